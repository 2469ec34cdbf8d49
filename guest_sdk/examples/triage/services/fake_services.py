"""Stand-ins for the services the `triage` example talks to, on 127.0.0.1 only.

* an OpenAI-compatible LLM (``POST /v1/chat/completions``): it classifies a
  ticket by keywords when the system prompt asks to classify, and drafts a
  short reply otherwise; every answer reports its token usage;
* a CRM / helpdesk API: ``GET /customers/<id>``, ``POST /tickets/<id>/replies``
  (the "send"), ``GET /replies`` (what was sent).

Run it beside the example (see guest_sdk/examples/triage/README.md)::

    python guest_sdk/examples/triage/services/fake_services.py            # 8400 and 8401
    python guest_sdk/examples/triage/services/fake_services.py --lifetime 60

It stops by itself after ``--lifetime`` seconds (default 600).  The tests
import :class:`Services` and start it on ephemeral ports.  Standard library only.
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CUSTOMERS: dict[str, dict[str, Any]] = {
    "C-42": {"id": "C-42", "name": "Ada Lovelace", "email": "ada@example.com", "plan": "enterprise"},
    "C-7": {"id": "C-7", "name": "Alan Turing", "email": "alan@example.com", "plan": "free"},
}

CATEGORIES = (
    ("billing", ("refund", "invoice", "charge", "charged", "billing", "payment")),
    ("bug", ("error", "crash", "bug", "broken", "fails")),
    ("account", ("password", "login", "locked", "account")),
)


def classify(text: str) -> dict[str, str]:
    low = text.lower()
    category = next((c for c, words in CATEGORIES if any(w in low for w in words)), "other")
    priority = "high" if any(w in low for w in ("urgent", "asap", "twice", "down")) else "normal"
    return {"category": category, "priority": priority}


def tokens(text: str) -> int:
    # About what a BPE tokenizer gives for English: 4 bytes a token, rounded up (the host
    # charges the larger of this and its own count, so a server must not under-report).
    return max(1, -(-len(text.encode()) // 4))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    services: Services

    def log_message(self, *args: Any) -> None:
        pass

    def _json(self, status: int, value: Any) -> None:
        data = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> Any:
        n = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(n) or b"null")

    def do_GET(self) -> None:
        m = re.fullmatch(r"/customers/([A-Za-z0-9-]+)", self.path)
        if m:
            self.services.crm_requests.append(("GET", self.path, dict(self.headers)))
            c = CUSTOMERS.get(m.group(1))
            return self._json(200, c) if c else self._json(404, {"error": f"no customer {m.group(1)}"})
        if self.path == "/replies":
            return self._json(200, self.services.replies)
        self._json(404, {"error": "no such endpoint"})

    def do_POST(self) -> None:
        body = self._body()
        if self.path == "/v1/chat/completions":
            return self._chat(body)
        m = re.fullmatch(r"/tickets/([A-Za-z0-9-]+)/replies", self.path)
        if m:
            self.services.crm_requests.append(("POST", self.path, dict(self.headers)))
            reply = {"reply_id": f"R-{len(self.services.replies) + 1}", "ticket": m.group(1), "status": "sent",
                     "to": (body or {}).get("to"), "body": (body or {}).get("body")}
            self.services.replies.append(reply)
            return self._json(201, {"reply_id": reply["reply_id"], "status": "sent"})
        self._json(404, {"error": "no such endpoint"})

    def _chat(self, req: Any) -> None:
        self.services.llm_requests.append(req)
        messages = req.get("messages") or []
        system = " ".join(m.get("content") or "" for m in messages if m.get("role") == "system")
        user = " ".join(m.get("content") or "" for m in messages if m.get("role") == "user")
        if "classify" in system.lower():
            content = json.dumps(classify(user))
        else:
            name = re.search(r"Customer: ([^(\n]+)", user)
            who = name.group(1).strip() if name else "there"
            content = (f"Dear {who},\n\nThank you for contacting us. We have looked into your request "
                       "and a specialist will follow up within one business day.\n\nBest regards,\nSupport")
        prompt = sum(tokens(m.get("content") or "") for m in messages)
        completion = tokens(content)
        self.services.tokens += prompt + completion
        self._json(200, {
            "id": f"chatcmpl-{len(self.services.llm_requests)}", "object": "chat.completion",
            "model": req.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
        })


class Services:
    """The fake LLM and CRM, each an HTTP server on 127.0.0.1 in a daemon thread."""

    def __init__(self, llm_port: int = 0, crm_port: int = 0, *, lifetime: float = 600.0) -> None:
        self.llm_requests: list[Any] = []
        self.crm_requests: list[Any] = []
        self.replies: list[dict[str, Any]] = []
        self.tokens = 0
        handler = type("Handler", (_Handler,), {"services": self})
        self._servers = [ThreadingHTTPServer(("127.0.0.1", p), handler) for p in (llm_port, crm_port)]
        for s in self._servers:
            s.daemon_threads = True
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True

    @property
    def llm_port(self) -> int:
        return int(self._servers[0].server_address[1])

    @property
    def crm_port(self) -> int:
        return int(self._servers[1].server_address[1])

    def start(self) -> Services:
        for s in self._servers:
            threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self._timer.start()
        return self

    def stop(self) -> None:
        self._timer.cancel()
        for s in self._servers:
            s.shutdown()
            s.server_close()

    def __enter__(self) -> Services:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llm-port", type=int, default=8400)
    ap.add_argument("--crm-port", type=int, default=8401)
    ap.add_argument("--lifetime", type=float, default=600.0, help="stop after this many seconds")
    a = ap.parse_args()
    with Services(a.llm_port, a.crm_port, lifetime=a.lifetime) as s:
        print(f"fake LLM on http://127.0.0.1:{s.llm_port}/v1, CRM on http://127.0.0.1:{s.crm_port} "
              f"(stopping in {a.lifetime:g}s)", flush=True)
        deadline = time.monotonic() + a.lifetime
        try:
            while time.monotonic() < deadline:
                time.sleep(0.2)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
