"""Helpers for calling host tools directly, outside a running agent."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio

from host.tools.registry import ToolContext, ToolError
from policies import Policy, parse_policy

T = TypeVar("T")


def policy(tools_toml: str, extra: str = "") -> Policy:
    return parse_policy('[agent]\nname = "t"\n' + tools_toml + "\n" + extra)


@dataclass
class Ctx:
    """A ToolContext for one grant, recording the tokens reported."""

    pol: Policy
    tool: str
    secrets: dict[str, str] = field(default_factory=dict)
    tokens: list[int] = field(default_factory=list)
    agent_id: str = "agent-1"
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # what the tool told the agent's audit
    mcp_config: Any = None  # the host's operator config (host.tools.mcp_config.OperatorConfig)

    def ctx(self) -> ToolContext:
        return ToolContext(
            agent_id=self.agent_id, agent_name="t", call_seq=1, kv_namespace=f"agent:{self.agent_id}",
            secrets=dict(self.secrets), report_tokens=lambda n, **detail: self.tokens.append(n), grant=self.pol.grants.get(self.tool),
            policy=self.pol, event=lambda kind, data: self.events.append((kind, data)), mcp_config=self.mcp_config,
        )


def run(fn: Callable[[], Awaitable[T]]) -> T:
    return anyio.run(fn)


def call(spec_func: Callable[..., Awaitable[Any]], args: Any, c: Ctx) -> Any:
    """Run an async tool function; returns its result or the ToolError it raised."""

    async def go() -> Any:
        try:
            return await spec_func(args, c.ctx())
        except ToolError as err:
            return err

    return anyio.run(go)


def invoke(tool: str, raw_args: dict[str, Any], c: Ctx) -> Any:
    """Validate ``raw_args`` with the tool's model and run it, as the runtime would."""
    from host.tools.builtin import BUILTINS

    spec = BUILTINS[tool]
    try:
        args = spec.validate(raw_args)
    except ToolError as err:
        return err
    return call(spec.func, args, c)


def answer(tool: str, raw_args: dict[str, Any], c: Ctx, *, also: tuple[str, ...] = ()) -> tuple[int, Any]:
    """Run a builtin tool as the pipeline does: canonical arguments, then the one choke point
    (:meth:`ToolCallPipeline.settle`) that turns its value or exception into the scrubbed answer
    the guest reads. ``also``: more secret values the agent holds (other grants)."""
    import json

    from host.runtime.tool_call import ToolCallPipeline, canonical_args
    from host.tools.builtin import BUILTINS
    from host.trust.scrub import Scrubber

    spec = BUILTINS[tool]
    scrub = Scrubber([*c.secrets.values(), *also])

    async def go() -> tuple[int, bytes]:
        try:
            args = spec.validate(canonical_args(spec, raw_args))
            value = await spec.func(args, c.ctx())
        except Exception as exc:
            return ToolCallPipeline.settle(spec, scrub, exc=exc)
        return ToolCallPipeline.settle(spec, scrub, value)

    status, data = anyio.run(go)
    return status, json.loads(data)
