"""``/v1/approvals`` and ``/v1/agents/{id}/approve|deny``: a person's decisions over HTTP.

The decision is recorded (one transaction, as ``torpor approve`` does) before the answer,
which is the agent after it (``approved`` or ``suspended``); the scheduler then resumes
the agent in the background. Who decided is the operator token's id.
"""

from __future__ import annotations

from typing import Any

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from host.errors import InvalidInput
from host.runtime import Host
from host.server.gateway import require
from host.server.inputs import json_object, optional_string, owned_agent, tenant_of
from host.server.responses import json_response


class Approvals:
    def __init__(self, host: Host, scheduler: Any) -> None:
        self.host = host
        self.scheduler = scheduler

    async def list(self, request: Request) -> Response:
        """The tenant's pending approvals: ``{"approvals": [...]}`` as ``torpor approvals``."""
        who = require(request, "runs:read")
        mine = set()
        for r in self.host.list_agents():
            if r.get("status") == "waiting_approval" and tenant_of(r) == who.tenant:
                mine.add(r["agent_id"])
        return json_response({"approvals": [a for a in self.host.approvals() if a.get("agent_id") in mine]})

    async def approve(self, request: Request) -> Response:
        """Approve the call the agent waits on (body ``{"note"?}``), or answer the question it
        waits on (``{"answer": {...}}``, checked against the schema asked for: ``invalid_input``
        naming the field otherwise); it resumes in the background."""
        who = require(request, "approvals:write")
        aid = request.path_params["agent_id"]
        owned_agent(self.host, aid, who)
        body = await json_object(request, optional=True)
        note = optional_string(body, "note")
        answer = body.get("answer")
        await anyio.to_thread.run_sync(lambda: self.host.decide_approve(aid, note=note, by=f"token:{who.token_id}",
                                                                        answer=answer))
        self.scheduler.resume(aid)
        return json_response(owned_agent(self.host, aid, who))

    async def deny(self, request: Request) -> Response:
        """Deny the call the agent waits on (body ``{"reason"}``); it resumes and sees the denial."""
        who = require(request, "approvals:write")
        aid = request.path_params["agent_id"]
        owned_agent(self.host, aid, who)
        body = await json_object(request)
        reason = optional_string(body, "reason")
        if not reason:
            raise InvalidInput("a denial needs a 'reason' (the agent is told it)")
        await anyio.to_thread.run_sync(lambda: self.host.decide_deny(aid, reason=reason, by=f"token:{who.token_id}"))
        self.scheduler.resume(aid)
        return json_response(owned_agent(self.host, aid, who))


def routes(approvals: Approvals) -> list[Route]:
    return [
        Route("/v1/approvals", approvals.list, methods=["GET"], name="list_approvals"),
        Route("/v1/agents/{agent_id}/approve", approvals.approve, methods=["POST"], name="approve_agent"),
        Route("/v1/agents/{agent_id}/deny", approvals.deny, methods=["POST"], name="deny_agent"),
    ]
