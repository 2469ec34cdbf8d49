"""The store's durability levels on real LMDB files and real processes.

``sync`` (the default) syncs every commit; ``process`` leaves commits in the page
cache and flushes in the background. What ``process`` must still guarantee is tested
here: other processes see its commits at once, a SIGKILL loses none of them, the
flusher really syncs (``force=True``: a plain sync is a no-op under MDB_NOSYNC), close
syncs, a failed flush is raised by the next commit, and the flusher neither keeps the
process alive nor races close() or a map resize. tests/test_crash_resume.py runs the
whole host under SIGKILL at both levels.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lmdb
import pytest
from conftest import BundleFactory

from host.cli import app as cli
from host.errors import ConfigError
from host.runtime import Host
from snapshots import (
    DURABILITY_LEVELS,
    GroupCommitter,
    LmdbStore,
    StoreConfigError,
    StoreFlushError,
    StoreUnavailable,
)
from snapshots.lmdb_store import DURABILITY_ENV

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _no_env_level(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DURABILITY_ENV, raising=False)


class _SpyEnv:
    """Stands in for the store's lmdb.Environment: records sync(force) calls, may fail them."""

    def __init__(self, env: lmdb.Environment, fail: BaseException | None = None) -> None:
        self._env = env
        self.fail = fail
        self.syncs: list[bool] = []

    def sync(self, force: bool = False) -> None:
        self.syncs.append(force)
        if self.fail is not None:
            raise self.fail
        self._env.sync(force)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._env, name)


def _spy(store: LmdbStore, fail: BaseException | None = None) -> _SpyEnv:
    spy = _SpyEnv(store._env, fail)
    store._env = spy  # type: ignore[assignment]
    return spy


def _put(i: int) -> Callable[[Any], None]:
    return lambda t: t.kv_set("ns", f"k{i}", b"v%d" % i)


def _wait(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def _flusher_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("torpor-lmdb-flush")]


# -- choosing a level ---------------------------------------------------------------------
def test_default_is_sync(tmp_path: Path) -> None:
    assert DURABILITY_LEVELS == ("sync", "process")
    with LmdbStore.open(tmp_path / "s") as store:
        assert store.durability == "sync"
        # MDB_NOSYNC: the store syncs each commit itself, once (LMDB's own commit would flush twice)
        assert store._env.flags()["sync"] is False and store._env.flags()["writemap"] is False
        spy = _spy(store)
        for i in range(3):
            store.transact(_put(i))
            assert spy.syncs == [True] * (i + 1), "one forced sync per commit, before it returns"
        assert store.unflushed_commits == 0 and store.flushed_commits == store.commits == 3
        assert not _flusher_threads()


