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

from ._frozen import FrozenDict, NotJSONError
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
    budget_events,
    check_output,
    decide,
    explain,
    explain_output,
    record_decision,
)
from .errors import PolicyError, PolicyIssue
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
from .units import RateLimit, parse_duration, parse_rate, parse_size

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
