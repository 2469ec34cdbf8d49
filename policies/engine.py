"""The decision engine: (policy, request, usage, time) → decision.

Every tool call an agent makes is decided here before the tool runs.  The
engine is a pure function in the spirit of sans-I/O protocol libraries: it
reads no clock (``now`` is an argument), touches no store, imports no runtime,
and returns a value.  That makes a decision reproducible from the audit log
alone — the same policy, request, usage and time give the same answer months
later — and lets the host run it anywhere (inside a tool-call trampoline, in
``torpor policy explain``, in a test) without setup.

Order of evaluation for a tool call (first deny or terminate wins):

1. **grant** — the tool must be granted (``not_granted``);
2. **budgets** — cumulative and per-run limits (``Terminate``), denials
   beyond ``max_denials`` (``Terminate``);
3. **argument constraints** (``invalid_args``);
4. **invocation limits** — ``max_calls`` (``budget_exceeded``), then rates
   (``rate_limited``, with ``retry_after_s``);
5. **validators** on this tool's arguments (``pii_detected``,
   ``secret_detected``, ``spending_limit``, ``rows_limit``,
   ``denied_by_validator``), whose action may instead require approval or
   terminate;
6. **approval** condition of the grant.

If nothing denied, the call needs approval when any rule asked for it, and is
allowed otherwise.  A denial that would take the agent past
``budgets.max_denials`` is returned as a :class:`Terminate` whose ``cause`` is
the denial, so the host can put both in the failure report.

The usage the engine sees is the host's bookkeeping; :func:`record_decision`
is the pure helper that advances it after a decision, so the host and the
engine agree on what counts (allowed and approval-bound calls count towards
``tool_calls``, ``max_calls`` and rates; denied calls count as denials).
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, ClassVar, Literal, Protocol

from ._frozen import FrozenDict, freeze, thaw
from .detectors import LABELS, PII_DETECTORS, scan
from .expr import json_equal
from .paths import locator as _locator
from .paths import resolve
from .schema import ArgConstraint, Limit, Policy, ToolGrant, Validator
from .units import format_duration

# --- inputs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolRequest:
    """One tool call as the guest made it.

    ``args`` is the parsed JSON the guest passed; it is frozen on construction
    (objects become read-only mappings, arrays tuples) so that a request is
    hashable and nobody can change it after it was decided.
    """

    agent_id: str
    tool: str
    args: Any
    call_seq: int
    principal: str | None = None
    agent_name: str | None = None
    run_id: str | None = None  # the agent's current run (the ``run`` scope of limits)
    tenant: str | None = None  # whom the agent acts for (the ``tenant`` scope); default: the principal

    def __post_init__(self) -> None:
        object.__setattr__(self, "args", freeze(self.args))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON, for audit records and display."""
        return {
            "agent_id": self.agent_id,
            "tool": self.tool,
            "args": thaw(self.args),
            "call_seq": self.call_seq,
            "principal": self.principal,
            "agent_name": self.agent_name,
            "run_id": self.run_id,
            "tenant": self.tenant,
        }


@dataclass(frozen=True)
class Usage:
    """What the agent has consumed so far, as the host counts it.

    ``*_run`` fields are for the current run segment (since spawn or the last
    resume); the others are cumulative.  ``wall_clock_s`` is elapsed time since
    spawn, including waits.  ``recent_calls`` holds, per tool, the timestamps
    (same clock as ``now``) of calls that count towards its rate windows;
    :func:`record_decision` keeps it pruned to the longest window.
    """

    fuel_used: int = 0
    fuel_used_run: int = 0
    wall_clock_s: float = 0.0
    wall_clock_run_s: float = 0.0
    tool_calls: int = 0
    tokens: int = 0
    denials: int = 0
    calls_by_tool: Mapping[str, int] = field(default_factory=FrozenDict)
    recent_calls: Mapping[str, tuple[float, ...]] = field(default_factory=FrozenDict)
    # Counters of the limits whose scope is wider than one agent's record (:func:`aggregate_keys`):
    # a spending total (a number) or a rate's timestamps (a tuple), by key. The host reads them
    # from its store, and writes back what :func:`record_decision` returns, atomically.
    shared: Mapping[str, Any] = field(default_factory=FrozenDict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "calls_by_tool", FrozenDict(self.calls_by_tool))
        object.__setattr__(
            self, "recent_calls", FrozenDict({k: tuple(v) for k, v in self.recent_calls.items()})
        )
        object.__setattr__(
            self, "shared",
            FrozenDict({k: tuple(v) if isinstance(v, list | tuple) else v for k, v in self.shared.items()}),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "fuel_used": self.fuel_used,
            "fuel_used_run": self.fuel_used_run,
            "wall_clock_s": self.wall_clock_s,
            "wall_clock_run_s": self.wall_clock_run_s,
            "tool_calls": self.tool_calls,
            "tokens": self.tokens,
            "denials": self.denials,
            "calls_by_tool": dict(self.calls_by_tool),
            "recent_calls": {k: list(v) for k, v in self.recent_calls.items()},
            "shared": {k: list(v) if isinstance(v, tuple) else v for k, v in self.shared.items()},
        }


