"""``/v1/agents``: list, get, inspect, and wait for an agent (long poll), within a tenant.

The bodies are the runtime's query dicts (``list_agents`` rows, ``get_agent``,
``inspect``), so a client prints the same thing as the CLI on a local store.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from host.runtime import Host
from host.runtime.queries import stalled
from host.server.gateway import require
from host.server.inputs import number, owned_agent, tenant_of
from host.server.responses import json_response
from host.server.scheduler import QUEUED_POLL_S, Drive

#: Statuses in which an agent still moves on without a person: a wait goes on.
MOVING = frozenset({"running", "suspended", "approved", "sleeping"})
#: How often a wait looks at the store even without a word from the scheduler (a change
#: made by another process on the same store).
POLL_S = 1.0


async def wait_until_stopped(host: Host, scheduler: Any, agent_id: str, timeout: float,
                             drive: Drive | None = None) -> dict[str, Any]:
    """The agent's record once it is no longer moving, or as it is after ``timeout`` seconds
    (or as soon as the server drains). Once it stopped, with ``logs``: the guest's log lines
    of the drive that got it there, if this server drove it lately (they are in no record;
    see :class:`host.server.scheduler.RecentLogs`).

    ``drive``: the drive of the agent the caller started (a run started with ``wait``). If
    it ended the agent stopped and no other drive of it began since, its record as that
    drive's last commit wrote it is the answer, without reading the store again."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        left = deadline - loop.time()
        if left > 0 and not scheduler.draining and scheduler.driving(agent_id):
            # This server drives it: it moves until that drive ends, which wakes us; the
            # store need not be read until then (nobody else may drive it meanwhile).
            await scheduler.changed(agent_id, min(left, POLL_S))
            continue
        if drive is not None and drive.result is not None and not scheduler.driving(agent_id):
            ended = drive.result.record
            if ended is not None and ended.get("status") not in MOVING:
                return {**ended, "stalled": stalled(ended, time.time()), "logs": list(drive.result.logs)}
        rec = host.get_agent(agent_id)
        # Stopped, and its drive has ended (the drive's tail, after its last commit, keeps its log lines).
        if rec.get("status") not in MOVING and not scheduler.driving(agent_id):
            return {**rec, "logs": scheduler.logs.get(agent_id)}
        if left <= 0 or scheduler.draining:
            return rec
        # In a fleet another host may drive it (its work went to the queue): nothing here ends
        # the wait early, so the local copy, which follows every host's commits, is read more often.
        await scheduler.changed(agent_id, min(left, QUEUED_POLL_S if getattr(scheduler, "queued", False) else POLL_S))


class Agents:
    def __init__(self, host: Host, scheduler: Any, max_wait_s: float) -> None:
        self.host = host
        self.scheduler = scheduler
        self.max_wait_s = max_wait_s

    async def list(self, request: Request) -> Response:
        """The tenant's agents: ``{"agents": [list_agents rows]}``."""
        who = require(request, "runs:read")
        rows = [r for r in self.host.list_agents() if tenant_of(r) == who.tenant]
        return json_response({"agents": rows})

    async def get(self, request: Request) -> Response:
        """One agent (``get_agent``)."""
        who = require(request, "runs:read")
        return json_response(owned_agent(self.host, request.path_params["agent_id"], who))

    async def inspect(self, request: Request) -> Response:
        """One agent as ``torpor inspect`` shows it: input and checkpoints too."""
        who = require(request, "runs:read")
        aid = request.path_params["agent_id"]
        owned_agent(self.host, aid, who)
        return json_response(self.host.inspect(aid))

    async def wait(self, request: Request) -> Response:
        """Long poll: the agent once it stops moving (``?timeout=S``, default 30, capped)."""
        who = require(request, "runs:read")
        aid = request.path_params["agent_id"]
        owned_agent(self.host, aid, who)
        timeout = number(request.query_params.get("timeout", "30"), "timeout", low=0, high=self.max_wait_s)
        return json_response(await wait_until_stopped(self.host, self.scheduler, aid, timeout))


def routes(agents: Agents) -> list[Route]:
    return [
        Route("/v1/agents", agents.list, methods=["GET"], name="list_agents"),
        Route("/v1/agents/{agent_id}", agents.get, methods=["GET"], name="get_agent"),
        Route("/v1/agents/{agent_id}/inspect", agents.inspect, methods=["GET"], name="inspect_agent"),
        Route("/v1/agents/{agent_id}/wait", agents.wait, methods=["GET"], name="wait_agent"),
    ]