def test_lazy_commits_are_synced_in_the_background_and_never_run_two_ahead(tmp_path: Path) -> None:
    """``sync="soon"`` at ``sync``: the commit returns unsynced and the background syncer
    syncs it; a write transaction begins only once every commit but the last is synced
    (checked at every begin, with a sync slow enough that commits catch up with it);
    ``settle`` syncs only when something is unsynced; ``close`` syncs what is left."""
    store = LmdbStore.open(tmp_path / "s")
    spy = _spy(store)
    real_sync = spy.sync

    release = threading.Event()  # holds the first sync until the lazy commit has returned

    def slow_sync(force: bool = False) -> None:
        release.wait(30)
        time.sleep(0.01)
        real_sync(force)

    spy.sync = slow_sync  # type: ignore[method-assign]
    behind: list[int] = []
    real_begin = spy.begin

    def begin(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("write") and kwargs.get("parent") is None:
            behind.append(store.commits - store.flushed_commits)
        return real_begin(*args, **kwargs)

    spy.begin = begin  # type: ignore[method-assign]
    store.transact(_put(1), sync="soon")
    assert store.unflushed_commits == 1, "a lazy commit does not wait for its sync"
    release.set()
    assert _wait(lambda: store.unflushed_commits == 0) and spy.syncs == [True]
    for i in range(2, 12):
        store.transact(_put(i), sync="soon" if i % 3 else "later")
    assert behind and max(behind) <= 1, behind
    assert _wait(lambda: store.unflushed_commits == 0)
    syncs = len(spy.syncs)
    store.settle()
    assert len(spy.syncs) == syncs, "nothing unsynced: settle costs no I/O"
    store.transact(_put(12))  # durable: synced before it returns, whatever is in the background
    assert store.unflushed_commits == 0
    store.transact(_put(13), sync="later")
    store.close()
    assert store.unflushed_commits == 0
    with LmdbStore.open(tmp_path / "s", readonly=True) as ro, ro.read() as r:
        assert [r.kv_get("ns", f"k{i}") for i in range(1, 14)] == [b"v%d" % i for i in range(1, 14)]


def test_a_failed_background_sync_fails_the_next_commit(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """At ``sync`` a ``sync="soon"`` commit's background sync that fails is not lost in its
    thread: the next commit raises StoreFlushError (sticky: a retried fsync proves nothing)."""
    store = LmdbStore.open(tmp_path / "s")
    _spy(store, fail=lmdb.Error("mdb_env_sync: Input/output error"))
    with caplog.at_level(logging.ERROR, logger="torpor.store"):
        store.transact(_put(1), sync="soon")
        assert _wait(lambda: store._flush_error is not None)
    with pytest.raises(StoreFlushError, match="Input/output error"):
        store.transact(_put(2))
    with pytest.raises(StoreFlushError):
        store.close()


def test_concurrent_writers_share_syncs_through_the_group_committer(tmp_path: Path) -> None:
    """At ``sync`` many threads' commits go through the committer's batches: fewer syncs than
    commits, and every Future resolves only after a sync that covers it."""
    with LmdbStore.open(tmp_path / "s") as store, GroupCommitter(store, max_delay_s=0.005) as gc:
        spy = _spy(store)
        synced_at: list[int] = []
        real_sync = spy.sync

        def sync(force: bool = False) -> None:
            real_sync(force)
            synced_at.append(store.commits)

        spy.sync = sync  # type: ignore[method-assign]
        futs = []
        threads = [threading.Thread(target=lambda i=i: futs.append(gc.submit(_put(i)))) for i in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for f in futs:
            f.result(timeout=30)
        assert gc.items == 64 and len(spy.syncs) == gc.batches < 64
        assert synced_at[-1] == store.commits and store.unflushed_commits == 0


def test_process_level_is_nosync_without_writemap(tmp_path: Path) -> None:
    with LmdbStore.open(tmp_path / "s", durability="process") as store:
        flags = store._env.flags()
        assert store.durability == "process"
        assert flags["sync"] is False and flags["writemap"] is False
        assert len(_flusher_threads()) == 1
    assert not _flusher_threads()


def test_env_var_picks_the_level_and_an_argument_overrides_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DURABILITY_ENV, "process")
    with LmdbStore.open(tmp_path / "a") as store:
        assert store.durability == "process"
    with LmdbStore.open(tmp_path / "b", durability="sync") as store:
        assert store.durability == "sync"
    monkeypatch.setenv(DURABILITY_ENV, "")
    with LmdbStore.open(tmp_path / "c") as store:
        assert store.durability == "sync"


@pytest.mark.parametrize("bad", ["fast", "SYNC", "", "none"])
def test_unknown_levels_are_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(StoreConfigError, match=r"durability must be one of sync, process") as info:
        LmdbStore.open(tmp_path / "s", durability=bad)
    assert isinstance(info.value, ValueError) and info.value.code == "invalid_config"
    assert not (tmp_path / "s").exists()  # refused before anything was created


def test_env_var_typos_are_refused_naming_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DURABILITY_ENV, "proccess")
    with pytest.raises(StoreConfigError, match=r"\$TORPOR_DURABILITY must be one of sync, process.*'proccess'"):
        LmdbStore.open(tmp_path / "s")


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "1"])
def test_bad_flush_intervals_are_refused(tmp_path: Path, bad: Any) -> None:
    with pytest.raises(StoreConfigError, match="flush_interval_s must be a positive number"):
        LmdbStore.open(tmp_path / "s", durability="process", flush_interval_s=bad)


