"""Property tests for the engine as a whole (hypothesis).

Policies are generated as tables (the same shape a TOML file produces) and
loaded with ``policy_from_dict``, so every generated policy has passed the
real loader.
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from policies import (
    Allow,
    Deny,
    Policy,
    PolicyError,
    RequireApproval,
    Terminate,
    ToolRequest,
    Usage,
    budget_events,
    decide,
    explain,
    policy_from_dict,
    record_decision,
)
from policies.detectors import luhn_valid

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TOOLS = ["kv.get", "kv.incr", "t.a", "t.b"]
PATHS = ["x", "y", "n", "v.id", "items.*.price"]

# --- generators -------------------------------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-100, 100),
    st.floats(-100, 100, allow_nan=False),
    st.sampled_from(["a", "b", "#support", "select 1", "DROP", "x@y.io", "4111 1111 1111 1111"]),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["id", "price", "k"]), inner, max_size=3),
    ),
    max_leaves=6,
)
args_strategy = st.dictionaries(
    st.sampled_from(["x", "y", "n", "v", "items", "text"]), json_values, max_size=5
)

constraint = st.fixed_dictionaries(
    {},
    optional={
        "required": st.booleans(),
        "type": st.sampled_from(
            ["string", "number", "integer", "boolean", "array", "object", "null"]
        ),
        "allow": st.lists(st.sampled_from(["a", "b", 1, 2, True]), min_size=1, max_size=3),
        "deny": st.lists(st.sampled_from(["a", "b", 1, 2, True]), max_size=3),
        "pattern": st.sampled_from(["^a", "b$", "(?i)^\\s*select\\b"]),
        "forbid_pattern": st.sampled_from(["DROP", "@", "x"]),
        "min": st.integers(-50, 0),
        "max": st.integers(0, 50),
        "min_length": st.integers(0, 2),
        "max_length": st.integers(2, 5),
    },
)
conditions = st.sampled_from(["n > 10", "x == 'a'", "not (n > 5) or y", "v.id != null", "true"])


@st.composite
def grants(draw: st.DrawFn, name: str) -> dict[str, Any]:
    g: dict[str, Any] = {}
    if not name.startswith("kv."):
        g["handler"] = "demo:tool"
    if draw(st.booleans()):
        g["rate"] = f"{draw(st.integers(1, 3))}/{draw(st.integers(1, 10))}s"
    if draw(st.booleans()):
        g["max_calls"] = draw(st.integers(0, 5))
    if draw(st.booleans()):
        g["approval"] = {"when": draw(conditions)}
    g["args"] = draw(st.dictionaries(st.sampled_from(PATHS), constraint, max_size=2))
    return g


@st.composite
def policies(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(st.lists(st.sampled_from(TOOLS), unique=True, max_size=4))
    data: dict[str, Any] = {"agent": {"name": "prop"}, "tools": {n: draw(grants(n)) for n in names}}
    budgets = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "tool_calls": st.integers(0, 20),
                "tokens": st.integers(0, 100),
                "max_denials": st.integers(0, 5),
            },
        )
    )
    data["budgets"] = budgets
    validators: list[dict[str, Any]] = []
    for n in names:
        if draw(st.booleans()):
            validators.append(
                {
                    "on": [f"tool:{n}"],
                    "detect": draw(
                        st.lists(
                            st.sampled_from(["email", "card", "secret"]), min_size=1, unique=True
                        )
                    ),
                }
            )
    if draw(st.booleans()) and names:
        validators.append(
            {
                "on": [f"tool:{names[0]}"],
                "spending_limit": {"field": "n", "max": draw(st.integers(0, 50))},
            }
        )
    data["validators"] = validators
    return data


usages = st.builds(
    lambda calls, tokens, denials, by_tool, recent: Usage(
        tool_calls=calls, tokens=tokens, denials=denials, calls_by_tool=by_tool, recent_calls=recent
    ),
    st.integers(0, 25),
    st.integers(0, 120),
    st.integers(0, 6),
    st.dictionaries(st.sampled_from(TOOLS), st.integers(0, 6), max_size=4),
    st.dictionaries(
        st.sampled_from(TOOLS), st.lists(st.floats(990, 1000), max_size=4).map(tuple), max_size=4
    ),
)


def load(data: dict[str, Any]) -> Policy | None:
    try:
        return policy_from_dict(data)
    except PolicyError:
        return None


def request(tool: str, args: Any) -> ToolRequest:
    return ToolRequest("agent-p", tool, args, 1)


# --- properties ----------------------------------------------------------------------------------


@SETTINGS
@given(policies(), st.sampled_from([*TOOLS, "nope"]), args_strategy, usages)
def test_decide_is_deterministic_and_explain_agrees(
    data: dict[str, Any], tool: str, args: Any, usage: Usage
) -> None:
    p = load(data)
    assume(p is not None)
    assert p is not None
    r = request(tool, args)
    first = decide(p, r, usage, 1000.0)
    again = decide(
        load(copy.deepcopy(data)) or p, request(tool, copy.deepcopy(args)), usage, 1000.0
    )
    assert first == again
    assert hash(first) == hash(again)
    assert explain(p, r, usage, 1000.0).decision == first


@SETTINGS
@given(policies(), st.text(min_size=1, max_size=12), args_strategy, usages)
def test_ungranted_tools_are_never_allowed(
    data: dict[str, Any], tool: str, args: Any, usage: Usage
) -> None:
    p = load(data)
    assume(p is not None and tool not in p.tools)
    assert p is not None
    d = decide(p, request(tool, args), usage, 1000.0)
    assert isinstance(d, Deny | Terminate)
    if isinstance(d, Deny):
        assert d.code == "not_granted"


@st.composite
def tightenings(draw: st.DrawFn, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with one more rule: a constraint, rate, call cap, validator, approval or budget."""
    out = copy.deepcopy(data)
    tools = list(out["tools"])
    kind = draw(st.sampled_from(["arg", "rate", "max_calls", "validator", "approval", "budget"]))
    if kind == "budget" or not tools:
        key = draw(st.sampled_from(["tool_calls", "tokens", "max_denials"]))
        current = out["budgets"].get(key)
        out["budgets"][key] = draw(st.integers(0, current if current is not None else 20))
        return out
    tool = draw(st.sampled_from(tools))
    g = out["tools"][tool]
    if kind == "arg":
        path = draw(st.sampled_from(PATHS))
        existing = g["args"].setdefault(path, {})
        extra = draw(constraint)
        for k, v in extra.items():
            existing.setdefault(k, v)
    elif kind == "rate":
        rates = g.get("rate")
        rates = [rates] if isinstance(rates, str) else list(rates or [])
        g["rate"] = [*rates, f"{draw(st.integers(1, 3))}/{draw(st.integers(1, 10))}s"]
    elif kind == "max_calls":
        g["max_calls"] = draw(st.integers(0, g.get("max_calls", 5)))
    elif kind == "validator":
        out["validators"].append(
            {
                "on": [f"tool:{tool}"],
                "detect": [draw(st.sampled_from(["email", "card", "secret", "phone"]))],
            }
        )
    else:
        if "approval" not in g:
            g["approval"] = {"when": draw(conditions)}
    return out


