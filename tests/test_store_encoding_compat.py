"""A store written by the standard library's JSON encoder (every version before
``snapshots.fastjson``) opens, verifies and runs on under the fast one, and the fast one
writes the very bytes the old one wrote.

The agent is parked waiting for an approval with the old encoder, so its record, journal,
audit chain and pending call are the old encoder's bytes; then a host with the fast
encoder approves it (a change to the record made by another path than a tool call) and
runs it to its end, on the same chain. ``torpor audit verify`` and ``torpor store check``
must pass, and every stored record must encode again to exactly its stored bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import lmdb
import pytest
from conftest import EXAMPLES, BundleFactory

from host.runtime import Host
from host.trust import audit
from snapshots import fastjson, sealed

pytestmark = pytest.mark.timeout(300)


def _stored(db_dir: Path) -> dict[str, list[tuple[bytes, bytes]]]:
    """Every (key, value) of the agents, journal and audit databases, read straight from LMDB."""
    env = lmdb.open(str(db_dir), max_dbs=32, readonly=True, lock=False)
    try:
        out: dict[str, list[tuple[bytes, bytes]]] = {}
        with env.begin() as txn:
            for name in ("agents", "journal", "audit"):
                db = env.open_db(name.encode(), txn=txn, create=False)
                out[name] = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=db)]
        return out
    finally:
        env.close()


def _encodes_to_itself(stored: dict[str, list[tuple[bytes, bytes]]]) -> int:
    """Check that the fast encoder writes each stored record's very bytes; how many were checked."""
    n = 0
    for _, raw in stored["agents"]:
        assert fastjson.compact(json.loads(raw)) == raw
        n += 1
    for key, raw in stored["journal"]:
        body = sealed.unseal("journal", key, raw, lambda: "journal entry", strict=True)
        assert fastjson.compact(json.loads(body)) == body
        n += 1
    for _, raw in stored["audit"]:
        rec = json.loads(raw)
        h = rec.pop("hash")
        assert audit.canonical(rec)[:-1] + b',"hash":"%s"}' % h.encode() == raw
        n += 1
    return n


def test_a_store_the_standard_encoder_wrote_runs_on_and_verifies(bundles: BundleFactory, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from host.cli import main

    b = bundles.load(EXAMPLES / "procurement")
    with monkeypatch.context() as m:
        m.setattr(fastjson, "_plain", lambda obj: False)  # every value by the standard library: the old bytes
        with Host(tmp_path) as host:
            res = anyio.run(lambda: host.run(b, {"item": "laptops", "amount": 75_000}))
            assert res.status == "waiting_approval", (res.error, res.logs)
        old = _stored(tmp_path / "db")
    assert old["journal"] and old["audit"]
    assert _encodes_to_itself(old) >= 3

    with Host(tmp_path) as host:  # the fast encoder from here on
        [pending] = host.approvals()
        assert pending["agent_id"] == res.agent_id
        done = anyio.run(lambda: host.approve(res.agent_id, by="cfo"))
        assert done.status == "completed", (done.error, done.logs)
        assert done.output["status"] == "ordered"
        kinds = [r["kind"] for r in host.audit_records(res.agent_id)]
        assert "approval.granted" in kinds and kinds.count("tool.answered") > 3
        report = audit.verify_store(host.store)
        assert report.ok, report.summary()
    new = _stored(tmp_path / "db")
    assert len(new["audit"]) > len(old["audit"])
    # the records written by the old encoder are still there, untouched, beside the new ones
    assert set(old["audit"]) <= set(new["audit"])
    _encodes_to_itself(new)
    assert main(["audit", "verify", "--store", str(tmp_path)]) == 0
    assert main(["store", "check", "--store", str(tmp_path)]) == 0


def test_a_record_changed_by_another_path_is_written_as_it_is_now(tmp_path: Path) -> None:
    """Nothing of a record's encoding is kept between commits: an agent record changed by an
    operator's path (here, in place, nested) is stored with the change at the next write."""
    with Host(tmp_path) as host:
        rec: dict[str, Any] = {"agent_id": "01AAAAAAAAAAAAAAAAAAAAAAAA", "status": "running",
                               "usage": {"tool_calls": 1, "calls_by_tool": {"kv.incr": 1}},
                               "identity": {"retired_at": None}}
        host.store.transact(lambda txn: txn.put_agent(rec))
        rec["usage"]["calls_by_tool"]["kv.incr"] = 2  # nested, in place: the same dict objects
        rec["identity"]["retired_at"] = 1.5
        rec["status"] = "paused"
        host.store.transact(lambda txn: txn.put_agent(rec))
        with host.store.read() as txn:
            got = txn.get_agent(rec["agent_id"])
            [summary] = [s for s in txn.iter_agent_summaries() if s.agent_id == rec["agent_id"]]
        assert got is not None
        assert got["usage"]["calls_by_tool"] == {"kv.incr": 2} and got["identity"]["retired_at"] == 1.5
        assert got["status"] == "paused"
        assert summary.status == "paused" and summary.tool_calls == 1
