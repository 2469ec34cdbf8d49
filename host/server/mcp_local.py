"""``torpor mcp serve``: the registry's agents as MCP tools over stdio, on a local store.

The tools and answers are those of ``torpor serve --mcp`` (:mod:`host.server.mcp_endpoint`),
for the default tenant of the store and without a gateway: whoever starts the process
(an MCP client configured with ``command = "torpor"``, ``args = ["mcp", "serve"]``) has the
store.  A call runs the agent in this process until it ends or parks; one that parks for a
person stays open, with progress, while the store says it waits, and answers when another
process (``torpor approve``, ``torpor resolve``) has taken it to its end, or, where the
client declares the elicitation capability, until the client answers the question it is
asked (the approval as yes/no, an MCP server's question as it was asked; recorded as the
decision of ``mcp-client:$USER``, whoever started the process, which has the store); one
that sleeps is woken here when its time comes (``torpor resume``'s work).
"""

from __future__ import annotations

import contextlib
from typing import Any

import anyio

from host.errors import TorporError
from host.runtime import Host
from host.runtime.registry import DEFAULT_TENANT
from host.server import runs as runs_routes
from host.server.agents import MOVING
from host.server.mcp_endpoint import (
    HEARTBEAT_S,
    WAITING_ON_PEOPLE,
    agent_tools,
    answer,
    ask_client,
    check_input,
    client_can_answer,
    failed,
    wait_of,
    what,
)

#: How often the store is read while another process decides on a parked agent.
POLL_S = 0.5


class LocalMcp:
    """The stdio MCP server of one local store."""

    def __init__(self, host: Host, tenant: str = DEFAULT_TENANT) -> None:
        import os

        from mcp.server.lowlevel.server import Server

        self.host = host
        self.tenant = tenant
        self._user = os.environ.get("USER") or "unknown"  # who decides through the client: who started it
        self.server: Any = Server("torpor", version="0.1.0", on_list_tools=self._list_tools,
                                  on_call_tool=self._call_tool)

    async def serve(self) -> None:
        """Answer on stdin/stdout until the client closes stdin."""
        from mcp.server.stdio import stdio_server

        from host.tools.mcp import SUPERVISOR as mcp_servers

        async with mcp_servers.owned_by_this_loop(), stdio_server() as (read, write):
            await self.server.run(read, write, self.server.create_initialization_options())

    def _still_waiting(self, agent_id: str, rec: dict[str, Any]) -> Any:
        """Returns once the agent no longer waits on the decision the client was asked for
        (another process decided it: ``torpor approve``)."""
        async def wait() -> None:
            while True:
                await anyio.sleep(POLL_S)
                now = self.host.get_agent(agent_id)
                if now.get("status") != "waiting_approval" or wait_of(now) != wait_of(rec):
                    return

        return wait

    async def _list_tools(self, ctx: Any, params: Any) -> Any:
        return agent_tools(self.host, self.tenant)

    async def _call_tool(self, ctx: Any, params: Any) -> Any:
        try:
            b, started_as = runs_routes.resolve(self.host, str(params.name), self.tenant)
            check_input(b, params)
            res = await self.host.run(b, dict(params.arguments or {}), tenant=self.tenant, started_as=started_as)
        except TorporError as exc:
            return failed(exc.code, str(exc))
        agent_id = res.agent_id
        step = 0
        quiet = 0.0
        asked: Any = None  # the wait the client was asked about (asked once per wait)
        while True:
            rec = self.host.get_agent(agent_id)
            status = str(rec.get("status"))
            if status == "sleeping" and agent_id in self.host.due():  # its time has come: ours to wake
                await self.host.resume(agent_id)
                continue
            wait = wait_of(rec)
            if status == "waiting_approval" and asked != wait and client_can_answer(ctx):
                asked = wait
                if await ask_client(self.host, ctx, agent_id, rec, self._still_waiting(agent_id, rec),
                                    by=f"mcp-client:{self._user}"):
                    await self.host.resume(agent_id)  # this process drives it, as `torpor approve` would
                continue
            if status not in WAITING_ON_PEOPLE and status not in MOVING:
                return answer(rec, agent_id)
            if quiet <= 0:
                step += 1
                with contextlib.suppress(Exception):  # a client that asked no progress, or has left
                    await ctx.session.report_progress(step, None, what(agent_id, rec))
                quiet = HEARTBEAT_S
            await anyio.sleep(POLL_S)
            quiet -= POLL_S
