"""A plain call (host.runtime.budgets.decide_plain) is decided and counted as the general path would.

The general path: the usage built from the record (``usage_of``), ``policies.decide``,
``policies.record_decision``, and ``keep`` writing it back. The plain path reads the record's
counters and moves them itself; both must leave the same record and the same decision, and the
plain one must step aside whenever the general one would do anything else.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import policies
from host.runtime import budgets
from policies import policy_from_dict

NOW = 1000.0
STAMPS = st.sampled_from([989.0, 990.0, 990.5, 995.0, 995.5, 998.0, 1000.0])
TOOLS = ["kv.incr", "kv.get"]

POLICIES = [
    {"agent": {"name": "p"}, "budgets": {"fuel": 5000, "wall_clock": "5s"}, "tools": {"kv.incr": {}, "kv.get": {}}},
    {"agent": {"name": "p"}, "budgets": {"max_denials": 2}, "tools": {"kv.incr": {"rate": "2/5s", "max_calls": 4}}},
    {"agent": {"name": "p"}, "tools": {"kv.incr": {"rate": ["1/2s", "3/10s"]}, "kv.get": {"max_calls": 1}}},
    # thresholds to report: never plain
    {"agent": {"name": "p"}, "budgets": {"tool_calls": 6}, "tools": {"kv.incr": {}}},
]

usages = st.fixed_dictionaries({}, optional={
    "fuel_used": st.integers(0, 8000), "tool_calls": st.integers(0, 8), "tokens": st.integers(0, 5),
    "denials": st.integers(0, 4), "suspensions": st.integers(0, 3),
    "calls_by_tool": st.dictionaries(st.sampled_from(TOOLS), st.integers(0, 5), max_size=2),
    "recent_calls": st.dictionaries(st.sampled_from(TOOLS), st.lists(STAMPS, max_size=4), max_size=2),
})


def _agent(policy: Any, usage: dict[str, Any], created: float, run_started: float, fuel_start: int) -> Any:
    return SimpleNamespace(usage=usage, record={"created_at": created, "usage": usage},
                           run_fuel_start=fuel_start, run_started=run_started,
                           bundle=SimpleNamespace(policy=policy), validators={})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(range(len(POLICIES))), st.sampled_from(TOOLS), usages, st.floats(990, 1000),
       st.floats(994, 1000), st.integers(0, 3000))
@example(1, "kv.incr", {"recent_calls": {"kv.incr": [995.0, 999.0]}}, 990.0, 999.0, 0)  # a stamp on the edge
def test_a_plain_call_counts_as_the_general_path(which: int, tool: str, usage: dict[str, Any], created: float,
                                                 run_started: float, fuel_start: int) -> None:
    policy = policy_from_dict(POLICIES[which])
    request = policies.ToolRequest("a", tool, {}, 1)
    plain = _agent(policy, copy.deepcopy(usage), created, run_started, fuel_start)
    general = _agent(policy, copy.deepcopy(usage), created, run_started, fuel_start)
    before = budgets.usage_of(general, NOW)
    expected = policies.decide(policy, request, before, NOW)
    got = budgets.decide_plain(plain, request, NOW)
    if got is None:  # stepped aside: the record untouched
        assert plain.usage == usage
        assert not isinstance(expected, policies.Allow) or which == 3 or tool not in policy.tools
        return
    assert got == expected
    budgets.keep(general, policies.record_decision(policy, before, request, expected, NOW))
    assert plain.usage == general.usage
