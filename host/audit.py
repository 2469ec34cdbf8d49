"""The audit log: every lifecycle event and decision, hash-chained per agent.

Each record carries the hash of the agent's previous record, and its own hash
over its canonical JSON; altering, removing, inserting or reordering a record
breaks the chain at that point, which :func:`verify_chain` names. Records are
appended in the same store transaction as the state change they describe (a
checkpoint, a tool result, a termination), so the log never claims what the
store does not hold, nor misses what it does.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

GENESIS = "0" * 64
BUCKET = "audit"


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def digest(obj: Any) -> str:
    """SHA-256 of a JSON value's canonical form (for arguments and results)."""
    return hashlib.sha256(canonical(obj)).hexdigest()


def record_key(agent_id: str, seq: int) -> str:
    return f"{agent_id}/{seq:012d}"


def seal(agent_id: str, seq: int, prev: str, t: float, kind: str, data: dict[str, Any]) -> dict[str, Any]:
    """A chained record: ``hash`` covers every other field, ``prev`` links it to the last one."""
    reserved = {"agent_id", "seq", "t", "kind", "prev", "hash"} & data.keys()
    if reserved:
        raise ValueError(f"audit event data may not use the reserved keys {sorted(reserved)}")
    rec: dict[str, Any] = {"agent_id": agent_id, "seq": seq, "t": t, "kind": kind, "prev": prev, **data}
    rec["hash"] = hashlib.sha256(canonical(rec)).hexdigest()
    return rec


def verify_chain(records: Iterable[dict[str, Any]]) -> tuple[int, str] | None:
    """None if the records form an intact chain from genesis, else (position, what is wrong)."""
    prev = GENESIS
    expected_seq = 1
    agent: str | None = None
    for pos, rec in enumerate(records):
        body = {k: v for k, v in rec.items() if k != "hash"}
        if agent is None:
            agent = rec.get("agent_id")
        if rec.get("agent_id") != agent:
            return pos, f"record {pos} belongs to agent {rec.get('agent_id')}, not {agent}"
        if rec.get("seq") != expected_seq:
            return pos, f"record {pos} has seq {rec.get('seq')}, expected {expected_seq} (removed, inserted or reordered)"
        if hashlib.sha256(canonical(body)).hexdigest() != rec.get("hash"):
            return pos, f"record {pos} (seq {rec.get('seq')}, {rec.get('kind')}) was modified: its hash does not match"
        if rec.get("prev") != prev:
            return pos, f"record {pos} (seq {rec.get('seq')}) does not link to the record before it"
        prev = rec["hash"]
        expected_seq += 1
    return None
