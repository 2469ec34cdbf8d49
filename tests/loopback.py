"""Loopback HTTP servers for the tool tests: real sockets on 127.0.0.1, real HTTP, any
misbehaviour on request.

A :class:`Loopback` runs a ``ThreadingHTTPServer`` in a daemon thread on an
ephemeral port.  Each route is a function ``(req) -> Reply``; a :class:`Reply`
may also hang, lie about its length, trickle, or send raw bytes.  Servers stop
when the test's ``with`` block ends, and on their own after ``lifetime``
seconds at the latest, so a failing test never leaves one behind.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body or b"null")


@dataclass
class Reply:
    status: int = 200
    body: bytes | str | Any = b""
    headers: dict[str, str] = field(default_factory=dict)
    hang: float = 0.0  # sleep this long before answering
    raw: bytes | None = None  # send exactly these bytes instead of a response
    content_length: int | None = None  # claim this length (truncation when larger than the body)
    close_after: bool = False

    def encoded(self) -> bytes:
        if isinstance(self.body, bytes):
            return self.body
        if isinstance(self.body, str):
            return self.body.encode()
        self.headers.setdefault("Content-Type", "application/json")
        return json.dumps(self.body).encode()


Route = Callable[[Request], Reply]


def json_reply(value: Any, status: int = 200, **headers: str) -> Reply:
    return Reply(status, json.dumps(value).encode(), {"Content-Type": "application/json", **headers})


class Loopback:
    """An HTTP server on 127.0.0.1 whose routes are Python functions."""

    def __init__(self, routes: dict[str, Route] | None = None, *, lifetime: float = 120.0) -> None:
        self.routes: dict[str, Route] = dict(routes or {})
        self.requests: list[Request] = []
        self.lifetime = lifetime
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                req = Request(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                outer.requests.append(req)
                route = outer.match(req.path)
                reply = route(req) if route else Reply(404, b"no route")
                if reply.hang:
                    time.sleep(reply.hang)
                try:
                    if reply.raw is not None:
                        self.wfile.write(reply.raw)
                        self.wfile.flush()
                        self.close_connection = True
                        return
                    data = reply.encoded()
                    self.send_response(reply.status)
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(reply.content_length if reply.content_length is not None else len(data)))
                    if reply.close_after or reply.content_length is not None:
                        self.send_header("Connection", "close")
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                    self.wfile.flush()
                    if reply.close_after or reply.content_length is not None:
                        self.close_connection = True
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def netloc(self) -> str:
        return f"127.0.0.1:{self.port}"

    def match(self, path: str) -> Route | None:
        plain = path.split("?", 1)[0]
        for pattern, route in self.routes.items():
            if re.fullmatch(pattern, plain):
                return route
        return None

    def start(self) -> Loopback:
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        self._timer.cancel()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> Loopback:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port() -> int:
    """A port nothing listens on (for connection-refused tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def chat_completion(content: str, *, prompt_tokens: int = 10, completion_tokens: int = 5, usage: bool = True,
                    model: str = "test-model") -> dict[str, Any]:
    """An OpenAI chat.completion object."""
    out: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
    }
    if usage:
        out["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                        "total_tokens": prompt_tokens + completion_tokens}
    return out
