"""One error boundary per agent: a damaged agent is reported and parked, and every other
agent in the store goes on (``resume --all``, ``ps``).

Real LMDB files damaged the way a disk or a hand would: a flipped bit in a checkpoint,
an agent record that is not JSON, a stored bundle gone. Healthy agents beside them are
resumable forks of a finished `steps` agent.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import lmdb
import pytest
from conftest import EXAMPLES, GUESTS, BundleFactory

from host.runtime import Host


def _raw(db_dir: Path, name: bytes, key: bytes, value: bytes | None) -> None:
    """Write (or delete) one raw LMDB value, under the store's feet."""
    env = lmdb.open(str(db_dir), max_dbs=32)
    try:
        db = env.open_db(name)
        with env.begin(write=True, db=db) as txn:
            if value is None:
                assert txn.delete(key)
            else:
                txn.put(key, value)
    finally:
        env.close()


def _flip(db_dir: Path, agent_id: str, seq: int) -> None:
    env = lmdb.open(str(db_dir), max_dbs=32)
    key = agent_id.encode() + b"\0" + seq.to_bytes(8, "big")
    try:
        db = env.open_db(b"checkpoints")
        with env.begin(write=True, db=db) as txn:
            value = bytearray(txn.get(key))
            value[40] ^= 0x40
            txn.put(key, bytes(value))
    finally:
        env.close()


def _store_with_forks(bundles: BundleFactory, path: Path, n: int) -> tuple[str, list[str]]:
    with Host(path) as host:
        done = anyio.run(lambda: host.run(bundles.load(EXAMPLES / "steps"), {"n": 5}))
        assert done.ok
        return done.agent_id, [host.fork(done.agent_id, 2) for _ in range(n)]


def torpor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "host.cli", *args], capture_output=True, text=True, timeout=120)


def test_resume_all_parks_the_damaged_and_finishes_the_rest(bundles: BundleFactory, tmp_path: Path) -> None:
    _, forks = _store_with_forks(bundles, tmp_path, 4)
    bad_checkpoint, bad_record = forks[0], forks[1]
    _flip(tmp_path / "db", bad_checkpoint, 1)
    _raw(tmp_path / "db", b"agents", bad_record.encode(), b"{not json")
    with Host(tmp_path) as host:
        listed = {a["agent_id"]: a for a in host.list_agents()}  # one bad record stops no listing
        assert listed[bad_record]["status"] == "corrupt"
        assert listed[bad_record]["error"]["code"] == "record_corrupt"
        results = {r.agent_id: r for r in anyio.run(host.resume_all)}
        assert bad_record not in results  # parked: nothing to resume, and nothing written over it
        assert results[bad_checkpoint].status == "corrupt"
        assert results[bad_checkpoint].error is not None
        assert results[bad_checkpoint].error["code"] == "snapshot_corrupt"
        for healthy in forks[2:]:
            assert results[healthy].status == "completed", results[healthy]
            # The fork resumed at checkpoint 2 of a sum of 1..5, from a counter at 5.
            assert results[healthy].output == {"sum": 1 + 2 + 6 + 7 + 8, "last": 8}
        audit = host.audit_records(bad_checkpoint)
        assert audit[-1]["kind"] == "agent.corrupt" and audit[-1]["error"]["code"] == "snapshot_corrupt"
    env = lmdb.open(str(tmp_path / "db"), max_dbs=32)
    with env.begin(db=env.open_db(b"agents")) as txn:
        assert txn.get(bad_record.encode()) == b"{not json"  # the damaged bytes are kept for an operator
    env.close()


def test_a_missing_bundle_parks_its_agents(bundles: BundleFactory, tmp_path: Path) -> None:
    _, forks = _store_with_forks(bundles, tmp_path, 1)
    with Host(tmp_path) as host:
        digest = host.get_agent(forks[0])["bundle_digest"]
    _raw(tmp_path / "db", b"bundles", digest.encode(), None)
    with Host(tmp_path) as host:
        [res] = anyio.run(host.resume_all)
        assert res.status == "corrupt" and res.error is not None and res.error["code"] == "bundle_missing", res


def test_the_cli_lists_and_resumes_around_a_damaged_agent(bundles: BundleFactory, tmp_path: Path) -> None:
    _, forks = _store_with_forks(bundles, tmp_path, 3)
    _raw(tmp_path / "db", b"agents", forks[0].encode(), b"\xff\xfe")
    _flip(tmp_path / "db", forks[1], 1)
    ps = torpor("ps", "--store", str(tmp_path), "--json")
    assert ps.returncode >= 0 and "internal" not in ps.stdout + ps.stderr, ps.stdout + ps.stderr
    rows: list[dict[str, Any]] = json.loads(ps.stdout)
    assert {r["agent_id"] for r in rows} >= set(forks), rows  # ps reads summaries: every agent listed
    resumed = torpor("resume", "--all", "--store", str(tmp_path), "--json")
    assert resumed.returncode >= 0 and "internal" not in resumed.stdout + resumed.stderr, resumed.stderr
    by_id = {r["agent_id"]: r for r in json.loads(resumed.stdout)}
    assert by_id[forks[1]]["status"] == "corrupt" and by_id[forks[2]]["status"] == "completed", by_id
    ps = torpor("ps", "--store", str(tmp_path), "--json")
    statuses = {r["agent_id"]: r["status"] for r in json.loads(ps.stdout)}
    assert (statuses[forks[0]], statuses[forks[1]], statuses[forks[2]]) == ("corrupt", "corrupt", "completed")
    named = {r["agent_id"]: r["name"] for r in json.loads(ps.stdout)}
    assert named[forks[0]] == "steps", named  # the listing keeps what it knew of the damaged record


