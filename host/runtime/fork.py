"""A new agent that continues from an earlier checkpoint of another.

The fork gets its own identity, audit chain and id, the parent's checkpoint re-keyed as
its first, the parent's journal entry for the pending call (so a recorded answer is
replayed, not re-run), its input, and a copy of the parent's private key-value data as
it is now (the store keeps no history of it).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from host.errors import AgentNotFound, TorporError
from host.ids import new_agent_id
from host.runtime.loader import BundleLoader
from host.trust import audit
from host.trust.identity import IdentityService
from snapshots.errors import SnapshotError
from snapshots.format import decode_snapshot, encode_checkpoint
from snapshots.store import INPUTS_BUCKET, AgentStore


def fork(store: AgentStore, loader: BundleLoader, identity: IdentityService, agent_id: str, checkpoint: int) -> str:
    """Write the fork of ``agent_id`` at ``checkpoint`` (suspended, ready to resume); its id."""
    with store.read() as txn:
        rec = txn.get_agent(agent_id)
        found = rec is not None and txn.get_checkpoint(agent_id, checkpoint) is not None
    if rec is None:
        raise AgentNotFound(f"no agent {agent_id}")
    if not found:
        raise TorporError(f"agent {agent_id} has no checkpoint {checkpoint}", code="checkpoint_not_found")
    fb = loader.by_digest(rec["bundle_digest"])
    pristine = loader.module(fb)[0].image
    try:
        with store.read() as txn:  # a large checkpoint reads its chunks in the transaction
            blob = txn.get_checkpoint(agent_id, checkpoint)
            if blob is None:
                raise TorporError(f"agent {agent_id} has no checkpoint {checkpoint}", code="checkpoint_not_found")
            snap = decode_snapshot(blob, expect_module_digest=fb.module_digest, pristine=pristine,
                                   chunks_from=txn.get_chunk)
    except SnapshotError as exc:
        raise TorporError(f"agent {agent_id}: checkpoint {checkpoint} is unusable: {exc}", code="snapshot_corrupt") from exc
    new_id = new_agent_id()
    now = time.time()
    new = dict(rec)
    new.update({
        "agent_id": new_id, "status": "suspended", "parent": {"agent_id": agent_id, "checkpoint": checkpoint},
        "created_at": now, "updated_at": now, "finished_at": None, "output": None, "error": None, "owner": None,
        "checkpoints": 1, "pending": snap.pending, "usage": dict(snap.usage), "audit_seq": 0,
        "audit_head": audit.GENESIS, "audit_events": 0, "approval": None, "in_doubt": None,
        "wake_at": None, "wake_reason": None,  # a sleeping parent's wake-up is its own (the fork's is journaled)
    })
    forked = dataclasses.replace(snap, agent_id=new_id, seq=1, created_at=now)
    data, chunks = encode_checkpoint(forked, pristine=pristine)  # shares its parent's chunks
    new["snapshot_bytes"] = len(data)
    new["last_checkpoint_bytes"] = len(data)
    pending_seq = int(snap.pending["seq"]) if snap.pending else None
    events: list[tuple[str, dict[str, Any]]] = [("agent.forked", {"parent": agent_id, "checkpoint": checkpoint,
                                                                  "bundle_digest": rec["bundle_digest"]})]
    provision = identity.provision(new, lambda kind, **d: events.append((kind, d)))

    def write(txn: Any) -> None:
        provision(txn)
        txn.put_checkpoint(new_id, 1, data, now, chunks or None)
        stored_input = txn.get_blob(INPUTS_BUCKET, agent_id)
        if stored_input is not None:  # a parent of an older host has it in its record, now copied
            txn.put_blob(INPUTS_BUCKET, new_id, stored_input)
        if pending_seq is not None:
            entry = txn.get_journal(agent_id, pending_seq)
            if entry is not None:
                txn.put_journal(new_id, pending_seq, entry)
        old_ns, new_ns = f"agent:{agent_id}", f"agent:{new_id}"
        for key in txn.kv_keys(old_ns, ""):
            value = txn.kv_get(old_ns, key)
            if value is not None:
                txn.kv_set(new_ns, key, value)
        audit.append_events(txn, new, events)
        txn.put_agent(new)

    store.transact(write)
    return new_id