@dataclass(frozen=True)
class ValidatorContext:
    """What a custom validator is told besides the value it checks."""

    target: str  # "tool:NAME" or "output"
    tool: str | None
    rule: str  # e.g. "validators[3].custom"
    now: float
    agent_id: str | None = None
    principal: str | None = None


class CustomValidator(Protocol):
    """The callable a ``custom = "module:function"`` validator names.

    The host imports it and passes it to :func:`decide` / :func:`check_output`
    in ``custom_validators`` keyed by the reference string.  It receives the
    value as plain JSON (a copy: mutating it changes nothing) and returns
    ``None`` to pass, or a reason string to trigger the validator's action.
    It should be pure and fast; an exception counts as a violation, and a
    reference the host did not supply is a violation too (fail closed).
    """

    def __call__(self, value: Any, context: ValidatorContext, /) -> str | None: ...


# --- decisions -------------------------------------------------------------------------


@dataclass(frozen=True)
class Allow:
    """Run the tool.  ``rules`` lists every rule that was checked and passed."""

    rules: tuple[str, ...] = ()
    kind: ClassVar[str] = "allow"

    def to_dict(self) -> dict[str, Any]:
        return {"decision": "allow", "rules": list(self.rules)}


@dataclass(frozen=True)
class Deny:
    """Do not run the tool; tell the agent why so it can adapt.

    ``code`` is machine-readable (``invalid_args``, ``rate_limited``, …),
    ``reason`` is for the agent and operators (it never contains a detected
    secret in full), ``rule`` locates the rule in the policy file, and
    ``retry_after_s`` says when a rate-limited call could succeed.
    """

    code: str
    reason: str
    rule: str
    retry_after_s: float | None = None
    kind: ClassVar[str] = "deny"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "decision": "deny",
            "code": self.code,
            "reason": self.reason,
            "rule": self.rule,
        }
        if self.retry_after_s is not None:
            out["retry_after_s"] = self.retry_after_s
        return out

    def to_guest_error(self) -> dict[str, Any]:
        """The structured error a guest receives: code ``denied``, the denial's code, reason and rule."""
        out: dict[str, Any] = {
            "code": "denied",
            "denial": self.code,
            "message": self.reason,
            "rule": self.rule,
        }
        if self.retry_after_s is not None:
            out["retry_after_s"] = self.retry_after_s
        return out


@dataclass(frozen=True)
class RequireApproval:
    """Hold the call until a human approves or denies it.

    ``reason`` joins the reasons of every rule that asked; ``rule`` is the
    first of them and ``rules`` all of them.
    """

    reason: str
    rule: str
    rules: tuple[str, ...] = ()
    kind: ClassVar[str] = "approval"

    def to_dict(self) -> dict[str, Any]:
        return {
            "decision": "approval",
            "reason": self.reason,
            "rule": self.rule,
            "rules": list(self.rules or (self.rule,)),
        }


@dataclass(frozen=True)
class Terminate:
    """Stop the agent; this goes into its failure report.

    ``code`` is ``budget_exceeded``, ``too_many_denials`` or the code of the
    validator that asked for termination; ``cause`` is the denial that tipped
    the agent over ``max_denials``, when that is why.
    """

    reason: str
    rule: str
    code: str = "budget_exceeded"
    cause: Deny | None = None
    kind: ClassVar[str] = "terminate"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "decision": "terminate",
            "code": self.code,
            "reason": self.reason,
            "rule": self.rule,
        }
        if self.cause is not None:
            out["cause"] = self.cause.to_dict()
        return out


Decision = Allow | Deny | RequireApproval | Terminate

Outcome = Literal["pass", "deny", "approval", "terminate"]


@dataclass(frozen=True)
class RuleResult:
    """One rule evaluated: where it is, what it said, and why."""

    rule: str
    outcome: Outcome
    detail: str
    decision: Deny | RequireApproval | Terminate | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "outcome": self.outcome, "detail": self.detail}


@dataclass(frozen=True)
class Explanation:
    """A decision and every rule evaluated for it, in evaluation order.

    Unlike :func:`decide`, which stops at the first denial, an explanation
    evaluates every rule, so a person sees all that would have failed;
    ``decisive`` is the index of the step that made the decision (``None``
    for an allow).
    """

    decision: Decision
    steps: tuple[RuleResult, ...]
    subject: str
    decisive: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "subject": self.subject,
            "decision": self.decision.to_dict(),
            "decisive": self.decisive,
            "steps": [s.to_dict() for s in self.steps],
        }

    def __str__(self) -> str:
        d = self.decision
        lines = [f"{self.subject}"]
        if isinstance(d, Allow):
            lines.append("decision: ALLOW")
        elif isinstance(d, Deny):
            lines.append(f"decision: DENY ({d.code})")
        elif isinstance(d, RequireApproval):
            lines.append("decision: REQUIRE APPROVAL")
        else:
            lines.append(f"decision: TERMINATE ({d.code})")
        if not isinstance(d, Allow):
            lines.append(f"  reason: {d.reason}")
            lines.append(f"  rule:   {d.rule}")
            if isinstance(d, Deny) and d.retry_after_s is not None:
                lines.append(f"  retry after: {d.retry_after_s:.3f}s")
        lines.append("rules evaluated:")
        width = max((len(s.rule) for s in self.steps), default=0)
        for i, s in enumerate(self.steps):
            mark = ">>" if i == self.decisive else "  "
            lines.append(f"{mark} {s.outcome.upper():<9} {s.rule:<{width}}  {s.detail}")
        return "\n".join(lines)


