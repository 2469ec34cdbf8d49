"""``GET /v1/agents/{id}/logs``: an agent's guest log lines as the store keeps them, within a tenant.

The lines are the runtime's (:mod:`host.runtime.logs`: written in the commit of the step
that logged them, bounded per agent), so they survive a restart of the server and are
the same whoever drove the agent. Paginated by line number: ``after`` (the last ``seq``
seen; -1, the default, from the oldest kept) and ``limit``; the answer says ``more`` when
a page was cut, and ``next`` (the number the agent's next line gets).

Follow by long poll: with ``wait=S``, a request that finds no line after ``after`` waits
up to ``S`` seconds (capped by the server) for one, and answers at once when the agent has
ended (completed, failed, terminated: no line will come) or the server drains. An agent
parked on a person is waited on like a running one: its next lines come once someone
decides. The answer carries the agent's ``status``, so a follower knows when to stop.
"""

from __future__ import annotations

from typing import Any

import anyio
import anyio.to_thread
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from host.errors import InvalidInput
from host.runtime import Host
from host.runtime.result import TERMINAL
from host.server.gateway import require
from host.server.inputs import number, owned_agent
from host.server.responses import json_response

#: How often a waiting request reads the store again (lines come with commits, mid-drive).
POLL_S = 0.2


def _integer(value: str | None, name: str, default: int, low: int) -> int:
    if value is None:
        return default
    try:
        n = int(value)
    except ValueError:
        raise InvalidInput(f"{name} must be an integer") from None
    if n < low or n > 1 << 62:
        raise InvalidInput(f"{name} must be an integer >= {low}")
    return n


class Logs:
    def __init__(self, host: Host, scheduler: Any, max_wait_s: float) -> None:
        self.host = host
        self.scheduler = scheduler
        self.max_wait_s = max_wait_s

    async def lines(self, request: Request) -> Response:
        """The agent's kept log lines after ``after`` (``?limit``, ``?wait=S`` to follow)."""
        who = require(request, "runs:read")
        aid = request.path_params["agent_id"]
        owned_agent(self.host, aid, who)
        q = request.query_params
        after = _integer(q.get("after"), "after", -1, -1)
        limit = _integer(q.get("limit"), "limit", 1000, 1)
        wait = number(q.get("wait", "0"), "wait", low=0, high=self.max_wait_s)
        deadline = anyio.current_time() + wait
        while True:
            rec = self.host.get_agent(aid)  # before the lines: a line committed with a stop is never missed
            page = await anyio.to_thread.run_sync(lambda: self.host.logs(aid, after=after, limit=limit))
            ended = rec.get("status") in TERMINAL and not self.scheduler.driving(aid)
            left = deadline - anyio.current_time()
            if page["lines"] or ended or left <= 0 or self.scheduler.draining:
                return json_response({**page, "status": rec.get("status")})
            await self.scheduler.changed(aid, min(left, POLL_S))


def routes(logs: Logs) -> list[Route]:
    return [Route("/v1/agents/{agent_id}/logs", logs.lines, methods=["GET"], name="agent_logs")]
