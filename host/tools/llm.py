"""``llm.chat``: chat completions from the LLM a policy names, with token accounting.

The guest sends messages; the grant decides everything else: where the
requests go (``base_url``), which model answers (``model``, plus the
alternatives in ``models`` the guest may pick), with which credential (leased
by the host per call, sent as a header, never shown to the guest), how many
tokens one answer may use (``max_tokens``), how long to wait (``timeout``,
per attempt) and how often to retry (``retries``).

Two wire formats: ``provider = "openai"`` (default; any OpenAI-compatible
``/chat/completions`` server: OpenAI, vLLM, llama.cpp, Ollama, LiteLLM ...) and
``provider = "anthropic"`` (the Messages API).  Both answer the guest in one
shape, OpenAI's::

    {"model": "...", "message": {"role": "assistant", "content": "..."},
     "content": "...", "finish_reason": "stop",
     "usage": {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42}}

**Tokens.**  Each answer is charged against the agent's token budget
(``ctx.report_tokens``) before the result is returned, even when the rest of
the answer is unusable: the larger of what the server reports and what the
host counts itself (UTF-8 bytes of the prompt and of the answer, 4 a token,
rounded up; :func:`charge`).  A server whose usage is missing, inconsistent (a
zero total beside non-zero parts), fractional or lower than the host's count
is charged the host's figures and the result says ``"estimated": true``: a
budget cannot be dodged by a misbehaving or proxied server.

**Retries.**  429 and 5xx answers, refused connections and broken responses
are retried up to ``retries`` times (default 2) with exponential backoff, or
after the server's ``Retry-After`` when it sends one (capped at
:data:`MAX_RETRY_WAIT_S`; a longer demand ends the call at once with a
``rate_limited`` error carrying ``retry_after_s``).  The agent is hibernated
throughout.  When the retries run out the guest gets ``rate_limited`` (for
429) or ``unavailable``, both ``retryable``.  Timeouts are not retried: a hung
server would only multiply the wait.
"""

from __future__ import annotations

import email.utils
import json
import math
import random
import time
from typing import Any, Literal

import anyio
import httpx
from pydantic import BaseModel, ConfigDict, Field

from host.tools import netguard
from host.tools._net import (
    ResponseTooLarge,
    check_bound,
    grant_of,
    read_capped,
    rule,
    transport_error,
)
from host.tools._net import (
    client as new_client,
)
from host.tools.registry import ToolContext, ToolError

DEFAULT_TIMEOUT_S = 60.0
DEFAULT_RETRIES = 2
DEFAULT_MAX_BYTES = 1 << 20
DEFAULT_ANTHROPIC_MAX_TOKENS = 1024
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 8.0
MAX_RETRY_WAIT_S = 30.0
ANTHROPIC_VERSION = "2023-06-01"
CHARS_PER_TOKEN = 4


class ChatMessage(BaseModel):
    """One message, OpenAI style.  ``content`` is text or a list of content parts."""

    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = Field(default=None, max_length=64)
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ChatArgs(BaseModel):
    """Arguments of ``llm.chat``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    messages: list[ChatMessage] = Field(min_length=1, max_length=1000)
    model: str | None = None
    max_tokens: int | None = Field(default=None, gt=0)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None


class _Retry(Exception):
    """An attempt failed in a way worth another try."""

    def __init__(self, error: ToolError, wait: float | None) -> None:
        super().__init__(str(error))
        self.error = error
        self.wait = wait


def retry_after(response: httpx.Response, now: float | None = None) -> float | None:
    """Seconds the server asks us to wait (``Retry-After``: seconds or an HTTP date), or None."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        secs = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value).timestamp()
        except (TypeError, ValueError, IndexError):
            return None
        secs = when - (time.time() if now is None else now)
    if math.isnan(secs) or math.isinf(secs):
        return None
    return max(0.0, secs)


def backoff(attempt: int) -> float:
    """Exponential backoff with full jitter: spreads a crowd of agents retrying together."""
    return random.uniform(0, min(BACKOFF_MAX_S, BACKOFF_BASE_S * (2**attempt)))


def _choose_model(tool: str, args: ChatArgs, grant: Any) -> str:
    default = str(grant.model)
    allowed = (default, *tuple(getattr(grant, "models", ()) or ()))
    if args.model is None or args.model == default:
        return default
    if args.model in allowed:
        return args.model
    raise ToolError(
        "denied",
        f"{tool}: model {args.model!r} is not granted (allowed: {', '.join(allowed)})",
        rule=rule(tool, "model"),
        reason_code="model_not_allowed",
    )