# --- budget events ----------------------------------------------------------------------


@dataclass(frozen=True)
class BudgetEvent:
    """A warning threshold or a limit crossed between two usage snapshots.

    ``threshold`` is the fraction for warnings and ``None`` for ``exceeded``;
    an ``exceeded`` event means the host must terminate the agent.
    """

    kind: Literal["warning", "exceeded"]
    budget: str
    used: float
    limit: float
    threshold: float | None
    rule: str

    @property
    def terminate(self) -> bool:
        return self.kind == "exceeded"

    @property
    def message(self) -> str:
        if self.kind == "warning":
            assert self.threshold is not None
            return f"{self.budget}: {self.threshold:.0%} of the budget used ({_num(self.used)} of {_num(self.limit)})"
        return f"{self.budget}: budget exceeded ({_num(self.used)} used, limit {_num(self.limit)})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "budget": self.budget,
            "used": self.used,
            "limit": self.limit,
            "threshold": self.threshold,
            "rule": self.rule,
            "message": self.message,
        }


_CUMULATIVE = (
    ("tokens", "tokens", "token_warnings"),
    ("fuel_total", "fuel_used", "warnings"),
    ("wall_clock_total", "wall_clock_s", "warnings"),
    ("tool_calls", "tool_calls", "warnings"),
)


def budget_events(policy: Policy, before: Usage, after: Usage) -> list[BudgetEvent]:
    """The warnings and exceedances crossed going from ``before`` to ``after``.

    Crossing semantics make the events exactly-once: a threshold reported for
    one update is not reported again for the next, and splitting an update in
    two yields the same events.  A warning is crossed when usage reaches the
    threshold (``used >= fraction * limit``); a limit is exceeded when usage
    goes past it (``used > limit``).
    """
    events: list[BudgetEvent] = []
    b = policy.budgets
    for budget, attr, warn_field in _CUMULATIVE:
        limit = getattr(b, budget)
        if limit is None:
            continue
        was, now = float(getattr(before, attr)), float(getattr(after, attr))
        fractions: tuple[float, ...] = getattr(b, warn_field)
        for i, f in enumerate(fractions):
            level = f * limit
            if was < level <= now:
                events.append(
                    BudgetEvent(
                        "warning", budget, now, float(limit), f, f"budgets.{warn_field}[{i}]"
                    )
                )
        if was <= limit < now:
            events.append(
                BudgetEvent("exceeded", budget, now, float(limit), None, f"budgets.{budget}")
            )
    return events


# --- helpers ----------------------------------------------------------------------------


@lru_cache(maxsize=4096)
def locator(*parts: str | int) -> str:
    """Rule locators are built on every decision from a policy's few names: cache them."""
    return _locator(*parts)


def _num(v: float) -> str:
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return f"{v:,}" if isinstance(v, int) else f"{v:,.3f}"


def _show(value: Any, limit: int = 60) -> str:
    """A short JSON rendering of an argument value, for reasons."""
    if isinstance(value, int) and not isinstance(value, bool) and _beyond_64_bits(value):
        return f"an integer of {value.bit_length()} bits"
    try:
        text = json.dumps(thaw(value), ensure_ascii=False, sort_keys=True)
    except (TypeError, ValueError):
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _where(path: str) -> str:
    """``$.vendor.id`` → ``vendor.id``; the root itself is ``(arguments)``."""
    if path == "$":
        return "(arguments)"
    return path[2:] if path.startswith("$.") else path[1:]


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _beyond_64_bits(v: int) -> bool:
    return not -(1 << 63) <= v < (1 << 64)


def _bad_number(v: Any) -> str | None:
    """Why a value is not a number the engine can judge (None: it is one)."""
    if not _is_number(v):
        return f"must be a number, got {_json_type(v)}"
    if isinstance(v, float) and not math.isfinite(v):
        return "must be a finite number"
    if isinstance(v, int) and _beyond_64_bits(v):
        return f"is an integer of {v.bit_length()} bits; numbers beyond 64 bits are refused"
    return None


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, Mapping):
        return "object"
    return "array"


def _has_type(v: Any, t: str) -> bool:
    if t == "number":
        return _is_number(v)
    if t == "integer":
        return (isinstance(v, int) and not isinstance(v, bool)) or (
            isinstance(v, float) and v.is_integer()
        )
    if t == "array":
        return isinstance(v, Sequence) and not isinstance(v, str)
    return _json_type(v) == t


