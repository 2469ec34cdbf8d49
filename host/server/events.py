"""``GET /v1/agents/{id}/events``: an agent's audit records as server-sent events.

One event per audit record (``id:`` its sequence number, ``event:`` its kind, ``data:``
the record as JSON): checkpoints, tool calls, denials, approvals, completion. A client
that reconnects with ``Last-Event-ID`` gets what came after it. The stream ends with
``event: end`` once the agent is completed, failed or terminated (or the server drains).

A client that goes away costs nothing: the response is a generator that Starlette
cancels when the connection closes; it holds no store transaction between reads.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from host.errors import InvalidInput
from host.runtime import Host
from host.server.gateway import require
from host.server.inputs import owned_agent
from host.trust import audit

FINISHED = frozenset({"completed", "failed", "terminated"})
#: How often a stream looks for new records between the scheduler's words.
POLL_S = 0.25
#: A comment line this often keeps proxies from closing an idle stream.
KEEPALIVE_S = 15.0


def _event(rec: dict[str, Any]) -> bytes:
    kind = str(rec.get("kind", "record")).replace("\n", " ").replace("\r", " ")
    data = json.dumps(rec, default=str, separators=(",", ":"))
    return f"id: {audit.event_number(rec)}\nevent: {kind}\ndata: {data}\n\n".encode()


class Events:
    def __init__(self, host: Host, scheduler: Any) -> None:
        self.host = host
        self.scheduler = scheduler
        self.open_streams = 0  # for tests and metrics: streams being served now

    async def stream(self, request: Request) -> Response:
        """The agent's events from ``Last-Event-ID`` (or the start) until it finishes."""
        who = require(request, "runs:read")
        aid = request.path_params["agent_id"]
        owned_agent(self.host, aid, who)
        last = request.headers.get("last-event-id", "0").strip() or "0"
        if not last.isdigit() or len(last) > 12:
            raise InvalidInput("Last-Event-ID must be an event id this stream sent (a sequence number)")
        return StreamingResponse(self._events(aid, int(last)), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def _events(self, agent_id: str, after: int) -> AsyncIterator[bytes]:
        self.open_streams += 1
        try:
            idle = 0.0
            # ``after`` counts events (a step record holds several, audit.event_number);
            # ``read`` is the last record read, from which the next poll reads on.
            read = 0
            while True:
                rec = self.host.get_agent(agent_id)  # before the records: a finish is never missed
                new = audit.records_after(self.host.store, agent_id, read)
                for r in new:
                    if isinstance(r.get("seq"), int):
                        read = r["seq"]
                    n = audit.event_number(r)
                    if n is not None and n <= after:
                        continue  # the client had it (Last-Event-ID)
                    yield _event(r)
                    if n is not None:
                        after = n
                if rec.get("status") in FINISHED or self.scheduler.draining:
                    yield f"event: end\ndata: {json.dumps({'status': rec.get('status')})}\n\n".encode()
                    return
                idle = 0.0 if new else idle + POLL_S
                if idle >= KEEPALIVE_S:
                    idle = 0.0
                    yield b": keep-alive\n\n"
                await self.scheduler.changed(agent_id, POLL_S)
        finally:
            self.open_streams -= 1


def routes(events: Events) -> list[Route]:
    return [Route("/v1/agents/{agent_id}/events", events.stream, methods=["GET"], name="agent_events")]
