"""One audit record a step: a chain written one record per event (an older host's) and one
written a record per step verify alike, side by side in one store, and read the same."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from host.runtime import Host
from host.trust import audit

STEPS = Path(__file__).parent.parent / "guest_sdk" / "examples" / "steps"


def _one_record_per_event(txn: Any, rec: dict[str, Any], events: Any) -> None:
    """How hosts before step records wrote a chain: every event a record of its own."""
    seq, head = int(rec.get("audit_seq", 0)), str(rec.get("audit_head") or audit.GENESIS)
    for kind, data in events:
        seq += 1
        sealed = audit.seal(rec["agent_id"], seq, head, time.time(), kind, data)
        txn.put_blob(audit.BUCKET, audit.record_key(rec["agent_id"], seq), audit.canonical(sealed))
        head = sealed["hash"]
    rec["audit_seq"], rec["audit_head"] = seq, head


def test_old_and_new_chains_verify_and_read_the_same(bundles: Any, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from host.cli import main

    b = bundles.load(STEPS)
    d = tmp_path / "store"
    with Host(d) as host:
        with monkeypatch.context() as m:
            m.setattr(audit, "append_events", _one_record_per_event)
            old = anyio.run(host.run, b, {"n": 4}).agent_id
        new = anyio.run(host.run, b, {"n": 4}).agent_id
        host.heads.maybe_seal(force=True)  # a signed head over both chains
        stored_old, stored_new = audit.stored_records(host.store, old), audit.stored_records(host.store, new)
        assert not any(r["kind"] == audit.STEP_KIND for r in stored_old)
        assert [r["kind"] for r in stored_new].count(audit.STEP_KIND) >= 4  # a call's events: one record
        assert len(stored_new) < len(stored_old) // 2
        # What the audit shows is the same events in the same order, whichever format holds them.
        kinds_old = [r["kind"] for r in audit.records(host.store, old)]
        assert kinds_old == [r["kind"] for r in audit.records(host.store, new)]
        for aid in (old, new):  # each event numbered in order, whichever record holds it (Last-Event-ID)
            numbers = [audit.event_number(r) for r in audit.records(host.store, aid)]
            assert numbers == list(range(1, len(kinds_old) + 1))
        assert kinds_old.count("tool.answered") == 4 and "tool.requested" in kinds_old and "checkpoint" in kinds_old
        lines_new = list(audit.trace_lines(audit.records(host.store, new)))
        assert any("answered, status 0" in line for line in lines_new)
        report = audit.verify_store(host.store)
        assert report.ok, report.summary()
        assert report.agents == 2 and report.records == len(stored_old) + len(stored_new)
    assert main(["audit", "verify", "--store", str(d)]) == 0

    # Tampering is found in either format: an old record's answer, then a new step's event.
    for aid, pick in ((old, "tool.answered"), (new, audit.STEP_KIND)):
        with Host(d) as host:
            seq = next(r["seq"] for r in audit.stored_records(host.store, aid) if r["kind"] == pick)

            def edit(txn: Any, aid: str = aid, seq: int = seq) -> None:
                rec = json.loads(txn.get_blob(audit.BUCKET, audit.record_key(aid, seq)))
                if rec["kind"] == audit.STEP_KIND:
                    rec["events"][-1]["status"] = 1
                else:
                    rec["status"] = 1
                txn.put_blob(audit.BUCKET, audit.record_key(aid, seq), audit.canonical(rec))

            host.store.transact(edit)
            first = audit.verify_store(host.store, agent_id=aid).first
            assert first is not None and first.kind == "modified" and (first.agent_id, first.seq) == (aid, seq)
