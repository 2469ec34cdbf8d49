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

**Tokens.**  The usage each response reports is counted against the agent's
token budget (``ctx.report_tokens``) before the result is returned, even when
the rest of the answer is unusable.  A server that reports no usage is
charged an estimate (4 characters a token) and the result says
``"estimated": true``: a budget cannot be dodged by leaving usage out.

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


def _estimate(args: ChatArgs, answer_text: str) -> int:
    chars = len(answer_text)
    for m in args.messages:
        chars += len(m.content) if isinstance(m.content, str) else len(json.dumps(m.content or ""))
    return max(1, math.ceil(chars / CHARS_PER_TOKEN))


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


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
    p, c, t = _int(u.get("prompt_tokens")), _int(u.get("completion_tokens")), _int(u.get("total_tokens"))
    if t is None and p is None and c is None:
        return None
    p, c = p or 0, c or 0
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": t if t is not None else p + c}


_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls"}


def _anthropic_answer(data: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    if not isinstance(data, dict):
        raise ValueError("the answer is not a JSON object")
    usage = None
    u = data.get("usage")
    if isinstance(u, dict):
        i, o = _int(u.get("input_tokens")), _int(u.get("output_tokens"))
        cache = sum(_int(u.get(k)) or 0 for k in ("cache_creation_input_tokens", "cache_read_input_tokens"))
        if i is not None or o is not None:
            usage = {"prompt_tokens": (i or 0) + cache, "completion_tokens": o or 0,
                     "total_tokens": (i or 0) + cache + (o or 0)}
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
    try:
        result, usage = parse(data)
    except ValueError as exc:
        spent = getattr(exc, "usage", None)
        if spent is not None:
            ctx.report_tokens(int(spent["total_tokens"]))
        raise ToolError(
            "tool_failed", f"{tool}: malformed answer from the LLM server: {exc}", reason_code="bad_response",
            tokens=spent["total_tokens"] if spent else 0,
        ) from None
    if usage is None:
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": _estimate(args, result["content"] or ""),
                 "estimated": True}
    ctx.report_tokens(int(usage["total_tokens"]))
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