def _key_name(grant: Any) -> str | None:
    name = getattr(grant, "api_key", None)
    creds = tuple(getattr(grant, "credentials", ()) or ())
    if name is None and len(creds) == 1:
        name = creds[0]
    return name if isinstance(name, str) else None


def _api_key(grant: Any, secrets: dict[str, str]) -> str | None:
    name = _key_name(grant)
    if name is None:
        return None  # a local server without authentication
    key = secrets.get(name)
    if key is None:
        raise ToolError(
            "unavailable", f"the credential {name!r} was not provided by the host", reason_code="credential_missing"
        )
    return key


def _openai_request(args: ChatArgs, model: str, max_tokens: int | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [m.model_dump(exclude_none=True) for m in args.messages],
        "stream": False,
    }
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    for k in ("temperature", "top_p", "stop", "seed", "response_format", "tools", "tool_choice"):
        v = getattr(args, k)
        if v is not None:
            body[k] = v
    return body


def _anthropic_request(tool: str, args: ChatArgs, model: str, max_tokens: int | None) -> dict[str, Any]:
    if args.tools is not None or args.tool_choice is not None or args.response_format is not None:
        raise ToolError("invalid_args", f"{tool}: tools, tool_choice and response_format need provider openai")
    system: list[str] = []
    messages: list[dict[str, Any]] = []
    for m in args.messages:
        if m.role in ("system", "developer"):
            if isinstance(m.content, str):
                system.append(m.content)
            continue
        if m.role not in ("user", "assistant"):
            raise ToolError("invalid_args", f"{tool}: role {m.role!r} needs provider openai")
        messages.append({"role": m.role, "content": m.content if m.content is not None else ""})
    if not messages:
        raise ToolError("invalid_args", f"{tool}: at least one user message is needed")
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens or DEFAULT_ANTHROPIC_MAX_TOKENS,
        "messages": messages,
    }
    if system:
        body["system"] = "\n\n".join(system)
    if args.temperature is not None:
        body["temperature"] = args.temperature
    if args.top_p is not None:
        body["top_p"] = args.top_p
    if args.stop is not None:
        body["stop_sequences"] = [args.stop] if isinstance(args.stop, str) else args.stop
    return body


def _host_count(text: str) -> int:
    """The host's own count of a text's tokens: its UTF-8 bytes over :data:`CHARS_PER_TOKEN`,
    rounded up (about what BPE tokenizers give for English; for other scripts a token is
    fewer bytes, and a server reporting more is charged its higher figure)."""
    return math.ceil(len(text.encode("utf-8", "replace")) / CHARS_PER_TOKEN)


def _host_prompt(args: ChatArgs) -> int:
    total = 0
    for m in args.messages:
        total += _host_count(m.content) if isinstance(m.content, str) else _host_count(json.dumps(m.content or ""))
        if m.tool_calls:
            total += _host_count(json.dumps(m.tool_calls))
    if args.tools:
        total += _host_count(json.dumps(args.tools))
    return total


def _int(v: Any) -> int | None:
    """A reported token count, rounded up; None when it is not a count (negative, non-finite, not a number)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    if isinstance(v, float):
        return math.ceil(v) if math.isfinite(v) and v >= 0 else None
    return v if v >= 0 else None


def _integral(*vs: Any) -> bool:
    return all(v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0) for v in vs)


def _detail(usage: dict[str, Any], model: str, provider: str) -> dict[str, Any]:
    """What a token report says beyond its total (audited with it; the GenAI attributes of
    the call's trace span): the model that answered, the provider, input and output tokens."""
    return {"model": model, "provider": provider, "input_tokens": int(usage["prompt_tokens"]),
            "output_tokens": int(usage["completion_tokens"])}


def charge(reported: dict[str, Any] | None, host_prompt: int, host_completion: int) -> dict[str, Any]:
    """The usage charged for one answer: the larger of what the server reports and what the host counts.

    The server's figures stand when they are whole, consistent (a total no smaller than
    its parts) and no lower than the host's count; otherwise each part is the larger of
    the two, the total their sum (or the server's larger total), and the usage says
    ``"estimated": true`` with the server's own figures under ``"reported"``. A token
    budget cannot be dodged by a server that leaves usage out, reports a zero total
    beside non-zero parts, or sends fractions.
    """
    host_total = host_prompt + host_completion
    if reported is None:
        return {"prompt_tokens": host_prompt, "completion_tokens": host_completion,
                "total_tokens": max(1, host_total), "estimated": True}
    p, c, t = reported["prompt_tokens"], reported["completion_tokens"], reported["total_tokens"]
    sound = bool(reported.get("sound", True)) and t >= p + c
    if sound and t >= host_total and p >= host_prompt:
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": t}
    prompt, completion = max(p, host_prompt), max(c, host_completion)
    clean = {k: v for k, v in reported.get("raw", {}).items() if isinstance(v, int | float) and not isinstance(v, bool)}
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": max(t, prompt + completion),
            "estimated": True, "reported": clean}


