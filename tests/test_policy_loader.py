"""Loading policy files: the full sketch, helpers for the host, and every kind of load error."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from policies import BUILTIN_TOOLS, PolicyError, load_policy, parse_policy, policy_from_dict

FULL = r"""
[agent]
name = "procurement"
description = "buys things"
version = "1.2.0"
pool = "finance"
priority = 5

[budgets]
fuel = 50_000_000
fuel_total = 1_000_000_000
memory = "32MiB"
wall_clock = "30s"
wall_clock_total = "7d"
tool_calls = 10_000
tokens = 100_000
token_warnings = [0.8, 0.5]
warnings = [0.9]
max_denials = 5
stall_timeout = "10m"

[tools."kv.incr"]
rate = "100/s"
idempotent = false
[tools."kv.incr".args.key]
allow = ["counter"]

[tools."kv.get"]

[tools."erp.create_po"]
handler = "procurement_tools:create_po"
credentials = ["erp_token"]
approval = { when = "amount > 50000", reason = "above spending authority" }
rate = ["10/s", "1000/h"]
max_calls = 100
[tools."erp.create_po".args.amount]
min = 0
max = 10_000_000
required = true
[tools."erp.create_po".args."vendor.id"]
pattern = "^v[0-9]+$"

[tools."slack.post"]
handler = "demo_tools:post"
approval = true
[tools."slack.post".args.channel]
allow = ["#support"]

[tools."sql.query"]
handler = "demo_tools:query"
[tools."sql.query".args.query]
pattern = "(?i)^\\s*select\\b"
forbid_pattern = "(?i)\\b(insert|update|delete|drop)\\b"

[tools."sql.exec"]
handler = "demo_tools:exec"

[tools."x"]
handler = "demo_tools:x"
[tools."x".args."vendor.id"]
forbidden = true

[[validators]]
on = ["tool:slack.post", "output"]
detect = ["email", "phone", "card", "national_id", "secret"]
action = "deny"

[[validators]]
on = ["tool:erp.create_po"]
spending_limit = { field = "amount", max = 50000, action = "approval" }

[[validators]]
on = ["tool:sql.exec"]
rows_affected = { field = "rows", max = 100 }

[[validators]]
on = ["output"]
custom = "mymodule:check"

