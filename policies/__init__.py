"""Torpor policies: what an agent may do, decided purely.

This package decides; it never acts.  It loads a policy file into immutable
pydantic models (:mod:`policies.schema`, whose docstring is the file
reference) and answers questions about it with pure functions of (policy,
request, usage so far, time): :func:`decide` for a tool call,
:func:`check_output` for a final output, :func:`budget_events` for thresholds
crossed, :func:`explain` for a person.  No clock reads, no I/O beyond reading
the policy file, no runtime imports — the host does all of that and passes
the results in, so every decision can be replayed from the audit log.
"""

from typing import TYPE_CHECKING, Any

# The light modules load with the package; the engine and the schema, whose pydantic
# models take a tenth of a second to build, and the detectors and conditions (regular
# expressions compiled at import) load on first use (``policies.load_policy``,
# ``from policies import Policy``): a program that only names PolicyError (the CLI's
# error handler) does not pay for them.
from ._frozen import FrozenDict, NotJSONError
from .errors import PolicyError, PolicyIssue
from .units import RateLimit, parse_duration, parse_rate, parse_size

if TYPE_CHECKING:
    from .detectors import DETECTORS, Finding, luhn_valid, scan
    from .engine import (
        Allow,
        BudgetEvent,
        CustomValidator,
        Decision,
        Deny,
        Explanation,
        RequireApproval,
        RuleResult,
        Terminate,
        ToolRequest,
        Usage,
        ValidatorContext,
        aggregate_keys,
        budget_events,
        check_output,
        decide,
        explain,
        explain_output,
        record_decision,
    )
    from .expr import Condition, ConditionSyntaxError
    from .schema import (
        BUILTIN_TOOLS,
        WASI_PREVIEW1,
        AgentSpec,
        Approval,
        ArgConstraint,
        Budgets,
        BuiltinTool,
        Limit,
        Policy,
        ToolGrant,
        Validator,
        WasiSpec,
        load_policy,
        parse_policy,
        policy_from_dict,
    )

_LAZY = {
    "Condition": "expr",
    "ConditionSyntaxError": "expr",
    "DETECTORS": "detectors",
    "Finding": "detectors",
    "luhn_valid": "detectors",
    "scan": "detectors",
    "Allow": "engine",
    "BudgetEvent": "engine",
    "CustomValidator": "engine",
    "Decision": "engine",
    "Deny": "engine",
    "Explanation": "engine",
    "RequireApproval": "engine",
    "RuleResult": "engine",
    "Terminate": "engine",
    "ToolRequest": "engine",
    "Usage": "engine",
    "ValidatorContext": "engine",
    "aggregate_keys": "engine",
    "budget_events": "engine",
    "check_output": "engine",
    "decide": "engine",
    "explain": "engine",
    "explain_output": "engine",
    "record_decision": "engine",
    "BUILTIN_TOOLS": "schema",
    "WASI_PREVIEW1": "schema",
    "AgentSpec": "schema",
    "Approval": "schema",
    "ArgConstraint": "schema",
    "Budgets": "schema",
    "BuiltinTool": "schema",
    "Limit": "schema",
    "Policy": "schema",
    "ToolGrant": "schema",
    "Validator": "schema",
    "WasiSpec": "schema",
    "load_policy": "schema",
    "parse_policy": "schema",
    "policy_from_dict": "schema",
}


__all__ = [
    "BUILTIN_TOOLS",
    "DETECTORS",
    "WASI_PREVIEW1",
    "AgentSpec",
    "Allow",
    "Approval",
    "ArgConstraint",
    "BudgetEvent",
    "Budgets",
    "BuiltinTool",
    "Condition",
    "ConditionSyntaxError",
    "CustomValidator",
    "Decision",
    "Deny",
    "Explanation",
    "Finding",
    "FrozenDict",
    "Limit",
    "NotJSONError",
    "Policy",
    "PolicyError",
    "PolicyIssue",
    "RateLimit",
    "RequireApproval",
    "RuleResult",
    "Terminate",
    "ToolGrant",
    "ToolRequest",
    "Usage",
    "Validator",
    "ValidatorContext",
    "WasiSpec",
    "aggregate_keys",
    "budget_events",
    "check_output",
    "decide",
    "explain",
    "explain_output",
    "load_policy",
    "luhn_valid",
    "parse_duration",
    "parse_policy",
    "parse_rate",
    "parse_size",
    "policy_from_dict",
    "record_decision",
    "scan",
]


def __getattr__(name: str) -> Any:
    """Load the engine, schema or detectors the first time one of their names is used."""
    where = _LAZY.get(name)
    if where == "schema":
        from . import schema as module
    elif where == "engine":
        from . import engine as module  # type: ignore[no-redef]
    elif where == "detectors":
        from . import detectors as module  # type: ignore[no-redef]
    elif where == "expr":
        from . import expr as module  # type: ignore[no-redef]
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(module, name)
    globals()[name] = value  # once: later lookups do not come back here
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