def _openai_answer(data: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(result without usage, usage or None).  Raises ValueError on a malformed answer."""
    if not isinstance(data, dict):
        raise ValueError("the answer is not a JSON object")
    usage = _openai_usage(data.get("usage"))
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise _Malformed("the answer has no choices", usage)
    message = choices[0].get("message")
    if not isinstance(message, dict) or message.get("role", "assistant") != "assistant":
        raise _Malformed("choices[0].message is missing or not an assistant message", usage)
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        raise _Malformed("choices[0].message.content is not a string", usage)
    kept: dict[str, Any] = {"role": "assistant"}
    kept.update((k, v) for k, v in message.items() if k in ("role", "content", "tool_calls", "refusal"))
    out = {
        "id": data.get("id") if isinstance(data.get("id"), str) else None,
        "model": data.get("model") if isinstance(data.get("model"), str) else None,
        "message": kept,
        "content": content,
        "finish_reason": choices[0].get("finish_reason"),
    }
    return out, usage


def _openai_usage(u: Any) -> dict[str, Any] | None:
    if not isinstance(u, dict):
        return None
    raw = {k: u.get(k) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    p, c, t = _int(raw["prompt_tokens"]), _int(raw["completion_tokens"]), _int(raw["total_tokens"])
    if t is None and p is None and c is None:
        return None
    p, c = p or 0, c or 0
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": t if t is not None else p + c,
            "sound": _integral(*raw.values()), "raw": raw}


_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls"}


def _anthropic_answer(data: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    if not isinstance(data, dict):
        raise ValueError("the answer is not a JSON object")
    usage = None
    u = data.get("usage")
    if isinstance(u, dict):
        keys = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
        raw = {k: u.get(k) for k in keys}
        i, o = _int(raw["input_tokens"]), _int(raw["output_tokens"])
        cache = sum(_int(raw[k]) or 0 for k in keys[2:])
        if i is not None or o is not None:
            usage = {"prompt_tokens": (i or 0) + cache, "completion_tokens": o or 0,
                     "total_tokens": (i or 0) + cache + (o or 0), "sound": _integral(*raw.values()), "raw": raw}
    blocks = data.get("content")
    if not isinstance(blocks, list):
        raise _Malformed("the answer has no content blocks", usage)
    text = "".join(b.get("text", "") for b in blocks if isinstance(b, dict) and b.get("type") == "text"
                   and isinstance(b.get("text"), str))
    stop = data.get("stop_reason")
    out = {
        "id": data.get("id") if isinstance(data.get("id"), str) else None,
        "model": data.get("model") if isinstance(data.get("model"), str) else None,
        "message": {"role": "assistant", "content": text},
        "content": text,
        "finish_reason": _FINISH.get(stop, stop) if isinstance(stop, str) else None,
    }
    return out, usage


class _Malformed(ValueError):
    """A malformed answer that still reported its usage (the tokens were spent)."""

    def __init__(self, message: str, usage: dict[str, Any] | None) -> None:
        super().__init__(message)
        self.usage = usage


async def chat(args: ChatArgs, ctx: ToolContext, *, tool: str = "llm.chat") -> dict[str, Any]:
    """One chat completion, retried within bounds, its tokens reported before it returns."""
    grant = grant_of(ctx, tool)
    provider = getattr(grant, "provider", None) or "openai"
    model = _choose_model(tool, args, grant)
    cap = getattr(grant, "max_tokens", None)
    max_tokens = args.max_tokens if cap is None else min(args.max_tokens or cap, cap)
    timeout = float(getattr(grant, "timeout", None) or DEFAULT_TIMEOUT_S)
    retries = getattr(grant, "retries", None)
    retries = DEFAULT_RETRIES if retries is None else int(retries)
    limit = int(getattr(grant, "max_response_bytes", None) or DEFAULT_MAX_BYTES)
    key = _api_key(grant, ctx.secrets)
    base = str(grant.base_url).rstrip("/")
    if key is not None:
        check_bound(tool, ctx, [_key_name(grant) or ""], netguard.parse_url(base + "/"))
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if provider == "anthropic":
        url, body = base + "/messages", _anthropic_request(tool, args, model, max_tokens)
        headers["anthropic-version"] = ANTHROPIC_VERSION
        if key is not None:
            headers["x-api-key"] = key
    else:
        url, body = base + "/chat/completions", _openai_request(args, model, max_tokens)
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
    payload = json.dumps(body, separators=(",", ":")).encode()

    async with new_client(timeout) as client:
        attempt = 0
        while True:
            try:
                data = await _attempt(client, tool, url, headers, payload, timeout, limit)
                break
            except _Retry as r:
                if attempt >= retries:
                    err = r.error
                    err.details["attempts"] = attempt + 1
                    raise err from None
                wait = backoff(attempt) if r.wait is None else r.wait
                if wait > MAX_RETRY_WAIT_S:
                    err = r.error
                    err.details.update(attempts=attempt + 1, retry_after_s=wait)
                    raise err from None
                attempt += 1
                await anyio.sleep(wait)

    parse = _anthropic_answer if provider == "anthropic" else _openai_answer
    host_prompt = _host_prompt(args)
    try:
        result, usage = parse(data)
    except ValueError as exc:
        spent = getattr(exc, "usage", None)
        if spent is not None:
            spent = charge(spent, host_prompt, 0)
            ctx.report_tokens(int(spent["total_tokens"]), **_detail(spent, model, provider))
        raise ToolError(
            "tool_failed", f"{tool}: malformed answer from the LLM server: {exc}", reason_code="bad_response",
            tokens=spent["total_tokens"] if spent else 0,
        ) from None
    usage = charge(usage, host_prompt, _host_count(result["content"] or "")
                   + (_host_count(json.dumps(result["message"]["tool_calls"])) if result["message"].get("tool_calls") else 0))
    ctx.report_tokens(int(usage["total_tokens"]), **_detail(usage, result["model"] or model, provider))
    result["usage"] = usage
    result["model"] = result["model"] or model
    result["attempts"] = attempt + 1
    return result


async def _attempt(
    client: httpx.AsyncClient, tool: str, url: str, headers: dict[str, str], payload: bytes, timeout: float,
    limit: int,
) -> Any:
    """One request: the parsed JSON answer, a ``_Retry`` for retryable failures, or a ToolError."""
    try:
        with anyio.fail_after(timeout):
            async with client.stream("POST", url, headers=headers, content=payload) as response:
                status = response.status_code
                if status == 429 or status >= 500:
                    code = "rate_limited" if status == 429 else "unavailable"
                    what = "rate limited the call" if status == 429 else f"answered {status}"
                    raise _Retry(
                        ToolError(code, f"{tool}: the LLM server {what}", retryable=True, status=status),
                        retry_after(response),
                    )
                try:
                    raw = await read_capped(response, limit)
                except ResponseTooLarge:
                    raise ToolError(
                        "result_too_large", f"{tool}: the LLM server's answer is larger than {limit} bytes",
                        limit=limit, reason_code="response_too_large",
                    ) from None
    except TimeoutError:
        raise ToolError("timeout", f"{tool}: the LLM server did not answer within {timeout:g}s", retryable=True) from None
    except httpx.TimeoutException as exc:
        raise transport_error(tool, exc, "the LLM server") from None
    except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
        raise _Retry(transport_error(tool, exc, "the LLM server"), None) from None
    except httpx.HTTPError as exc:
        raise transport_error(tool, exc, "the LLM server") from None
    if status >= 400:
        raise ToolError(
            "tool_failed", f"{tool}: the LLM server refused the request ({status}): {_error_text(raw)}",
            status=status, reason_code="upstream_error",
        )
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ToolError(
            "tool_failed", f"{tool}: the LLM server's answer is not JSON: {exc}", reason_code="bad_response"
        ) from None


def _error_text(raw: bytes) -> str:
    """The upstream error message (OpenAI/Anthropic shape, else the text), short (the pipeline
    scrubs it, a secret's prefix at the cut included)."""
    text = raw.decode("utf-8", "replace")
    try:
        data = json.loads(text)
        err = data.get("error") if isinstance(data, dict) else None
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            text = err["message"]
        elif isinstance(err, str):
            text = err
    except ValueError:
        pass
    return text[:500]


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
