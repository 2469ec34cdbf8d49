"""Read-only questions about the agents in a store: list, get, inspect, audit, approvals.

Pure reads of an :class:`~snapshots.store.AgentStore`, with nothing of Wasmtime, the
engine or the committer: the :class:`~host.runtime.Host` answers them through these
functions, and a light command (``torpor ps``, ``torpor inspect``) calls them on a store
opened read-only, without building a host.
"""

from __future__ import annotations

import json
import time
from typing import Any

from host.errors import AgentNotFound
from snapshots.errors import RecordCorrupt
from snapshots.store import INPUTS_BUCKET, UNREADABLE, AgentStore

APPROVALS_BUCKET = "approvals"

# Statuses an agent can be in while it still owes progress (a stalled one is flagged).
_PROGRESSING = ("running", "suspended", "approved")


def stalled(rec: dict[str, Any], now: float) -> bool:
    """No progress (tool call, output) within the policy's ``stall_timeout`` while unfinished."""
    return stalled_since(rec.get("status"), rec.get("stall_timeout"), rec.get("last_progress") or rec.get("created_at"),
                         now)


def stalled_since(status: str | None, stall_timeout: float | None, since: float | None, now: float) -> bool:
    """:func:`stalled` from the fields themselves (a listing summary has them, not a record)."""
    if not stall_timeout or status not in _PROGRESSING:
        return False
    return now - float(since or now) > float(stall_timeout)


def list_agents(store: AgentStore) -> list[dict[str, Any]]:
    """Every agent record, each with ``stalled`` set."""
    now = time.time()
    with store.read() as txn:
        agents = list(txn.iter_agents())
    for a in agents:
        a["stalled"] = stalled(a, now)
    return agents


def get_agent(store: AgentStore, agent_id: str, *, where: object = None) -> dict[str, Any]:
    """One agent's record with ``stalled`` set; :class:`AgentNotFound` names ``where`` (the store)."""
    with store.read() as txn:
        rec = txn.get_agent(agent_id)
    if rec is None:
        raise AgentNotFound(f"no agent {agent_id} in store {where if where is not None else ''}".rstrip())
    rec["stalled"] = stalled(rec, time.time())
    return rec


def inspect(store: AgentStore, agent_id: str, *, where: object = None) -> dict[str, Any]:
    """The record as an operator reads it: its input, and its checkpoints (no owner, no raw input)."""
    rec = get_agent(store, agent_id, where=where)
    out = {k: v for k, v in rec.items() if k not in ("input_raw", "owner")}
    with store.read() as txn:
        cps = txn.list_checkpoints(agent_id)
        try:  # a damaged input is shown as such: inspecting a corrupt agent is how one finds out why
            stored_input = txn.get_blob(INPUTS_BUCKET, agent_id)
            if stored_input is not None:
                out["input"] = json.loads(stored_input)
        except (RecordCorrupt, ValueError) as exc:
            out["input_error"] = {"code": "record_corrupt", "message": str(exc)}
    out["checkpoint_list"] = [{"seq": c.seq, "size": c.size, "created_at": c.created_at} for c in cps]
    return out


def approvals(store: AgentStore) -> list[dict[str, Any]]:
    """Pending approval requests: the call, its arguments and the rule that asked."""
    with store.read() as txn:
        return [_approval(k, v) for k, v in txn.iter_blobs(APPROVALS_BUCKET)]


def _approval(agent_id: str, raw: bytes) -> dict[str, Any]:
    """A pending request as stored, or a stand-in naming the damage (one bad request stops no listing)."""
    try:
        request = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        problem = f"does not decode ({exc})"
    else:
        if isinstance(request, dict):
            return request
        problem = f"is a JSON {type(request).__name__}, not an object"
    return {"agent_id": agent_id, UNREADABLE: True,
            "error": {"code": "record_corrupt", "message": f"the approval request of agent {agent_id} {problem}"}}
