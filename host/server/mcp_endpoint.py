"""``torpor serve --mcp``: every registry agent of the caller's tenant offered as an MCP tool at ``/mcp``.

The endpoint is the ``mcp`` SDK's streamable-HTTP server, mounted behind the same gateway
as ``/v1``: the operator token, its tenant, its rate limits and body caps.  It keeps
sessions (the SDK's, with its idle timeout and cap on their number) so that it can ask the
client something during a call and route the answer back; each session is kept to the
token that opened it.

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
* A client that declares the elicitation capability, calling with a token that may decide
  (``approvals:write``), is *asked* instead (:func:`question_for`): an approval becomes an
  ``elicitation/create`` whose answer approves or denies the call (``decline`` denies;
  ``cancel`` leaves it waiting, with progress as above), and a question an MCP server put
  to the agent (its own elicitation) is passed on as the server asked it, the client's
  answer checked against that schema like ``torpor approve --answer``.  The request races
  the agent: a decision made elsewhere meanwhile (``torpor approve``, the console) cancels
  it.  Who decided is the calling token, as over the API.
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
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import anyio.to_thread

from host.errors import TorporError
from host.runtime import Host
from host.server import agents as agents_routes
from host.server import runs as runs_routes
from host.server.gateway import require

_log = logging.getLogger("torpor.server")

#: The longest the endpoint stays silent during a call (a progress notification at least this often).
HEARTBEAT_S = 5.0
#: Sessions whose owner is remembered, at most (the SDK itself keeps fewer open at a time).
MAX_OWNERS = 100_000
#: How often a question put to the client looks whether the agent still waits (decided elsewhere).
POLL_S = 0.5
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
        # Sessions, so that the server can ask the client (elicitation) during a call and have
        # its answer routed back; bounded by the SDK (idle timeout, count), each kept to the
        # operator token that opened it (:meth:`asgi`).
        self.manager = StreamableHTTPSessionManager(app=self.server, stateless=False)
        self._sdk = StreamableHTTPASGIApp(self.manager)
        self._owners: dict[str, str] = {}  # session id -> the token id that opened it
        self.asgi = _Asgi(self._serve)  # an ASGI app, not a method: Starlette would wrap a method as a view

    async def _serve(self, scope: Any, receive: Any, send: Any) -> None:
        """The SDK's transport, with each session kept to the token that opened it: another
        token naming a session's id is answered as for an unknown session (404), so one
        client cannot answer, or read, another's questions."""
        from starlette.requests import Request

        from host.server.gateway import principal

        who = principal(Request(scope)).token_id
        # Every Mcp-Session-Id the request carries: the SDK routes by the first, so a second
        # one (the caller's own, after another's) must not pass the check in its place.
        sids = [bytes(v).decode("latin-1") for k, v in scope.get("headers") or () if bytes(k).lower() == b"mcp-session-id"]
        sid = sids[0] if sids else ""
        if len(sids) > 1 or (sid and self._owners.get(sid, who) != who):
            from host.server.responses import error_body, json_response

            response = json_response(error_body("not_found", "no such MCP session"), 404)
            await response(scope, receive, send)
            return

        async def opened(message: Any) -> None:
            if message.get("type") == "http.response.start" and not sid:
                new = dict(message.get("headers") or []).get(b"mcp-session-id")
                if new:
                    if len(self._owners) >= MAX_OWNERS:  # forget the oldest (the SDK has let them go by now)
                        self._owners.pop(next(iter(self._owners)))
                    self._owners[new.decode("latin-1")] = who
            await send(message)

        await self._sdk(scope, receive, opened)

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
            check_input(b, params)
            agent_id = await self.runs.start(b, dict(params.arguments or {}), who.tenant, started_as)
        except TorporError as exc:
            return failed(exc.code, str(exc))
        return answer(await self._follow(ctx, agent_id, who), agent_id)

    async def _follow(self, ctx: Any, agent_id: str, who: Any = None) -> dict[str, Any]:
        """Wait until the agent ends, telling the client what it does at least every heartbeat
        (and asking it, where it can answer, what the agent waits on a person for)."""
        step = 0
        said = None
        asked: Any = None  # the wait the client was asked about (asked once per wait)
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
            wait = wait_of(rec)
            if status == "waiting_approval" and asked != wait and can_ask(ctx, who):
                asked = wait
                await self._ask(ctx, who, agent_id, rec)
                continue
            if status in WAITING_ON_PEOPLE:
                await self.scheduler.changed(agent_id, HEARTBEAT_S)

    async def _ask(self, ctx: Any, who: Any, agent_id: str, rec: dict[str, Any]) -> None:
        """Ask the client what the agent waits on, racing a decision made elsewhere; record
        its answer as the calling token's decision and resume the agent in the background."""

        async def still_waiting() -> None:
            while True:
                await self.scheduler.changed(agent_id, POLL_S)
                now = await anyio.to_thread.run_sync(lambda: self.host.get_agent(agent_id))
                if now.get("status") != "waiting_approval" or wait_of(now) != wait_of(rec):
                    return

        if await ask_client(self.host, ctx, agent_id, rec, still_waiting, by=f"token:{who.token_id}"):
            self.scheduler.resume(agent_id)


