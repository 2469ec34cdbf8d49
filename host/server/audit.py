"""``/v1/agents/{id}/audit`` and ``.../audit/verify``: an agent's audit log and its check, within a tenant."""

from __future__ import annotations

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from host.runtime import Host
from host.server.gateway import require
from host.server.inputs import owned_agent
from host.server.responses import json_response
from host.trust import audit


class Audit:
    def __init__(self, host: Host) -> None:
        self.host = host

    async def records(self, request: Request) -> Response:
        """The agent's audit records in order: ``{"records": [...]}``."""
        who = require(request, "runs:read")
        aid = request.path_params["agent_id"]
        owned_agent(self.host, aid, who)
        return json_response({"agent_id": aid, "records": self.host.audit_records(aid)})

    async def verify(self, request: Request) -> Response:
        """The agent's chain checked (as ``torpor audit verify AGENT --json``)."""
        who = require(request, "runs:read")
        aid = request.path_params["agent_id"]
        owned_agent(self.host, aid, who)
        report = await anyio.to_thread.run_sync(lambda: audit.verify_store(self.host.store, agent_id=aid))
        return json_response(report.to_dict())


def routes(a: Audit) -> list[Route]:
    return [
        Route("/v1/agents/{agent_id}/audit", a.records, methods=["GET"], name="agent_audit"),
        Route("/v1/agents/{agent_id}/audit/verify", a.verify, methods=["GET"], name="verify_agent_audit"),
    ]