@SETTINGS
@given(st.data(), policies(), st.sampled_from(TOOLS), args_strategy, usages)
def test_adding_a_rule_never_loosens(
    data: st.DataObject, base: dict[str, Any], tool: str, args: Any, usage: Usage
) -> None:
    p = load(base)
    assume(p is not None)
    assert p is not None
    tighter = load(data.draw(tightenings(base)))
    assume(tighter is not None)
    assert tighter is not None
    r = request(tool, args)
    before = decide(p, r, usage, 1000.0)
    after = decide(tighter, r, usage, 1000.0)
    if not isinstance(before, Allow):
        assert not isinstance(after, Allow), (before, after)
    if isinstance(before, Deny | Terminate):
        assert isinstance(after, Deny | Terminate), (before, after)


@SETTINGS
@given(
    st.integers(1, 4),
    st.integers(1, 20),
    st.lists(st.floats(0, 5, allow_nan=False), min_size=1, max_size=40),
)
def test_rate_limit_never_allows_more_than_n_in_any_window(
    count: int, window: int, gaps: list[float]
) -> None:
    p = policy_from_dict(
        {"agent": {"name": "r"}, "tools": {"kv.get": {"rate": f"{count}/{window}s"}}}
    )
    u = Usage()
    now = 0.0
    allowed: list[float] = []
    for gap in gaps:
        now += gap
        r = request("kv.get", {})
        d = decide(p, r, u, now)
        if isinstance(d, Allow):
            allowed.append(now)
        else:
            assert isinstance(d, Deny) and d.code == "rate_limited"
            assert d.retry_after_s is not None and 0 <= d.retry_after_s <= window
        u = record_decision(p, u, r, d, now)
    for start in allowed:
        assert sum(1 for t in allowed if start <= t < start + window) <= count