def test_a_waited_run_syncs_once_and_a_tool_is_dispatched_on_a_durable_intent(bundles: BundleFactory,
                                                                               tmp_path: Path) -> None:
    """At ``sync``: ``Host.run`` of ``hello`` (no tool calls) commits its spawn unsynced and its
    end durably: two commits, one sync. A run of ``steps`` (``kv.incr``, transactional) ends
    with everything synced, its calls' syncs made in the background."""
    import anyio

    from host.sandbox import bundle as bundle_mod

    hello = bundle_mod.load(bundles.example("hello"))
    steps = bundle_mod.load(bundles.example("steps"))
    with Host(tmp_path / "h") as host:
        store = host.store
        assert isinstance(store, LmdbStore)
        anyio.run(lambda: host.run(hello, {"name": "warm"}))  # loads and compiles, records the bundle
        spy = _spy(store)
        commits = store.commits
        r = anyio.run(lambda: host.run(hello, {"name": "ada"}))
        assert r.status == "completed"
        assert (store.commits - commits, spy.syncs) == (2, [True]), "a waited run: spawn and end, one sync"
        assert store.unflushed_commits == 0
        r = anyio.run(lambda: host.run(steps, {"n": 20}))
        assert r.status == "completed" and r.output == {"sum": 210, "last": 20}
        assert store.unflushed_commits == 0, "a run's end covers its calls' background syncs"


def test_host_passes_the_level_to_its_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Host(tmp_path / "default") as host:
        assert isinstance(host.store, LmdbStore) and host.store.durability == "sync"
    with Host(tmp_path / "process", durability="process") as host:
        assert isinstance(host.store, LmdbStore) and host.store.durability == "process"
    monkeypatch.setenv(DURABILITY_ENV, "process")
    with Host(tmp_path / "env") as host:
        assert isinstance(host.store, LmdbStore) and host.store.durability == "process"
    with pytest.raises(ConfigError, match="must be one of sync, process"):
        Host(tmp_path / "bad", durability="everysec")
    with LmdbStore.open(tmp_path / "own") as own, pytest.raises(ConfigError, match="durability applies"):
        Host(tmp_path / "own-host", store=own, durability="process")


def test_cli_flag_reaches_the_store(tmp_path: Path) -> None:
    parser = cli.build_parser()
    for argv, level in ((["run", "x.torpor"], "sync"), (["run", "x.torpor", "--durability", "process"], "process"),
                        (["resume", "--all", "--durability", "process"], "process")):
        args = parser.parse_args([*argv, "--store", str(tmp_path / "s")])
        host = cli._host(args) if argv[0] == "run" else None
        if host is None:  # only `run` may create a store
            LmdbStore.open(tmp_path / "s" / "db").close()
            host = cli._host(args)
        try:
            assert host.store.durability == level
        finally:
            host.close()


