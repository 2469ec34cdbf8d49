"""The accountant of an agent's budgets: what it has used, and which limits that crosses.

The policy engine decides on a :class:`policies.Usage` (pure, no I/O); the agent record
keeps usage as JSON. This module is the one place that converts between the two, counts
tokens and fuel into the record, and turns crossed thresholds into audit events, so a
budget cannot be counted in one place and checked against another.
"""

from __future__ import annotations

import time
from typing import Any

import policies
from host.runtime.agent import LiveAgent


def usage_of(agent: LiveAgent, now: float) -> policies.Usage:
    """The agent's usage as the policy engine reads it (per run and in total)."""
    u = agent.usage
    return policies.Usage(
        fuel_used=int(u.get("fuel_used", 0)),
        fuel_used_run=int(u.get("fuel_used", 0)) - agent.run_fuel_start,
        wall_clock_s=max(0.0, now - float(agent.record.get("created_at", now))),
        wall_clock_run_s=max(0.0, now - agent.run_started),
        tool_calls=int(u.get("tool_calls", 0)), tokens=int(u.get("tokens", 0)),
        denials=int(u.get("denials", 0)), calls_by_tool=dict(u.get("calls_by_tool", {})),
        recent_calls={k: tuple(v) for k, v in (u.get("recent_calls") or {}).items()},
    )


def keep(agent: LiveAgent, usage: policies.Usage) -> None:
    """Write the counters a decision moved back into the agent record."""
    agent.usage.update(tool_calls=usage.tool_calls, tokens=usage.tokens, denials=usage.denials,
                       calls_by_tool=dict(usage.calls_by_tool),
                       recent_calls={k: list(v) for k, v in usage.recent_calls.items()})


def count_tokens(agent: LiveAgent, call_seq: int, tool: str, n: int) -> None:
    """A tool reports the tokens a call spent (an LLM call); audited as it happens."""
    n = max(0, int(n))
    agent.usage["tokens"] = int(agent.usage.get("tokens", 0)) + n
    agent.event("tokens.used", call_seq=call_seq, tool=tool, tokens=n, total=agent.usage["tokens"])


def count_fuel(agent: LiveAgent, fuel_used: int) -> None:
    """The fuel the guest has burnt so far (its instance's meter)."""
    agent.usage["fuel_used"] = fuel_used


def crossed(agent: LiveAgent, before: policies.Usage) -> policies.BudgetEvent | None:
    """Audit the warnings crossed since ``before``; return the first exceeded limit, if any."""
    exceeded = None
    after = usage_of(agent, time.time())
    for ev in policies.budget_events(agent.bundle.policy, before, after):
        data: dict[str, Any] = ev.to_dict()
        data.pop("kind", None)
        agent.event("budget." + ev.kind, **data)
        if ev.terminate and exceeded is None:
            exceeded = ev
    return exceeded