[wasi]
allow = ["fd_write", "clock_time_get"]
"""

MINIMAL = '[agent]\nname = "x"\n'


def errors_of(text: str, source: str = "policy.toml") -> PolicyError:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, source)
    return info.value


# --- the full policy ----------------------------------------------------------------------


def test_full_policy_loads_with_resolved_units() -> None:
    p = parse_policy(FULL, "policy.toml")
    assert p.agent.name == "procurement"
    assert (p.agent.pool, p.agent.priority, p.agent.version) == ("finance", 5, "1.2.0")
    b = p.budgets
    assert b.memory == 32 * 1024 * 1024
    assert b.wall_clock == 30.0
    assert b.wall_clock_total == 7 * 86400
    assert b.stall_timeout == 600.0
    assert b.token_warnings == (0.5, 0.8)  # sorted
    assert b.fuel == 50_000_000 and b.max_denials == 5


def test_grants_helper() -> None:
    p = parse_policy(FULL)
    g = p.grants["erp.create_po"]
    assert g.handler == "procurement_tools:create_po"
    assert g.credentials == ("erp_token",)
    assert [(r.count, r.window_s) for r in g.rate] == [(10, 1.0), (1000, 3600.0)]
    assert g.approval is not None and g.approval.when is not None
    assert str(g.approval.when) == "amount > 50000"
    assert g.approval.reason == "above spending authority"
    assert (
        p.grants["slack.post"].approval is not None and p.grants["slack.post"].approval.when is None
    )
    assert [c[0] for c in g.constraints] == ["amount", "vendor.id"]
    assert g.constraints[1][1] == ("vendor", "id")
    assert p.handler_refs["sql.exec"] == "demo_tools:exec"
    assert p.custom_validator_refs == ("mymodule:check",)


def test_builtin_idempotent_defaults() -> None:
    p = parse_policy(FULL)
    assert p.grants["kv.get"].idempotent is BUILTIN_TOOLS["kv.get"].idempotent is True
    assert p.grants["kv.incr"].idempotent is False
    assert p.grants["sql.exec"].idempotent is False  # user tools default to not idempotent
    tightened = parse_policy(MINIMAL + '[tools."kv.get"]\nidempotent = false\n')
    assert tightened.grants["kv.get"].idempotent is False


def test_wasi_allow_helper() -> None:
    assert parse_policy(FULL).wasi_allow == frozenset({"fd_write", "clock_time_get"})
    assert parse_policy(MINIMAL).wasi_allow == frozenset()


def test_minimal_policy_has_no_limits() -> None:
    p = parse_policy(MINIMAL)
    assert p.tools == {} and p.validators == ()
    assert all(
        getattr(p.budgets, k) is None
        for k in ("fuel", "memory", "tokens", "tool_calls", "max_denials")
    )


def test_validators_are_indexed_by_target() -> None:
    p = parse_policy(FULL)
    assert [i for i, _ in p.tool_validators["slack.post"]] == [0]
    assert [i for i, _ in p.tool_validators["kv.incr"]] == []
    assert [i for i, _ in p.output_validators] == [0, 3]
    assert p.validators[1].effective_action == "approval"
    assert p.validators[2].effective_action == "deny"
    star = parse_policy(
        MINIMAL + '[tools."kv.get"]\n[[validators]]\non = ["tool:*"]\ndetect = ["secret"]\n'
    )
    assert [i for i, _ in star.tool_validators["kv.get"]] == [0]


def test_to_dict_and_digest() -> None:
    p = parse_policy(FULL)
    d = p.to_dict()
    assert d["budgets"]["memory"] == 33554432
    assert d["tools"]["erp.create_po"]["rate"] == ["10/s", "1000/h"]
    assert d["tools"]["erp.create_po"]["approval"]["when"] == "amount > 50000"
    assert d["tools"]["sql.query"]["args"]["query"]["pattern"] == r"(?i)^\s*select\b"
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", p.digest)
    # Same meaning, same digest; different meaning, different digest.
    same = parse_policy(FULL.replace('wall_clock = "30s"', 'wall_clock = "30000ms"'))
    assert same.digest == p.digest
    other = parse_policy(FULL.replace('wall_clock = "30s"', 'wall_clock = "31s"'))
    assert other.digest != p.digest
    # The resolved form loads back to the same policy.
    assert policy_from_dict(d).digest == p.digest


def test_summary_mentions_the_essentials() -> None:
    text = parse_policy(FULL).summary()
    for fragment in (
        "agent procurement",
        "erp.create_po",
        "approval when amount > 50000",
        "digest sha256:",
    ):
        assert fragment in text


def test_load_policy_from_file(tmp_path: Path) -> None:
    f = tmp_path / "policy.toml"
    f.write_text(FULL, encoding="utf-8")
    assert load_policy(f).agent.name == "procurement"


def test_load_policy_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="file not found") as info:
        load_policy(tmp_path / "nope.toml")
    assert info.value.source.endswith("nope.toml")


def test_load_policy_names_the_file(tmp_path: Path) -> None:
    f = tmp_path / "policy.toml"
    f.write_text(MINIMAL + "[budgets]\ntokns = 5\n", encoding="utf-8")
    with pytest.raises(PolicyError) as info:
        load_policy(f)
    assert str(info.value) == f"{f}: [budgets] unknown key 'tokns' — did you mean 'tokens'?"


def test_not_utf8(tmp_path: Path) -> None:
    f = tmp_path / "policy.toml"
    f.write_bytes(b'[agent]\nname = "\xff"\n')
    with pytest.raises(PolicyError, match="not UTF-8"):
        load_policy(f)


# --- misspelled keys ------------------------------------------------------------------------


def test_typo_at_top_level() -> None:
    e = errors_of('[agnet]\nname = "x"\n')
    assert str(e) == "policy.toml: unknown top-level key 'agnet' — did you mean 'agent'?"
    assert (e.source, e.field, e.suggestion) == ("policy.toml", "agnet", "agent")


def test_typo_in_budgets() -> None:
    e = errors_of(MINIMAL + "[budgets]\ntokns = 100\n")
    assert str(e) == "policy.toml: [budgets] unknown key 'tokns' — did you mean 'tokens'?"
    assert (e.field, e.suggestion) == ("budgets.tokns", "tokens")


def test_typo_in_tool_grant() -> None:
    e = errors_of(MINIMAL + '[tools."kv.incr"]\nrat = "10/s"\n')
    assert str(e) == "policy.toml: [tools.\"kv.incr\"] unknown key 'rat' — did you mean 'rate'?"
    assert e.field == 'tools."kv.incr".rat'


def test_typo_in_args_constraint() -> None:
    e = errors_of(
        MINIMAL
        + '[tools."slack.post"]\nhandler = "m:f"\n[tools."slack.post".args.channel]\nalow = ["#support"]\n'
    )
    assert (
        str(e)
        == "policy.toml: [tools.\"slack.post\".args.channel] unknown key 'alow' — did you mean 'allow'?"
    )
    assert (e.field, e.suggestion) == ('tools."slack.post".args.channel.alow', "allow")


def test_typo_in_validator_and_wasi() -> None:
    e = errors_of(
        MINIMAL
        + '[[validators]]\non = ["output"]\ndetect = ["email"]\nacton = "deny"\n[wasi]\nalow = []\n'
    )
    assert "[validators[0]] unknown key 'acton' — did you mean 'action'?" in str(e)
    assert "[wasi] unknown key 'alow' — did you mean 'allow'?" in str(e)


def test_unknown_key_without_close_match_lists_valid_keys() -> None:
    e = errors_of(MINIMAL + "[budgets]\nzzz = 1\n")
    assert "unknown key 'zzz'; valid keys: fuel, fuel_total, memory" in str(e)


def test_unquoted_nested_arg_path_is_explained() -> None:
    e = errors_of(
        MINIMAL + '[tools."x"]\nhandler = "m:f"\n[tools."x".args.vendor.id]\nforbidden = true\n'
    )
    assert 'must be quoted as one key: [tools.x.args."vendor.id"]' in str(e)


def test_misspelled_builtin_tool() -> None:
    e = errors_of(MINIMAL + '[tools."kv.icnr"]\n')
    assert "'kv.icnr' is not a builtin tool" in str(e)
    assert "did you mean 'kv.incr'?" in str(e)
    assert e.suggestion == "kv.incr"


def test_validator_on_ungranted_tool() -> None:
    e = errors_of(
        MINIMAL
        + '[tools."slack.post"]\nhandler = "m:f"\n[[validators]]\non = ["tool:slack.pst"]\ndetect = ["email"]\n'
    )
    assert (
        "validators[0].on: 'tool:slack.pst' names a tool this policy does not grant — did you mean 'tool:slack.post'?"
        in str(e)
    )


def test_bad_target_and_detector_and_action() -> None:
    e = errors_of(MINIMAL + '[[validators]]\non = ["outptu"]\ndetect = ["crad"]\naction = "dney"\n')
    text = str(e)
    assert "validators[0].on: unknown target 'outptu' — did you mean 'output'?" in text
    assert "validators[0].detect: unknown detector 'crad' — did you mean 'card'?" in text
    assert (
        "validators[0].action: 'dney' is not one of 'deny', 'approval', 'terminate' — did you mean 'deny'?"
        in text
    )


# --- wrong types and bad values ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        ("[budgets]\nfuel = -1\n", "budgets.fuel: must be greater than 0 (got -1)"),
        ('[budgets]\nfuel = "lots"\n', "budgets.fuel: expected an integer, got a string ('lots')"),
        ("[budgets]\nfuel = 1.5\n", "budgets.fuel: expected an integer, got a float (1.5)"),
        (
            "[budgets]\ntool_calls = true\n",
            "budgets.tool_calls: expected an integer, got a boolean (true)",
        ),
        (
            '[budgets]\nwall_clock = "5 parsecs"\n',
            "budgets.wall_clock: invalid duration '5 parsecs': unknown unit 'parsecs'",
        ),
        (
            '[budgets]\nstall_timeout = "0s"\n',
            "budgets.stall_timeout: duration must be greater than zero",
        ),
        (
            '[budgets]\nmemory = "32MB"\n',
            "budgets.memory: invalid size '32MB': 'MB' is ambiguous — did you mean 'MiB'?",
        ),
        ("[budgets]\nmemory = -1\n", "budgets.memory: size must be greater than zero"),
        (
            "[budgets]\ntokens = 10\ntoken_warnings = [0.5, 1.5]\n",
            "budgets.token_warnings: each threshold must be a fraction",
        ),
        (
            "[budgets]\ntoken_warnings = [0.5]\n",
            "budgets.token_warnings: warnings need a token budget",
        ),
        ("[budgets]\nmax_denials = -1\n", "budgets.max_denials: must be at least 0"),
        ("[budgets]\nfuel = 5\n[budgets.extra]\n", "[budgets] unknown key 'extra'"),
        ('[tools."kv.get"]\nrate = "100"\n', "tools.\"kv.get\".rate: invalid rate '100'"),
        ('[tools."kv.get"]\nhandler = "m:f"\n', 'tools."kv.get".handler: kv.get is a builtin tool'),
        (
            '[tools."kv.incr"]\nidempotent = true\n',
            'tools."kv.incr".idempotent: kv.incr is not idempotent; a policy may only tighten',
        ),
        ('[tools."t"]\nhandler = "nocolon"\n', "tools.t.handler: expected 'module:function'"),
        (
            '[tools."t"]\nhandler = "m:f"\ncredentials = ["bad name"]\n',
            "tools.t.credentials: 'bad name' is not a credential name",
        ),
        (
            '[tools."bad name"]\nhandler = "m:f"\n',
            "tools.\"bad name\": 'bad name' is not a valid tool name",
        ),
        (
            '[tools."t"]\nhandler = "m:f"\napproval = { when = "amount >> 5" }\n',
            "tools.t.approval.when: expected an argument name or a value, got '>' at column 9",
        ),
        (
            '[tools."t"]\nhandler = "m:f"\napproval = { when = 5 }\n',
            "tools.t.approval.when: expected a condition string",
        ),
        (
            '[tools."t"]\nhandler = "m:f"\napproval = "yes"\n',
            "tools.t.approval: expected a table, got a string ('yes')",
        ),
        (
            '[tools."t"]\nhandler = "m:f"\n[tools."t".args.q]\npattern = "(unclosed"\n',
            "tools.t.args.q.pattern: invalid regular expression '(unclosed'",
        ),
        (
            '[tools."t"]\nhandler = "m:f"\n[tools."t".args.q]\nmin = "5"\n',
            "tools.t.args.q.min: expected a number, got a string ('5')",
        ),
        (
            '[tools."t"]\nhandler = "m:f"\n[tools."t".args.q]\nmin = 5\nmax = 1\n',
            "tools.t.args.q: min (5) is greater than max (1)",
        ),
        (
            '[tools."t"]\nhandler = "m:f"\n[tools."t".args.q]\nforbidden = true\nrequired = true\n',
            "tools.t.args.q: forbidden = true cannot be combined with required",
        ),
        (
            '[tools."t"]\nhandler = "m:f"\n[tools."t".args.q]\nallow = []\n',
            "tools.t.args.q: allow = [] would refuse every value",
        ),
        (
            '[tools."t"]\nhandler = "m:f"\n[tools."t".args.q]\nallow = [{ a = 1 }]\n',
            "tools.t.args.q.allow: item 0 is a table",
        ),
        (
            '[tools."t"]\nhandler = "m:f"\n[tools."t".args.q]\ntype = "str"\n',
            "tools.t.args.q.type: 'str' is not one of",
        ),
        (
            '[tools."t"]\nhandler = "m:f"\n[tools."t".args."a..b"]\nrequired = true\n',
            "tools.t.args: argument path 'a..b' has an empty segment",
        ),
        (
            '[[validators]]\non = []\ndetect = ["email"]\n',
            "validators[0].on: on = [] applies nowhere",
        ),
        (
            '[[validators]]\non = ["output"]\n',
            "validators[0]: a validator needs exactly one of detect, spending_limit, rows_affected, custom (got none)",
        ),
        (
            '[[validators]]\non = ["output"]\ncustom = "nope"\n',
            "validators[0].custom: expected 'module:function'",
        ),
        (
            '[[validators]]\non = ["output"]\nspending_limit = { field = "amount", max = -1 }\n',
            "validators[0].spending_limit.max: must not be negative",
        ),
        (
            '[[validators]]\non = ["output"]\nspending_limit = { max = 5 }\n',
            "validators[0].spending_limit.field is required",
        ),
        (
            '[wasi]\nallow = ["fd_wirte"]\n',
            "wasi.allow: unknown WASI function 'fd_wirte' — did you mean 'fd_write'?",
        ),
    ],
)
def test_bad_values_name_the_field(snippet: str, expected: str) -> None:
    e = errors_of(MINIMAL + snippet)
    assert expected in str(e), str(e)
    assert str(e).startswith("policy.toml: ")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[agent]\nname = "Procurement Bot"\n',
            "agent.name: 'Procurement Bot' is not a valid name; use 1-64 lowercase letters, digits, '_' and '-', e.g. 'procurement-bot'",
        ),
        ("[agent]\nname = 5\n", "agent.name: expected a string, got an integer (5)"),
        ("[agent]\n", "agent.name is required"),
        ("", "[agent] table is missing"),
        ('agent = "x"\n', "agent: expected a table, got a string ('x')"),
        ("[agent\nname = 'x'", "policy.toml: not valid TOML: "),
    ],
)
def test_agent_section_errors(text: str, expected: str) -> None:
    assert expected in str(errors_of(text))


def test_all_problems_reported_at_once() -> None:
    text = (
        '[agent]\nname = "Bad Name"\n'
        "[budgets]\ntokns = 5\nfuel = -1\n"
        '[tools."kv.icnr"]\n'
        '[tools."kv.incr"]\nidempotent = true\n'
        '[[validators]]\non = ["tool:nope"]\ndetect = ["email"]\n'
    )
    e = errors_of(text)
    lines = str(e).splitlines()
    assert lines[0] == "policy.toml: 6 problems:"
    # Unknown keys come first: they are the likeliest root cause.
    assert lines[1] == "  - [budgets] unknown key 'tokns' — did you mean 'tokens'?"
    assert len(e.issues) == 6
    assert {i.field for i in e.issues} == {
        "budgets.tokns",
        "agent.name",
        "budgets.fuel",
        'tools."kv.icnr"',
        'tools."kv.incr".idempotent',
        "validators[0].on",
    }
    assert all(i.source == "policy.toml" for i in e.issues)


def test_missing_key_caused_by_typo_is_not_reported_twice() -> None:
    e = errors_of('[agent]\nnmae = "x"\n')
    assert len(e.issues) == 1
    assert str(e) == "policy.toml: [agent] unknown key 'nmae' — did you mean 'name'?"


def test_policy_error_attributes_for_a_file_level_problem() -> None:
    e = errors_of("not toml at all [")
    assert e.field is None and e.suggestion is None and e.source == "policy.toml"


@pytest.mark.parametrize("value", ["[" * 5000 + "]" * 5000, "{a = " * 2000 + "1" + "}" * 2000, "[" * 40 + "]" * 40])
def test_deeply_nested_values_are_a_policy_error(value: str) -> None:
    """tomllib recursed into 5,000 nested arrays and `torpor policy check` ended in
    `internal error (RecursionError)` (found by tests/test_hostile_cli.py)."""
    with pytest.raises(PolicyError, match="nest deeper than 32 levels"):
        parse_policy(f'[agent]\nname = "x"\nx = {value}\n')
