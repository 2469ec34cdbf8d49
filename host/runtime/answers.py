"""What the guest is told: every answer to a tool call, built in one place.

An answer is an ABI status code and the JSON bytes the guest reads (ABI.md section 5).
Tool results, tool errors, policy denials and the host's own refusals all become
answers here, so what may cross into the guest is decided by one module.
"""

from __future__ import annotations

import json
from typing import Any

import policies
from host.runtime.agent import Answer
from host.sandbox import abi
from host.sandbox.execution import error_response
from host.tools.registry import ToolError
from host.trust.scrub import Scrubber

# A tool's result as the guest reads it (built once: json.dumps with options builds an encoder per call).
_RESULT_JSON = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


def result(value: Any) -> Answer:
    """A tool's return value: its compact JSON, or an error if it is not JSON or too large."""
    try:
        data = _RESULT_JSON(value).encode()
    except (TypeError, ValueError) as exc:
        return abi.E_TOOL_FAILED, error_response("tool_failed", f"the tool returned a value that is not JSON: {exc}")
    if len(data) > abi.MAX_RESPONSE:
        return abi.E_RESULT_TOO_LARGE, error_response(
            "result_too_large", f"the tool's result is {len(data)} bytes; the limit is {abi.MAX_RESPONSE}")
    return 0, data


def scrubbed(answer: Answer, scrub: Scrubber) -> Answer:
    """An answer with every secret of the call (and every fragment of one) masked: see
    :mod:`host.trust.scrub`. Applied to everything a tool returns, errors included."""
    clean = scrub.json_bytes(answer[1])
    if clean is None:
        return answer
    if len(clean) > abi.MAX_RESPONSE:
        return abi.E_RESULT_TOO_LARGE, error_response(
            "result_too_large", f"the tool's result is {len(clean)} bytes; the limit is {abi.MAX_RESPONSE}")
    return answer[0], clean


def tool_error(err: ToolError) -> Answer:
    """A structured error a tool raised on purpose (its code, message, details)."""
    errno = abi.ERROR_CODES.get(err.code, abi.E_TOOL_FAILED)
    return errno, error_response(err.code, str(err), retryable=err.retryable, **err.details)


def record_corrupt(name: str, exc: Exception) -> Answer:
    """A tool read a stored value that does not match its digest: an error, never the value."""
    return abi.E_TOOL_FAILED, error_response("record_corrupt", f"{name}: {exc}")


def tool_crashed(name: str, exc: Exception) -> Answer:
    """A tool that raised anything else: a bug in the tool, which must not take the host down."""
    return abi.E_TOOL_FAILED, error_response("tool_failed", f"{name} failed: {type(exc).__name__}: {exc}")


def denial(decision: policies.Deny) -> Answer:
    """A policy denial: a rate or invocation limit is ``rate_limited`` (retryable), every
    other refusal is ``denied``; both name the rule."""
    extra: dict[str, Any] = {"rule": decision.rule, "reason_code": decision.code}
    if decision.retry_after_s is not None:
        extra["retry_after_s"] = decision.retry_after_s
    if decision.code == "rate_limited" or (decision.code == "budget_exceeded" and ".max_calls" in decision.rule):
        return abi.E_RATE_LIMITED, error_response("rate_limited", decision.reason,
                                                  retryable=decision.code == "rate_limited", **extra)
    return abi.E_DENIED, error_response("denied", decision.reason, **extra)


def operator_denial(reason: str, rule: str) -> Answer:
    """An operator's no to a call that waited for approval."""
    return abi.E_DENIED, error_response("denied", f"denied by an operator: {reason}", rule=rule,
                                        reason_code="approval_denied")


def unknown_tool(tool: str) -> Answer:
    """A call to a tool this host does not have for the agent."""
    return abi.E_UNKNOWN_TOOL, error_response("unknown_tool", f"no tool named {tool!r} is available to this agent")


def invalid_args(tool: str, problem: Exception) -> Answer:
    """Arguments the host could not take as a request at all (not JSON)."""
    return abi.E_INVALID_ARGS, error_response("invalid_args", f"{tool}: {problem}")
