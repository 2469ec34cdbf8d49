"""conversation, in Python: bench/guests/conversation/agent.c for `torpor bench
conversation --agent conversation-py`. Input {"turns": N, "bytes": B, "tool": "llm" |
"kv", "summarise": K}. Each turn appends a user message of B bytes of word-like text (a
fixed PRNG, so every run writes the same bytes), sends the whole conversation to the tool
(llm.chat's messages, or kv.set of the messages) and appends the answer; with K > 0 every
K turns the oldest half of the history becomes one summary message. The conversation
lives in the CPython heap, so every checkpoint carries what it changed.
Output: {"turns": N, "bytes": <conversation bytes>, "check": <hash>}, the same as the C
and JavaScript agents'."""

import json
from typing import Any

import torpor

WORDS = [
    "the", "agent", "tool", "model", "answer", "request", "memory", "store", "turn", "of",
    "and", "a", "to", "in", "is", "that", "for", "it", "with", "as", "was", "on", "be",
    "customer", "order", "invoice", "shipping", "delay", "refund", "policy", "account",
    "please", "check", "status", "thanks", "weather", "report", "summary", "meeting",
    "schedule", "budget", "quarter", "revenue", "forecast", "incident", "ticket", "user",
]
MASK = (1 << 64) - 1


class Rng:
    """xorshift64, as the C and JavaScript agents draw it."""

    def __init__(self) -> None:
        self.state = 0x9E3779B97F4A7C15

    def next(self) -> int:
        x = self.state
        x ^= (x << 13) & MASK
        x ^= x >> 7
        x ^= (x << 17) & MASK
        self.state = x
        return x


def words(rng: Rng, n: int) -> str:
    parts: list[str] = []
    size = 0
    while size < n:
        w = WORDS[rng.next() % len(WORDS)]
        parts.append(w)
        size += len(w)
        if size < n:
            parts.append("." if rng.next() % 13 == 0 else " ")
            size += 1
    return "".join(parts)[:n]


async def main(input: Any) -> dict[str, int]:
    turns, size = input.get("turns"), input.get("bytes")
    via, summarise = input.get("tool", "llm"), input.get("summarise", 0)
    if not isinstance(turns, int) or turns < 0 or not isinstance(size, int) or size < 1:
        raise TypeError('input needs "turns" >= 0 and "bytes" >= 1')
    rng = Rng()
    messages: list[dict[str, str]] = []
    for t in range(turns):
        if summarise > 0 and t > 0 and t % summarise == 0:
            cut = len(messages) // 2
            gone = len(json.dumps(messages[:cut], separators=(",", ":")))
            messages = [{"role": "system", "content": f"summary of the conversation before turn {t}: {gone} bytes of "
                         "requests and answers"}, *messages[cut:]]
        messages.append({"role": "user", "content": words(rng, size)})
        if via == "kv":
            await torpor.tool("kv.set", {"key": "conversation", "value": messages})
            messages.append({"role": "assistant", "content": "stored"})
        else:
            answer = await torpor.tool("llm.chat", {"messages": messages})
            content = answer.get("content")
            messages.append({"role": "assistant", "content": content if isinstance(content, str) else ""})
    text = json.dumps(messages, separators=(",", ":"))
    check = 0
    for ch in text:
        check = (check * 31 + ord(ch)) & 0xFFFFFFFF
    return {"turns": turns, "bytes": len(text), "check": check}