def _scalar_in(v: Any, values: tuple[Any, ...]) -> bool:
    return any(json_equal(v, a) for a in values)


def _elements(path: str, v: Any) -> list[tuple[str, Any]]:
    """Per-element checks apply to each element of an array, else to the value."""
    if isinstance(v, Sequence) and not isinstance(v, str):
        return [(f"{path}[{i}]", x) for i, x in enumerate(v)]
    return [(path, v)]


def _list(values: tuple[Any, ...], limit: int = 10) -> str:
    shown = ", ".join(_show(v, 40) for v in values[:limit])
    return shown + (f", … ({len(values) - limit} more)" if len(values) > limit else "")


# --- the checks ---------------------------------------------------------------------------


def _grant_check(policy: Policy, tool: str) -> RuleResult:
    grant = policy.tools.get(tool)
    if grant is not None:
        how = f"handler {grant.handler}" if grant.handler else "builtin"
        return RuleResult(locator("tools", tool), "pass", f"granted ({how})")
    near = difflib.get_close_matches(tool, list(policy.tools), n=1, cutoff=0.6)
    hint = f" — did you mean {near[0]!r}?" if near else ""
    granted = ", ".join(sorted(policy.tools)) or "none"
    reason = f"tool {tool!r} is not granted by this agent's policy{hint} (granted: {granted})"
    return RuleResult("tools", "deny", reason, Deny("not_granted", reason, "tools"))


def _budget_checks(policy: Policy, usage: Usage, verbose: bool) -> Iterator[RuleResult]:
    b = policy.budgets

    def show(v: float, unit: str) -> str:
        if unit == "s":
            return "0s" if v <= 0 else format_duration(v)
        return _num(v)

    def over(rule: str, name: str, used: float, limit: float, unit: str = "") -> RuleResult:
        reason = f"{name} budget exhausted: {show(used, unit)} used, limit {show(limit, unit)}"
        return RuleResult(rule, "terminate", reason, Terminate(reason, rule, "budget_exceeded"))

    def ok(rule: str, used: float, limit: float, unit: str = "") -> RuleResult:
        # Formatting numbers costs more than the check; only explanations show it.
        detail = f"{show(used, unit)} of {show(limit, unit)} used" if verbose else ""
        return RuleResult(rule, "pass", detail)

    if b.tool_calls is not None:
        rule = "budgets.tool_calls"
        if usage.tool_calls + 1 > b.tool_calls:
            reason = (
                f"tool call budget exhausted: {usage.tool_calls} calls made, limit {b.tool_calls}"
            )
            yield RuleResult(rule, "terminate", reason, Terminate(reason, rule, "budget_exceeded"))
        else:
            yield ok(rule, usage.tool_calls, b.tool_calls)
    for rule, name, used, limit, unit in (
        ("budgets.tokens", "token", usage.tokens, b.tokens, ""),
        ("budgets.fuel_total", "total fuel", usage.fuel_used, b.fuel_total, ""),
        ("budgets.fuel", "per-run fuel", usage.fuel_used_run, b.fuel, ""),
        (
            "budgets.wall_clock_total",
            "total wall-clock",
            usage.wall_clock_s,
            b.wall_clock_total,
            "s",
        ),
        ("budgets.wall_clock", "per-run wall-clock", usage.wall_clock_run_s, b.wall_clock, "s"),
    ):
        if limit is None:
            continue
        yield over(rule, name, used, limit, unit) if used > limit else ok(rule, used, limit, unit)
    if b.max_denials is not None:
        rule = "budgets.max_denials"
        if usage.denials > b.max_denials:
            reason = f"too many denials: {usage.denials}, limit {b.max_denials}"
            yield RuleResult(rule, "terminate", reason, Terminate(reason, rule, "too_many_denials"))
        else:
            yield RuleResult(
                rule, "pass", f"{usage.denials} of {b.max_denials} denials tolerated so far"
            )


def _arg_checks(tool: str, grant: ToolGrant, args: Any) -> Iterator[RuleResult]:
    for path_text, segments, c in grant.constraints:
        found, missing = resolve(args, segments)
        for key in c.keys_in_use:
            rule = locator("tools", tool, "args", path_text, key)
            yield _one_constraint(rule, key, c, path_text, found, missing)


