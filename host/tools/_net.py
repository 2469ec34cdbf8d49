"""Pieces shared by the network tools (``llm.*``, ``http.*``): capped reads, the hosts a
secret is bound to, grant settings, and the mapping of transport failures to structured
errors. (Scrubbing secrets from what a tool returns is not a tool's job: the pipeline does
it for every tool, :mod:`host.trust.scrub`.)"""

from __future__ import annotations

import functools
import ssl
from collections.abc import Iterable
from typing import Any

import certifi
import httpx

from host.tools import netguard
from host.tools.registry import ToolContext, ToolError
from policies.paths import locator


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


def check_bound(tool: str, ctx: ToolContext, names: Iterable[str], target: netguard.Target) -> None:
    """Refuse to send a secret to a host outside the operator's binding (``torpor secrets set
    NAME --host H``), whatever the bundle's policy grants: a host that may not receive it
    cannot echo it either. An unbound secret goes only where the grant allows."""
    for name in names:
        hosts = ctx.secret_hosts.get(name) or ()
        if hosts and not netguard.host_allowed(target, hosts):
            raise ToolError(
                "denied", f"{tool}: the credential {name!r} is bound to {', '.join(hosts)}; it is never sent to "
                f"{target.netloc}", reason_code="credential_host_not_allowed", rule=f"secrets.{name}.hosts",
                host=target.netloc,
            )


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
