"""A policy compiled per tool: the decision of an ordinary call without walking the rules.

Why: :func:`policies.engine.decide` walks every rule of a call as a chain of generators and
builds a :class:`~policies.engine.RuleResult` for each, so that ``torpor policy explain`` can
show them all; at thousands of tool calls a second that walk is most of a decision's cost.
Most grants need none of it: a tool with no argument constraints, no validators, no
approval and rates (if any) counted per agent is allowed exactly when a handful of numbers
are under their limits, and the rules its :class:`~policies.engine.Allow` lists are the same
every time. :func:`compiled` works those out once per policy object (kept while the policy
lives), and :meth:`CompiledPolicy.decide` checks the numbers.

The general engine stays the one definition of a decision: a tool that is not plain, and a
plain one whose numbers do not all pass, are decided by :func:`~policies.engine.decide`
itself, so a compiled program only ever answers "allowed, by these rules" where the engine
would (``tests/test_policy_compiled.py`` checks them against each other). Pure, no I/O.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from .engine import (
    Allow,
    CustomValidator,
    Decision,
    ToolRequest,
    Usage,
    decide,
    locator,
    record_decision,
)

if TYPE_CHECKING:
    from .schema import Policy

__all__ = ["CompiledPolicy", "ToolProgram", "compiled"]


@dataclass(frozen=True)
class ToolProgram:
    """One plain grant, precompiled: the limits its calls are checked against, in the
    engine's order, and the :class:`Allow` every passing call gets."""

    tool: str
    allow: Allow
    #: ``budgets.tool_calls``: a call is the ``n + 1``-th, at most this many
    tool_calls: int | None
    #: the other budgets, ``(Usage attribute, limit)``: used may not exceed the limit
    ceilings: tuple[tuple[str, float], ...]
    max_denials: int | None
    max_calls: int | None
    #: ``(window_s, count)`` of each rate, counted over this agent's own calls
    rates: tuple[tuple[float, int], ...]
    #: the longest rate window: how long a call's time is kept in ``recent_calls``
    window: float

    def passes(self, usage: Usage, now: float) -> bool:
        """True when every rule of the call passes (the engine would allow it)."""
        if self.tool_calls is not None and usage.tool_calls + 1 > self.tool_calls:
            return False
        for attr, limit in self.ceilings:
            if getattr(usage, attr) > limit:
                return False
        if self.max_denials is not None and usage.denials > self.max_denials:
            return False
        if self.max_calls is not None and usage.calls_by_tool.get(self.tool, 0) + 1 > self.max_calls:
            return False
        if self.rates:
            stamps = usage.recent_calls.get(self.tool, ())
            for window_s, count in self.rates:
                if sum(1 for t in stamps if t > now - window_s) >= count:
                    return False
        return True

    def record(self, usage: Usage, now: float) -> Usage:
        """:func:`~policies.engine.record_decision` of this program's :attr:`allow`."""
        tool = self.tool
        calls = dict(usage.calls_by_tool)
        calls[tool] = calls.get(tool, 0) + 1
        recent = dict(usage.recent_calls)
        if self.window > 0:
            recent[tool] = (*(t for t in recent.get(tool, ()) if t > now - self.window), now)
        else:
            recent.pop(tool, None)
        return replace(usage, tool_calls=usage.tool_calls + 1, calls_by_tool=calls, recent_calls=recent)


#: The budgets a call is checked against besides ``tool_calls`` and ``max_denials``, in the
#: engine's order: ``(rule, Usage attribute, Budgets attribute)``.
_CEILINGS = (
    ("budgets.tokens", "tokens", "tokens"),
    ("budgets.fuel_total", "fuel_used", "fuel_total"),
    ("budgets.fuel", "fuel_used_run", "fuel"),
    ("budgets.wall_clock_total", "wall_clock_s", "wall_clock_total"),
    ("budgets.wall_clock", "wall_clock_run_s", "wall_clock"),
)

