"""The client side of the protocol: what Torpor declares and answers to one MCP server.

A server may ask its client things in the middle of a call (``sampling/createMessage``,
``elicitation/create``, ``roots/list``) and tell it things (progress, log messages,
resource changes).  :class:`Peer` holds one session's answers to all of them:

* **progress** is requested on every call (a progress token), and each notification
  tells the call's :class:`CallRoute` (which pushes its deadline back, up to the
  server's hard limit, see :mod:`host.tools.mcp`) and becomes an ``mcp.progress``
  event of the calling agent;
* **log messages** and **resource notifications** become ``mcp.log`` /
  ``mcp.notification`` events of the agent whose call is in flight (or lines of the
  host's log when none is), never dropped;
* **roots** are the policy's ``[mcp.NAME].roots``; without them no roots capability is
  declared;
* **sampling** goes to the ``llm.*`` tool ``[mcp.NAME].sampling`` names, through the
  calling agent's own pipeline (its policy decides, its token budget pays, the call
  is audited as its model call): :attr:`CallRoute.sample`.  A server whose policy
  names no such tool gets an error saying so;
* **elicitation** (form mode) is a question for a person, allowed where the policy says
  ``[mcp.NAME] elicitation = true`` (refused with a reason otherwise, and in URL mode).
  The agent must not hold a server's request open while it waits for a person (it
  hibernates; the process that ran it may exit; a session does not survive a restart),
  so the call is *cut*: the question goes to :attr:`CallRoute.asked`, the call is
  cancelled, and the tool raises :class:`~host.tools.registry.InputRequired`, on which
  the pipeline parks the agent as for an approval.  Once a person has answered, the call
  is issued again and the server's same question (the same message and schema, at the
  same place in the call's order of questions) is answered at once from the journal
  (:attr:`CallRoute.elicited`).  A server the operator lets elicit must therefore ask
  before it acts, which is how elicitation is meant to be used.

Server requests are not tied to a call by the protocol's stdio framing, so they go to
the one call in flight on that session; with several in flight (agents sharing a
server) a request that needs a caller is refused as ambiguous rather than answered
for the wrong agent.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("torpor.mcp")

MAX_EVENT_TEXT = 2000  # a server's log line kept in an audit event, at most
MAX_EVENTS_PER_CALL = 100  # progress and log events recorded per call; the rest counted


def _noop_event(kind: str, data: dict[str, Any]) -> None:
    return None


@dataclass
class CallRoute:
    """One call in flight on a session: where the server's requests and notifications go."""

    tool: str
    event: Callable[[str, dict[str, Any]], None] = _noop_event  # the calling agent's audit events
    sample: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]] | None = None  # llm.chat arguments → result
    progressed: Callable[[], None] = field(default=lambda: None)  # a sign of life: push the deadline back
    elicitation: bool = False  # the policy lets this server ask a person ([mcp.NAME] elicitation = true)
    elicited: list[dict[str, Any]] = field(default_factory=list)  # answers people gave, in the order asked
    asked: dict[str, Any] | None = None  # a question not yet answered: the call is cut, the agent parks
    cut: Callable[[], None] = field(default=lambda: None)  # cancel the call (set by the supervisor)
    questions: int = 0  # elicitations seen in this call so far
    kept: int = 0  # events recorded for this call
    dropped: int = 0  # and those past MAX_EVENTS_PER_CALL, counted only

    def record(self, kind: str, data: dict[str, Any]) -> None:
        """An event of the calling agent, unless the call has had its share (a chatty server
        must not fill an agent's audit log: the rest are counted, and the count recorded once)."""
        if self.kept >= MAX_EVENTS_PER_CALL:
            self.dropped += 1
            return
        self.kept += 1
        self.event(kind, data)

    def close(self, server: str) -> None:
        """The call is over: say how many events were not recorded, if any."""
        if self.dropped:
            self.event("mcp.events_dropped", {"server": server, "tool": self.tool, "dropped": self.dropped,
                                              "kept": self.kept})


