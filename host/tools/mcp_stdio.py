"""The stdio transport to an MCP server, with a size cap applied while the server's output is read.

The SDK's own ``stdio_client`` reads a line of any length into memory before it parses
it: a server that answers with 40 MB holds 40 MB (and several copies while it is
decoded and validated) in the host, and the call runs into its timeout meanwhile.  A
result larger than a guest may ever be told (:data:`MAX_MESSAGE_BYTES`) is useless, so
this transport stops keeping a line at the cap: the rest of it is read and dropped as it
arrives (the pipe must be drained, or the server blocks), and the request it answered
gets a JSON-RPC error at once, which :mod:`host.tools.mcp` names ``result_too_large``.
Memory stays bounded by the cap whatever the server sends.

The process gets exactly the environment it is given (``params.env``, built by
:func:`host.tools.mcp_config.server_env`: PATH, its own HOME, what the operator names and
the credentials the policy grants), never the SDK's default, which passes the host's HOME,
PATH, SHELL, USER and TERM on.  Everything else is the SDK's: the process is started and
stopped (its whole process tree) by the SDK's own helpers, exactly as ``stdio_client`` does.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel

log = logging.getLogger("torpor.mcp")

# Twice the guest's cap on a tool's answer (abi.MAX_RESPONSE, 1 MiB), plus room for the
# JSON-RPC envelope: a server that follows the spec's advice sends its structured result and
# the same again as text, and the guest is told it once (mcp.one_representation), so a
# message of twice the cap may still become an answer the guest reads; one over this never can.
MAX_MESSAGE_BYTES = 2 * (1 << 20) + 8192
TOO_LARGE = -32099  # a server error code (the JSON-RPC range -32000..-32099): the answer was cut at the cap
_ID = re.compile(rb'"id"\s*:\s*(-?\d+|"(?:[^"\\]|\\.){0,200}")')


def oversized_reply(head: bytes, size: int, cap: int) -> Any:
    """The JSON-RPC error that answers, in the server's place, the request whose answer
    (``head``: its first bytes) went over ``cap``; or an exception when ``head`` names no
    request (a notification: the session logs it)."""
    import json

    from mcp.shared.message import SessionMessage
    from mcp.types import ErrorData, JSONRPCError

    m = _ID.search(head)
    if m is None:
        return ValueError(f"the MCP server sent a message of more than {cap} bytes; it was dropped")
    request_id = json.loads(m.group(1))
    error = ErrorData(code=TOO_LARGE, message=f"the server's answer is more than {cap} bytes (read {size}); "
                                               "it was cut at the cap")
    return SessionMessage(JSONRPCError(jsonrpc="2.0", id=request_id, error=error))


@contextlib.asynccontextmanager
async def stdio_client(params: Any, errlog: Any, cap: int = MAX_MESSAGE_BYTES) -> AsyncIterator[tuple[Any, Any]]:
    """Start the server and yield the session's ``(read, write)`` streams (the SDK's
    ``stdio_client``, but a line over ``cap`` bytes is never held)."""
    from mcp.client import stdio as sdk
    from mcp.shared.message import SessionMessage

    command = await sdk._get_executable_command(params.command)
    process = await sdk._create_platform_compatible_process(
        command=command, args=params.args, env=dict(params.env or {}), errlog=errlog, cwd=params.cwd)
    read_writer, read_stream = anyio.create_memory_object_stream[SessionMessage | Exception](0)
    write_stream, write_reader = anyio.create_memory_object_stream[SessionMessage](0)
    writer_done = anyio.Event()

    async def stdout_reader() -> None:
        assert process.stdout is not None
        buffer = bytearray()
        dropping = 0  # bytes of an oversized line read so far (0: keeping lines)
        try:
            async with read_writer:
                try:
                    async for chunk in process.stdout:
                        while chunk:
                            nl = chunk.find(b"\n")
                            if dropping:
                                if nl < 0:
                                    dropping += len(chunk)
                                    break
                                log.info("MCP server: dropped an answer of %d bytes (over the cap)", dropping + nl)
                                dropping, chunk = 0, chunk[nl + 1:]
                                continue
                            part = chunk if nl < 0 else chunk[:nl]
                            if len(buffer) + len(part) > cap:
                                await read_writer.send(oversized_reply(bytes((buffer + part)[:512]),
                                                                       len(buffer) + len(part), cap))
                                buffer.clear()
                                if nl < 0:
                                    dropping = cap + 1
                                    break
                                chunk = chunk[nl + 1:]
                                continue
                            buffer += part
                            if nl < 0:
                                break
                            line, chunk = bytes(buffer), chunk[nl + 1:]
                            buffer.clear()
                            if line.strip():
                                await read_writer.send(sdk._parse_line(line.decode("utf-8", "replace")))
                except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                    return  # the session is gone
                finally:
                    await sdk._drain_stdout(process)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, ConnectionError):
            pass

    async def stdin_writer() -> None:
        assert process.stdin is not None
        try:
            async with write_reader:
                async for message in write_reader:
                    data = message.message.model_dump_json(by_alias=True, exclude_unset=True)
                    await process.stdin.send((data + "\n").encode())
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
            await read_writer.aclose()  # the session sees the connection end, not a hang
        finally:
            writer_done.set()

    async def shutdown() -> None:
        read_stream.close()
        write_stream.close()
        with anyio.move_on_after(sdk._WRITER_FLUSH_TIMEOUT):
            await writer_done.wait()
        await sdk._stop_server_process(process)
        await sdk._aclose_all(read_stream, write_stream, read_writer, write_reader)
        await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(stdout_reader)
        tg.start_soon(stdin_writer)
        try:
            yield read_stream, write_stream
        finally:
            with anyio.CancelScope(shield=True):  # the process is stopped whatever cancels us
                await shutdown()
            tg.cancel_scope.cancel()