def test_cli_refuses_bad_levels(tmp_path: Path) -> None:
    LmdbStore.open(tmp_path / "db").close()
    run = subprocess.run([sys.executable, "-m", "host.cli", "resume", "--all", "--store", str(tmp_path),
                          "--durability", "fsync"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert run.returncode == 2 and "invalid choice: 'fsync'" in run.stderr
    env = {**os.environ, DURABILITY_ENV: "later"}
    ps = subprocess.run([sys.executable, "-m", "host.cli", "ps", "--store", str(tmp_path), "--json"],
                        capture_output=True, text=True, cwd=ROOT, timeout=60, env=env)
    assert ps.returncode == 2, ps.stderr
    err = json.loads(ps.stdout)["error"]
    assert err["code"] == "invalid_config" and "sync, process" in err["message"]


# -- flushing -------------------------------------------------------------------------------
def test_flusher_syncs_what_was_committed_and_idles_otherwise(tmp_path: Path) -> None:
    with LmdbStore.open(tmp_path / "s", durability="process", flush_interval_s=0.05) as store:
        spy = _spy(store)
        before = time.time()
        for i in range(3):
            store.transact(_put(i))
        assert _wait(lambda: store.unflushed_commits == 0)
        assert store.flushes >= 1 and store.flushed_commits == store.commits == 3
        assert store.last_flush is not None and store.last_flush >= before
        assert spy.syncs and all(spy.syncs), "a flush must force: sync(False) is a no-op under MDB_NOSYNC"
        flushes = store.flushes
        time.sleep(0.3)  # six intervals with nothing committed: no I/O
        assert store.flushes == flushes
        store.transact(_put(9))
        assert _wait(lambda: store.flushes == flushes + 1 and store.unflushed_commits == 0)


def test_close_flushes_and_stops_the_flusher(tmp_path: Path) -> None:
    store = LmdbStore.open(tmp_path / "s", durability="process", flush_interval_s=3600)
    spy = _spy(store)
    for i in range(3):
        store.transact(_put(i))
    assert (store.flushes, store.unflushed_commits) == (0, 3)
    store.close()
    assert spy.syncs == [True]
    assert (store.flushes, store.unflushed_commits) == (1, 0)
    assert not _flusher_threads()
    store.close()  # idempotent: no second flush
    assert spy.syncs == [True]


def test_explicit_flush_at_both_levels(tmp_path: Path) -> None:
    for level in DURABILITY_LEVELS:
        with LmdbStore.open(tmp_path / level, durability=level, flush_interval_s=3600) as store:
            store.transact(_put(1))
            store.flush()
            # at sync the commit synced itself, then the flush once more
            assert store.flushes == (2 if level == "sync" else 1) and store.unflushed_commits == 0
    with LmdbStore.open(tmp_path / "sync", readonly=True) as ro, pytest.raises(StoreUnavailable, match="read-only"):
        ro.flush()


@pytest.mark.parametrize(("error", "says"), [
    (lmdb.Error("mdb_env_sync: Input/output error"), "Input/output error"),
    (lmdb.DiskError("mdb_env_sync: No space left on device"), "the disk is full"),
])
def test_a_failed_flush_fails_the_next_commit(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                              error: lmdb.Error, says: str) -> None:
    path = tmp_path / "s"
    store = LmdbStore.open(path, durability="process", flush_interval_s=0.02)
    spy = _spy(store, fail=error)
    committer = GroupCommitter(store)
    with caplog.at_level(logging.ERROR, logger="torpor.store"):
        store.transact(_put(1))
        assert _wait(lambda: bool(spy.syncs))  # the flusher tried, and failed
        assert _wait(lambda: not _flusher_threads())  # ...and stopped trying
    assert any(says in r.getMessage() for r in caplog.records)
    with pytest.raises(StoreFlushError, match=says) as info:
        store.transact(_put(2))
    assert "1 commit(s) of this process since the last successful flush" in str(info.value)
    assert info.value.__cause__ is error
    with pytest.raises(StoreFlushError):  # sticky: a retried fsync proves nothing
        committer.submit(_put(3)).result(timeout=10)
    with pytest.raises(StoreFlushError):
        store.flush()
    with store.read() as r:  # reads still work, and see the unflushed commit
        assert r.kv_get("ns", "k1") == b"v1" and r.kv_get("ns", "k2") is None
    committer.close()
    with pytest.raises(StoreFlushError):
        store.close()
    with LmdbStore.open(path) as again, again.read() as r:  # closed despite the error
        assert r.kv_get("ns", "k1") == b"v1"


def test_a_failed_final_flush_is_raised_by_close(tmp_path: Path) -> None:
    store = LmdbStore.open(tmp_path / "s", durability="process", flush_interval_s=3600)
    store.transact(_put(1))
    _spy(store, fail=lmdb.Error("mdb_env_sync: Input/output error"))
    with pytest.raises(StoreFlushError, match="Input/output error"):
        store.close()
    LmdbStore.open(tmp_path / "s").close()


def test_flusher_keeps_up_with_map_growth_and_many_writers(tmp_path: Path) -> None:
    """Flushes every millisecond while four threads grow the map and one flushes from inside
    read transactions: no crash, no deadlock (flushes wait at the gate before the lock),
    nothing lost."""
    store = LmdbStore.open(tmp_path / "s", durability="process", flush_interval_s=0.001, map_size=64 * 1024)
    pad = os.urandom(1500)

    def writer(w: int) -> None:
        for i in range(150):
            store.transact(lambda t, i=i: t.kv_set("pad", f"{w}-{i}", pad))

    def reader_flushing() -> None:
        for _ in range(50):
            with store.read() as r:
                r.kv_keys("pad")
                store.flush()

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    threads.append(threading.Thread(target=reader_flushing))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive(), "deadlock between flushes, transactions and map growth"
    assert store.grows >= 1 and store.flushes >= 50
    store.close()
    assert store.unflushed_commits == 0
    with LmdbStore.open(tmp_path / "s") as again, again.read() as r:
        assert len(r.kv_keys("pad")) == 600


# -- processes ------------------------------------------------------------------------------
WRITER = textwrap.dedent(
    """
    import sys
    from snapshots import LmdbStore

    store = LmdbStore.open(sys.argv[1], durability="process", flush_interval_s=3600)
    store.transact(lambda t: (t.put_checkpoint("agent", 1, b"state-1", 1.0),
                              t.put_agent({"agent_id": "agent", "seq": 1})))
    print("committed", store.flushes, store.unflushed_commits, flush=True)
    sys.stdin.readline()  # the other process has written at the sync level
    with store.read() as r:
        print("sees", r.kv_get("ns", "from-sync").decode(), flush=True)
    sys.stdin.readline()  # never comes: SIGKILL
    """
)


def test_process_level_commits_are_visible_at_once_and_survive_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "shared"
    LmdbStore.open(path).close()
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        # Never flushed (interval one hour), yet this process reads it: one page cache.
        assert proc.stdout.readline().split() == ["committed", "0", "1"]
        with LmdbStore.open(path, durability="sync") as other:  # two levels on one store at once
            with other.read() as r:
                assert r.get_checkpoint("agent", 1) == b"state-1"
            other.transact(lambda t: t.kv_set("ns", "from-sync", b"ok"))
            proc.stdin.write("go\n")
            proc.stdin.flush()
            assert proc.stdout.readline().split() == ["sees", "ok"]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    with LmdbStore.open(path, durability="process") as store:
        with store.read() as r:
            assert r.get_checkpoint("agent", 1) == b"state-1"
            assert r.get_agent("agent") == {"agent_id": "agent", "seq": 1}
            assert r.kv_get("ns", "from-sync") == b"ok"
        store.transact(lambda t: t.put_checkpoint("agent", 2, b"state-2", 2.0))  # writer not wedged


LAZY_WRITER = textwrap.dedent(
    """
    import sys
    from snapshots import LmdbStore

    store = LmdbStore.open(sys.argv[1], durability="sync")
    for i in range(2):  # two commits left unsynced (its first write syncs what it found, if anything)
        store.transact(lambda t, i=i: t.kv_set("child", f"k{i}", b"v"), sync="later")
    print("unsynced", store.unflushed_commits, flush=True)
    sys.stdin.readline()
    store.close()
    """
)


def test_a_write_after_another_processs_unsynced_commits_syncs_them_first(tmp_path: Path) -> None:
    """At ``sync`` a write transaction begins only once the commit two before it is on
    stable storage, whichever process made it: LMDB reuses pages freed two commits back, so
    writing over another process's unsynced commits could tear the tree the disk's meta page
    names. The other process's syncs are not seen here, so the transaction syncs first,
    under LMDB's writer lock; a second one, with nothing of another process in doubt, does not."""
    path = tmp_path / "shared"
    store = LmdbStore.open(path, durability="sync")
    try:
        store.transact(lambda t: t.kv_set("parent", "k0", b"v"))  # durable: synced before it returns
        spy = _spy(store)
        proc = subprocess.Popen([sys.executable, "-c", LAZY_WRITER, str(path)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            assert proc.stdout is not None and proc.stdin is not None
            assert proc.stdout.readline().split() == ["unsynced", "2"]
            store.transact(lambda t: t.kv_set("parent", "k1", b"v"), sync="later")
            assert spy.syncs == [True], "the other process's unsynced commits are synced before writing"
            assert store.interleaved_syncs == 1
            store.transact(lambda t: t.kv_set("parent", "k2", b"v"), sync="later")
            assert spy.syncs == [True], "its own single unsynced commit asks for no sync"
            proc.stdin.write("done\n")
            proc.stdin.flush()
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    finally:
        store.close()
    with LmdbStore.open(path) as again, again.read() as r:
        assert [r.kv_get("child", f"k{i}") for i in range(2)] == [b"v", b"v"]
        assert [r.kv_get("parent", f"k{i}") for i in range(3)] == [b"v", b"v", b"v"]


DURABLE_WRITER = textwrap.dedent(
    """
    import sys
    from snapshots import LmdbStore

    with LmdbStore.open(sys.argv[1], durability="sync") as store:
        for i in range(3):
            store.transact(lambda t, i=i: t.kv_set("child", f"k{i}", b"v"))  # each synced before it returns
    print("synced", flush=True)
    """
)


def test_another_processs_syncs_are_known_through_the_shared_mark(tmp_path: Path) -> None:
    """What another process's syncs covered is read from the store's shared record
    (``snapshots.synced_mark``), so a transaction after its durable commits does not sync
    them again; a record of another data file (an older copy restored in place: its
    transaction ids are behind the record's), or one that is damaged, is not believed."""
    from snapshots.synced_mark import FILE_NAME, SyncedMark

    path = tmp_path / "shared"
    store = LmdbStore.open(path, durability="sync")
    try:
        store.transact(lambda t: t.kv_set("parent", "k0", b"v"))
        spy = _spy(store)
        out = subprocess.run([sys.executable, "-c", DURABLE_WRITER, str(path)], capture_output=True, text=True,
                             cwd=ROOT, timeout=60)
        assert out.stdout.split() == ["synced"], out.stderr
        store.transact(lambda t: t.kv_set("parent", "k1", b"v"), sync="later")
        assert spy.syncs == [] and store.interleaved_syncs == 0, "the child's own syncs covered its commits"
    finally:
        store.close()
    mark = SyncedMark.open(path)
    assert mark is not None and mark.read() > 0
    mark.covered(10**9)  # more than this data file ever committed: a record of some other history
    mark.close()
    store = LmdbStore.open(path, durability="sync")
    try:
        spy = _spy(store)
        store.transact(lambda t: t.kv_set("parent", "k2", b"v"), sync="later")
        assert spy.syncs == [True] and store.interleaved_syncs == 1, "a record ahead of the file is not believed"
    finally:
        store.close()
    (path / FILE_NAME).write_bytes(b"short")
    assert SyncedMark.open(path) is None  # damaged: each process relies on its own syncs
    with LmdbStore.open(path, durability="sync") as again:
        again.transact(lambda t: t.kv_set("parent", "k4", b"v"))
        with again.read() as r:
            assert r.kv_get("parent", "k4") == b"v"


EXITS = textwrap.dedent(
    """
    import sys
    from snapshots import LmdbStore

    store = LmdbStore.open(sys.argv[1], durability="process", flush_interval_s=0.01)
    store.transact(lambda t: t.kv_set("ns", "k", b"v"))
    print("done", flush=True)
    # no close(): the daemon flusher must not keep the interpreter alive
    """
)


def test_flusher_does_not_keep_the_process_alive(tmp_path: Path) -> None:
    # A flusher that kept the interpreter alive would never let it exit: the timeout says so.
    out = subprocess.run([sys.executable, "-c", EXITS, str(tmp_path / "s")], capture_output=True, text=True,
                         cwd=ROOT, timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == "done", out.stderr
    with LmdbStore.open(tmp_path / "s") as store, store.read() as r:
        assert r.kv_get("ns", "k") == b"v"