def _one_constraint(
    rule: str, key: str, c: ArgConstraint, path_text: str, found: list[Any], missing: list[str]
) -> RuleResult:
    def deny(reason: str) -> RuleResult:
        return RuleResult(rule, "deny", reason, Deny("invalid_args", reason, rule))

    if key == "required":
        if missing:
            return deny(f"argument {_where(missing[0])} is required")
        return RuleResult(rule, "pass", f"{path_text} present")
    if key == "forbidden":
        if found:
            return deny(f"argument {_where(found[0].path)} is not allowed for this tool; remove it")
        return RuleResult(rule, "pass", f"{path_text} absent")
    if not found:
        return RuleResult(rule, "pass", f"{path_text} absent")
    for m in found:
        where = _where(m.path)
        v = m.value
        if key == "type":
            assert c.type is not None
            if not _has_type(v, c.type):
                return deny(f"{where} must be of type {c.type}, got {_json_type(v)}")
        elif key in ("min_length", "max_length"):
            if not (isinstance(v, str) or (isinstance(v, Sequence) and not isinstance(v, str))):
                return deny(
                    f"{where} must be a string or an array to have a length, got {_json_type(v)}"
                )
            n = len(v)
            if key == "min_length" and c.min_length is not None and n < c.min_length:
                return deny(f"{where} is too short: length {n}, minimum {c.min_length}")
            if key == "max_length" and c.max_length is not None and n > c.max_length:
                return deny(f"{where} is too long: length {n}, maximum {c.max_length}")
        else:
            for ewhere, e in _elements(where, v):
                r = _element_check(key, c, ewhere, e)
                if r is not None:
                    return deny(r)
    return RuleResult(rule, "pass", f"{path_text} ok")


def _element_check(key: str, c: ArgConstraint, where: str, v: Any) -> str | None:
    """The reason a single value fails ``key``, or ``None``."""
    if key == "allow":
        assert c.allow is not None
        if not _scalar_in(v, c.allow):
            return f"{where} = {_show(v)} is not allowed; allowed: {_list(c.allow)}"
    elif key == "deny":
        if _scalar_in(v, c.deny):
            return f"{where} = {_show(v)} is refused by policy"
    elif key == "pattern":
        assert c.pattern is not None
        if not isinstance(v, str):
            return f"{where} must be a string matching {c.pattern.pattern!r}, got {_json_type(v)}"
        if c.pattern.search(v) is None:
            return f"{where} = {_show(v)} does not match the required pattern {c.pattern.pattern!r}"
    elif key == "forbid_pattern":
        assert c.forbid_pattern is not None
        text = v if isinstance(v, str) else json.dumps(thaw(v), sort_keys=True)
        if c.forbid_pattern.search(text) is not None:
            return (
                f"{where} = {_show(v)} matches the forbidden pattern {c.forbid_pattern.pattern!r}"
            )
    elif key in ("min", "max"):
        bound = c.min if key == "min" else c.max
        assert bound is not None
        bad = _bad_number(v)
        if bad is not None:
            return f"{where} {bad}"
        if key == "min" and v < bound:
            return f"{where} = {_show(v)} is below the minimum {_num(bound)}"
        if key == "max" and v > bound:
            return f"{where} = {_show(v)} is above the maximum {_num(bound)}"
    return None


def _invocation_checks(
    tool: str, grant: ToolGrant, usage: Usage, now: float, request: ToolRequest | None = None
) -> Iterator[RuleResult]:
    if grant.max_calls is not None:
        rule = locator("tools", tool, "max_calls")
        made = usage.calls_by_tool.get(tool, 0)
        if made + 1 > grant.max_calls:
            reason = f"{tool} may be called at most {grant.max_calls} times by this agent; {made} calls made"
            yield RuleResult(rule, "deny", reason, Deny("budget_exceeded", reason, rule))
        else:
            yield RuleResult(rule, "pass", f"{made} of {grant.max_calls} calls made")
    scope_text = ""
    if grant.rate_scope == "agent" or request is None:
        stamps = usage.recent_calls.get(tool, ())
    else:
        key = _scope_key(grant.rate_scope, request, _rate_what(tool))
        stamps = tuple(usage.shared.get(key, ()))
        scope_text = f" (scope {key.rsplit(':', 1)[0].replace(':', ' ', 1)})"
    for i, rate in enumerate(grant.rate):
        rule = locator("tools", tool, "rate") + (f"[{i}]" if len(grant.rate) > 1 else "")
        # Count every call in the half-open window (now - w, now]; timestamps in the
        # future (a clock that stepped back) count too, so skew never loosens a limit.
        in_window = sorted(t for t in stamps if t > now - rate.window_s)
        if len(in_window) >= rate.count:
            oldest_relevant = in_window[len(in_window) - rate.count]
            retry = min(rate.window_s, max(0.0, oldest_relevant + rate.window_s - now))
            reason = (
                f"rate limit {rate.text} reached for {tool}{scope_text}: {len(in_window)} calls in the last "
                f"{format_duration(rate.window_s)}; retry in {retry:.3g}s"
            )
            yield RuleResult(
                rule, "deny", reason, Deny("rate_limited", reason, rule, retry_after_s=retry)
            )
        else:
            yield RuleResult(rule, "pass", f"{len(in_window)} of {rate.count} calls in the window{scope_text}")


def _violation(rule: str, code: str, reason: str, action: str) -> RuleResult:
    if action == "approval":
        return RuleResult(rule, "approval", reason, RequireApproval(reason, rule, (rule,)))
    if action == "terminate":
        return RuleResult(rule, "terminate", reason, Terminate(reason, rule, code))
    return RuleResult(rule, "deny", reason, Deny(code, reason, rule))


