"""Pieces shared by the network tools (``llm.*``, ``http.*``): capped reads, secret
scrubbing, grant settings, and the mapping of transport failures to structured errors."""

from __future__ import annotations

import functools
import ssl
from collections.abc import Iterable, Mapping
from typing import Any

import certifi
import httpx

from host.tools.registry import ToolContext, ToolError
from policies.paths import locator

REDACTED = "[redacted]"
MIN_SECRET = 4  # shorter values would redact ordinary text; no real credential is this short


@functools.lru_cache(maxsize=1)
def tls_context() -> ssl.SSLContext:
    """One verifying TLS context for every call (certifi's CA bundle).

    Building a context loads the CA bundle, about 25 ms; the network tools make
    a fresh client per call (no connection is shared between agents), so they
    share this instead.  A context is safe to use from many connections.
    """
    return ssl.create_default_context(cafile=certifi.where())


def client(timeout: float) -> httpx.AsyncClient:
    """A client for one tool call: no proxies from the environment (they would
    resolve names behind the guard's back), no automatic redirects (each hop is
    checked by the caller), verified TLS."""
    return httpx.AsyncClient(trust_env=False, follow_redirects=False, timeout=timeout, verify=tls_context())


class ResponseTooLarge(Exception):
    """The body went past the cap; ``data`` holds the first ``cap`` bytes."""

    def __init__(self, data: bytes, cap: int) -> None:
        super().__init__(f"more than {cap} bytes")
        self.data = data
        self.cap = cap


async def read_capped(response: httpx.Response, cap: int) -> bytes:
    """Read a streamed body, decoded, stopping as soon as it passes ``cap`` bytes.

    The cap applies to the decoded bytes, so a small gzip bomb stops at the cap
    too; nothing past ``cap + one chunk`` is ever held in memory.
    """
    buf = bytearray()
    async for chunk in response.aiter_bytes():
        buf += chunk
        if len(buf) > cap:
            raise ResponseTooLarge(bytes(buf[:cap]), cap)
    return bytes(buf)


def secret_values(secrets: Mapping[str, str]) -> list[str]:
    """The secret values worth scrubbing, longest first (so a prefix never hides a longer one)."""
    return sorted({v for v in secrets.values() if isinstance(v, str) and len(v) >= MIN_SECRET}, key=len, reverse=True)


def scrub_text(text: str, values: Iterable[str]) -> str:
    """Replace every occurrence of a secret in text the guest will see.

    Servers echo credentials back (error messages quoting the bad key, echo
    endpoints returning the request's headers); whatever the guest receives is
    scrubbed so that a key the host injected never reaches agent code.
    """
    for v in values:
        if v in text:
            text = text.replace(v, REDACTED)
    return text


def scrub_bytes(data: bytes, values: Iterable[str]) -> bytes:
    for v in values:
        raw = v.encode()
        if raw in data:
            data = data.replace(raw, REDACTED.encode())
    return data


def scrub_json(value: Any, values: list[str]) -> Any:
    """Scrub every string (and key) of a JSON value."""
    if not values:
        return value
    if isinstance(value, str):
        return scrub_text(value, values)
    if isinstance(value, list):
        return [scrub_json(v, values) for v in value]
    if isinstance(value, dict):
        return {scrub_text(str(k), values): scrub_json(v, values) for k, v in value.items()}
    return value


def grant_of(ctx: ToolContext, tool: str) -> Any:
    """The call's grant; a tool that reaches the network never runs without one."""
    if ctx.grant is None:
        raise ToolError("denied", f"{tool}: no grant for this tool", rule="tools", reason_code="not_granted")
    return ctx.grant


def rule(tool: str, key: str) -> str:
    """The rule locator of a grant setting, as the policy file reads: ``tools."http.fetch".hosts``."""
    return locator("tools", tool, key)


def transport_error(tool: str, exc: Exception, what: str) -> ToolError:
    """A structured error for an httpx failure: timeouts, refused connections, broken responses."""
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        return ToolError("timeout", f"{tool}: {what} did not answer in time", retryable=True)
    if isinstance(exc, httpx.ConnectError):
        return ToolError(
            "unavailable", f"{tool}: cannot connect to {what}: {exc}", retryable=True, reason_code="connect_failed"
        )
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError):
        return ToolError(
            "unavailable",
            f"{tool}: {what} broke off or sent a malformed response: {exc}",
            retryable=True,
            reason_code="bad_response",
        )
    if isinstance(exc, httpx.DecodingError):
        return ToolError("tool_failed", f"{tool}: {what} sent a body that does not decode: {exc}", reason_code="bad_response")
    return ToolError("unavailable", f"{tool}: {what} failed: {type(exc).__name__}: {exc}", retryable=True)