async def ask_client(host: Host, ctx: Any, agent_id: str, rec: dict[str, Any],
                     still_waiting: Callable[[], Awaitable[None]], *, by: str) -> bool:
    """Ask the calling client (an elicitation) what a parked agent waits on, until
    ``still_waiting`` returns (decided elsewhere); record its answer as ``by``'s decision.
    True when a decision was recorded (the caller resumes the agent)."""
    message, schema = question_for(agent_id, rec)
    got: list[Any] = []
    async with anyio.create_task_group() as tg:
        async def elicit() -> None:
            try:
                got.append(await ctx.session.elicit_form(message, schema, related_request_id=ctx.request_id))
            except Exception as exc:  # the client cannot be asked after all: progress, as without
                _log.debug("mcp call %s: the client could not be asked: %s", agent_id, exc)
            tg.cancel_scope.cancel()

        async def watch() -> None:
            await still_waiting()
            tg.cancel_scope.cancel()

        tg.start_soon(elicit)
        tg.start_soon(watch)
    if not got or got[0].action == "cancel":  # cancel: no decision; it waits on, with progress
        return False
    result = got[0]
    content = dict(result.content or {})
    approval = rec.get("approval") or {}
    question = approval.get("question") if approval.get("kind") == "elicitation" else None

    def decide() -> bool:
        if wait_of(host.get_agent(agent_id)) != wait_of(rec):  # decided elsewhere, and now waits on another
            return False
        if result.action == "accept" and question is not None:
            host.decide_approve(agent_id, by=by, note="answered by the MCP client", answer=content)
        elif result.action == "accept" and content.get("approve") is True:
            host.decide_approve(agent_id, by=by, note=str(content.get("note") or "") or None)
        else:
            why = str(content.get("note") or "") or ("declined by the MCP client" if result.action == "decline"
                                                       else "denied by the MCP client")
            host.decide_deny(agent_id, reason=why, by=by)
        return True

    try:
        return bool(await anyio.to_thread.run_sync(decide))
    except TorporError as exc:  # decided elsewhere meanwhile, or an answer the schema refuses: it waits on
        _log.info("mcp call %s: the client's answer was not taken: %s", agent_id, exc)
        return False


class _Asgi:
    """An ASGI application that is one coroutine function."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


def can_ask(ctx: Any, who: Any) -> bool:
    """Whether the calling client may be asked to decide: it declared the elicitation
    capability, its channel can carry a request, and its token may decide approvals."""
    return who is not None and who.allows("approvals:write") and client_can_answer(ctx)


def client_can_answer(ctx: Any) -> bool:
    """Whether the calling client declared the elicitation capability on a channel that can
    carry a request to it."""
    session = getattr(ctx, "session", None)
    caps = getattr(session, "client_capabilities", None)
    return caps is not None and caps.elicitation is not None and bool(getattr(session, "can_send_request", False))


def wait_of(rec: dict[str, Any]) -> tuple[Any, ...]:
    """What tells one wait of an agent on a person from the next: its checkpoint and call,
    and the question (the calls' next question waits at the same checkpoint and call)."""
    question = (rec.get("approval") or {}).get("question") or {}
    return (rec.get("checkpoints"), (rec.get("pending") or {}).get("seq"), question.get("index"),
            question.get("digest"))


def question_for(agent_id: str, rec: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """What the client is asked about an agent waiting on a person: an MCP server's own
    question as it was asked, or the approval as a yes/no with a note."""
    approval = rec.get("approval") or {}
    question = approval.get("question")
    if approval.get("kind") == "elicitation" and isinstance(question, dict):
        return (f"Agent {agent_id}: {question.get('server')} asks: {question.get('message')}",
                dict(question.get("requested_schema") or {"type": "object", "properties": {}}))
    call = rec.get("pending") or {}
    message = (f"Agent {agent_id} waits for a person to approve {call.get('tool') or 'a tool call'} "
               f"{json.dumps(call.get('args'), separators=(',', ':'))[:500]} ({approval.get('reason') or 'its policy asks'})")
    schema = {"type": "object", "properties": {
        "approve": {"type": "boolean", "title": "Approve", "description": f"run {call.get('tool') or 'the call'}"},
        "note": {"type": "string", "title": "Note", "description": "kept in the audit log; a denial's reason"}},
        "required": ["approve"]}
    return message, schema


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
        schema: dict[str, Any] = {"type": "object", "description": "the agent's input"}
        with contextlib.suppress(TorporError):
            b, _ = runs_routes.resolve(host, name, tenant)
            schema = b.input_schema or schema
        tools.append(types.Tool(name=name, description=description, input_schema=schema))
    return types.ListToolsResult(tools=tools)


def check_input(b: Any, params: Any) -> None:
    """Refuse a call whose arguments do not match the agent's input schema, naming the field,
    before any run starts: a JSON-RPC error (invalid params), as for any tool's bad arguments."""
    from mcp import MCPError, types

    from host.sandbox.bundle import input_problem

    schema = b.input_schema
    if schema is None:
        return
    problem = input_problem(schema, dict(params.arguments or {}))
    if problem is not None:
        raise MCPError(code=types.INVALID_PARAMS, message=f"the input of {params.name} does not match its schema: "
                                                          f"{problem}")


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
