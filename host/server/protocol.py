"""The server's HTTP/1.1 connections: uvicorn's httptools protocol, one ``send`` per answer.

uvicorn writes a response's head when the application sends ``http.response.start`` and its
body when it sends ``http.response.body``: two ``send`` system calls on the socket for every
answer, each of which on loopback also runs the receiving side's TCP work and wakes the
client. :class:`HttpProtocol` gives uvicorn's request cycle a transport whose writes made in
one step of the event loop go out together, in one ``send`` at the end of that step (a
callback scheduled with the first write; a close flushes first; a complete answer at once).
Nothing is held back past the step that wrote it: a streamed answer (server-sent events)
still goes out event by event.

Everything else is uvicorn's, unchanged: parsing (httptools, in C), keep-alive, flow control,
pipelining.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class CoalescingTransport:
    """``transport`` as a request cycle writes to it: writes within one loop step, one ``send``.

    Only :meth:`write` and :meth:`close` differ from the transport's own; every other attribute
    (``is_closing``, ``get_extra_info``, ``pause_reading``...) is the transport's."""

    __slots__ = ("_loop", "_pending", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._pending is None:
            self._pending = [bytes(data)]
            self._loop.call_soon(self.flush)
        else:
            self._pending.append(bytes(data))

    def flush(self) -> None:
        """Write what this step wrote, as one write of the transport (a no-op when nothing waits)."""
        pending, self._pending = self._pending, None
        if pending and not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self.flush()  # what was written before the close goes out before it
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol whose answers leave in one ``send`` (see the module docstring)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # The flow control keeps the real transport (it pauses and resumes reading on it);
        # the request cycles, created from self.transport per request, get the coalescing one.
        self.transport = CoalescingTransport(transport, self.loop)  # type: ignore[assignment]

    def on_response_complete(self) -> None:
        # The answer is whole: it leaves now, not after what else this loop step runs.
        if isinstance(self.transport, CoalescingTransport):
            self.transport.flush()
        super().on_response_complete()