def _scope_key(scope: str, request: ToolRequest, what: str) -> str:
    """The key of a counter shared beyond one call: ``SCOPE:WHO:WHAT``."""
    who = {
        "run": f"{request.agent_id}/{request.run_id or '-'}",
        "agent": request.agent_id,
        "policy": request.agent_name or "-",
        "tenant": request.tenant or request.principal or "-",
    }[scope]
    return f"{scope}:{who}:{what}"


def _limit_what(v: Validator, limit: Limit) -> str:
    return f"{'spend' if v.spending_limit is not None else 'rows'}:{limit.field}"


def _rate_what(tool: str) -> str:
    return f"rate:{tool}"


def _stray(value: Any, segments: Sequence[str]) -> str | None:
    """Where the limit's field name appears although not at its path (one level deeper, say)."""
    name = segments[-1] if segments else None
    if name is None or name == "*" or name.isdigit():
        return None
    stack: list[tuple[str, Any]] = [("$", value)]
    while stack:
        where, node = stack.pop()
        if isinstance(node, Mapping):
            for k, child in node.items():
                here = f"{where}.{k}"
                if k == name:
                    return here
                stack.append((here, child))
        elif isinstance(node, Sequence) and not isinstance(node, str):
            stack.extend((f"{where}[{i}]", child) for i, child in enumerate(node))
    return None


def _limit_amounts(limit: Limit, value: Any) -> tuple[list[Any], str | None]:
    """The amounts a limit sums, or why they cannot be judged (the first problem)."""
    found, _missing = resolve(value, limit.segments)
    if not found:
        stray = _stray(value, limit.segments)
        if stray is not None:
            return [], (f"{limit.field} is absent but {_where(stray)} is present: the limit refuses "
                        "arguments of a shape it does not match")
        return [], None
    for m in found:
        bad = _bad_number(m.value)
        if bad is not None:
            return [], f"{_where(m.path)} {bad}"
        if m.value < 0 and not limit.allow_negative:
            return [], f"{_where(m.path)} = {_show(m.value)} is negative, which this limit does not allow"
    return [m.value for m in found], None


def _limit_check(
    base: str, v: Validator, limit: Limit, value: Any, action: str, extra: str,
    request: ToolRequest | None, usage: Usage | None,
) -> RuleResult:
    is_spend = v.spending_limit is not None
    rule = f"{base}.{'spending_limit' if is_spend else 'rows_affected'}"
    code = "spending_limit" if is_spend else "rows_limit"
    amounts, problem = _limit_amounts(limit, value)
    if problem is not None:
        return _violation(rule, code, f"{problem}{extra}", action)
    if not amounts:
        return RuleResult(rule, "pass", f"{limit.field} absent")
    total = sum(amounts)
    scope = limit.scope if request is not None else "call"  # an output is judged alone
    prior: Any = 0
    scope_text = "this call"
    if scope != "call":
        assert request is not None and usage is not None
        key = _scope_key(scope, request, _limit_what(v, limit))
        prior = usage.shared.get(key, 0)
        scope_text = f"scope {key.rsplit(':', 1)[0].replace(':', ' ', 1)}"
    after = prior + total
    unit = "" if is_spend else " rows"
    if after > limit.max:
        spent = f"{_num(prior)} already + {_num(total)} = {_num(after)}" if scope != "call" else _num(total)
        what = "the spending limit" if is_spend else "the limit"
        reason = f"{limit.field} = {spent}{unit} exceeds {what} of {_num(limit.max)}{unit} ({scope_text}){extra}"
        return _violation(rule, code, reason, action)
    return RuleResult(rule, "pass", f"{limit.field}: {_num(after)}{unit} within {_num(limit.max)} ({scope_text})")


def aggregate_keys(policy: Policy, request: ToolRequest) -> tuple[str, ...]:
    """The shared counters a decision on ``request`` reads (``Usage.shared``), empty for
    most policies: the host reads these from its store before :func:`decide`."""
    grant = policy.tools.get(request.tool)
    keys: list[str] = []
    if grant is not None and grant.rate and grant.rate_scope != "agent":
        keys.append(_scope_key(grant.rate_scope, request, _rate_what(request.tool)))
    for _, v in policy.tool_validators.get(request.tool, ()):
        limit = v.spending_limit or v.rows_affected
        if limit is not None and limit.scope != "call":
            keys.append(_scope_key(limit.scope, request, _limit_what(v, limit)))
    return tuple(dict.fromkeys(keys))