def test_ps_resume_all_and_audit_verify_name_the_agents_that_need_attention(
        bundles: BundleFactory, tmp_path: Path) -> None:
    """Exit 5 ("some agents need attention") with the damaged agents named, in --json and
    on stderr; the healthy ones are handled all the same. A store with nothing wrong exits 0."""
    _, forks = _store_with_forks(bundles, tmp_path, 4)
    unreadable, bad_checkpoint, bad_chain, healthy = forks
    assert torpor("ps", "--store", str(tmp_path)).returncode == 0  # nothing damaged yet
    _raw(tmp_path / "db", b"agents", unreadable.encode(), b"\xff\xfe")
    _flip(tmp_path / "db", bad_checkpoint, 1)
    _raw(tmp_path / "db", b"audit", f"{bad_chain}/000000000001".encode(), b"{torn")

    resumed = torpor("resume", "--all", "--store", str(tmp_path), "--json")
    assert resumed.returncode == 5 and "internal" not in resumed.stdout + resumed.stderr, resumed.stderr
    by_id = {r["agent_id"]: r for r in json.loads(resumed.stdout)}
    assert by_id[healthy]["status"] == "completed" and by_id[healthy]["attention"] is None, by_id[healthy]
    assert by_id[bad_checkpoint]["status"] == "corrupt" and "snapshot_corrupt" in by_id[bad_checkpoint]["attention"]
    assert by_id[unreadable]["status"] == "corrupt" and "does not decode" in by_id[unreadable]["attention"]
    again = torpor("resume", "--all", "--store", str(tmp_path))  # nothing left to resume, still damaged
    assert again.returncode == 5 and bad_checkpoint in again.stderr and unreadable in again.stderr, again.stderr

    # ps reads listing summaries: the damaged agents show once a writer has read their records.
    ps = torpor("ps", "--store", str(tmp_path), "--json")
    assert ps.returncode == 5, ps.stdout + ps.stderr
    assert {r["agent_id"] for r in json.loads(ps.stdout) if r["attention"]} == {unreadable, bad_checkpoint}
    human = torpor("ps", "--store", str(tmp_path))
    assert human.returncode == 5 and "2 agents need attention" in human.stderr and unreadable in human.stderr, \
        human.stderr

    verified = torpor("audit", "verify", "--store", str(tmp_path), "--json")
    report = json.loads(verified.stdout)
    assert verified.returncode == 5 and not report["ok"], verified.stdout
    assert {a["agent_id"] for a in report["attention"]} == {unreadable, bad_chain}, report["attention"]


def test_an_import_exception_left_by_another_thread_is_not_this_agents(bundles: BundleFactory,
                                                                       tmp_path: Path) -> None:
    """wasmtime-py keeps a host import's exception in one module global; with guests on
    several threads one agent's (out of memory) was raised for another (out of fuel).
    The host keeps it per thread: one left in that global by any thread changes nothing."""
    from wasmtime import _func

    from host.sandbox import abi
    from host.sandbox.execution import GuestAbort

    _func.LAST_EXCEPTION = GuestAbort(abi.ABORT_OOM, "out of memory: another agent's")  # type: ignore[assignment]
    try:
        with Host(tmp_path) as host:
            res = anyio.run(lambda: host.run(bundles.load(GUESTS / "loop"), {}))
        assert res.status == "failed" and res.error is not None and res.error["code"] == "out_of_fuel", res
    finally:
        _func.LAST_EXCEPTION = None


def test_the_error_of_an_agent_ended_by_an_import_is_freed(bundles: BundleFactory, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """An import's exception (here the grow guest's out-of-memory abort) comes back from
    Wasmtime as a native error object; the host raised the exception without taking the
    error, which leaked ~1.9 KiB per such agent (the soak benchmark's RSS slope). Each
    one is now owned and freed: counted at Wasmtime's own destructor."""
    import wasmtime._error

    freed: list[object] = []
    real = wasmtime._error.WasmtimeError._delete

    def counting(self: Any, ptr: Any) -> None:
        freed.append(ptr)
        real(self, ptr)

    monkeypatch.setattr(wasmtime._error.WasmtimeError, "_delete", counting)
    grow = bundles.load(GUESTS / "grow")
    with Host(tmp_path) as host:
        for _ in range(3):
            res = anyio.run(lambda: host.run(grow, {}))
            assert res.error is not None and res.error["code"] == "memory_limit", res
    import gc

    gc.collect()
    assert len(freed) >= 3, freed
