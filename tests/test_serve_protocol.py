"""The server's HTTP/1.1 connections (host/server/protocol.py and ``uvicorn_config``), against a
real uvicorn on 127.0.0.1 read through a raw socket: an answer leaves in one ``send`` (head
and body arrive together), a close still sends what was written before it, and an idle
keep-alive connection outlives a pooled client's own idle expiry (so the client closes it
first and never sends a request into the server's close); and the answers' JSON
(host/server/responses.py: orjson, the standard library for what orjson refuses)."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from serve_helpers import InProcessServer, token

from host.server.app import KEEP_ALIVE_S, uvicorn_config
from host.server.protocol import CoalescingTransport, HttpProtocol


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    with InProcessServer(tmp_path_factory.mktemp("protocol") / "store") as srv:
        yield srv


def _connect(srv: InProcessServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _get(sock: socket.socket, path: str) -> bytes:
    """One request; the first ``recv`` of its answer, as it arrived (not read to completion)."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    return sock.recv(1 << 16)


def _whole(chunk: bytes) -> bool:
    head, sep, body = chunk.partition(b"\r\n\r\n")
    length = [int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
    return bool(sep) and length == [len(body)]


def test_an_answer_arrives_whole_in_one_read(server: InProcessServer) -> None:
    """Head and body are written as one ``send``: the client's first read has all of it (two
    ``send``s wake a reading client with the head alone), answer after answer on one
    connection, for a route behind the gateway too (its 401 is an answer like another)."""
    with _connect(server) as sock:
        for _ in range(20):
            chunk = _get(sock, "/healthz")
            assert chunk.startswith(b"HTTP/1.1 200") and _whole(chunk), chunk
            chunk = _get(sock, "/v1/agents")
            assert chunk.startswith(b"HTTP/1.1 401") and _whole(chunk) and b'"unauthenticated"' in chunk, chunk


def test_an_idle_connection_outlives_a_pooled_clients_expiry(server: InProcessServer) -> None:
    """Kept past httpx's 5 s idle expiry (and a load balancer's 60 s): a client closes an idle
    connection before the server does, so no request of its is sent into the server's close
    (the 1,000-request test's ``ReadError``: uvicorn's own 5 s raced httpx's 5 s)."""
    import httpx

    assert KEEP_ALIVE_S > 60 and uvicorn_config(server.app, host="127.0.0.1", port=1).timeout_keep_alive == KEEP_ALIVE_S
    assert httpx.Limits().keepalive_expiry is not None and httpx.Limits().keepalive_expiry < KEEP_ALIVE_S
    with _connect(server) as sock:
        assert _whole(_get(sock, "/healthz"))
        time.sleep(6.0)  # past httpx's expiry and uvicorn's default
        chunk = _get(sock, "/healthz")
        assert chunk.startswith(b"HTTP/1.1 200") and _whole(chunk), chunk


def test_writes_of_one_loop_step_go_out_together_and_a_close_flushes_first() -> None:
    """The transport itself, on a real socket pair: two writes in one step are one ``send``
    at the end of the step; a write followed by a close still goes out, before the close."""

    async def main() -> tuple[bytes, bytes, bytes]:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        b.setblocking(False)
        transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, a)
        t = CoalescingTransport(transport, loop)
        t.write(b"head,")
        t.write(bytearray(b"body"))
        await asyncio.sleep(0)  # the write is still held: it leaves at the end of this step
        await asyncio.sleep(0.05)
        first = await loop.sock_recv(b, 1 << 16)
        t.write(b"last")
        assert t.is_closing() is False  # anything else is the transport's own
        t.close()
        await asyncio.sleep(0.05)
        second = await loop.sock_recv(b, 1 << 16)
        eof = await loop.sock_recv(b, 1 << 16)
        b.close()
        return first, second, eof

    first, second, eof = asyncio.run(main())
    assert (first, second, eof) == (b"head,body", b"last", b"")


def test_the_servers_connections_speak_through_this_protocol(server: InProcessServer) -> None:
    """`torpor serve` and the tests' servers get the same protocol from ``uvicorn_config``: each
    connection an :class:`HttpProtocol` whose request cycles write to the coalescing transport."""
    assert server.server.config.http is HttpProtocol
    with _connect(server) as sock:
        assert _whole(_get(sock, "/healthz"))
        port = sock.getsockname()[1]
        [conn] = [p for p in server.server.server_state.connections if p.client and p.client[1] == port]
        assert isinstance(conn, HttpProtocol) and isinstance(conn.transport, CoalescingTransport)


def test_answers_are_the_json_they_were_orjson_or_not() -> None:
    """The answers' JSON (orjson) decodes to what the standard library's did, and what orjson
    refuses (an integer past 64 bits, a key that is not a string) is still answered."""
    import json

    from host.server.responses import encode, json_response

    values = [{"agent_id": "a", "output": {"greeting": "hello, ada"}, "n": 2**63 - 1, "f": 0.1, "none": None,
               "list": [1, "two", [3.5]], "t": (1, 2), "s": "é\u2028\"\\"}, {"big": 2**80}, {1: "int key"},
              {"odd": {2.5: Path("/x")}}]
    for v in values:
        assert json.loads(encode(v)) == json.loads(json.dumps(v, default=str)), v
    assert json.loads(encode({"big": 2**80})) == {"big": 2**80}
    r = json_response({"big": 2**80}, 201)
    assert r.status_code == 201 and r.headers["content-type"] == "application/json"
    assert json.loads(bytes(r.body)) == {"big": 2**80}


def test_a_client_that_hangs_up_mid_body_is_no_internal_error(server: InProcessServer,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """A request whose client goes away before its body is read whole is nobody's error: no
    "internal error" with a traceback in the server's log, and the server answers the next."""
    secret = token(server.host.store, "acme", "runs:write")
    with caplog.at_level(logging.INFO, logger="torpor.server"):
        for _ in range(3):
            with _connect(server) as sock:
                sock.sendall(b"POST /v1/runs HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                             b"Authorization: Bearer " + secret.encode() + b"\r\nContent-Length: 1000\r\n\r\n"
                             b'{"agent": "hel')
                time.sleep(0.2)  # the route is reading the body when the client goes
        with _connect(server) as sock:
            assert _get(sock, "/healthz").startswith(b"HTTP/1.1 200")
    assert not [r for r in caplog.records if "internal error" in r.getMessage() or r.exc_info], caplog.text