@SETTINGS
@given(st.integers(0, 6), st.integers(1, 15))
def test_tool_call_budget_is_never_exceeded(limit: int, attempts: int) -> None:
    p = policy_from_dict(
        {"agent": {"name": "b"}, "budgets": {"tool_calls": limit}, "tools": {"kv.get": {}}}
    )
    u = Usage()
    allowed = 0
    for i in range(attempts):
        r = request("kv.get", {})
        d = decide(p, r, u, float(i))
        allowed += isinstance(d, Allow)
        u = record_decision(p, u, r, d, float(i))
    assert allowed == min(limit, attempts)


@st.composite
def luhn_cards(draw: st.DrawFn) -> str:
    prefix = draw(
        st.sampled_from(["4", "51", "52", "53", "54", "55", "2221", "2720", "6011", "65", "3530"])
    )
    body = draw(st.text("0123456789", min_size=15 - len(prefix), max_size=15 - len(prefix)))
    partial = prefix + body
    return next(partial + d for d in "0123456789" if luhn_valid(partial + d))


@st.composite
def with_card(draw: st.DrawFn) -> Any:
    card = draw(luhn_cards())
    sep = draw(st.sampled_from(["", " ", "-"]))
    written = sep.join(card[i : i + 4] for i in range(0, 16, 4))
    text = draw(st.text("abc :,.", max_size=8)) + written + draw(st.text("abc :,.", max_size=8))
    placed: Any = text if draw(st.booleans()) else int(card)
    # Bury it somewhere in a nested document.
    for key in draw(st.lists(st.sampled_from(["a", "b", "items"]), max_size=3)):
        placed = [placed] if key == "items" else {key: placed}
    return {"payload": placed, "other": draw(json_values)}


@SETTINGS
@given(policies(), with_card(), usages)
def test_cards_in_arguments_are_never_allowed_under_a_card_detector(
    data: dict[str, Any], args: Any, usage: Usage
) -> None:
    data = copy.deepcopy(data)
    data["tools"].setdefault("t.a", {"handler": "demo:tool"})
    data["validators"].append({"on": ["tool:*"], "detect": ["card"]})
    p = load(data)
    assume(p is not None)
    assert p is not None
    d = decide(p, request("t.a", args), usage, 1000.0)
    assert not isinstance(d, Allow | RequireApproval)


budget_usages = st.tuples(
    st.integers(0, 2000),
    st.integers(0, 300),
    st.floats(0, 300, allow_nan=False),
    st.integers(0, 30),
)


@SETTINGS
@given(budget_usages, budget_usages, budget_usages)
def test_budget_events_are_exactly_once(
    a: tuple[Any, ...], b: tuple[Any, ...], c: tuple[Any, ...]
) -> None:
    p = policy_from_dict(
        {
            "agent": {"name": "e"},
            "budgets": {
                "tokens": 1000,
                "token_warnings": [0.25, 0.5, 0.8],
                "fuel_total": 200,
                "wall_clock_total": 200,
                "tool_calls": 20,
                "warnings": [0.5, 0.9],
            },
        }
    )
    # Build three monotone snapshots from the sorted coordinates.
    cols = [sorted(col) for col in zip(a, b, c, strict=True)]
    snaps = [
        Usage(
            tokens=cols[0][i], fuel_used=cols[1][i], wall_clock_s=cols[2][i], tool_calls=cols[3][i]
        )
        for i in range(3)
    ]

    def key(events: list[Any]) -> Counter[tuple[str, str, float | None]]:
        return Counter((e.kind, e.budget, e.threshold) for e in events)

    whole = budget_events(p, snaps[0], snaps[2])
    split = budget_events(p, snaps[0], snaps[1]) + budget_events(p, snaps[1], snaps[2])
    assert key(whole) == key(split)
    assert all(v == 1 for v in key(whole).values())
