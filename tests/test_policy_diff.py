"""policies.diff: what two policies grant differently, section by section, as data and text."""

from __future__ import annotations

import json

import policies
from policies.diff import SECTIONS, diff_policies

BASE = """
[agent]
name = "svc"
pool = "default"

[budgets]
wall_clock = "30s"
tokens = 1000

[tools."http.fetch"]
hosts = ["api.a.example"]
methods = ["GET"]

[tools."kv.get"]

[tools."notify.send"]
handler = "tools_mod:notify"
approval = true
credentials = ["SMTP"]
rate = "3/min"
[tools."notify.send".args.to]
required = true
max_length = 64

[[validators]]
on = ["tool:notify.send"]
detect = ["email"]
action = "deny"
"""


def parse(text: str) -> policies.Policy:
    return policies.parse_policy(text)


def h(value: object) -> object:
    """A value as a set element (a rate or an argument rule is a list or a dict)."""
    return json.dumps(value, sort_keys=True) if isinstance(value, list | dict) else value


def changes(a: str, b: str) -> set[tuple[str, str, str, object, object]]:
    d = diff_policies(parse(a), parse(b))
    return {(c.section, c.subject, c.kind, h(c.before), h(c.after)) for c in d.changes}


def test_the_same_grants_spelled_differently_are_the_same() -> None:
    spelled = BASE.replace('wall_clock = "30s"', 'wall_clock = "30000ms"').replace("\n[tools.\"kv.get\"]\n",
                                                                                  "\n# a comment\n[tools.\"kv.get\"]\n")
    d = diff_policies(parse(BASE), parse(spelled))
    assert d.same and d.changes == () and d.text() == "the two policies grant the same"
    assert d.to_dict() == {"same": True, "tools": {"added": [], "removed": [], "changed": []}, "sections": {}}


def test_each_kind_of_grant_lands_in_its_section() -> None:
    after = (BASE.replace('hosts = ["api.a.example"]', 'hosts = ["api.b.example"]\nallow_private = true')
             .replace('methods = ["GET"]', 'methods = ["GET", "POST"]')
             .replace("approval = true", 'approval = { when = "to != \'ops\'" }')
             .replace('credentials = ["SMTP"]', 'credentials = ["SMTP", "SMTP_BACKUP"]')
             .replace('rate = "3/min"', 'rate = "10/min"')
             .replace("max_length = 64", "max_length = 128")
             .replace("tokens = 1000", "tokens = 5000")
             .replace('pool = "default"', 'pool = "batch"')
             .replace('detect = ["email"]', 'detect = ["email", "phone"]')
             .replace('[tools."kv.get"]', '[tools."kv.set"]\nnamespaces = ["shared"]')
             + '\n[wasi]\nallow = ["random_get"]\n\n[mcp.fs]\ncommand = "fs-server"\ntools = ["read"]\n'
               'credentials = ["FS_TOKEN"]\n\n[retention]\ncheckpoints = 3\n')
    found = changes(BASE, after)
    expected = {
        ("tools", "kv.get", "removed", None, None),
        ("tools", "kv.set", "added", None, None),
        ("tools", "kv.set namespace", "added", None, "shared"),
        ("tools", "mcp.fs.read", "added", None, None),
        ("approvals", "notify.send", "changed", "always", "when to != 'ops'"),
        ("network", "http.fetch host", "added", None, "api.b.example"),
        ("network", "http.fetch host", "removed", "api.a.example", None),
        ("network", "http.fetch method", "added", None, "POST"),
        ("network", "http.fetch allow_private", "added", None, True),
        ("secrets", "notify.send credential", "added", None, "SMTP_BACKUP"),
        ("secrets", "mcp.fs credential", "added", None, "FS_TOKEN"),
        ("limits", "notify.send args.to.max_length", "changed", 64, 128),
        ("budgets", "tokens", "changed", 1000, 5000),
        ("retention", "checkpoints", "changed", None, 3),
        ("wasi", "import", "added", None, "random_get"),
        ("mcp", "fs", "added", None, "fs-server"),
        ("agent", "pool", "changed", "default", "batch"),
    }
    assert expected <= found, expected - found
    rates = {c for c in found if c[1] == "notify.send rate"}
    assert len(rates) == 1 and next(iter(rates))[2] == "changed"
    validators = {c[2] for c in found if c[0] == "validators"}
    assert validators == {"added", "removed"}  # a validator changed is one gone and one new
    d = diff_policies(parse(BASE), parse(after))
    text = d.text()
    # Sections in their fixed order, each heading once.
    headings = [line for line in text.splitlines() if not line.startswith("  ")]
    assert headings == [s for s in SECTIONS if s in headings]
    assert "  ~ notify.send: always -> when to != 'ops'" in text
    assert "  - http.fetch host: api.a.example" in text and "  + http.fetch host: api.b.example" in text


def test_a_tool_added_or_removed_brings_or_takes_its_grants() -> None:
    minimal = '[agent]\nname = "svc"\n'
    found = changes(minimal, BASE)
    assert ("tools", "http.fetch", "added", None, None) in found
    assert ("tools", "notify.send", "added", None, "handler tools_mod:notify") in found
    assert ("network", "http.fetch host", "added", None, "api.a.example") in found
    assert ("approvals", "notify.send", "added", None, "always") in found
    assert ("secrets", "notify.send credential", "added", None, "SMTP") in found
    assert ("limits", "notify.send args.to", "added", None, h({"required": True, "max_length": 64})) in found
    back = changes(BASE, minimal)
    assert ("network", "http.fetch host", "removed", "api.a.example", None) in back
    assert ("approvals", "notify.send", "removed", "always", None) in back
    d = diff_policies(parse(BASE), parse(minimal))
    assert d.tools_removed == ("http.fetch", "kv.get", "notify.send") and d.tools_added == ()


def test_a_rate_limit_that_waits_instead_of_denying_is_a_changed_limit_and_defaults_say_nothing() -> None:
    a = policies.parse_policy(BASE)
    b = policies.parse_policy(BASE.replace('rate = "3/min"', 'rate = "3/min"\non_limit = "wait"\nmax_wait = "20s"'))
    limits = {(c.subject, c.before, c.after) for c in diff_policies(a, b).changes if c.section == "limits"}
    assert ("notify.send on_limit", "deny", "wait") in limits
    assert any(subject == "notify.send max_wait" for subject, _, _ in limits)
    # a tool added or removed with on_limit at its default adds no limit line for it
    c = policies.parse_policy(BASE + '\n[tools."kv.set"]\nrate = "5/s"\n')
    added = [ch for ch in diff_policies(a, c).changes if ch.section == "limits"]
    assert [(ch.subject, ch.after) for ch in added] == [("kv.set rate", ["5/s"])], added
    assert not [ch for ch in diff_policies(c, a).changes if "on_limit" in ch.subject]
