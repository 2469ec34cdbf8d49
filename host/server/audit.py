"""The audit over HTTP: an agent's log and its check, within a tenant; the store's and the host's chains.

``/v1/agents/{id}/audit`` and ``.../audit/verify`` (``runs:read``) read and check one
agent's chain of the token's tenant (``/v1/agents/host.gateway/audit``, a host chain's
records, needs ``admin``). ``/v1/audit/verify`` checks what ``torpor audit
verify`` checks on the server's store, with the same report: without ``agent``, every
chain, signed head and checkpoint claim of the store; with ``agent=host.<name>``, a
host-level chain (``host.gateway``: the requests the gateway refused); both span every
tenant, so they need ``admin``; with ``agent=<id>``, one agent's chain, as the route
above (``runs:read``, within the tenant).
"""

from __future__ import annotations

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from host.errors import AgentNotFound, InvalidInput
from host.runtime import Host
from host.server.gateway import require
from host.server.inputs import owned_agent
from host.server.responses import json_response
from host.trust import audit


class Audit:
    def __init__(self, host: Host) -> None:
        self.host = host

    async def records(self, request: Request) -> Response:
        """The agent's audit records in order: ``{"records": [...]}`` (a host chain's: scope admin)."""
        aid = request.path_params["agent_id"]
        if aid.startswith(audit.host_chain("")):
            require(request, "admin")  # a host chain holds every tenant's requests
            found = self.host.audit_records(aid)
            if not found:  # as `torpor audit show` says of a chain nothing was written to yet
                raise AgentNotFound(f"no agent {aid[:64]}: no host chain of that name has records")
            return json_response({"agent_id": aid, "records": found})
        owned_agent(self.host, aid, require(request, "runs:read"))
        return json_response({"agent_id": aid, "records": self.host.audit_records(aid)})

    async def verify(self, request: Request) -> Response:
        """The agent's chain checked (as ``torpor audit verify AGENT --json``)."""
        who = require(request, "runs:read")
        aid = request.path_params["agent_id"]
        owned_agent(self.host, aid, who)
        report = await anyio.to_thread.run_sync(lambda: audit.verify_store(self.host.store, agent_id=aid))
        return json_response(report.to_dict())

    async def verify_store(self, request: Request) -> Response:
        """The store's audit checked as ``torpor audit verify`` does (``?agent=`` one chain)."""
        aid = request.query_params.get("agent") or None
        if aid is not None and (len(aid) > 128 or not aid.isprintable() or "/" in aid):
            raise InvalidInput("'agent' must be an agent id or a host chain (host.gateway)")
        if aid is None or aid.startswith(audit.host_chain("")):
            require(request, "admin")  # every tenant's records (a host chain holds all tenants' requests)
        else:
            owned_agent(self.host, aid, require(request, "runs:read"))
        report = await anyio.to_thread.run_sync(lambda: audit.verify_store(self.host.store, agent_id=aid))
        return json_response(report.to_dict())


def routes(a: Audit) -> list[Route]:
    return [
        Route("/v1/audit/verify", a.verify_store, methods=["GET"], name="verify_audit"),
        Route("/v1/agents/{agent_id}/audit", a.records, methods=["GET"], name="agent_audit"),
        Route("/v1/agents/{agent_id}/audit/verify", a.verify, methods=["GET"], name="verify_agent_audit"),
    ]
