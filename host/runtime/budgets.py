"""The accountant of an agent's budgets: what it has used, and which limits that crosses.

The policy engine decides on a :class:`policies.Usage` (pure, no I/O); the agent record
keeps usage as JSON. This module is the one place that converts between the two, counts
tokens and fuel into the record, and turns crossed thresholds into audit events, so a
budget cannot be counted in one place and checked against another.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from typing import Any

import policies
from host.runtime.agent import LiveAgent
from policies.compiled import compiled
from snapshots.store import AgentStore

#: The store namespace of the limits shared beyond one agent record (``scope`` = run,
#: agent, policy, tenant): no guest can name it (agents reach ``agent:ID`` and ``shared:NAME``).
LIMITS_NAMESPACE = "torpor:limits"


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


#: What a token report may say beyond its total, and the type of each (anything else is dropped).
TOKEN_DETAIL = {"model": str, "provider": str, "input_tokens": int, "output_tokens": int}


def count_tokens(agent: LiveAgent, call_seq: int, tool: str, n: int, **detail: Any) -> None:
    """A tool reports the tokens a call spent (an LLM call); audited as it happens, with
    the model, provider, input and output tokens when the tool says them (:data:`TOKEN_DETAIL`)."""
    n = max(0, int(n))
    agent.usage["tokens"] = int(agent.usage.get("tokens", 0)) + n
    known = {k: v for k, v in detail.items()
             if k in TOKEN_DETAIL and isinstance(v, TOKEN_DETAIL[k]) and not isinstance(v, bool)}
    for k in ("model", "provider"):
        if k in known:
            known[k] = str(known[k])[:200]
    agent.event("tokens.used", call_seq=call_seq, tool=tool, tokens=n, total=agent.usage["tokens"], **known)


def count_fuel(agent: LiveAgent, fuel_used: int) -> None:
    """The fuel the guest has burnt so far (its instance's meter)."""
    agent.usage["fuel_used"] = fuel_used


def crossed(agent: LiveAgent, before: policies.Usage | None) -> policies.BudgetEvent | None:
    """Audit the warnings crossed since ``before``; return the first exceeded limit, if any.
    ``before`` is None after a plain call (:func:`decide_plain`): nothing to report."""
    if before is None or not compiled(agent.bundle.policy).reports_budgets:
        return None  # no budget with thresholds: nothing to report, no usage to build
    exceeded = None
    after = usage_of(agent, time.time())
    for ev in policies.budget_events(agent.bundle.policy, before, after):
        data: dict[str, Any] = ev.to_dict()
        data.pop("kind", None)
        agent.event("budget." + ev.kind, **data)
        if ev.terminate and exceeded is None:
            exceeded = ev
    return exceeded


def forget_counters(txn: Any, agent_id: str) -> int:
    """Delete the shared counters of an agent that has ended: its runs' and its own (the
    policy's and the tenant's go on). Without this every run would leave its counters in
    the store for good. Returns how many were deleted."""
    keys = [*txn.kv_keys(LIMITS_NAMESPACE, f"run:{agent_id}/"), *txn.kv_keys(LIMITS_NAMESPACE, f"agent:{agent_id}:")]
    for k in keys:
        txn.kv_delete(LIMITS_NAMESPACE, k)
    return len(keys)


def read_shared(txn: Any, keys: Sequence[str]) -> dict[str, Any]:
    """The shared counters ``keys`` as stored (absent: never counted)."""
    out: dict[str, Any] = {}
    for k in keys:
        raw = txn.kv_get(LIMITS_NAMESPACE, k)
        if raw is not None:
            out[k] = json.loads(raw)
    return out


class _Counters:
    """The counters a :class:`policies.compiled.ToolProgram` checks, read straight from the
    agent record: no :class:`policies.Usage` (and its frozen copies) built for a plain call."""

    __slots__ = ("calls_by_tool", "denials", "fuel_used", "fuel_used_run", "recent_calls", "tokens",
                 "tool_calls", "wall_clock_run_s", "wall_clock_s")

    def __init__(self, agent: LiveAgent, now: float) -> None:
        u = agent.usage
        self.fuel_used = fuel = int(u.get("fuel_used", 0))
        self.fuel_used_run = fuel - agent.run_fuel_start
        self.wall_clock_s = max(0.0, now - float(agent.record.get("created_at", now)))
        self.wall_clock_run_s = max(0.0, now - agent.run_started)
        self.tool_calls = int(u.get("tool_calls", 0))
        self.tokens = int(u.get("tokens", 0))
        self.denials = int(u.get("denials", 0))
        self.calls_by_tool: dict[str, int] = u.get("calls_by_tool") or {}
        self.recent_calls: dict[str, list[float]] = u.get("recent_calls") or {}


def decide_plain(agent: LiveAgent, request: policies.ToolRequest, now: float) -> policies.Allow | None:
    """A plain call decided and counted without building its usage, or None when it is not one.

    Plain: its grant is precompiled (:mod:`policies.compiled`), every rule passes, and the
    policy has no budget with thresholds to report after the call (so nothing needs the usage
    but the counters). The record's usage then moves on exactly as :func:`keep` of
    :func:`policies.record_decision` would move it (``tests/test_policy_compiled.py``).
    """
    program = compiled(agent.bundle.policy)
    prog = program.tools.get(request.tool)
    if prog is None or program.reports_budgets:
        return None
    counters = _Counters(agent, now)
    if not prog.passes(counters, now):  # type: ignore[arg-type]  # the counters a Usage would hold
        return None
    tool = request.tool
    calls = dict(counters.calls_by_tool)
    calls[tool] = calls.get(tool, 0) + 1
    recent = {k: list(v) for k, v in counters.recent_calls.items()}
    if prog.window > 0:
        recent[tool] = [*(t for t in recent.get(tool, ()) if t > now - prog.window), now]
    else:
        recent.pop(tool, None)
    agent.usage.update(tool_calls=counters.tool_calls + 1, tokens=counters.tokens, denials=counters.denials,
                       calls_by_tool=calls, recent_calls=recent)
    return prog.allow


def decide(agent: LiveAgent, store: AgentStore, request: policies.ToolRequest,
           now: float) -> tuple[policies.Decision, policies.Usage, policies.Usage]:
    """The policy's decision on ``request`` and the usage before and after it.

    Limits scoped beyond one call (a spending total per run, agent, policy or tenant; a
    rate per run, policy or tenant) are counters in the store: they are read, decided on
    and advanced in one write transaction, which LMDB serialises across threads and
    processes, so concurrent agents can never both take the last of a limit, and a
    restart resets nothing. The counters are advanced when the call is let through
    (before it runs): a call cut short by a crash still counts, never the reverse.
    """
    policy = agent.bundle.policy
    before = usage_of(agent, now)
    keys = policies.aggregate_keys(policy, request)
    if not keys:
        program = compiled(policy)  # the plain grants' decisions, precompiled per tool
        decision = program.decide(request, before, now, custom_validators=agent.validators)
        return decision, before, program.record(before, request, decision, now)

    def judge(txn: Any) -> tuple[policies.Decision, policies.Usage, policies.Usage]:
        usage = dataclasses.replace(before, shared=read_shared(txn, keys))
        decision = policies.decide(policy, request, usage, now, custom_validators=agent.validators)
        after = policies.record_decision(policy, usage, request, decision, now)
        for k in keys:
            if k in after.shared and after.shared.get(k) != usage.shared.get(k):
                v = after.shared[k]
                txn.kv_set(LIMITS_NAMESPACE, k, json.dumps(list(v) if isinstance(v, tuple) else v).encode())
        return decision, usage, after

    return store.transact(judge)
