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


#: Error codes of an agent the host, not the agent, ended: a bug or an outage to look at.
HOST_ERROR_CODES = frozenset({"host_error"})


def attention(rec: dict[str, Any]) -> str | None:
    """Why an agent needs an operator's attention, or None.

    An agent needs attention when something other than its own code ended it or stops
    it: its record does not decode, it is parked ``corrupt`` (its bundle, module or
    stored state cannot be used, or does not match its digest), or the host failed
    while running it. An agent that failed or was terminated by its own doing (a
    budget, a trap, ``torpor_fail``) or that waits on a person is not damaged: its
    status says what to do. ``ps``, ``resume --all`` and ``audit verify`` list these
    and exit with their own code (``host.cli.common.EXIT_ATTENTION``).
    """
    error = rec.get("error")
    error = error if isinstance(error, dict) else {}
    what = f"[{error.get('code')}] {error.get('message')}" if error else ""
    if rec.get(UNREADABLE):
        return f"its record does not decode: {what}".rstrip(": ")
    status = rec.get("status")
    if status == "corrupt":
        return f"parked corrupt: {what}".rstrip(": ")
    if status == "failed" and error.get("code") in HOST_ERROR_CODES:
        return f"ended by a host error: {what}"
    return None


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
