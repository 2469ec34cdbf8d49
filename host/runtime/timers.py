"""Agents asleep until a time: the wake index, and when a wait is short enough to hold.

An agent waits on a time for two reasons: it called ``timer.sleep`` (a durable sleep), or
a call it made hit a rate limit whose grant says ``on_limit = "wait"`` (a back-off). Either
way the runtime (:mod:`host.runtime.tool_call`) journals the wake time with the call, so a
resume after a crash keeps the original deadline and a replay sees the same answer. A wait
shorter than :data:`SHORT_WAIT_S` is held in-process; a longer one parks the agent
``sleeping``: hibernated, holding nothing but its checkpoint, with ``wake_at`` in its record
and an entry in this index written in the same commit as the park.

The index is bucket :data:`~snapshots.store.TIMERS_BUCKET`, keyed ``<time>/<agent id>``
(the time zero-padded, so keys sort by time and the due ones are a prefix of the bucket).
Whoever runs on the store wakes the due ones: ``torpor serve``'s timer loop
(:meth:`host.server.scheduler.Scheduler.timers`), ``torpor resume --all``, or an embedding
program through :meth:`host.runtime.Host.wake_due`. The entry is deleted in the commit that
wakes its agent (status back to ``running``), never before: a crash in between leaves the
agent asleep and its entry in place, for the next one to wake.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from host.errors import AgentStateError
from snapshots.store import TIMERS_BUCKET, AgentStore

#: The status of an agent parked until a time.
SLEEPING = "sleeping"
#: The builtin durable sleep (``{"ms": N}`` or ``{"until": unix_seconds}``).
SLEEP_TOOL = "timer.sleep"
#: A wait shorter than this is held in-process (the instance stays warm); a longer one
#: parks the agent: a park and a wake cost two commits and a restore, more than 50 ms of waiting.
SHORT_WAIT_S = 0.05
#: A wake time a little after the limit's: a rate window that ends exactly at the wake
#: time is judged with the same clock, and a float's last bit must not deny the call again.
SETTLE_S = 0.001


@dataclass(frozen=True)
class Wakeup:
    """One entry of the wake index: wake ``agent_id`` at Unix time ``at`` (why: ``reason``)."""

    agent_id: str
    at: float
    reason: str
    key: str

    def to_dict(self) -> dict[str, Any]:
        return {"agent_id": self.agent_id, "at": self.at, "reason": self.reason}


def wake_key(at: float, agent_id: str) -> str:
    """Sortable by time: ``<seconds, zero-padded>/<agent id>``."""
    return f"{at:020.6f}/{agent_id}"


def put(txn: Any, agent_id: str, at: float, reason: str) -> None:
    """Add the entry (in the caller's transaction: the park's own commit)."""
    value = json.dumps({"agent_id": agent_id, "at": at, "reason": reason}).encode()
    txn.put_blob(TIMERS_BUCKET, wake_key(at, agent_id), value)


def remove(txn: Any, agent_id: str, at: float) -> None:
    """Delete the entry (in the caller's transaction: the wake's own commit)."""
    txn.delete_blob(TIMERS_BUCKET, wake_key(at, agent_id))


def wake_times(txn: Any) -> dict[str, float]:
    """Agent id -> wake time, from the index in a read transaction (``torpor ps``)."""
    out: dict[str, float] = {}
    for _, raw in txn.iter_blobs(TIMERS_BUCKET):
        try:
            e = json.loads(raw)
            out[str(e["agent_id"])] = float(e["at"])
        except (ValueError, TypeError, KeyError):
            continue  # damaged: the next sweep drops it
    return out


def entries(store: AgentStore) -> list[Wakeup]:
    """Every entry, earliest first. One that does not decode (bytes on disk are not trusted)
    is given with no agent and time 0, so the first reader that writes drops it."""
    out = []
    with store.read() as txn:
        for key, raw in txn.iter_blobs(TIMERS_BUCKET):
            try:
                e = json.loads(raw)
                out.append(Wakeup(str(e["agent_id"]), float(e["at"]), str(e.get("reason", "")), key))
            except (ValueError, TypeError, KeyError):
                out.append(Wakeup("", 0.0, "undecodable", key))
    return out


def sweep(store: AgentStore, now: float) -> list[Wakeup]:
    """The due entries whose agent still sleeps until that time, earliest first.

    Entries that name no sleeping agent (it was failed or deleted meanwhile, or the entry
    does not decode) are deleted here, in one write, so no reader trips on them twice.
    """
    due = [w for w in entries(store) if w.at <= now]
    if not due:
        return []
    with store.read() as txn:  # a read, not a write: due entries are almost always live
        stale = [w for w in due if not _sleeps_until(txn, w)]
    if stale:
        def drop(txn: Any) -> None:
            for w in stale:
                if not _sleeps_until(txn, w):  # looked at again under the write lock
                    txn.delete_blob(TIMERS_BUCKET, w.key)

        store.transact(drop)
    return [w for w in due if w not in stale]


def _sleeps_until(txn: Any, w: Wakeup) -> bool:
    """Whether the entry's agent sleeps until the entry's time (else the entry is stale)."""
    rec = txn.get_agent(w.agent_id) if w.agent_id else None
    return rec is not None and rec.get("status") == SLEEPING and rec.get("wake_at") == w.at


def check_due(rec: dict[str, Any], now: float) -> None:
    """Refuse to resume a sleeping agent before its time (AgentStateError ``not_due``).

    Why a refusal and not a no-op: ``torpor resume ID`` must say that nothing ran and when
    something will; the agent is untouched and its wake-up stays where it was."""
    at = rec.get("wake_at")
    if isinstance(at, int | float) and at > now:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))
        raise AgentStateError(
            f"agent {rec.get('agent_id')} sleeps until {when} ({at - now:.3g}s from now); it is resumed then "
            "(by torpor serve, torpor resume --all or Host.wake_due)", code="not_due")
