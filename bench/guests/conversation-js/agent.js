// conversation, in JavaScript: bench/guests/conversation/agent.c for `torpor bench
// conversation --agent conversation-js`. Input {"turns": N, "bytes": B, "tool": "llm" |
// "kv", "summarise": K}. Each turn appends a user message of B bytes of word-like text (a
// fixed PRNG, so every run writes the same bytes), sends the whole conversation to the
// tool (llm.chat's messages, or kv.set of the messages) and appends the answer; with
// K > 0 every K turns the oldest half of the history becomes one summary message. The
// conversation lives in the QuickJS heap, so every checkpoint carries what it changed.
// Output: {"turns": N, "bytes": <conversation bytes>, "check": <hash>}.
import { tool } from "torpor";

const WORDS = [
  "the", "agent", "tool", "model", "answer", "request", "memory", "store", "turn", "of",
  "and", "a", "to", "in", "is", "that", "for", "it", "with", "as", "was", "on", "be",
  "customer", "order", "invoice", "shipping", "delay", "refund", "policy", "account",
  "please", "check", "status", "thanks", "weather", "report", "summary", "meeting",
  "schedule", "budget", "quarter", "revenue", "forecast", "incident", "ticket", "user",
];

let rng = 0x9e3779b97f4a7c15n;
function nextRand() {
  rng ^= BigInt.asUintN(64, rng << 13n);
  rng ^= rng >> 7n;
  rng ^= BigInt.asUintN(64, rng << 17n);
  return rng;
}

function words(n) {
  let t = "";
  while (t.length < n) {
    t += WORDS[Number(nextRand() % BigInt(WORDS.length))];
    if (t.length < n) t += nextRand() % 13n === 0n ? "." : " ";
  }
  return t.slice(0, n);
}

export default async function main({ turns, bytes, tool: via = "llm", summarise = 0 }) {
  if (!Number.isInteger(turns) || turns < 0 || !Number.isInteger(bytes) || bytes < 1) {
    throw new TypeError('input needs "turns" >= 0 and "bytes" >= 1');
  }
  let messages = [];
  for (let t = 0; t < turns; t++) {
    if (summarise > 0 && t > 0 && t % summarise === 0) {
      const cut = Math.floor(messages.length / 2);
      const gone = JSON.stringify(messages.slice(0, cut)).length;
      messages = [{ role: "system", content: `summary of the conversation before turn ${t}: ${gone} bytes of ` +
                    "requests and answers" }, ...messages.slice(cut)];
    }
    messages.push({ role: "user", content: words(bytes) });
    if (via === "kv") {
      await tool("kv.set", { key: "conversation", value: messages });
      messages.push({ role: "assistant", content: "stored" });
    } else {
      const answer = await tool("llm.chat", { messages });
      messages.push({ role: "assistant", content: typeof answer.content === "string" ? answer.content : "" });
    }
  }
  const text = JSON.stringify(messages);
  let check = 0;
  for (let i = 0; i < text.length; i++) check = (Math.imul(check, 31) + text.charCodeAt(i)) >>> 0;
  return { turns, bytes: text.length, check };
}
