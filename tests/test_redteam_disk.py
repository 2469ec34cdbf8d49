"""Red team (session 10), bytes on disk under JavaScript and Python agents.

The store checks of issue 21 were tested with C agents; a JS or Python agent's state is
the same kinds of records (a checkpoint over chunks, journal answers), larger. Here the
``steps-js`` and ``steps-py`` examples, built by the project's toolchain, run to the end
in a real LMDB store and are forked at checkpoint 2 (each fork waits on call 2, whose
answer is in the journal). Then, as a hand or a disk would: a journal answer rewritten
with its seal recomputed, a checkpoint's bytes flipped, the data file cut short. Each
damaged agent parks ``corrupt`` naming what, through the real CLI; the healthy fork beside
it completes with the exact sums; nothing is replayed silently and nothing crashes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import anyio
import lmdb
import pytest
from conftest import EXAMPLES, BundleFactory, built_runtime
from test_store_integrity import _json, _payload, _put, _raw, _seq, torpor

from host.runtime import Host
from snapshots import sealed

#: steps with n = 5 forked at checkpoint 2: calls 2..5 answered 2, 6, 7, 8 (the counter went on).
FORK_OUTPUT = {"sum": 1 + 2 + 6 + 7 + 8, "last": 8}


@pytest.fixture(scope="module", params=["steps-js", "steps-py"])
def forked(request: pytest.FixtureRequest, bundles: BundleFactory,
           tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """A store (with its compile cache) holding two forks of a finished agent: copied per test."""
    from host.sandbox import js_runtime, py_runtime

    built_runtime(js_runtime if request.param == "steps-js" else py_runtime, request.param)
    store = tmp_path_factory.mktemp(request.param)
    with Host(store) as host:
        done = anyio.run(lambda: host.run(bundles.load(EXAMPLES / request.param), {"n": 5}))
        assert done.ok and done.output == {"sum": 15, "last": 5}, done.error
        damaged, healthy = (host.fork(done.agent_id, 2) for _ in range(2))
    return store, damaged, healthy


@pytest.fixture
def store(forked: tuple[Path, str, str], tmp_path: Path) -> Path:
    shutil.copytree(forked[0], tmp_path / "s")
    return tmp_path / "s"


def _resume_all(store: Path) -> dict[str, dict[str, object]]:
    proc = torpor("resume", "--all", "--store", str(store), "--json")
    assert proc.returncode in (0, 5), proc.stdout + proc.stderr  # 5: some agents need attention
    return {r["agent_id"]: r for r in _json(proc)}


def test_a_resealed_journal_answer_of_a_js_or_python_agent_is_never_replayed(
        forked: tuple[Path, str, str], store: Path) -> None:
    _, damaged, healthy = forked
    db = store / "db"
    entry = json.loads(_payload(_raw(db, b"journal", _seq(damaged, 2))))
    entry["response"] = json.dumps({"value": 1000})
    _put(db, b"journal", _seq(damaged, 2), sealed.seal("journal", _seq(damaged, 2), json.dumps(entry).encode()))
    by_id = _resume_all(store)
    assert by_id[damaged]["status"] == "corrupt" and by_id[damaged]["output"] is None, by_id[damaged]
    assert "differs from the one its audit record holds" in str(by_id[damaged]["error"])
    assert by_id[healthy]["status"] == "completed" and by_id[healthy]["output"] == FORK_OUTPUT, by_id[healthy]


def test_a_flipped_checkpoint_of_a_js_or_python_agent_parks_it_corrupt(
        forked: tuple[Path, str, str], store: Path) -> None:
    _, damaged, healthy = forked
    db = store / "db"
    env = lmdb.open(str(db), max_dbs=32, readonly=True)
    with env.begin(db=env.open_db(b"checkpoints", create=False)) as txn:
        key = max(k for k, _ in txn.cursor() if k.startswith(damaged.encode() + b"\0"))  # its last checkpoint
    env.close()
    raw = bytearray(_raw(db, b"checkpoints", key))
    raw[len(raw) // 2] ^= 0x40
    _put(db, b"checkpoints", key, bytes(raw))
    checked = torpor("store", "check", "--store", str(store), "--json")
    assert checked.returncode == 1 and damaged in checked.stdout, checked.stdout
    by_id = _resume_all(store)
    assert by_id[damaged]["status"] == "corrupt", by_id[damaged]
    assert by_id[healthy]["status"] == "completed" and by_id[healthy]["output"] == FORK_OUTPUT, by_id[healthy]


@pytest.mark.parametrize("forked", ["steps-js"], indirect=True)  # the file, not the language: one is enough
def test_a_data_file_cut_short_is_store_corrupt_never_a_signal(forked: tuple[Path, str, str], store: Path) -> None:
    data = store / "db" / "data.mdb"
    os.truncate(data, data.stat().st_size // 2)
    for args in (("ps",), ("resume", "--all"), ("audit", "verify")):
        proc = torpor(*args, "--store", str(store), "--json")
        assert proc.returncode > 0, (args, proc.returncode, proc.stderr)  # a typed refusal, not a signal
        assert json.loads(proc.stdout)["error"]["code"] == "store_corrupt", (args, proc.stdout)


def test_a_fleet_hosts_local_copy_cut_short_is_rebuilt_from_the_log(nats_cluster: object, tmp_path: Path) -> None:
    """The fleet store's local copy is a cache of the replicated log: cut short on disk, it
    was refused at open (``store_corrupt``, "restore the store from a copy") although the
    log held every commit. Now it is moved aside and rebuilt from the log, nothing lost."""
    import uuid

    from snapshots.nats_store import NatsStore

    url, stream, copy = nats_cluster.url, f"T{uuid.uuid4().hex[:12]}", tmp_path / "copy"  # type: ignore[attr-defined]
    with NatsStore.open(url, copy, stream=stream, replicas=3) as s:
        s.transact(lambda txn: txn.put_blob("meta", "redteam", b"x" * 50_000))
    data = copy / "data.mdb"
    os.truncate(data, data.stat().st_size // 2)
    with NatsStore.open(url, copy, stream=stream, replicas=3) as s:
        s.sync(timeout=30)  # the rebuilt copy has applied the log
        with s.read() as txn:
            assert txn.get_blob("meta", "redteam") == b"x" * 50_000
    assert [p.name.startswith("copy.corrupt-") for p in tmp_path.iterdir() if p.name != "copy"] == [True]
