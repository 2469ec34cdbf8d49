"""Declaring tools, validating their arguments, and loading user tools.

A tool is a Python callable ``fn(args, ctx)`` (sync or async) whose first
parameter is annotated with a pydantic model: the guest's JSON arguments are
validated against that model (strictly: no silent coercion, no unknown keys)
before the tool runs, so a tool never sees malformed input. A *transactional*
tool instead takes ``fn(args, ctx, txn)`` and does its whole effect inside the
store transaction that also records its result in the journal: that is how
``kv.incr`` happens exactly once even if the host is killed at any moment.

User tools are named in a policy as ``module:function``, a name that resolves
to one of the operator's tools (never to any importable callable): see
:mod:`host.tools.sources`.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError


class ToolError(Exception):
    """Raise from a tool to give the guest a structured error it can act on."""

    def __init__(self, code: str, message: str, *, retryable: bool = False, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.retryable = retryable
        self.details = details


class InputRequired(ToolError):
    """Raised by a tool whose peer asks a person something mid-call (an MCP server's
    ``elicitation/create``): the call is cut, and the pipeline parks the agent for a
    person as for an approval.  ``question`` is what the person is shown (``server``,
    ``tool``, ``message``, ``requested_schema``, ``index``, ``digest``); once answered, the
    call is issued again and the tool answers the same question from
    :attr:`ToolContext.elicited` (see :mod:`host.tools.mcp_peer`)."""

    def __init__(self, question: dict[str, Any]) -> None:
        super().__init__("input_required", f"{question.get('server')} asks a person: {question.get('message')}")
        self.question = question


class AnyArgs(BaseModel):
    """Arguments of a tool that takes any JSON object."""

    model_config = ConfigDict(extra="allow")


@dataclass
class ToolContext:
    """What a tool knows about the call: who, which call, and the host services it may use."""

    agent_id: str
    agent_name: str
    call_seq: int
    kv_namespace: str
    principal: str | None = None
    now: Callable[[], float] = field(default=lambda: 0.0)
    store: Any = None  # the host's AgentStore, for tools that keep state
    secrets: dict[str, str] = field(default_factory=dict)  # credentials leased for this call (host side only)
    secret_hosts: dict[str, tuple[str, ...]] = field(default_factory=dict)  # hosts each may go to (empty: unbound)
    # Count LLM tokens against the budget: report_tokens(total, model=, provider=, input_tokens=, output_tokens=).
    report_tokens: Callable[..., None] = field(default=lambda n, **detail: None)
    grant: Any = None  # the policy's ToolGrant for this tool (constraints, credentials, tool-specific settings)
    policy: Any = None  # the agent's whole Policy
    # The host's operator config (host.tools.mcp_config.OperatorConfig): how to start or reach
    # the MCP servers a policy names. None: none (only a policy's own deprecated command or url).
    mcp_config: Any = None
    # An audit event of the calling agent (kind, data), from any thread: what a tool's peer said
    # during the call (an MCP server's progress and log lines), scrubbed by the pipeline.
    event: Callable[[str, dict[str, Any]], None] = field(default=lambda kind, data: None)
    # Another granted tool run for this call by the agent's own pipeline (decided under its policy,
    # paid from its budgets, audited): an MCP server's sampling request through ``llm.*``. None outside one.
    nested: Callable[[str, dict[str, Any]], Awaitable[Any]] | None = None
    # The answers people gave to the questions this call asked before it was cut (an MCP
    # server's elicitations, in the order asked): the call issued again answers them from here.
    elicited: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class ToolSpec:
    """A registered tool."""

    name: str
    func: Callable[..., Any]
    args_model: type[BaseModel]
    idempotent: bool = False
    transactional: bool = False
    description: str = ""
    # The arguments as the tool will use them (a URL parsed and normalised once): the policy
    # decides on these, and the tool is handed the same. None: the arguments as given.
    canonical: Callable[[Any], Any] | None = None
    # Asked after a crash, for a call that was started but not answered and whose spec is not
    # idempotent: may it run again anyway?  (An MCP tool its trusted server marks read-only or
    # idempotent.)  None: no; the agent is parked in_doubt.
    rerun_safe: Callable[[ToolContext], Awaitable[bool]] | None = None

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.func)

    def validate(self, args: Any) -> BaseModel:
        """Validate guest arguments; raise ToolError('invalid_args') with a readable summary."""
        if not isinstance(args, dict):
            raise ToolError("invalid_args", f"{self.name}: arguments must be a JSON object, got {type(args).__name__}")
        try:
            return self.args_model.model_validate(args, strict=True)
        except ValidationError as exc:
            parts = []
            for err in exc.errors()[:5]:
                loc = ".".join(str(x) for x in err["loc"]) or "(arguments)"
                parts.append(f"{loc}: {err['msg']}")
            raise ToolError("invalid_args", f"{self.name}: " + "; ".join(parts)) from None


def tool(name: str, *, idempotent: bool = False, transactional: bool = False, description: str = "") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark a function as a tool (the registry reads these attributes)."""

    def mark(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn.__torpor_tool__ = {  # type: ignore[attr-defined]
            "name": name,
            "idempotent": idempotent,
            "transactional": transactional,
            "description": description or (fn.__doc__ or "").strip().split("\n")[0],
        }
        return fn

    return mark


def spec_from_function(fn: Callable[..., Any], *, name: str | None = None, idempotent: bool | None = None) -> ToolSpec:
    """Build a ToolSpec from a function and its annotations."""
    meta: dict[str, Any] = getattr(fn, "__torpor_tool__", {})
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # annotations that do not resolve: accept any object
        hints = {}
    params = list(inspect.signature(fn).parameters)
    model: type[BaseModel] = AnyArgs
    if params:
        ann = hints.get(params[0])
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
    tool_name = name or meta.get("name") or fn.__name__
    return ToolSpec(
        name=tool_name,
        func=fn,
        args_model=model,
        idempotent=bool(meta.get("idempotent", False) if idempotent is None else idempotent),
        transactional=bool(meta.get("transactional", False)),
        description=str(meta.get("description", "")),
    )
