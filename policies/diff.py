"""What two policies grant differently: tools, approvals, network, secrets, limits, budgets.

Why a diff of *grants* and not of text: two versions of an agent are compared to decide
whether the second may go to production ("what may it do now that it could not
before?"). A text diff of two ``policy.toml`` files shows comments, spacing and ``"30s"``
against ``"30000ms"``; this compares the policies as the engine reads them
(:meth:`~policies.schema.Policy.to_dict`, units resolved) and sorts each difference
under the question it answers:

* ``tools``: a tool granted or no longer granted, or what runs behind it (its handler,
  model, kv namespaces, idempotency);
* ``approvals``: when a person must approve a call;
* ``network``: the hosts, methods, private addresses and headers a tool may reach;
* ``secrets``: the credentials a tool or MCP server is leased;
* ``limits``: per-tool rates, call caps, argument rules, response and token caps;
* ``budgets``, ``retention``, ``validators``, ``wasi``, ``mcp``, ``agent``.

A tool added brings its hosts, credentials and approval into their sections too (they
are new grants); a tool removed takes them away. Pure: no I/O, as every module here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .schema import Policy

__all__ = ["SECTIONS", "Change", "PolicyDiff", "diff_policies"]

#: The sections of a diff, in the order the text shows them.
SECTIONS: tuple[str, ...] = ("tools", "approvals", "network", "secrets", "limits", "budgets", "retention",
                             "validators", "wasi", "mcp", "agent")

# Where each field of a tool grant is reported (a field not named here: under ``tools``).
_NETWORK_FIELDS = ("hosts", "methods", "allow_private", "base_url", "headers", "max_redirects")
_SECRET_FIELDS = ("credentials", "api_key")
_LIMIT_FIELDS = ("rate", "rate_scope", "on_limit", "max_wait", "max_calls", "max_tokens", "max_response_bytes", "timeout", "retries")
_AGENT_FIELDS = ("name", "version", "pool", "priority")
# Set-valued fields, reported one element at a time ("+ host api.example.com").
_SET_FIELDS = frozenset({"hosts", "methods", "credentials", "namespaces", "models"})


@dataclass(frozen=True, slots=True)
class Change:
    """One difference: in ``section``, about ``subject`` (a tool, a budget, a server...),
    ``kind`` "added", "removed" or "changed", with the value ``before`` and ``after``
    (None on the side where it is absent)."""

    section: str
    subject: str
    kind: str
    before: Any = None
    after: Any = None

    def to_dict(self) -> dict[str, Any]:
        return {"section": self.section, "subject": self.subject, "kind": self.kind,
                "before": self.before, "after": self.after}

    def line(self) -> str:
        """The change as one line of text (``+``, ``-`` or ``~``)."""
        if self.kind == "added":
            return f"+ {self.subject}" + ("" if self.after is None else f": {_show(self.after)}")
        if self.kind == "removed":
            return f"- {self.subject}" + ("" if self.before is None else f": {_show(self.before)}")
        return f"~ {self.subject}: {_show(self.before)} -> {_show(self.after)}"


@dataclass(frozen=True, slots=True)
class PolicyDiff:
    """Every difference between policy ``a`` and policy ``b``, in section order."""

    changes: tuple[Change, ...]
    tools_added: tuple[str, ...]
    tools_removed: tuple[str, ...]
    tools_changed: tuple[str, ...]

    @property
    def same(self) -> bool:
        """Whether the two policies grant exactly the same (comments and spelling aside)."""
        return not self.changes

    def to_dict(self) -> dict[str, Any]:
        """The diff as JSON-able data (the CLI's ``--json``, the server's body)."""
        sections: dict[str, list[dict[str, Any]]] = {}
        for c in self.changes:
            sections.setdefault(c.section, []).append(c.to_dict())
        return {"same": self.same,
                "tools": {"added": list(self.tools_added), "removed": list(self.tools_removed),
                          "changed": list(self.tools_changed)},
                "sections": sections}

    def text(self) -> str:
        """The diff for people: one heading per section that differs, one line per change."""
        if self.same:
            return "the two policies grant the same"
        lines: list[str] = []
        for section in SECTIONS:
            rows = [c for c in self.changes if c.section == section]
            if rows:
                lines.append(section)
                lines.extend("  " + c.line() for c in rows)
        return "\n".join(lines)


def diff_policies(a: Policy, b: Policy) -> PolicyDiff:
    """What policy ``b`` grants differently from policy ``a`` (``a`` is before, ``b`` after)."""
    da, db = a.to_dict(), b.to_dict()
    changes: list[Change] = []
    ta, tb = da.get("tools", {}), db.get("tools", {})
    added = tuple(sorted(set(tb) - set(ta)))
    removed = tuple(sorted(set(ta) - set(tb)))
    changed: list[str] = []
    for name in sorted(set(ta) | set(tb)):
        before, after = ta.get(name), tb.get(name)
        if before is None:
            changes.append(Change("tools", name, "added", after=_tool_summary(after)))
            changes.extend(_grant_changes(name, _EMPTY_GRANT, after, only=_NEW_GRANT_FIELDS))
        elif after is None:
            changes.append(Change("tools", name, "removed", before=_tool_summary(before)))
            changes.extend(_grant_changes(name, before, _EMPTY_GRANT, only=_NEW_GRANT_FIELDS))
        elif before != after:
            changed.append(name)
            changes.extend(_grant_changes(name, before, after))
    changes.extend(_field_changes("budgets", "", da.get("budgets", {}), db.get("budgets", {})))
    changes.extend(_field_changes("retention", "", da.get("retention", {}), db.get("retention", {})))
    changes.extend(_set_changes("validators", "", [_validator(v) for v in da.get("validators", [])],
                                [_validator(v) for v in db.get("validators", [])], what="validator"))
    changes.extend(_set_changes("wasi", "", da.get("wasi", {}).get("allow", []), db.get("wasi", {}).get("allow", []),
                                what="import"))
    changes.extend(_mcp_changes(da.get("mcp", {}), db.get("mcp", {})))
    agent_a, agent_b = da.get("agent", {}), db.get("agent", {})
    changes.extend(_field_changes("agent", "", {k: agent_a.get(k) for k in _AGENT_FIELDS},
                                  {k: agent_b.get(k) for k in _AGENT_FIELDS}))
    order = {s: i for i, s in enumerate(SECTIONS)}
    changes.sort(key=lambda c: order[c.section])  # stable: within a section, in the order found
    return PolicyDiff(tuple(changes), added, removed, tuple(changed))


# The grant of a tool that is not granted: what an added tool is compared against.
_EMPTY_GRANT: dict[str, Any] = {}
# Settings every grant has, at the value a grant that does not name them gets: a tool added
# or removed with them at that value changes nothing there.
_GRANT_DEFAULTS: dict[str, Any] = {"on_limit": "deny"}
# What an added or removed tool brings or takes into the other sections.
# (its description and settings at their defaults say nothing; ``rate_scope`` only with a rate).
_NEW_GRANT_FIELDS = frozenset({"approval", "hosts", "methods", "allow_private", "base_url", "headers", "credentials",
                               "api_key", "rate", "on_limit", "max_wait", "max_calls", "max_tokens", "max_response_bytes", "timeout",
                               "args", "namespaces", "model", "models"})


def _section_of(field: str) -> str:
    if field == "approval":
        return "approvals"
    if field in _NETWORK_FIELDS:
        return "network"
    if field in _SECRET_FIELDS:
        return "secrets"
    if field in _LIMIT_FIELDS or field == "args":
        return "limits"
    return "tools"


def _grant_changes(tool: str, before: dict[str, Any], after: dict[str, Any],
                   only: frozenset[str] | None = None) -> list[Change]:
    out: list[Change] = []
    for field in sorted(set(before) | set(after), key=_field_order):
        if only is not None and field not in only:
            continue
        default = _GRANT_DEFAULTS.get(field)
        va, vb = before.get(field, default), after.get(field, default)
        if va == vb:
            continue
        section = _section_of(field)
        if field == "approval":
            out.append(_change(section, tool, _approval(va), _approval(vb)))
        elif field in _SET_FIELDS:
            out.extend(_set_changes(section, tool, va or [], vb or [], what=field.rstrip("s")))
        elif field == "args":
            out.extend(_args_changes(tool, va or {}, vb or {}))
        elif _in_use(va) or _in_use(vb):
            out.append(_change(section, f"{tool} {field}", va if _in_use(va) else None, vb if _in_use(vb) else None))
    return out


def _field_order(field: str) -> tuple[int, str]:
    return (SECTIONS.index(_section_of(field)), field)


def _change(section: str, subject: str, before: Any, after: Any) -> Change:
    kind = "added" if before is None else "removed" if after is None else "changed"
    return Change(section, subject, kind, before, after)


def _field_changes(section: str, prefix: str, a: dict[str, Any], b: dict[str, Any]) -> list[Change]:
    out = []
    for field in sorted(set(a) | set(b)):
        va, vb = a.get(field), b.get(field)
        if va != vb and (_in_use(va) or _in_use(vb)):
            out.append(Change(section, f"{prefix}{field}", "changed", _unset(va), _unset(vb)))
    return out


def _set_changes(section: str, subject: str, a: list[Any], b: list[Any], *, what: str) -> list[Change]:
    sa, sb = list(dict.fromkeys(_key(x) for x in a)), list(dict.fromkeys(_key(x) for x in b))
    head = f"{subject} {what}" if subject else what
    return ([Change(section, head, "added", after=_unkey(x)) for x in sb if x not in sa]
            + [Change(section, head, "removed", before=_unkey(x)) for x in sa if x not in sb])


def _args_changes(tool: str, a: dict[str, Any], b: dict[str, Any]) -> list[Change]:
    out = []
    for path in sorted(set(a) | set(b)):
        ca, cb = _constraint(a.get(path)), _constraint(b.get(path))
        if ca == cb:
            continue
        if ca is None or cb is None:
            out.append(_change("limits", f"{tool} args.{path}", ca, cb))
            continue
        for field in sorted(set(ca) | set(cb)):
            if ca.get(field) != cb.get(field):
                out.append(Change("limits", f"{tool} args.{path}.{field}", "changed", _unset(ca.get(field)),
                                  _unset(cb.get(field))))
    return out


def _mcp_changes(a: dict[str, Any], b: dict[str, Any]) -> list[Change]:
    out: list[Change] = []
    for name in sorted(set(a) | set(b)):
        sa, sb = a.get(name), b.get(name)
        if sa == sb:
            continue
        if sa is None or sb is None:
            out.append(_change("mcp", name, _server(sa) if sa else None, _server(sb) if sb else None))
            out.extend(_set_changes("secrets", f"mcp.{name}", (sa or {}).get("credentials", []),
                                    (sb or {}).get("credentials", []), what="credential"))
            continue
        for field in sorted(set(sa) | set(sb)):
            va, vb = sa.get(field), sb.get(field)
            if va == vb:
                continue
            if field == "credentials":
                out.extend(_set_changes("secrets", f"mcp.{name}", va or [], vb or [], what="credential"))
            elif field == "tools":
                out.extend(_set_changes("mcp", name, va or [], vb or [], what="tool"))
            else:
                out.append(Change("mcp", f"{name} {field}", "changed", _unset(va), _unset(vb)))
    return out


# -- values as people read them ---------------------------------------------------------

def _in_use(value: Any) -> bool:
    """Whether a field says anything (None, False, empty: the default, nothing granted)."""
    return not (value is None or value is False or (isinstance(value, list | tuple | dict) and not value))


def _unset(value: Any) -> Any:
    return value if _in_use(value) else None


def _approval(value: Any) -> str | None:
    if not isinstance(value, dict):
        return None
    when = value.get("when")
    return f"when {when}" if when else "always"


def _constraint(value: Any) -> dict[str, Any] | None:
    """An argument rule with only the fields that say something."""
    if not isinstance(value, dict):
        return None
    return {k: v for k, v in value.items() if _in_use(v)}


def _tool_summary(grant: Any) -> str | None:
    if not isinstance(grant, dict):
        return None
    if grant.get("handler"):
        return f"handler {grant['handler']}"
    return None


def _validator(v: dict[str, Any]) -> str:
    """A validator as one line: what it watches, what it checks, what a violation does."""
    on = ", ".join(v.get("on") or [])
    checks = {k: v[k] for k in ("detect", "spending_limit", "rows_affected", "custom") if _in_use(v.get(k))}
    inner = v.get("spending_limit") or v.get("rows_affected") or {}
    action = (inner.get("action") if isinstance(inner, dict) else None) or v.get("action") or "deny"
    return f"on {on}: {_show(checks)} -> {action}"


def _server(s: dict[str, Any]) -> str:
    """A server as the policy gives it: its deprecated command line or URL, or by name only."""
    if s.get("url"):
        return str(s["url"])
    if s.get("command"):
        return " ".join([str(s["command"]), *map(str, s.get("args") or [])])
    return "(the operator config's)"


def _key(x: Any) -> Any:
    """A hashable form of a list element (an element may be a dict: a rate)."""
    return x if isinstance(x, str | int | float | bool) or x is None else json.dumps(x, sort_keys=True)


def _unkey(x: Any) -> Any:
    if isinstance(x, str) and x[:1] in "{[":
        try:
            return json.loads(x)
        except ValueError:
            return x
    return x


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ", ".join(_show(v) for v in value) or "none"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return str(value)
