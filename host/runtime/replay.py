"""Deterministic replay: re-execute a past agent, instruction for instruction, against its record.

Why it can work: a guest has no clock, no randomness and no I/O except its
input and the answers to its tool calls (WASI is not linked; ``clock.now`` is
a tool), and every answer is in the journal. Running the exact bundle again
from the recorded input, and answering each call from the journal instead of
running the tool, must therefore retrace the original run exactly: the same
calls with the same arguments in the same order, the same fuel consumed up to
each call, the same output. Any difference means the record, the bundle or
the host is not what it claims to be, and the report says where (call seq),
what (tool, args, fuel, output, outcome), what was expected and what came.

No tool runs and no credential is leased: the replay never touches the
host's tools or broker, only the store (read-only) and the engine.

Agents that were hibernated, crashed and resumed, or parked for approval
were rebuilt from a checkpoint each time; a checkpoint holds the exact fuel
count at its call, so fuel at later calls is still comparable. What differs
per run is the fuel *budget* (a run gets its own budget on top of what was
used): the replay re-arms the budget at every call where the original was
resumed, so an out-of-fuel outcome is reproduced where it happened. Wall-clock
deadlines are not deterministic and are reported as such.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from host.errors import TorporError
from host.runtime.loader import stored_bundle
from host.sandbox import abi
from host.sandbox.bundle import Bundle
from host.sandbox.execution import Captured, Completed, Execution, Failed, PendingCall, Suspended
from host.trust import audit
from snapshots.errors import SnapshotError
from snapshots.format import decode_snapshot
from snapshots.store import INPUTS_BUCKET

TERMINAL = ("completed", "failed", "terminated")


class ReplayError(TorporError):
    """The agent cannot be replayed (no bundle, a different bundle, no record)."""

    code = "replay"


class BundleMissing(ReplayError):
    """The exact bundle the agent ran is no longer in the store."""

    code = "bundle_missing"


@dataclass(frozen=True)
class Mismatch:
    """Where the replay departed from the record."""

    call_seq: int | None  # None: the final outcome
    field: str  # tool, args, fuel, call, output, outcome, fuel_used
    expected: Any
    got: Any
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"call_seq": self.call_seq, "field": self.field, "expected": self.expected, "got": self.got,
                "message": self.message}


@dataclass
class ReplayReport:
    """The verdict of one replay."""

    agent_id: str
    bundle_digest: str
    status: str  # the recorded status
    calls_recorded: int = 0
    calls_replayed: int = 0
    fuel_used: int = 0
    #: whether a total this far above the replay's is an older host's count (the unwinds' and
    #: rewinds' fuel, which a host before session 11 counted: Execution.fuel_offset_known)
    fuel_offset_known: Callable[[int], bool] = field(default=lambda offset: offset == 0, repr=False)
    outcome: dict[str, Any] = field(default_factory=dict)  # what the replay came to
    mismatches: list[Mismatch] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    complete: bool = True  # False: the record stops early (the agent is still going or parked)
    cold: bool = False
    audit_ok: bool | None = None

    @property
    def matched(self) -> bool:
        return not self.mismatches

    def to_dict(self) -> dict[str, Any]:
        return {"agent_id": self.agent_id, "bundle_digest": self.bundle_digest, "matched": self.matched,
                "complete": self.complete, "status": self.status, "calls_recorded": self.calls_recorded,
                "calls_replayed": self.calls_replayed, "fuel_used": self.fuel_used, "outcome": self.outcome,
                "mismatches": [m.to_dict() for m in self.mismatches], "notes": self.notes, "cold": self.cold,
                "audit_ok": self.audit_ok}

    def summary(self) -> str:
        if self.matched:
            scope = "every recorded decision" if self.complete else "every decision recorded so far"
            return (f"replay of {self.agent_id} matched: {scope} ({self.calls_replayed} tool calls, same arguments, "
                    f"order and fuel; {self.outcome.get('status')})")
        m = self.mismatches[0]
        where = f"call {m.call_seq}" if m.call_seq is not None else "the outcome"
        return f"replay of {self.agent_id} DIFFERS at {where}, {m.field}: {m.message}"


def _short(value: Any, limit: int = 200) -> Any:
    text = json.dumps(value, default=str)
    return value if len(text) <= limit else text[:limit] + "…"


def replay(host: Any, agent_id: str, *, bundle: Bundle | None = None, cold: bool = False) -> ReplayReport:
    """Replay ``agent_id`` from its recorded input against its journal; never runs a tool.

    ``host`` is a :class:`~host.runtime.Host` (its store and engine are used).
    ``bundle``: the exact bundle, when the store no longer has it (its digest
    must be the recorded one). ``cold``: rebuild the instance from a capture
    at every call, as a hibernated agent is, instead of rewinding it in place.
    """
    rec = host.get_agent(agent_id)
    digest = str(rec.get("bundle_digest"))
    b = _bundle(host, agent_id, digest, bundle)
    loaded, pre = host.load_module(b)
    report = ReplayReport(agent_id, digest, str(rec.get("status")), cold=cold)
    journal, resumed_at = _history(host, rec, loaded.image, b.module_digest, report)
    report.calls_recorded = len(journal)
    last_seq = max(journal) if journal else 0
    with host.store.read() as txn:
        stored = txn.get_blob(INPUTS_BUCKET, agent_id)
    input_raw = stored.decode() if stored is not None else rec.get("input_raw")
    if input_raw is None:  # an older host's record: the host's own encoding of its input
        input_raw = json.dumps(rec.get("input"), separators=(",", ":"))
    fuel_limit = rec.get("fuel_limit")
    limits = host.limits_for(b, fuel_limit, 0)
    logs: list[tuple[int, str]] = []

    def sink(level: int, message: str) -> None:
        if len(logs) < 1000:
            logs.append((level, message))

    ex = Execution(loaded, pre, limits, str(input_raw).encode(), log_sink=sink, seed=abi.agent_seed(agent_id))
    ex.fuel_history = set()  # records an older host began count the unwinds too (Execution.fuel_matches)
    outcome: Any = ex.start()
    status = report.status
    stopped_by_record = False
    while isinstance(outcome, Suspended):
        call: PendingCall = outcome.call
        entry = journal.get(call.seq)
        fuel_now = ex.fuel_used
        if entry is None:
            if call.seq > last_seq and status not in TERMINAL:
                report.complete = False
                report.notes.append(f"the record ends before call {call.seq} ({call.tool}): the agent is still {status}")
                stopped_by_record = True
            else:
                report.mismatches.append(Mismatch(call.seq, "call", None, {"tool": call.tool, "args": _short(call.args)},
                                                  f"the replay made call {call.seq} ({call.tool}), which the record "
                                                  f"does not have (the agent {status} after {last_seq} calls)"))
            break
        report.calls_replayed += 1
        if entry.get("tool") != call.tool:
            report.mismatches.append(Mismatch(call.seq, "tool", entry.get("tool"), call.tool,
                                              f"expected a call to {entry.get('tool')}, got {call.tool}"))
            break
        if entry.get("args") != call.args:
            report.mismatches.append(Mismatch(call.seq, "args", _short(entry.get("args")), _short(call.args),
                                              f"{call.tool} was called with other arguments: expected "
                                              f"{json.dumps(_short(entry.get('args')))}, got {json.dumps(_short(call.args))}"))
            break
        expected_fuel = entry.get("fuel", resumed_at.get(call.seq))  # the journal's, else the checkpoint's
        if expected_fuel is not None:
            if not ex.fuel_matches(int(expected_fuel)):  # this host's count, or an older host's
                source = "" if "fuel" in entry else " (from the checkpoint taken at this call)"
                report.mismatches.append(Mismatch(call.seq, "fuel", int(expected_fuel), fuel_now,
                                                  f"fuel used at the call: expected {expected_fuel}{source}, "
                                                  f"got {fuel_now}"))
        else:
            report.notes.append(f"call {call.seq}: the journal did not record the fuel at this call (settled by an "
                                "operator or re-run after a crash); not compared")
        state = entry.get("state")
        if state != "done":
            what = {"intent": "the host stopped at this call before answering it",
                    "approved": "a person approved this call and the tool has not run yet"}.get(str(state), str(state))
            report.complete = status in TERMINAL
            report.notes.append(f"the record ends at call {call.seq} ({call.tool}): {what}; the agent is {status}")
            stopped_by_record = True
            break
        if call.seq == last_seq and status == "terminated":
            report.notes.append(f"the host terminated the agent after answering call {call.seq} "
                                f"({(rec.get('error') or {}).get('code')})")
            stopped_by_record = True
            break
        answer = (int(entry.get("status", 0)), str(entry.get("response", "")).encode())
        if call.seq in resumed_at:
            limits = host.limits_for(b, fuel_limit, resumed_at[call.seq])
        if cold:
            captured: Captured = ex.capture()
            host_fuel, history = ex.host_fuel, ex.fuel_history
            ex.release()
            ex = Execution.restore(loaded, pre, limits, str(input_raw).encode(), captured, fuel_used=fuel_now,
                                   call_seq=call.seq, pending=call, log_sink=sink)
            ex.host_fuel, ex.fuel_history = host_fuel, history  # an older host's records count it from the start
        else:
            ex.limits = limits
        outcome = ex.resume(*answer)
    report.fuel_used, report.fuel_offset_known = ex.fuel_used, ex.fuel_offset_known
    ex.release()
    if isinstance(outcome, Suspended):
        report.outcome = {"status": "stopped", "at_call": outcome.call.seq, "tool": outcome.call.tool}
        if stopped_by_record and status == "terminated":
            report.outcome["status"] = "terminated"
    else:
        _compare_outcome(report, rec, outcome, journal, last_seq)
    report.audit_ok = audit.verify_store(host.store, agent_id=agent_id).ok
    if report.audit_ok is False:
        report.notes.append("the agent's audit log does not verify: run `torpor audit verify` for details")
    return report


def _bundle(host: Any, agent_id: str, digest: str, given: Bundle | None) -> Bundle:
    if given is not None:
        if given.digest != digest:
            raise ReplayError(f"the bundle given has digest {given.digest[:16]}, but agent {agent_id} ran "
                              f"{digest[:16]}; replay needs the exact bundle the agent ran", code="bundle_mismatch")
        return given
    try:
        return stored_bundle(host.store, digest)  # checked against its digest
    except TorporError as exc:
        if exc.code != "bundle_missing":
            raise
        raise BundleMissing(f"agent {agent_id} ran bundle {digest[:16]}, which is no longer in the store, so it "
                            "cannot be re-executed; pass the bundle file with `torpor replay "
                            f"{agent_id} --bundle FILE` (its digest must be {digest})") from exc


def _history(host: Any, rec: dict[str, Any], pristine: Any, module_digest: str,
             report: ReplayReport) -> tuple[dict[int, dict[str, Any]], dict[int, int]]:
    """The agent's journal (a fork's: its parent's calls before the fork point, then its own)
    and, for each call where a run was resumed, the fuel used at that point."""
    agent_id = str(rec["agent_id"])
    with host.store.read() as txn:
        journal = dict(txn.iter_journal(agent_id))
        starts = _resumed(txn, agent_id, pristine, module_digest, report)
        parent = rec.get("parent")
        chain: list[str] = []
        while isinstance(parent, dict) and parent.get("agent_id"):
            pid = str(parent["agent_id"])
            if pid in chain:
                break
            chain.append(pid)
            fork_at = _pending_seq(txn, agent_id if not chain[:-1] else chain[-2], 1, pristine, module_digest)
            if fork_at is None:
                report.notes.append(f"cannot find where {agent_id} was forked from {pid}; the parent's calls are not used")
                break
            for seq, entry in txn.iter_journal(pid):
                if seq < fork_at and seq not in journal:
                    journal[seq] = entry
            for seq, fuel in _resumed(txn, pid, pristine, module_digest, report).items():
                if seq < fork_at:
                    starts.setdefault(seq, fuel)
            prec = txn.get_agent(pid)
            parent = prec.get("parent") if prec else None
    return journal, starts


def _pending_seq(txn: Any, agent_id: str, checkpoint: int, pristine: Any, module_digest: str) -> int | None:
    snap = _snapshot(txn, agent_id, checkpoint, pristine, module_digest)
    if snap is None or not snap.pending:
        return None
    return int(snap.pending["seq"])


def _snapshot(txn: Any, agent_id: str, checkpoint: int, pristine: Any, module_digest: str) -> Any:
    blob = txn.get_checkpoint(agent_id, checkpoint)
    if blob is None:
        return None
    try:
        return decode_snapshot(blob, expect_module_digest=module_digest, pristine=pristine,
                               chunks_from=txn.get_chunk)
    except SnapshotError:
        return None


def _resumed(txn: Any, agent_id: str, pristine: Any, module_digest: str, report: ReplayReport) -> dict[int, int]:
    """Call seq -> fuel used there, for every run that resumed from a checkpoint (its budget restarts there)."""
    out: dict[int, int] = {}
    for _, raw in txn.iter_blobs(audit.BUCKET, f"{agent_id}/"):
        stored = json.loads(raw)
        r = next((e for e in audit.expand(stored) if e.get("kind") == "agent.resumed"), None)
        if r is None or not r.get("checkpoint"):
            continue
        snap = _snapshot(txn, agent_id, int(r["checkpoint"]), pristine, module_digest)
        if snap is None or not snap.pending:
            report.notes.append(f"checkpoint {r['checkpoint']} (where a run resumed) is gone; the fuel budget of that "
                                "run is not known, an out-of-fuel outcome may differ")
            continue
        out[int(snap.pending["seq"])] = int(snap.usage.get("fuel_used", 0))
    return out


def _compare_outcome(report: ReplayReport, rec: dict[str, Any], outcome: Any, journal: dict[int, Any],
                     last_seq: int) -> None:
    status = report.status
    err = rec.get("error") or {}
    add: Callable[[Mismatch], None] = report.mismatches.append
    replayed_calls = report.calls_replayed
    if isinstance(outcome, Completed):
        report.outcome = {"status": "completed", "output": _short(outcome.output, 2000)}
    else:
        assert isinstance(outcome, Failed)
        report.outcome = {"status": "failed", "error": {"code": outcome.code, "message": outcome.message}}
    if replayed_calls < len(journal) and status in TERMINAL:
        missing = sorted(journal)[replayed_calls]
        how = report.outcome["status"]
        if isinstance(outcome, Failed):
            how += f" ({outcome.code}: {outcome.message})"
        add(Mismatch(missing, "call", {"tool": journal[missing].get("tool")}, None,
                     f"the record has call {missing} ({journal[missing].get('tool')}), but the replay "
                     f"{how} after {replayed_calls} calls"))
        return
    if status == "completed":
        if not isinstance(outcome, Completed):
            add(Mismatch(None, "outcome", "completed", report.outcome, f"expected completion, got {outcome.code}: "
                                                                     f"{outcome.message}"))
        elif outcome.output != rec.get("output"):
            add(Mismatch(None, "output", _short(rec.get("output")), _short(outcome.output),
                         "the output differs from the recorded output"))
        else:
            fuel = int((rec.get("usage") or {}).get("fuel_used", 0))
            if fuel and not report.fuel_offset_known(fuel - report.fuel_used):  # this host's count, or an older's
                add(Mismatch(None, "fuel_used", fuel, report.fuel_used,
                             f"total fuel: expected {fuel}, got {report.fuel_used}"))
        return
    code = err.get("code")
    if status == "failed" and code == "output_rejected":
        if isinstance(outcome, Completed):
            report.notes.append("the guest completed and the host's output check rejected the output, as recorded "
                                "(the rejected output is not stored, so it is not compared)")
        else:
            add(Mismatch(None, "outcome", "completed (output then rejected)", report.outcome,
                         f"expected the guest to complete, got {outcome.code}"))
        return
    if status in ("failed", "terminated"):
        if isinstance(outcome, Failed) and outcome.code == code:
            return
        got = "completed" if isinstance(outcome, Completed) else outcome.code
        note = " (wall-clock deadlines depend on the machine's speed and are not reproducible)" \
            if code == "deadline_exceeded" else ""
        add(Mismatch(None, "outcome", code, got, f"expected the agent to fail with {code}, got {got}{note}"))
        return
    # Not finished in the record (running, suspended, parked): the replay ran past what was recorded.
    report.complete = False
    report.notes.append(f"the agent is still {status} in the record; the replay went on to "
                        f"{report.outcome['status']} after call {last_seq}")