class Peer:
    """The callbacks and capabilities of one server's session."""

    def __init__(self, server: str, roots: tuple[str, ...] = ()) -> None:
        self.server = server
        self.roots = roots
        self.calls: dict[int, CallRoute] = {}
        self._next = 0

    # -- the calls in flight ------------------------------------------------------------
    def enter(self, route: CallRoute) -> int:
        """Register a call in flight; returns the key :meth:`leave` takes."""
        self._next += 1
        self.calls[self._next] = route
        return self._next

    def leave(self, key: int) -> None:
        route = self.calls.pop(key, None)
        if route is not None:
            route.close(self.server)

    def _caller(self, what: str) -> tuple[CallRoute | None, str]:
        routes = list(self.calls.values())
        if len(routes) == 1:
            return routes[0], ""
        if not routes:
            return None, f"{what} arrived while no call of this client is in flight"
        return None, (f"{what} cannot be attributed: {len(routes)} calls of different agents are in flight "
                      "on this server; Torpor answers server requests only for a single caller")

    def _event(self, kind: str, **data: Any) -> None:
        routes = list(self.calls.values())
        for route in routes:
            route.record(kind, {"server": self.server, **data})
        if not routes:
            log.info("MCP server %s: %s %s", self.server, kind, data)

    # -- what the SDK's session is given -----------------------------------------------
    def session_kwargs(self) -> dict[str, Any]:
        """The ``ClientSession`` keyword arguments: every callback declares its capability."""
        kwargs: dict[str, Any] = {
            "sampling_callback": self._sampling,
            "elicitation_callback": self._elicitation,
            "logging_callback": self._logging,
            "message_handler": self._message,
        }
        if self.roots:
            kwargs["list_roots_callback"] = self._list_roots
        return kwargs

    def progress_callback(self, route: CallRoute) -> Callable[[float, float | None, str | None], Awaitable[None]]:
        """The progress callback of one call: its deadline moves, its agent hears of it."""

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            route.progressed()
            route.record("mcp.progress", {"server": self.server, "tool": route.tool, "progress": progress,
                                         "total": total, "message": (message or "")[:MAX_EVENT_TEXT] or None})

        return on_progress

    async def _sampling(self, context: Any, params: Any) -> Any:
        from mcp import types

        route, why = self._caller("a sampling request")
        if route is None:
            return types.ErrorData(code=types.INVALID_REQUEST, message=why)
        if route.sample is None:
            route.record("mcp.sampling_refused", {"server": self.server, "tool": route.tool})
            return types.ErrorData(
                code=types.INVALID_REQUEST,
                message=(f"sampling refused: no llm tool answers this server's sampling requests for this agent "
                         f"(name a granted llm.* tool in [mcp.{self.server}].sampling)"))
        try:
            args = sampling_to_chat(params)
        except ValueError as exc:
            return types.ErrorData(code=types.INVALID_PARAMS, message=f"sampling refused: {exc}")
        try:
            result = await route.sample(args)
        except Exception as exc:  # a ToolError mostly: denied, over budget, the provider failed
            code = getattr(exc, "code", type(exc).__name__)
            return types.ErrorData(code=types.INTERNAL_ERROR, message=f"sampling failed ({code}): {exc}"[:1000])
        return types.CreateMessageResult(
            role="assistant", content=types.TextContent(type="text", text=str(result.get("content") or "")),
            model=str(result.get("model") or "unknown"), stop_reason=_stop_reason(result.get("finish_reason")))

    async def _elicitation(self, context: Any, params: Any) -> Any:
        from mcp import types

        route, why = self._caller("an elicitation request")
        if route is None:
            return types.ErrorData(code=types.INVALID_REQUEST, message=why)
        message = str(getattr(params, "message", ""))
        if not route.elicitation:
            route.record("mcp.elicitation_refused", {"server": self.server, "tool": route.tool,
                                                    "message": message[:MAX_EVENT_TEXT]})
            return types.ErrorData(
                code=types.INVALID_REQUEST,
                message=(f"elicitation refused: the agent's policy does not let the server {self.server} ask a person "
                         f"(the operator allows it with [mcp.{self.server}] elicitation = true)"))
        if getattr(params, "mode", "form") != "form":
            route.record("mcp.elicitation_refused", {"server": self.server, "tool": route.tool,
                                                    "message": message[:MAX_EVENT_TEXT], "mode": params.mode})
            return types.ErrorData(code=types.INVALID_REQUEST,
                                   message="elicitation refused: Torpor answers form elicitations only, not URL mode")
        schema = dict(getattr(params, "requested_schema", None) or {})
        index = route.questions
        route.questions += 1
        digest = question_digest(message, schema)
        if index < len(route.elicited) and route.elicited[index].get("digest") == digest:
            given = route.elicited[index]
            route.record("mcp.elicitation_answered", {"server": self.server, "tool": route.tool, "index": index,
                                                     "action": given.get("action")})
            return types.ElicitResult(action=given.get("action", "cancel"),
                                      content=given.get("content") if given.get("action") == "accept" else None)
        # A question no one has answered (or not this one: the server asks otherwise now): the
        # call is cut here and the agent waits for a person, hibernated.
        del route.elicited[index:]
        route.asked = {"server": self.server, "tool": route.tool, "message": message[:MAX_EVENT_TEXT * 4],
                       "requested_schema": schema, "index": index, "digest": digest}
        route.cut()
        return types.ErrorData(
            code=types.INVALID_REQUEST,
            message=("the question waits for a person; the agent hibernates meanwhile, and the call is made again "
                     "with the answer"))

    async def _list_roots(self, context: Any) -> Any:
        from mcp import types

        return types.ListRootsResult(roots=[types.Root(uri=r) for r in self.roots])  # type: ignore[arg-type]

    async def _logging(self, params: Any) -> None:
        self._event("mcp.log", level=str(getattr(params, "level", "info")), logger=getattr(params, "logger", None),
                    data=_short(getattr(params, "data", None)))

    async def _message(self, message: Any) -> None:
        from mcp import types

        if isinstance(message, Exception):
            log.info("MCP server %s: transport error: %s", self.server, message)
            return
        root = getattr(message, "root", message)
        if isinstance(root, types.ResourceUpdatedNotification | types.ResourceListChangedNotification
                      | types.ToolListChangedNotification):
            self._event("mcp.notification", method=root.method,
                        params=_short(root.params.model_dump(mode="json") if root.params else None))


