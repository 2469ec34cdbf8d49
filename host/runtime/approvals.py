"""A person's decisions about a parked agent: approve or deny a call, settle an in-doubt one.

Each decision is a check-and-set in one transaction on the agent record (of two
operators deciding at once, one wins), journaled where the resumed agent will find it
and audited with who decided. Resuming the agent afterwards is the caller's part.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from host.errors import AgentNotFound, AgentStateError, ConfigError, InvalidInput
from host.runtime import answers
from host.trust import audit
from host.trust.identity import IdentityService
from snapshots.store import AgentStore

APPROVALS_BUCKET = "approvals"


def approve(store: AgentStore, agent_id: str, *, note: str | None, by: str | None, where: object = None,
            answer: Any = None) -> None:
    """Approve the call an agent waits on: the journal says ``approved``, the tool runs at resume.

    An agent that waits on a question (an MCP server's elicitation) takes ``answer``
    instead, checked against the schema the server asked for (:class:`InvalidInput`
    naming the field otherwise): the call is made again at resume, and the server's
    question answered with it."""
    data: dict[str, Any] = {"by": by, "note": note}

    def decide(txn: Any, rec: dict[str, Any], call: dict[str, Any]) -> None:
        if _question(rec) is not None:
            _answered(txn, agent_id, rec, call, "accept", answer, by)
            data.update(action="accept", answer_digest=audit.digest(answer))
            return
        if answer is not None:
            raise InvalidInput(f"agent {agent_id} waits for approval of {call.get('tool')}, not for an answer to a "
                               "question: approve it without --answer")
        txn.put_journal(agent_id, int(call["seq"]), {
            "tool": call["tool"], "args": call.get("args"), "state": "approved", "t": time.time(),
            "fuel": (rec.get("usage") or {}).get("fuel_used", 0),
            "approval": {"by": by, "note": note}})

    _decide(store, agent_id, "approval.granted", data, decide, where)


def deny(store: AgentStore, agent_id: str, *, reason: str, by: str | None, where: object = None) -> None:
    """Deny the call an agent waits on: its answer is a denial the guest sees at resume.
    A question (an MCP server's elicitation) is declined instead: the call is made again
    and the server told ``decline``."""
    data: dict[str, Any] = {"by": by, "reason": reason}

    def decide(txn: Any, rec: dict[str, Any], call: dict[str, Any]) -> None:
        if _question(rec) is not None:
            _answered(txn, agent_id, rec, call, "decline", None, by)
            data.update(action="decline")
            return
        rule = (rec.get("approval") or {}).get("rule", "approval")
        status, response = answers.operator_denial(reason, rule)
        txn.put_journal(agent_id, int(call["seq"]), {
            "tool": call["tool"], "args": call.get("args"), "state": "done", "status": status,
            "response": response.decode(), "t": time.time(), "approval": {"by": by, "reason": reason}})

    _decide(store, agent_id, "approval.denied", data, decide, where)


def _question(rec: dict[str, Any]) -> dict[str, Any] | None:
    """The question an agent parked on a person waits to have answered, if that is what it waits on."""
    approval = rec.get("approval") or {}
    question = approval.get("question")
    return question if approval.get("kind") == "elicitation" and isinstance(question, dict) else None


def _answered(txn: Any, agent_id: str, rec: dict[str, Any], call: dict[str, Any], action: str, answer: Any,
              by: str | None) -> None:
    """Journal a person's answer to the call's question: the entry turns ``approved`` (the call
    is made again at resume) with the answer after those given before."""
    question = _question(rec)
    assert question is not None
    seq = int(call["seq"])
    if action == "accept":
        check_answer(agent_id, question, answer)
    entry = dict(txn.get_journal(agent_id, seq) or {})
    given = list(entry.get("elicitations") or [])[:int(question.get("index") or 0)]
    given.append({"index": question.get("index"), "digest": question.get("digest"), "action": action,
                  **({"content": answer} if action == "accept" else {}), "by": by, "t": time.time()})
    entry.pop("asked", None)
    entry.update(tool=call["tool"], args=call.get("args"), state="approved", t=time.time(), elicitations=given)
    txn.put_journal(agent_id, seq, entry)


def check_answer(agent_id: str, question: dict[str, Any], answer: Any) -> None:
    """An answer is a JSON object that matches the schema the server asked for, or
    :class:`InvalidInput` naming the first field that does not."""
    import jsonschema

    from host import json_schema

    if answer is None:
        raise InvalidInput(f"agent {agent_id} waits for an answer to {question.get('server')}'s question "
                           f"({question.get('message')!r}): give it as JSON (torpor approve --answer JSON), "
                           "or decline it (torpor deny)")
    if not isinstance(answer, dict):
        raise InvalidInput(f"the answer must be a JSON object, not a JSON {type(answer).__name__}")
    schema = question.get("requested_schema") or {}
    try:
        v = json_schema.validator(schema, format_checker=jsonschema.FormatChecker())
        errors = sorted(json_schema.errors(v, answer), key=lambda e: list(e.absolute_path))
    except Exception as exc:  # a schema the server sent that cannot be applied (or whose patterns backtrack)
        raise InvalidInput(f"the schema {question.get('server')} asked with cannot check an answer: {exc}") from None
    if errors:
        e = errors[0]
        where = ".".join(str(p) for p in e.absolute_path) or "(answer)"
        raise InvalidInput(f"the answer does not match the schema {question.get('server')} asked for: "
                           f"{where}: {e.message}")


def _decide(store: AgentStore, agent_id: str, kind: str, data: dict[str, Any],
            decide: Callable[[Any, dict[str, Any], dict[str, Any]], None], where: object) -> None:
    def write(txn: Any) -> None:
        rec = txn.get_agent(agent_id)
        if rec is None:
            raise AgentNotFound(f"no agent {agent_id} in store {where}")
        if rec.get("status") != "waiting_approval":
            already = " (someone already decided it)" if rec.get("status") in ("approved", "suspended", "running") else ""
            raise AgentStateError(f"agent {agent_id} is {rec.get('status')}, not waiting for approval{already}")
        call = rec.get("pending") or {}
        decide(txn, rec, call)
        rec["status"] = "approved" if kind == "approval.granted" else "suspended"
        rec["updated_at"] = time.time()
        audit.append_events(txn, rec, [(kind, {"call_seq": call.get("seq"), "tool": call.get("tool"), **data})])
        txn.put_agent(rec)
        txn.delete_blob(APPROVALS_BUCKET, agent_id)

    store.transact(write)


def resolve(store: AgentStore, identity: IdentityService, agent_id: str, *, retry: bool, result: Any,
            fail: str | None, by: str | None, where: object = None) -> None:
    """Settle an ``in_doubt`` agent: re-run its call, supply the call's result, or fail it.

    Only a person can know whether a non-idempotent call that was started before a
    crash took effect (did the payment go out?), so the host asks.
    """
    if sum((retry, result is not None, fail is not None)) != 1:
        raise ConfigError("resolve needs exactly one of: retry, a result, or fail")

    def write(txn: Any) -> None:
        rec = txn.get_agent(agent_id)
        if rec is None:
            raise AgentNotFound(f"no agent {agent_id} in store {where}")
        if rec.get("status") != "in_doubt":
            raise AgentStateError(f"agent {agent_id} is {rec.get('status')}, not in_doubt")
        call = (rec.get("in_doubt") or {}).get("call") or rec.get("pending") or {}
        seq = int(call["seq"])
        base = {"tool": call.get("tool"), "args": call.get("args"), "t": time.time(), "resolved_by": by}
        if retry:
            txn.put_journal(agent_id, seq, {**base, "state": "approved"})
            action: dict[str, Any] = {"action": "retry"}
        elif result is not None:
            status, response = answers.result(result)
            txn.put_journal(agent_id, seq, {**base, "state": "done", "status": status, "response": response.decode()})
            action = {"action": "result", "result_digest": audit.digest(result)}
        else:
            action = {"action": "fail", "reason": fail}
        rec["status"] = "suspended" if fail is None else "failed"
        retired: list[tuple[str, dict[str, Any]]] = []
        if fail is not None:
            rec.update(error={"code": "in_doubt_failed", "message": f"failed by an operator: {fail}"},
                       finished_at=time.time(), pending=None)
            identity.retire(rec, lambda kind, **d: retired.append((kind, d)))(txn)
        rec["in_doubt"] = None
        rec["updated_at"] = time.time()
        audit.append_events(txn, rec, [("operator.resolved", {"call_seq": seq, "by": by, **action}),
                                       *([("agent.failed", {"error": rec["error"]})] if fail is not None else []),
                                       *retired])
        txn.put_agent(rec)

    store.transact(write)