def _validator_checks(
    index: int,
    v: Validator,
    value: Any,
    ctx: ValidatorContext,
    custom: Mapping[str, Callable[..., Any]] | None,
    request: ToolRequest | None = None,
    usage: Usage | None = None,
) -> Iterator[RuleResult]:
    base = f"validators[{index}]"
    action = v.effective_action
    extra = f" ({v.reason})" if v.reason else ""
    subject = "the output" if ctx.target == "output" else f"the arguments of {ctx.tool}"
    if v.detect is not None:
        findings = scan(value, v.detect, decode=v.decode)
        for det in v.detect:
            rule = f"{base}.detect.{det}"
            hits = [f for f in findings if f.detector == det]
            if not hits:
                yield RuleResult(rule, "pass", f"no {LABELS[det]} found")
                continue
            more = f" (and {len(hits) - 1} more)" if len(hits) > 1 else ""
            code = "pii_detected" if det in PII_DETECTORS else "secret_detected"
            what = "personal data" if det in PII_DETECTORS else "a secret"
            reason = f"{what} in {subject}: {hits[0].describe()}{more}; remove it{extra}"
            yield _violation(rule, code, reason, action)
        return
    limit = v.spending_limit or v.rows_affected
    if limit is not None:
        yield _limit_check(base, v, limit, value, action, extra, request, usage)
        return
    assert v.custom is not None
    rule = f"{base}.custom"
    fn = (custom or {}).get(v.custom)
    if fn is None:
        reason = f"custom validator {v.custom} is not loaded, so {subject} cannot be checked{extra}"
        yield _violation(rule, "denied_by_validator", reason, action)
        return
    vctx = ValidatorContext(ctx.target, ctx.tool, rule, ctx.now, ctx.agent_id, ctx.principal)
    try:
        verdict = fn(thaw(value), vctx)
    except Exception as exc:  # a custom validator is user code: its failure must not pass the value
        reason = f"custom validator {v.custom} failed ({type(exc).__name__}: {exc}){extra}"
        yield _violation(rule, "denied_by_validator", reason, action)
        return
    if verdict is None or verdict is True:
        yield RuleResult(rule, "pass", f"{v.custom} passed")
    else:
        text = "rejected" if verdict is False else str(verdict)
        yield _violation(rule, "denied_by_validator", f"{v.custom}: {text}{extra}", action)


def _approval_check(tool: str, grant: ToolGrant, args: Any) -> Iterator[RuleResult]:
    if grant.approval is None:
        return
    rule = locator("tools", tool, "approval")
    a = grant.approval
    if a.when is None:
        yield RuleResult(rule, "approval", a.reason, RequireApproval(a.reason, rule, (rule,)))
        return
    result = a.when.evaluate(args)
    bound = a.when.bindings(args)
    if result is False:
        yield RuleResult(rule, "pass", f"{a.when} is false ({bound})")
        return
    if result is None:
        reason = f"{a.reason} (could not decide {a.when!s}: {bound}; approval required)"
    else:
        reason = f"{a.reason} ({a.when}: {bound})"
    yield RuleResult(rule, "approval", reason, RequireApproval(reason, rule, (rule,)))


def _tool_steps(
    policy: Policy,
    request: ToolRequest,
    usage: Usage,
    now: float,
    custom: Mapping[str, Callable[..., Any]] | None,
    verbose: bool,
) -> Iterator[RuleResult]:
    g = _grant_check(policy, request.tool)
    yield g
    if g.outcome != "pass":
        return
    grant = policy.tools[request.tool]
    yield from _budget_checks(policy, usage, verbose)
    yield from _arg_checks(request.tool, grant, request.args)
    yield from _invocation_checks(request.tool, grant, usage, now, request)
    ctx = ValidatorContext(
        f"tool:{request.tool}", request.tool, "", now, request.agent_id, request.principal
    )
    for index, v in policy.tool_validators.get(request.tool, ()):
        yield from _validator_checks(index, v, request.args, ctx, custom, request, usage)
    yield from _approval_check(request.tool, grant, request.args)


def _conclude(
    steps: Iterator[RuleResult], exhaustive: bool, max_denials: int | None, denials: int
) -> tuple[Decision, list[RuleResult], int | None]:
    seen: list[RuleResult] = []
    final: Deny | Terminate | None = None
    decisive: int | None = None
    approvals: list[int] = []
    for step in steps:
        seen.append(step)
        if step.outcome in ("deny", "terminate") and final is None:
            assert isinstance(step.decision, Deny | Terminate)
            final = step.decision
            decisive = len(seen) - 1
            if not exhaustive:
                break
        elif step.outcome == "approval":
            approvals.append(len(seen) - 1)
    if final is not None:
        if isinstance(final, Deny) and max_denials is not None and denials + 1 > max_denials:
            reason = (
                f"denial {denials + 1} exceeds budgets.max_denials = {max_denials}; "
                f"last denial ({final.code}): {final.reason}"
            )
            return (
                Terminate(reason, "budgets.max_denials", "too_many_denials", final),
                seen,
                decisive,
            )
        return final, seen, decisive
    if approvals:
        asks = [seen[i] for i in approvals]
        reason = "; ".join(s.detail for s in asks)
        return (
            RequireApproval(reason, asks[0].rule, tuple(s.rule for s in asks)),
            seen,
            approvals[0],
        )
    return Allow(tuple(s.rule for s in seen if s.outcome == "pass")), seen, None


# --- public entry points ------------------------------------------------------------------


