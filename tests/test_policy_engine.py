"""The decision engine, one rule kind at a time, plus ordering, budgets events and explain."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from policies import (
    Allow,
    Deny,
    NotJSONError,
    Policy,
    RequireApproval,
    Terminate,
    ToolRequest,
    Usage,
    ValidatorContext,
    budget_events,
    check_output,
    decide,
    explain,
    explain_output,
    parse_policy,
    record_decision,
)

HEAD = '[agent]\nname = "t"\n'


def pol(body: str) -> Policy:
    return parse_policy(HEAD + body)


def req(tool: str, args: Any = None, seq: int = 1) -> ToolRequest:
    return ToolRequest("agent-1", tool, {} if args is None else args, seq)


def run(
    policy: Policy, tool: str, args: Any = None, usage: Usage | None = None, now: float = 1000.0
) -> Any:
    return decide(policy, req(tool, args), usage or Usage(), now)


def tool_with(args_toml: str, extra: str = "") -> Policy:
    return pol(f'[tools."t.x"]\nhandler = "m:f"\n{extra}[tools."t.x".args.{args_toml}')


# --- grants ---------------------------------------------------------------------------------


def test_ungranted_tool_is_denied_with_a_suggestion() -> None:
    p = pol('[tools."kv.incr"]\n')
    d = run(p, "kv.icnr")
    assert isinstance(d, Deny)
    assert (d.code, d.rule) == ("not_granted", "tools")
    assert "did you mean 'kv.incr'?" in d.reason


def test_granted_tool_without_rules_is_allowed() -> None:
    d = run(pol('[tools."kv.get"]\n'), "kv.get", {"key": "a"})
    assert d == Allow(('tools."kv.get"',))


def test_no_tools_at_all() -> None:
    d = run(pol(""), "kv.get")
    assert isinstance(d, Deny) and "granted: none" in d.reason


# --- budgets ----------------------------------------------------------------------------------


def test_tool_calls_budget_allows_exactly_n() -> None:
    p = pol('[budgets]\ntool_calls = 3\n[tools."kv.get"]\n')
    assert isinstance(run(p, "kv.get", usage=Usage(tool_calls=2)), Allow)
    d = run(p, "kv.get", usage=Usage(tool_calls=3))
    assert isinstance(d, Terminate)
    assert (d.code, d.rule) == ("budget_exceeded", "budgets.tool_calls")


@pytest.mark.parametrize(
    ("budget", "usage_field", "limit", "used_ok", "used_over"),
    [
        ("tokens", "tokens", "100", 100, 101),
        ("fuel_total", "fuel_used", "1000", 1000, 1001),
        ("fuel", "fuel_used_run", "1000", 1000, 1001),
        ("wall_clock_total", "wall_clock_s", '"1h"', 3600.0, 3600.5),
        ("wall_clock", "wall_clock_run_s", '"30s"', 30.0, 30.1),
    ],
)
def test_budget_past_limit_terminates(
    budget: str, usage_field: str, limit: str, used_ok: float, used_over: float
) -> None:
    p = pol(f'[budgets]\n{budget} = {limit}\n[tools."kv.get"]\n')
    assert isinstance(
        run(p, "kv.get", usage=Usage(**dict[str, Any]({usage_field: used_ok}))), Allow
    )
    d = run(p, "kv.get", usage=Usage(**dict[str, Any]({usage_field: used_over})))
    assert isinstance(d, Terminate)
    assert d.rule == f"budgets.{budget}" and d.code == "budget_exceeded"


def test_denials_beyond_limit_terminate() -> None:
    p = pol('[budgets]\nmax_denials = 2\n[tools."kv.get"]\n')
    assert isinstance(run(p, "kv.get", usage=Usage(denials=2)), Allow)
    d = run(p, "kv.get", usage=Usage(denials=3))
    assert isinstance(d, Terminate) and d.code == "too_many_denials"


def test_the_denial_that_goes_past_max_denials_terminates_with_its_cause() -> None:
    p = pol('[budgets]\nmax_denials = 2\n[tools."kv.get"]\n')
    assert isinstance(run(p, "nope", usage=Usage(denials=1)), Deny)
    d = run(p, "nope", usage=Usage(denials=2))
    assert isinstance(d, Terminate)
    assert (d.code, d.rule) == ("too_many_denials", "budgets.max_denials")
    assert d.cause is not None and d.cause.code == "not_granted"
    assert "denial 3 exceeds budgets.max_denials = 2" in d.reason


def test_max_denials_zero_terminates_on_first_denial() -> None:
    p = pol('[budgets]\nmax_denials = 0\n[tools."kv.get"]\n')
    assert isinstance(run(p, "nope"), Terminate)


# --- argument constraints --------------------------------------------------------------------


def code_rule(d: Any) -> tuple[str, str]:
    assert isinstance(d, Deny), d
    return d.code, d.rule


def test_required() -> None:
    p = tool_with("amount]\nrequired = true\n")
    assert isinstance(run(p, "t.x", {"amount": 0}), Allow)
    d = run(p, "t.x", {})
    assert code_rule(d) == ("invalid_args", 'tools."t.x".args.amount.required')
    assert d.reason == "argument amount is required"
    assert code_rule(run(p, "t.x", ["not", "an", "object"]))[0] == "invalid_args"


def test_required_nested_and_wildcard() -> None:
    p = tool_with('"items.*.sku"]\nrequired = true\n')
    assert isinstance(run(p, "t.x", {"items": [{"sku": "a"}, {"sku": "b"}]}), Allow)
    assert isinstance(run(p, "t.x", {"items": []}), Allow)  # no element lacks it
    d = run(p, "t.x", {"items": [{"sku": "a"}, {"name": "b"}]})
    assert d.reason == "argument items[1].sku is required"


def test_forbidden_nested() -> None:
    p = tool_with('"vendor.id"]\nforbidden = true\n')
    assert isinstance(run(p, "t.x", {"vendor": {"name": "acme"}}), Allow)
    assert isinstance(run(p, "t.x", {"vendor": "acme"}), Allow)
    d = run(p, "t.x", {"vendor": {"id": 1}})
    assert code_rule(d) == ("invalid_args", 'tools."t.x".args."vendor.id".forbidden')


@pytest.mark.parametrize(
    ("type_", "good", "bad"),
    [
        ("string", "s", 1),
        ("number", 1.5, "1.5"),
        ("number", 2, True),
        ("integer", 2, 2.5),
        ("integer", 2.0, "2"),
        ("boolean", False, 0),
        ("array", [1], {"a": 1}),
        ("object", {"a": 1}, [1]),
        ("null", None, 0),
    ],
)
def test_type(type_: str, good: Any, bad: Any) -> None:
    p = tool_with(f'v]\ntype = "{type_}"\n')
    assert isinstance(run(p, "t.x", {"v": good}), Allow)
    d = run(p, "t.x", {"v": bad})
    assert code_rule(d) == ("invalid_args", 'tools."t.x".args.v.type')


def test_allow_list_and_json_equality() -> None:
    p = tool_with('channel]\nallow = ["#support", 1]\n')
    assert isinstance(run(p, "t.x", {"channel": "#support"}), Allow)
    assert isinstance(run(p, "t.x", {"channel": 1.0}), Allow)
    assert isinstance(run(p, "t.x"), Allow)  # absent passes; use required for presence
    d = run(p, "t.x", {"channel": "#all-company"})
    assert code_rule(d) == ("invalid_args", 'tools."t.x".args.channel.allow')
    assert d.reason == 'channel = "#all-company" is not allowed; allowed: "#support", 1'
    assert isinstance(run(p, "t.x", {"channel": True}), Deny)  # true is not 1


def test_allow_applies_to_each_array_element() -> None:
    p = tool_with('channels]\nallow = ["#a", "#b"]\n')
    assert isinstance(run(p, "t.x", {"channels": ["#a", "#b"]}), Allow)
    d = run(p, "t.x", {"channels": ["#a", "#c"]})
    assert d.reason.startswith('channels[1] = "#c" is not allowed')


def test_deny_list() -> None:
    p = tool_with('channel]\ndeny = ["#all-company"]\n')
    assert isinstance(run(p, "t.x", {"channel": "#support"}), Allow)
    assert (
        code_rule(run(p, "t.x", {"channel": "#all-company"}))[1] == 'tools."t.x".args.channel.deny'
    )


def test_pattern_read_only_sql() -> None:
    p = tool_with(
        'query]\npattern = "(?i)^\\\\s*select\\\\b"\nforbid_pattern = "(?i)\\\\b(insert|update|delete|drop)\\\\b"\n'
    )
    assert isinstance(run(p, "t.x", {"query": "  SELECT * FROM t"}), Allow)
    assert (
        code_rule(run(p, "t.x", {"query": "DELETE FROM t"}))[1] == 'tools."t.x".args.query.pattern'
    )
    assert (
        code_rule(run(p, "t.x", {"query": "select 1; drop table t"}))[1]
        == 'tools."t.x".args.query.forbid_pattern'
    )
    assert "must be a string" in run(p, "t.x", {"query": 5}).reason


def test_forbid_pattern_sees_non_strings_as_json() -> None:
    p = tool_with('payload]\nforbid_pattern = "secret"\n')
    assert isinstance(run(p, "t.x", {"payload": {"a": 1}}), Deny) is False
    assert isinstance(run(p, "t.x", {"payload": {"secret": 1}}), Deny)


def test_min_max() -> None:
    p = tool_with("amount]\nmin = 0\nmax = 10_000_000\n")
    assert isinstance(run(p, "t.x", {"amount": 0}), Allow)
    assert isinstance(run(p, "t.x", {"amount": 10_000_000}), Allow)
    d = run(p, "t.x", {"amount": -1})
    assert code_rule(d) == ("invalid_args", 'tools."t.x".args.amount.min')
    assert d.reason == "amount = -1 is below the minimum 0"
    d = run(p, "t.x", {"amount": 10_000_001})
    assert code_rule(d)[1] == 'tools."t.x".args.amount.max'
    assert run(p, "t.x", {"amount": "5"}).reason == "amount must be a number, got string"
    assert isinstance(run(p, "t.x", {"amount": True}), Deny)
    with pytest.raises(NotJSONError):  # non-finite numbers are refused at parse (issue 22)
        run(p, "t.x", {"amount": float("inf")})


def test_lengths() -> None:
    p = tool_with("text]\nmin_length = 2\nmax_length = 5\n")
    assert isinstance(run(p, "t.x", {"text": "abc"}), Allow)
    assert isinstance(run(p, "t.x", {"text": [1, 2]}), Allow)
    assert code_rule(run(p, "t.x", {"text": "a"}))[1] == 'tools."t.x".args.text.min_length'
    assert code_rule(run(p, "t.x", {"text": "abcdef"}))[1] == 'tools."t.x".args.text.max_length'
    assert "to have a length" in run(p, "t.x", {"text": 5}).reason


def test_nan_arguments_are_refused_at_construction() -> None:
    with pytest.raises(NotJSONError):
        req("t.x", json.loads('{"a": NaN}'))
    with pytest.raises(NotJSONError):
        req("t.x", json.loads('{"a": [-Infinity]}'))


# --- invocation limits --------------------------------------------------------------------------


def rate_policy(rate: str = '"3/10s"') -> Policy:
    return pol(f'[tools."kv.get"]\nrate = {rate}\n')


def test_rate_limit_window_edges() -> None:
    p = rate_policy()
    u = Usage(recent_calls={"kv.get": (100.0, 101.0, 102.0)})
    d = run(p, "kv.get", usage=u, now=109.999)
    assert isinstance(d, Deny)
    assert (d.code, d.rule) == ("rate_limited", 'tools."kv.get".rate')
    assert d.retry_after_s == pytest.approx(0.001)
    # The window is half-open: exactly 10 s after the oldest call it has left the window.
    assert isinstance(run(p, "kv.get", usage=u, now=110.0), Allow)
    assert isinstance(
        run(p, "kv.get", usage=Usage(recent_calls={"kv.get": (100.0, 101.0)}), now=100.5), Allow
    )


def test_rate_limit_counts_future_timestamps() -> None:
    # A clock that stepped back must not loosen the limit.
    p = rate_policy()
    assert isinstance(
        run(p, "kv.get", usage=Usage(recent_calls={"kv.get": (200.0, 201.0, 202.0)}), now=150.0),
        Deny,
    )


def test_several_rates_all_hold() -> None:
    p = rate_policy('["2/s", "3/min"]')
    u = Usage(recent_calls={"kv.get": (10.0, 20.0, 30.0)})
    d = run(p, "kv.get", usage=u, now=40.0)
    assert d.rule == 'tools."kv.get".rate[1]'
    assert d.retry_after_s == pytest.approx(30.0)


def test_max_calls() -> None:
    p = pol('[tools."kv.get"]\nmax_calls = 2\n')
    assert isinstance(run(p, "kv.get", usage=Usage(calls_by_tool={"kv.get": 1})), Allow)
    d = run(p, "kv.get", usage=Usage(calls_by_tool={"kv.get": 2}))
    assert code_rule(d) == ("budget_exceeded", 'tools."kv.get".max_calls')


def test_record_decision_feeds_the_rate_window() -> None:
    p = rate_policy('"2/10s"')
    u = Usage()
    results = []
    for t in (0.0, 1.0, 2.0, 10.0, 10.5, 11.0):
        r = req("kv.get")
        d = decide(p, r, u, t)
        results.append(type(d).__name__)
        u = record_decision(p, u, r, d, t)
    assert results == ["Allow", "Allow", "Deny", "Allow", "Deny", "Allow"]
    assert u.tool_calls == 4 and u.denials == 2 and u.calls_by_tool["kv.get"] == 4
    assert u.recent_calls["kv.get"] == (10.0, 11.0)  # pruned to the window


def test_record_decision_counts() -> None:
    p = pol('[tools."kv.get"]\n')
    r = req("kv.get")
    u = record_decision(p, Usage(), r, Allow(), 1.0)
    assert (u.tool_calls, u.calls_by_tool["kv.get"], u.recent_calls) == (1, 1, {})
    u = record_decision(p, u, r, RequireApproval("x", "y"), 2.0)
    assert u.tool_calls == 2
    u = record_decision(p, u, r, Deny("c", "r", "x"), 3.0)
    assert (u.tool_calls, u.denials) == (2, 1)
    u = record_decision(p, u, r, Terminate("r", "budgets.tokens"), 3.0)
    assert u.denials == 1
    u = record_decision(
        p, u, r, Terminate("r", "budgets.max_denials", "too_many_denials", Deny("c", "r", "x")), 3.0
    )
    assert u.denials == 2


# --- validators on tool arguments -----------------------------------------------------------------


SLACK = '[tools."slack.post"]\nhandler = "m:f"\n'


def detect_policy(
    detect: str = '"email", "phone", "card", "national_id", "secret"', action: str = ""
) -> Policy:
    return pol(SLACK + f'[[validators]]\non = ["tool:slack.post"]\ndetect = [{detect}]\n{action}')


@pytest.mark.parametrize(
    ("text", "rule", "code"),
    [
        ("write to jane@example.com", "validators[0].detect.email", "pii_detected"),
        ("call 415-555-0134", "validators[0].detect.phone", "pii_detected"),
        ("card 4111 1111 1111 1111", "validators[0].detect.card", "pii_detected"),
        ("ssn 123-45-6789", "validators[0].detect.national_id", "pii_detected"),
        ("key AKIAIOSFODNN7EXAMPLE", "validators[0].detect.secret", "secret_detected"),
    ],
)
def test_detectors_deny_outbound_data(text: str, rule: str, code: str) -> None:
    d = run(detect_policy(), "slack.post", {"channel": "#support", "text": text})
    assert code_rule(d) == (code, rule)
    assert "$.text" in d.reason


def test_detector_reason_masks_the_value() -> None:
    d = run(
        detect_policy('"secret"'),
        "slack.post",
        {"text": "token sk-ant-api03-abcdefghijklmnopqrstuvwxyz"},
    )
    assert "abcdefghijklmnop" not in d.reason
    assert "sk-a…" in d.reason


def test_detector_clean_args_allowed() -> None:
    d = run(detect_policy(), "slack.post", {"channel": "#support", "text": "order 12345 shipped"})
    assert isinstance(d, Allow)
    assert "validators[0].detect.card" in d.rules


def test_detector_action_approval_and_terminate() -> None:
    a = run(detect_policy('"email"', 'action = "approval"\n'), "slack.post", {"text": "a@b.io"})
    assert isinstance(a, RequireApproval) and a.rule == "validators[0].detect.email"
    t = run(detect_policy('"email"', 'action = "terminate"\n'), "slack.post", {"text": "a@b.io"})
    assert isinstance(t, Terminate) and t.code == "pii_detected"


def test_validator_on_all_tools() -> None:
    p = pol('[tools."kv.set"]\n[[validators]]\non = ["tool:*"]\ndetect = ["secret"]\n')
    assert isinstance(run(p, "kv.set", {"key": "k", "value": "AKIAIOSFODNN7EXAMPLE"}), Deny)


def test_validators_only_apply_to_their_tools() -> None:
    p = pol(
        SLACK + '[tools."kv.set"]\n[[validators]]\non = ["tool:slack.post"]\ndetect = ["email"]\n'
    )
    assert isinstance(run(p, "kv.set", {"value": "a@b.io"}), Allow)


def spend_policy(extra: str = "", field: str = "amount") -> Policy:
    return pol(
        '[tools."erp.create_po"]\nhandler = "m:f"\n'
        f'[[validators]]\non = ["tool:erp.create_po"]\nspending_limit = {{ field = "{field}", max = 50000 {extra}}}\n'
    )


def test_spending_limit() -> None:
    p = spend_policy()
    assert isinstance(run(p, "erp.create_po", {"amount": 50000}), Allow)
    d = run(p, "erp.create_po", {"amount": 50001})
    assert code_rule(d) == ("spending_limit", "validators[0].spending_limit")
    assert d.reason == "amount = 50,001 exceeds the spending limit of 50,000 (this call)"
    assert "must be a number" in run(p, "erp.create_po", {"amount": "50001"}).reason
    assert isinstance(run(p, "erp.create_po", {}), Allow)


def test_spending_limit_sums_a_wildcard() -> None:
    p = spend_policy(field="items.*.price")
    assert isinstance(
        run(p, "erp.create_po", {"items": [{"price": 20000}, {"price": 30000}]}), Allow
    )
    assert isinstance(
        run(p, "erp.create_po", {"items": [{"price": 20000}, {"price": 30001}]}), Deny
    )


def test_spending_limit_approval_action() -> None:
    d = run(spend_policy(extra=', action = "approval" '), "erp.create_po", {"amount": 75000})
    assert isinstance(d, RequireApproval) and d.rule == "validators[0].spending_limit"


def test_rows_affected() -> None:
    p = pol(
        '[tools."sql.exec"]\nhandler = "m:f"\n[[validators]]\non = ["tool:sql.exec"]\nrows_affected = { field = "rows", max = 100 }\n'
    )
    assert isinstance(run(p, "sql.exec", {"rows": 100}), Allow)
    assert code_rule(run(p, "sql.exec", {"rows": 101})) == (
        "rows_limit",
        "validators[0].rows_affected",
    )


def custom_policy(target: str = '"tool:slack.post"', extra: str = "") -> Policy:
    return pol(SLACK + f'[[validators]]\non = [{target}]\ncustom = "mymod:check"\n{extra}')


def test_custom_validator_missing_fails_closed() -> None:
    d = run(custom_policy(), "slack.post", {"text": "hi"})
    assert code_rule(d) == ("denied_by_validator", "validators[0].custom")
    assert "not loaded" in d.reason


def test_custom_validator_pass_reason_and_raise() -> None:
    p = custom_policy(extra='reason = "house rules"\n')
    seen: list[tuple[Any, ValidatorContext]] = []

    def check(value: Any, ctx: ValidatorContext) -> str | None:
        seen.append((value, ctx))
        value["text"] = "mutated"  # a copy: must not affect the request
        return None

    r = ToolRequest("agent-1", "slack.post", {"text": "hi"}, 7, principal="alice")
    assert isinstance(decide(p, r, Usage(), 5.0, custom_validators={"mymod:check": check}), Allow)
    value, ctx = seen[0]
    assert value == {"text": "mutated"} and r.args["text"] == "hi"
    assert (ctx.target, ctx.tool, ctx.rule, ctx.now, ctx.agent_id, ctx.principal) == (
        "tool:slack.post",
        "slack.post",
        "validators[0].custom",
        5.0,
        "agent-1",
        "alice",
    )

    def no(value: Any, ctx: ValidatorContext) -> str | None:
        return "too shouty"

    d = decide(p, r, Usage(), 5.0, custom_validators={"mymod:check": no})
    assert isinstance(d, Deny) and d.reason == "mymod:check: too shouty (house rules)"

    def boom(value: Any, ctx: ValidatorContext) -> str | None:
        raise RuntimeError("db down")

    d = decide(p, r, Usage(), 5.0, custom_validators={"mymod:check": boom})
    assert isinstance(d, Deny) and "RuntimeError: db down" in d.reason


# --- approval ------------------------------------------------------------------------------------


def approval_policy(approval: str) -> Policy:
    return pol(f'[tools."erp.create_po"]\nhandler = "m:f"\napproval = {approval}\n')


def test_approval_always() -> None:
    d = run(approval_policy("true"), "erp.create_po", {"amount": 1})
    assert isinstance(d, RequireApproval) and d.rule == 'tools."erp.create_po".approval'


def test_approval_false_means_none() -> None:
    assert isinstance(run(approval_policy("false"), "erp.create_po"), Allow)


def test_approval_condition() -> None:
    p = approval_policy('{ when = "amount > 50000", reason = "above spending authority" }')
    assert isinstance(run(p, "erp.create_po", {"amount": 20000}), Allow)
    d = run(p, "erp.create_po", {"amount": 75000})
    assert isinstance(d, RequireApproval)
    assert d.reason == "above spending authority (amount > 50000: amount = 75000)"


def test_approval_condition_fails_closed() -> None:
    p = approval_policy('{ when = "amount > 50000" }')
    d = run(p, "erp.create_po", {"amount": "75000"})
    assert isinstance(d, RequireApproval) and "could not decide" in d.reason


def test_several_approvals_are_all_listed() -> None:
    p = pol(
        '[tools."erp.create_po"]\nhandler = "m:f"\napproval = { when = "amount > 50000" }\n'
        '[[validators]]\non = ["tool:erp.create_po"]\nspending_limit = { field = "amount", max = 60000, action = "approval" }\n'
    )
    d = run(p, "erp.create_po", {"amount": 75000})
    assert isinstance(d, RequireApproval)
    assert d.rules == ("validators[0].spending_limit", 'tools."erp.create_po".approval')
    assert d.rule == "validators[0].spending_limit"


# --- order of evaluation ---------------------------------------------------------------------------


ORDERED = (
    "[budgets]\ntool_calls = 10\n"
    '[tools."erp.create_po"]\nhandler = "m:f"\nrate = "1/min"\napproval = true\n'
    '[tools."erp.create_po".args.amount]\nmax = 100\n'
    '[[validators]]\non = ["tool:erp.create_po"]\ndetect = ["email"]\n'
)


def test_order_budget_before_args() -> None:
    d = run(pol(ORDERED), "erp.create_po", {"amount": 1000}, Usage(tool_calls=10))
    assert isinstance(d, Terminate)


def test_order_args_before_rate() -> None:
    u = Usage(recent_calls={"erp.create_po": (999.0,)})
    assert run(pol(ORDERED), "erp.create_po", {"amount": 1000}, u).code == "invalid_args"
    assert run(pol(ORDERED), "erp.create_po", {"amount": 10}, u).code == "rate_limited"


def test_order_rate_before_validators_and_deny_beats_approval() -> None:
    u = Usage(recent_calls={"erp.create_po": (999.0,)})
    assert (
        run(pol(ORDERED), "erp.create_po", {"amount": 10, "note": "a@b.io"}, u).code
        == "rate_limited"
    )
    assert (
        run(pol(ORDERED), "erp.create_po", {"amount": 10, "note": "a@b.io"}).code == "pii_detected"
    )
    assert isinstance(run(pol(ORDERED), "erp.create_po", {"amount": 10}), RequireApproval)


def test_allow_lists_rules_in_order() -> None:
    p = pol(
        '[budgets]\ntool_calls = 10\n[tools."kv.incr"]\nrate = "100/s"\n[tools."kv.incr".args.key]\nallow = ["counter"]\n'
    )
    d = run(p, "kv.incr", {"key": "counter"})
    assert d == Allow(
        (
            'tools."kv.incr"',
            "budgets.tool_calls",
            'tools."kv.incr".args.key.allow',
            'tools."kv.incr".rate',
        )
    )


# --- output ----------------------------------------------------------------------------------------


def test_check_output() -> None:
    p = pol('[[validators]]\non = ["output"]\ndetect = ["card", "email"]\n')
    assert isinstance(check_output(p, {"greeting": "hello, ada"}, 1.0), Allow)
    d = check_output(p, {"summary": ["paid with 4111111111111111"]}, 1.0)
    assert code_rule(d) == ("pii_detected", "validators[0].detect.card")
    assert isinstance(d, Deny) and "$.summary[0]" in d.reason
    assert check_output(pol(""), "anything", 1.0) == Allow(())


def test_check_output_ignores_tool_validators_and_runs_custom() -> None:
    p = custom_policy(target='"output"')
    assert isinstance(check_output(p, "x", 1.0), Deny)
    calls: list[ValidatorContext] = []

    def ok(value: Any, ctx: ValidatorContext) -> None:
        calls.append(ctx)

    assert isinstance(
        check_output(p, "x", 1.0, custom_validators={"mymod:check": ok}, agent_id="a"), Allow
    )
    assert calls[0].target == "output" and calls[0].tool is None and calls[0].agent_id == "a"
    assert isinstance(run(p, "slack.post", {"text": "x"}), Allow)  # output-only validator


# --- budget events ------------------------------------------------------------------------------------


BUDGETS = (
    "[budgets]\ntokens = 1000\ntoken_warnings = [0.5, 0.8]\n"
    'fuel_total = 100\nwall_clock_total = "100s"\ntool_calls = 10\nwarnings = [0.9]\n'
)


def test_token_warnings_and_exceeded() -> None:
    p = pol(BUDGETS)
    ev = budget_events(p, Usage(tokens=100), Usage(tokens=500))
    assert [(e.kind, e.budget, e.threshold, e.rule) for e in ev] == [
        ("warning", "tokens", 0.5, "budgets.token_warnings[0]")
    ]
    assert not ev[0].terminate
    assert ev[0].message == "tokens: 50% of the budget used (500 of 1,000)"
    assert budget_events(p, Usage(tokens=500), Usage(tokens=700)) == []  # not reported twice
    ev = budget_events(p, Usage(tokens=700), Usage(tokens=1001))
    assert [(e.kind, e.threshold) for e in ev] == [("warning", 0.8), ("exceeded", None)]
    assert ev[1].terminate and ev[1].rule == "budgets.tokens"
    assert (
        budget_events(p, Usage(tokens=700), Usage(tokens=1000))[-1].kind == "warning"
    )  # at the limit is not past it


@pytest.mark.parametrize(
    ("budget", "field", "before", "warn_at", "over"),
    [
        ("fuel_total", "fuel_used", 0, 90, 101),
        ("wall_clock_total", "wall_clock_s", 0.0, 90.0, 100.5),
        ("tool_calls", "tool_calls", 0, 9, 11),
    ],
)
def test_other_budget_events(
    budget: str, field: str, before: float, warn_at: float, over: float
) -> None:
    p = pol(BUDGETS)
    ev = budget_events(
        p, Usage(**dict[str, Any]({field: before})), Usage(**dict[str, Any]({field: warn_at}))
    )
    assert [(e.kind, e.budget, e.rule) for e in ev] == [("warning", budget, "budgets.warnings[0]")]
    ev = budget_events(
        p, Usage(**dict[str, Any]({field: warn_at})), Usage(**dict[str, Any]({field: over}))
    )
    assert [(e.kind, e.budget) for e in ev] == [("exceeded", budget)]
    assert json.dumps(ev[0].to_dict())


def test_no_events_without_budgets() -> None:
    assert budget_events(pol(""), Usage(), Usage(tokens=10**9, fuel_used=10**12)) == []


# --- explain --------------------------------------------------------------------------------------------


def test_explain_lists_every_rule_and_marks_the_decisive_one() -> None:
    p = pol(
        SLACK + '[tools."slack.post".args.channel]\nallow = ["#support"]\n'
        '[[validators]]\non = ["tool:slack.post"]\ndetect = ["email", "card"]\n'
    )
    r = req("slack.post", {"channel": "#all-company", "text": "mail bob@corp.io"})
    e = explain(p, r, Usage(), 1.0)
    assert e.decision == decide(p, r, Usage(), 1.0)
    assert [(s.rule, s.outcome) for s in e.steps] == [
        ('tools."slack.post"', "pass"),
        ('tools."slack.post".args.channel.allow', "deny"),
        ("validators[0].detect.email", "deny"),
        ("validators[0].detect.card", "pass"),
    ]
    assert e.decisive == 1
    text = str(e)
    assert "decision: DENY (invalid_args)" in text
    assert '>> DENY      tools."slack.post".args.channel.allow' in text
    assert 'rule:   tools."slack.post".args.channel.allow' in text
    assert json.loads(json.dumps(e.to_dict()))["decision"]["code"] == "invalid_args"


def test_explain_allow_and_approval() -> None:
    p = approval_policy('{ when = "amount > 5" }')
    e = explain(p, req("erp.create_po", {"amount": 1}), Usage(), 1.0)
    assert isinstance(e.decision, Allow) and e.decisive is None and "decision: ALLOW" in str(e)
    e = explain(p, req("erp.create_po", {"amount": 10}), Usage(), 1.0)
    assert isinstance(e.decision, RequireApproval) and "REQUIRE APPROVAL" in str(e)


def test_explain_output() -> None:
    p = pol('[[validators]]\non = ["output"]\ndetect = ["email"]\n')
    e = explain_output(p, {"x": "a@b.io"}, 1.0)
    assert isinstance(e.decision, Deny) and e.decisive == 0


# --- the data types ------------------------------------------------------------------------------------


def test_requests_and_usage_are_immutable_and_hashable() -> None:
    r = req("kv.get", {"a": [1, {"b": 2}]})
    assert hash(r) == hash(req("kv.get", {"a": [1, {"b": 2}]}))
    with pytest.raises(TypeError):
        r.args["a"] = 1
    assert r.to_dict()["args"] == {"a": [1, {"b": 2}]}
    u = Usage(calls_by_tool={"x": 1}, recent_calls={"x": [1.0]})  # type: ignore[dict-item]
    assert hash(u) == hash(Usage(calls_by_tool={"x": 1}, recent_calls={"x": (1.0,)}))
    assert u.recent_calls["x"] == (1.0,)
    assert replace(u, tokens=5).tokens == 5


def test_decisions_serialise() -> None:
    d = Deny("rate_limited", "slow down", 'tools."x".rate', retry_after_s=1.5)
    assert d.to_guest_error() == {
        "code": "denied",
        "denial": "rate_limited",
        "message": "slow down",
        "rule": 'tools."x".rate',
        "retry_after_s": 1.5,
    }
    t = Terminate("r", "budgets.max_denials", "too_many_denials", d)
    assert t.to_dict()["cause"]["code"] == "rate_limited"
    assert RequireApproval("r", "x").to_dict()["rules"] == ["x"]
    assert Allow(("a",)).to_dict() == {"decision": "allow", "rules": ["a"]}
