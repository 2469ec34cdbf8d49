"""How the host reaches one MCP server: a process over stdio, or a URL over streamable HTTP.

:class:`ServerConfig` is what a policy's ``[mcp.NAME]`` comes to on this host, once the
operator config said how to start or reach it and its ``{credential}`` placeholders are
filled on the host side (:func:`host.tools.mcp_config.resolve`); equal configurations
share one connection (:mod:`host.tools.mcp`).  :func:`connect` opens the
transport and yields the SDK's stream pair; the supervisor puts a session on it.

Streamable HTTP goes through the ``mcp`` SDK's client, whose requests follow a
redirect only within the endpoint's origin, so the headers filled from the vault
(``Authorization = "Bearer {token}"``) reach that host and no other.  A remote
that dies in the middle of a call ends the call's response stream; the SDK
resolves the call with an error at once, which :mod:`host.tools.mcp` names
``server_crashed`` (not a timeout seconds later).  Both transports stop reading a message
at :data:`~host.tools.mcp_stdio.MAX_MESSAGE_BYTES` (stdio: :mod:`host.tools.mcp_stdio`;
HTTP: the SDK's cap on one server-sent event).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from host.tools.mcp_stdio import MAX_MESSAGE_BYTES, stdio_client

DEFAULT_STARTUP_TIMEOUT_S = 10.0
HTTP_CONNECT_TIMEOUT_S = 10.0
# A response stream may stay quiet while a long tool runs; the call's own timeout (and its
# progress) decide how long a call may take, so the read timeout only catches a dead peer.
HTTP_READ_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class ServerConfig:
    """How to start or reach one server; equal configurations share one connection."""

    name: str
    command: str | None = None
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    cwd: str | None = None
    url: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    roots: tuple[str, ...] = ()
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT_S
    home: str | None = None  # the server's own HOME directory, made (0700) before it starts

    @property
    def remote(self) -> bool:
        """A streamable-HTTP server (no process of ours)."""
        return self.url is not None

    def where(self) -> str:
        """The server as people name it in a message: its URL, or its command."""
        return self.url if self.url is not None else " ".join((self.command or "", *self.args))


@contextlib.asynccontextmanager
async def connect(config: ServerConfig, errlog: Any) -> AsyncIterator[tuple[Any, Any]]:
    """The transport's ``(read, write)`` streams, open until the block ends.

    stdio: the process is started here (no shell; ``env`` is its whole environment, its
    ``home`` made first) and its stderr goes to ``errlog``; it is stopped when the block ends.
    Streamable HTTP: one HTTP client with the configured headers; the session is
    ended (``DELETE``) when the block ends.
    """
    if config.url is not None:
        import httpx2
        from mcp.client.streamable_http import streamable_http_client

        timeout = httpx2.Timeout(HTTP_CONNECT_TIMEOUT_S, read=HTTP_READ_TIMEOUT_S)
        transport = _capped_transport(httpx2.AsyncHTTPTransport(), MAX_MESSAGE_BYTES)
        async with (
            httpx2.AsyncClient(headers=dict(config.headers), timeout=timeout, transport=transport) as http,
            streamable_http_client(config.url, http_client=http, max_sse_event_size=MAX_MESSAGE_BYTES) as (read, write),
        ):
            yield read, write
        return
    from mcp import StdioServerParameters

    assert config.command is not None
    if config.home is not None:
        _make_home(config.home)
    params = StdioServerParameters(command=config.command, args=list(config.args), env=dict(config.env),
                                   cwd=config.cwd)
    async with stdio_client(params, errlog) as (read, write):
        yield read, write


def _make_home(home: str) -> None:
    """The server's HOME, its own and private (0700), made before it starts."""
    import os

    try:
        os.makedirs(home, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise RuntimeError(f"cannot make its HOME {home}: {exc.strerror or exc}") from None


def _capped_transport(inner: Any, cap: int) -> Any:
    """An HTTP transport whose JSON answers stop being read at ``cap`` bytes.

    A server may answer a call with one JSON body instead of an event stream; the SDK reads
    that body whole.  Here it is read through a counter that fails past the cap (a
    ``StreamError``, which the SDK turns into the call's error), so a 40 MB body costs the
    host at most the cap.  Event streams are capped per event by the SDK itself
    (``max_sse_event_size``) and may run long in all, so they pass untouched.
    """
    import httpx2

    class TooLarge(httpx2.StreamError):
        pass

    class Capped(httpx2.AsyncByteStream):
        def __init__(self, stream: Any) -> None:
            self.stream = stream

        async def __aiter__(self) -> AsyncIterator[bytes]:
            seen = 0
            async for chunk in self.stream:
                seen += len(chunk)
                if seen > cap:
                    raise TooLarge(f"the answer went over the {cap}-byte limit; it was cut there")
                yield chunk

        async def aclose(self) -> None:
            await self.stream.aclose()

    class Transport(httpx2.AsyncBaseTransport):
        async def handle_async_request(self, request: Any) -> Any:
            response = await inner.handle_async_request(request)
            if not response.headers.get("content-type", "").lower().startswith("application/json"):
                return response
            return httpx2.Response(status_code=response.status_code, headers=response.headers,
                                   stream=Capped(response.stream), extensions=response.extensions)

        async def aclose(self) -> None:
            await inner.aclose()

    return Transport()


def stderr_file() -> Any:
    """Where a stdio server's stderr goes: a temporary file whose tail is logged when it stops."""
    return tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace")
