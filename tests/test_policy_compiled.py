"""The precompiled policy (policies.compiled) decides and counts every call as the engine does.

Policies are generated as tables and loaded by the real loader; each call is decided by both
``policies.compiled.compiled(policy)`` and ``policies.decide`` (and counted by both ``record``s) on generated
usage, at a time that puts some rate stamps inside their windows and some outside.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from policies import (
    Allow,
    Policy,
    PolicyError,
    ToolRequest,
    Usage,
    decide,
    load_policy,
    policy_from_dict,
    record_decision,
)
from policies.compiled import compiled

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOOLS = ["kv.get", "kv.incr", "t.a"]
NOW = 1000.0
#: Rate stamps on and about the windows' edges (5 s and 10 s, 2 s) before NOW.
STAMPS = st.sampled_from([989.0, 990.0, 990.5, 995.0, 995.5, 998.0, 998.5, 1000.0, 1001.0])


@st.composite
def grants(draw: st.DrawFn, name: str) -> dict[str, Any]:
    g: dict[str, Any] = {} if name.startswith("kv.") else {"handler": "demo:tool"}
    if draw(st.booleans()):
        g["rate"] = draw(st.sampled_from(["2/5s", "3/10s", ["1/2s", "3/10s"]]))
        g["rate_scope"] = draw(st.sampled_from(["agent", "agent", "run", "tenant"]))
    if draw(st.booleans()):
        g["max_calls"] = draw(st.integers(0, 5))
    if draw(st.integers(0, 4)) == 0:  # not plain: the engine decides
        g["approval"] = {"when": "n > 3"}
    if draw(st.integers(0, 4)) == 0:
        g["args"] = {"n": {"max": 10}}
    return g


@st.composite
def policies(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(st.lists(st.sampled_from(TOOLS), unique=True, min_size=1, max_size=3))
    budgets = draw(st.fixed_dictionaries({}, optional={
        "tool_calls": st.integers(0, 20), "tokens": st.integers(0, 100), "max_denials": st.integers(0, 5),
        "fuel": st.integers(1, 2000), "fuel_total": st.integers(1, 4000),
        "wall_clock": st.sampled_from(["1s", "5s"]), "wall_clock_total": st.sampled_from(["2s", "10s"]),
    }))
    data: dict[str, Any] = {"agent": {"name": "prop"}, "tools": {n: draw(grants(n)) for n in names},
                            "budgets": budgets}
    if draw(st.integers(0, 3)) == 0:
        data["validators"] = [{"on": [f"tool:{names[0]}"], "detect": ["email"]}]
    return data


usages = st.builds(
    lambda calls, tokens, denials, fuel, run_fuel, wall, run_wall, by_tool, recent: Usage(
        fuel_used=fuel, fuel_used_run=min(fuel, run_fuel), wall_clock_s=wall, wall_clock_run_s=min(wall, run_wall),
        tool_calls=calls, tokens=tokens, denials=denials, calls_by_tool=by_tool, recent_calls=recent),
    st.integers(0, 25), st.integers(0, 120), st.integers(0, 6), st.integers(0, 5000), st.integers(0, 5000),
    st.floats(0, 12), st.floats(0, 12),
    st.dictionaries(st.sampled_from(TOOLS), st.integers(0, 6), max_size=3),
    st.dictionaries(st.sampled_from(TOOLS), st.lists(STAMPS, max_size=4).map(tuple), max_size=3),
)


def load(data: dict[str, Any]) -> Policy | None:
    try:
        return policy_from_dict(data)
    except PolicyError:
        return None


@SETTINGS
@given(policies(), st.sampled_from([*TOOLS, "nope"]), st.integers(0, 12), usages)
def test_compiled_decides_and_counts_as_the_engine(data: dict[str, Any], tool: str, n: int, usage: Usage) -> None:
    p = load(data)
    assume(p is not None)
    assert p is not None
    req = ToolRequest("agent-c", tool, {"n": n, "text": "hi"}, 3, principal="ops", agent_name="prop", run_id="1.5")
    expected = decide(p, req, usage, NOW)
    got = compiled(p).decide(req, usage, NOW)
    assert got == expected
    assert compiled(p).record(usage, req, got, NOW) == record_decision(p, usage, req, expected, NOW)


def test_plain_grants_are_precompiled_and_others_are_not() -> None:
    p = policy_from_dict({
        "agent": {"name": "c"}, "budgets": {"fuel": 100, "tool_calls": 3},
        "tools": {"kv.incr": {"rate": "2/10s", "max_calls": 5}, "kv.get": {"approval": {"when": "true"}},
                  "t.a": {"handler": "demo:tool", "rate": "1/s", "rate_scope": "tenant"}},
    })
    progs = compiled(p).tools
    assert set(progs) == {"kv.incr"}  # an approval, and a rate counted beyond the agent, need the engine
    allow = progs["kv.incr"].allow
    req = ToolRequest("a", "kv.incr", {}, 1)
    assert compiled(p).decide(req, Usage(), NOW) is allow
    assert allow == decide(p, req, Usage(), NOW)
    assert allow.rules == ('tools."kv.incr"', "budgets.tool_calls", "budgets.fuel", 'tools."kv.incr".max_calls',
                           'tools."kv.incr".rate')
    # past a limit the engine's own decision comes back, with its reason
    for over in (Usage(tool_calls=3), Usage(fuel_used_run=101), Usage(calls_by_tool={"kv.incr": 5}),
                 Usage(recent_calls={"kv.incr": (990.5, 1000.0)})):
        assert compiled(p).decide(req, over, NOW) == decide(p, req, over, NOW) != allow
    # on the edges: exactly at a limit still passes, a stamp as old as the window does not count
    for under in (Usage(tool_calls=2), Usage(fuel_used_run=100), Usage(calls_by_tool={"kv.incr": 4}),
                  Usage(recent_calls={"kv.incr": (990.0, 1000.0)})):
        assert compiled(p).decide(req, under, NOW) is allow
        assert decide(p, req, under, NOW) == allow
        assert compiled(p).record(under, req, allow, NOW) == record_decision(p, under, req, allow, NOW)


def test_a_policy_without_cumulative_budgets_reports_none() -> None:
    assert compiled(load_policy_text({"fuel": 10, "wall_clock": "1s"})).reports_budgets is False
    assert compiled(load_policy_text({"tool_calls": 10})).reports_budgets is True


def load_policy_text(budgets: dict[str, Any]) -> Policy:
    return policy_from_dict({"agent": {"name": "b"}, "budgets": budgets, "tools": {"kv.incr": {}}})


def test_the_steps_example_is_plain(tmp_path: Any) -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    p = load_policy(root / "guest_sdk" / "examples" / "steps" / "policy.toml")
    assert isinstance(compiled(p).tools["kv.incr"].allow, Allow)


def test_the_cache_lets_a_policy_go() -> None:
    import gc

    from policies import compiled as module

    p = load_policy_text({"fuel": 10})
    key = id(p)
    assert compiled(p).policy is p and key in module._COMPILED
    del p
    gc.collect()
    assert key not in module._COMPILED