def decide(
    policy: Policy,
    request: ToolRequest,
    usage: Usage,
    now: float,
    *,
    custom_validators: Mapping[str, CustomValidator] | None = None,
) -> Decision:
    """Decide one tool call.  Pure: same inputs, same decision.

    ``now`` is seconds on the same clock as ``usage.recent_calls``.
    ``custom_validators`` maps each ``custom = "module:function"`` reference of
    the policy to the callable the host imported (see :class:`CustomValidator`).
    """
    steps = _tool_steps(policy, request, usage, now, custom_validators, False)
    decision, _, _ = _conclude(steps, False, policy.budgets.max_denials, usage.denials)
    return decision


def explain(
    policy: Policy,
    request: ToolRequest,
    usage: Usage,
    now: float,
    *,
    custom_validators: Mapping[str, CustomValidator] | None = None,
) -> Explanation:
    """The decision :func:`decide` makes, with every rule evaluated (for ``torpor policy explain``)."""
    steps = _tool_steps(policy, request, usage, now, custom_validators, True)
    decision, seen, decisive = _conclude(steps, True, policy.budgets.max_denials, usage.denials)
    subject = f"tool call {request.tool} {_show(request.args, 200)} (agent {request.agent_id}, call {request.call_seq})"
    return Explanation(decision, tuple(seen), subject, decisive)


def _output_steps(
    policy: Policy,
    output: Any,
    now: float,
    custom: Mapping[str, Callable[..., Any]] | None,
    agent_id: str | None,
    principal: str | None,
) -> Iterator[RuleResult]:
    ctx = ValidatorContext("output", None, "", now, agent_id, principal)
    for index, v in policy.output_validators:
        yield from _validator_checks(index, v, output, ctx, custom)


def check_output(
    policy: Policy,
    output: Any,
    now: float,
    *,
    custom_validators: Mapping[str, CustomValidator] | None = None,
    agent_id: str | None = None,
    principal: str | None = None,
) -> Decision:
    """Check an agent's final output against the validators with ``on = ["output"]``.

    A :class:`Deny` means the output must not be released (the run fails with
    the denial as its error); :class:`RequireApproval` means a human should
    release it; :class:`Terminate` means the same as deny, recorded as a
    termination.
    """
    frozen = freeze(output)
    steps = _output_steps(policy, frozen, now, custom_validators, agent_id, principal)
    decision, _, _ = _conclude(steps, False, None, 0)
    return decision


def explain_output(
    policy: Policy,
    output: Any,
    now: float,
    *,
    custom_validators: Mapping[str, CustomValidator] | None = None,
    agent_id: str | None = None,
    principal: str | None = None,
) -> Explanation:
    """:func:`check_output` with every validator evaluated."""
    frozen = freeze(output)
    steps = _output_steps(policy, frozen, now, custom_validators, agent_id, principal)
    decision, seen, decisive = _conclude(steps, True, None, 0)
    return Explanation(decision, tuple(seen), f"output {_show(frozen, 200)}", decisive)


def record_decision(
    policy: Policy, usage: Usage, request: ToolRequest, decision: Decision, now: float
) -> Usage:
    """Advance ``usage`` after ``decision`` was made for ``request`` at ``now``.

    Allowed and approval-bound calls count as tool calls (total, per tool, and
    in the rate windows, pruned to the tool's longest window); denials count as
    denials, including the one inside a ``too_many_denials`` termination.
    Token, fuel and time usage are the host's to add (``dataclasses.replace``).
    """
    if isinstance(decision, Deny) or (
        isinstance(decision, Terminate) and decision.cause is not None
    ):
        return _replace(usage, denials=usage.denials + 1)
    if isinstance(decision, Terminate):
        return usage
    tool = request.tool
    calls = dict(usage.calls_by_tool)
    calls[tool] = calls.get(tool, 0) + 1
    recent = dict(usage.recent_calls)
    grant = policy.tools.get(tool)
    window = max((r.window_s for r in grant.rate), default=0.0) if grant is not None else 0.0
    shared = dict(usage.shared)
    if grant is not None and grant.rate_scope != "agent" and window > 0:
        key = _scope_key(grant.rate_scope, request, _rate_what(tool))
        shared[key] = (*(t for t in shared.get(key, ()) if t > now - window), now)
    elif window > 0:
        recent[tool] = (*(t for t in recent.get(tool, ()) if t > now - window), now)
    else:
        recent.pop(tool, None)
    for _, v in policy.tool_validators.get(tool, ()):
        limit = v.spending_limit or v.rows_affected
        if limit is not None and limit.scope != "call":
            amounts, problem = _limit_amounts(limit, request.args)
            if problem is None and amounts:
                key = _scope_key(limit.scope, request, _limit_what(v, limit))
                shared[key] = shared.get(key, 0) + sum(amounts)
    return _replace(
        usage, tool_calls=usage.tool_calls + 1, calls_by_tool=calls, recent_calls=recent, shared=shared
    )


def _replace(usage: Usage, **changes: Any) -> Usage:
    return replace(usage, **changes)
