"""``torpor serve --mcp``: every registry agent of the caller's tenant offered as an MCP tool at ``/mcp``.

The endpoint is the ``mcp`` SDK's streamable-HTTP server (stateless: each POST its own
transport, so nothing of one client is kept between requests), mounted behind the same
gateway as ``/v1``: the operator token, its tenant, its rate limits and body caps.

* ``tools/list`` (scope ``runs:read``): the tenant's registry names, each a tool that runs
  the name's latest version; its input schema is any JSON object (the agent's input), its
  description the policy's ``[agent].description``.
* ``tools/call`` (scope ``runs:write``): a sandboxed run of that agent under its policy,
  started and driven exactly as ``POST /v1/runs`` does, the call's arguments its input.
  The call stays open while the agent runs and while it waits: progress notifications
  say what it is doing (running, asleep, waiting for a person's approval, with the
  command that gives it) and come at least every :data:`HEARTBEAT_S` seconds, so a client
  that honours progress does not cut the call.  An agent that parks for approval
  hibernates as always (its instance dropped); when someone approves (``torpor
  approve``, the API, the console) it resumes in the background and the call answers.
  A client that leaves does not stop the agent: it is durable, and ``torpor ps`` has it.
* The answer is the agent's output: ``structuredContent`` (an object output as is,
  anything else as ``{"result": ...}``) and its JSON as text; a failed or terminated run
  is ``isError`` with its error code and message, and so is a call still open when the
  server drains (``shutting_down``: the agent goes on in the next server process).  The
  run's agent id is in ``_meta``.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from host.errors import TorporError
from host.runtime import Host
from host.server import agents as agents_routes
from host.server import runs as runs_routes
from host.server.gateway import require

_log = logging.getLogger("torpor.server")

#: The longest the endpoint stays silent during a call (a progress notification at least this often).
HEARTBEAT_S = 5.0
#: Statuses in which the agent waits for a person: the call stays open, with progress.
WAITING_ON_PEOPLE = frozenset({"waiting_approval", "in_doubt"})


class McpEndpoint:
    """The MCP server of one ``torpor serve``: its SDK session manager and its two handlers."""

    def __init__(self, host: Host, runs: runs_routes.Runs, scheduler: Any) -> None:
        from mcp.server.lowlevel.server import Server
        from mcp.server.streamable_http_manager import (
            StreamableHTTPASGIApp,
            StreamableHTTPSessionManager,
        )

        self.host = host
        self.runs = runs
        self.scheduler = scheduler
        self.server: Any = Server("torpor", version="0.1.0", on_list_tools=self._list_tools,
                                  on_call_tool=self._call_tool)
        self.manager = StreamableHTTPSessionManager(app=self.server, stateless=True)
        self.asgi = StreamableHTTPASGIApp(self.manager)

    @contextlib.asynccontextmanager
    async def run(self) -> AsyncIterator[None]:
        """Open for the application's lifespan (the SDK's session manager runs in it)."""
        async with self.manager.run():
            yield

    async def _list_tools(self, ctx: Any, params: Any) -> Any:
        who = require(ctx.request, "runs:read")
        return agent_tools(self.host, who.tenant)

    async def _call_tool(self, ctx: Any, params: Any) -> Any:
        try:
            who = require(ctx.request, "runs:write")
            b, started_as = runs_routes.resolve(self.host, str(params.name), who.tenant)
            agent_id = await self.runs.start(b, dict(params.arguments or {}), who.tenant, started_as)
        except TorporError as exc:
            return failed(exc.code, str(exc))
        return answer(await self._follow(ctx, agent_id), agent_id)

    async def _follow(self, ctx: Any, agent_id: str) -> dict[str, Any]:
        """Wait until the agent ends, telling the client what it does at least every heartbeat."""
        step = 0
        said = None
        while True:
            rec = await agents_routes.wait_until_stopped(self.host, self.scheduler, agent_id, HEARTBEAT_S)
            status = str(rec.get("status"))
            if status not in agents_routes.MOVING and status not in WAITING_ON_PEOPLE:
                return rec
            if self.scheduler.draining:  # the agent stays at its last checkpoint for the next process
                return {**rec, "status": "interrupted", "error": {
                    "code": "shutting_down", "message": f"the server is shutting down; agent {agent_id} goes on "
                    f"where it stopped in the next server process (it is {status})"}}
            step += 1
            message = what(agent_id, rec)
            with contextlib.suppress(Exception):  # a client that asked no progress, or has left
                await ctx.session.report_progress(step, None, message)
            if message != said:
                said = message
                _log.debug("mcp call %s: %s", agent_id, message)
            if status in WAITING_ON_PEOPLE:
                await self.scheduler.changed(agent_id, HEARTBEAT_S)


def agent_tools(host: Host, tenant: str) -> Any:
    """The tenant's registry names as MCP tools (each runs the name's latest version)."""
    from mcp import types

    tools = []
    for row in sorted(host.registry.names(tenant=tenant), key=lambda r: str(r["name"])):
        name = str(row["name"])
        description = f"Run the Torpor agent {name} (its latest version, sandboxed under its policy)."
        with contextlib.suppress(TorporError):
            b, _ = runs_routes.resolve(host, name, tenant)
            if b.policy.agent.description:
                description = f"{b.policy.agent.description} (Torpor agent {name})"
        tools.append(types.Tool(name=name, description=description,
                                input_schema={"type": "object", "description": "the agent's input"}))
    return types.ListToolsResult(tools=tools)


def answer(rec: dict[str, Any], agent_id: str) -> Any:
    """An ended agent's record as the call's result: its output, or its error as ``isError``."""
    from mcp import types

    meta = {"torpor/agent_id": agent_id}
    if rec.get("status") == "completed":
        output = rec.get("output")
        structured = output if isinstance(output, dict) else {"result": output}
        return types.CallToolResult(content=[types.TextContent(type="text", text=json.dumps(output))],
                                    structured_content=structured, _meta=meta)
    error = rec.get("error") or {}
    return failed(str(error.get("code") or rec.get("status")),
                  str(error.get("message") or f"the agent ended {rec.get('status')}"), meta)


def what(agent_id: str, rec: dict[str, Any]) -> str:
    """What a call's progress says of its agent."""
    status = str(rec.get("status"))
    if status == "waiting_approval":
        call = (rec.get("pending") or {}).get("tool") or "a tool call"
        return (f"agent {agent_id} waits for a person to approve {call}: `torpor approve {agent_id}` "
                "(or the API, or the console)")
    if status == "in_doubt":
        return f"agent {agent_id} waits for an operator to settle an in-doubt call: `torpor resolve {agent_id}`"
    if status == "sleeping":
        return f"agent {agent_id} is asleep until {rec.get('wake_at')}"
    usage = rec.get("usage") or {}
    return f"agent {agent_id} is {status} ({usage.get('tool_calls', 0)} tool calls so far)"


def failed(code: str, message: str, meta: dict[str, Any] | None = None) -> Any:
    """A call that did not give the agent's output: ``isError``, with the error's code."""
    from mcp import types

    return types.CallToolResult(content=[types.TextContent(type="text", text=f"error[{code}]: {message}")],
                                is_error=True, _meta=meta)