def question_digest(message: str, schema: dict[str, Any]) -> str:
    """What identifies a server's question across the call's re-issues: its message and schema."""
    text = json.dumps({"message": message, "schema": schema}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def sampling_to_chat(params: Any) -> dict[str, Any]:
    """A ``sampling/createMessage`` request as ``llm.chat`` arguments (text messages only)."""
    messages: list[dict[str, Any]] = []
    system = getattr(params, "system_prompt", None)
    if system:
        messages.append({"role": "system", "content": str(system)})
    for m in params.messages:
        blocks = m.content if isinstance(m.content, list) else [m.content]
        texts = [getattr(b, "text", None) for b in blocks]
        if any(not isinstance(t, str) for t in texts):
            raise ValueError("only text content can be sampled through the agent's llm tool")
        messages.append({"role": str(m.role), "content": "\n".join(t for t in texts if isinstance(t, str))})
    out: dict[str, Any] = {"messages": messages, "max_tokens": int(params.max_tokens)}
    if getattr(params, "temperature", None) is not None:
        out["temperature"] = float(params.temperature)
    if getattr(params, "stop_sequences", None):
        out["stop"] = list(params.stop_sequences)
    return out


def _stop_reason(finish: Any) -> str:
    return {"length": "maxTokens", "stop": "endTurn", "end_turn": "endTurn", "max_tokens": "maxTokens"}.get(
        str(finish), "endTurn")


def _short(value: Any) -> Any:
    """A server-chosen value as an audit event keeps it: as is when small, else cut text."""
    try:
        text = json.dumps(value, separators=(",", ":"), default=str)
    except (TypeError, ValueError):
        text = repr(value)
    return value if len(text) <= MAX_EVENT_TEXT else text[:MAX_EVENT_TEXT] + "…"