#: The budgets whose thresholds :func:`policies.engine.budget_events` reports.
_CUMULATIVE = ("tokens", "fuel_total", "wall_clock_total", "tool_calls")


class CompiledPolicy:
    """A policy's plain grants as :class:`ToolProgram`, and what its budgets report."""

    def __init__(self, policy: Policy) -> None:
        # Weakly: the cache of :func:`compiled` must not keep a policy alive.
        self._policy = weakref.ref(policy)
        b = policy.budgets
        #: False when no budget has thresholds to report: a call then needs no usage after it
        self.reports_budgets = any(getattr(b, name) is not None for name in _CUMULATIVE)
        self.tools: Mapping[str, ToolProgram] = {
            name: prog for name in policy.tools if (prog := _program(policy, name)) is not None
        }

    @property
    def policy(self) -> Policy:
        """The policy compiled (alive as long as its compiled form is in use)."""
        policy = self._policy()
        assert policy is not None, "a compiled policy outlived its policy"
        return policy

    def decide(self, request: ToolRequest, usage: Usage, now: float, *,
               custom_validators: Mapping[str, CustomValidator] | None = None) -> Decision:
        """:func:`~policies.engine.decide`, by the precompiled program when the tool has one
        and all of its rules pass."""
        prog = self.tools.get(request.tool)
        if prog is not None and prog.passes(usage, now):
            return prog.allow
        return decide(self.policy, request, usage, now, custom_validators=custom_validators)

    def record(self, usage: Usage, request: ToolRequest, decision: Decision, now: float) -> Usage:
        """:func:`~policies.engine.record_decision`, shorter for a program's own allow."""
        prog = self.tools.get(request.tool)
        if prog is not None and decision is prog.allow:
            return prog.record(usage, now)
        return record_decision(self.policy, usage, request, decision, now)


#: id(policy) -> its compiled form, dropped when the policy is (policies are not hashable).
_COMPILED: dict[int, CompiledPolicy] = {}


def compiled(policy: Policy) -> CompiledPolicy:
    """``policy`` precompiled (see the module docstring): built on its first call (the first
    decision of a loaded bundle), then the same object for as long as the policy lives."""
    key = id(policy)
    found = _COMPILED.get(key)
    if found is not None and found._policy() is policy:
        return found
    made = _COMPILED[key] = CompiledPolicy(policy)
    weakref.finalize(policy, _COMPILED.pop, key, None)
    return made


def _program(policy: Policy, tool: str) -> ToolProgram | None:
    """The program of a plain grant, None for one the general engine must walk."""
    grant = policy.tools[tool]
    if grant.constraints or grant.approval is not None or policy.tool_validators.get(tool):
        return None
    if grant.rate and grant.rate_scope != "agent":
        return None  # counted in the store, beyond the agent (``aggregate_keys``)
    b = policy.budgets
    rules = [locator("tools", tool)]
    if b.tool_calls is not None:
        rules.append("budgets.tool_calls")
    ceilings: list[tuple[str, float]] = []
    for rule, attr, name in _CEILINGS:
        limit = getattr(b, name)
        if limit is not None:
            rules.append(rule)
            ceilings.append((attr, limit))
    if b.max_denials is not None:
        rules.append("budgets.max_denials")
    if grant.max_calls is not None:
        rules.append(locator("tools", tool, "max_calls"))
    for i in range(len(grant.rate)):
        rules.append(locator("tools", tool, "rate") + (f"[{i}]" if len(grant.rate) > 1 else ""))
    return ToolProgram(
        tool=tool, allow=Allow(tuple(rules)), tool_calls=b.tool_calls, ceilings=tuple(ceilings),
        max_denials=b.max_denials, max_calls=grant.max_calls,
        rates=tuple((r.window_s, r.count) for r in grant.rate),
        window=max((r.window_s for r in grant.rate), default=0.0),
    )
