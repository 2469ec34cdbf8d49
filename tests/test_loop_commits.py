"""Commits made on the event loop's thread (host.runtime.commits._LoopCommits), on a real LMDB store.

A ``"now"`` commit returns only once a sync covered it (its durable ack, from the store's
background syncer); commits that arrive while the store cannot begin a transaction go
together into one; a function that raises fails only its own commit; a failed sync fails
every commit waiting on it.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import anyio
import lmdb
import pytest

from host.runtime.commits import AgentCommits
from snapshots.errors import StoreFlushError
from snapshots.group_commit import GroupCommitter
from snapshots.lmdb_store import DURABILITY_ENV, LmdbStore


@pytest.fixture(autouse=True)
def _no_env_level(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DURABILITY_ENV, raising=False)


class _SlowSyncEnv:
    """The store's environment, its syncs slowed (so that commits pile up behind one) or failed."""

    def __init__(self, env: lmdb.Environment, delay_s: float = 0.0) -> None:
        self._env = env
        self.delay_s = delay_s
        self.fail: BaseException | None = None
        self.syncs = 0
        self.threads: set[str] = set()

    def sync(self, force: bool = False) -> None:
        self.syncs += 1
        self.threads.add(threading.current_thread().name)
        if self.fail is not None:
            raise self.fail
        threading.Event().wait(self.delay_s)
        self._env.sync(force)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._env, name)


def _slow(store: LmdbStore, delay_s: float) -> _SlowSyncEnv:
    env = _SlowSyncEnv(store._env, delay_s)
    store._env = env  # type: ignore[assignment]
    return env


def test_a_now_commit_is_made_on_the_loop_and_acknowledged_once_synced(tmp_path: Path) -> None:
    with LmdbStore.open(tmp_path / "s") as store, GroupCommitter(store) as committer:
        env = _slow(store, 0.02)
        commits = AgentCommits(committer)
        loop_thread: list[str] = []

        def put(txn: Any) -> int:
            loop_thread.append(threading.current_thread().name)
            txn.kv_set("ns", "k", b"v")
            return 7

        async def main() -> None:
            assert await commits.run(put, "now") == 7
            # acknowledged: a sync covered it (the syncer's, not the loop's own thread)
            assert store.unflushed_commits == 0
            assert await commits.run(put, "soon") == 7  # not waited for: made, its sync under way
            assert store.commits - store.flushed_commits <= 1

        anyio.run(main)
        assert loop_thread == [threading.current_thread().name] * 2, "committed on the loop's thread"
        assert committer.items == 0, "the group committer's writer thread was not used"
        assert env.syncs >= 1 and threading.current_thread().name not in env.threads


def test_commits_behind_a_sync_share_one_transaction_and_one_sync(tmp_path: Path) -> None:
    with LmdbStore.open(tmp_path / "s") as store, GroupCommitter(store) as committer:
        env = _slow(store, 0.05)
        commits = AgentCommits(committer)
        values: dict[int, int] = {}

        def incr(i: int) -> Any:
            def fn(txn: Any) -> int:
                if i == 13:
                    txn.kv_set("ns", "poison", b"x")
                    raise ValueError("function 13 fails alone")
                return txn.kv_incr("ns", "n")
            return fn

        async def one(i: int) -> None:
            try:
                values[i] = await commits.run(incr(i), "now")
            except ValueError:
                values[i] = -1

        async def main() -> None:
            async with anyio.create_task_group() as tg:
                for i in range(40):
                    tg.start_soon(one, i)

        before = store.commits
        anyio.run(main)
        assert values[13] == -1
        assert sorted(v for i, v in values.items() if i != 13) == list(range(1, 40)), "each counted once"
        assert store.commits - before < 10, "40 commits went in a few transactions"
        assert env.syncs < 10
        assert store.unflushed_commits == 0
        with store.read() as txn:
            assert txn.kv_get("ns", "n") == b"39" and txn.kv_get("ns", "poison") is None


def test_a_failed_sync_fails_the_commits_waiting_for_it(tmp_path: Path) -> None:
    store = LmdbStore.open(tmp_path / "s")
    committer = GroupCommitter(store)
    try:
        env = _slow(store, 0.0)
        commits = AgentCommits(committer)
        env.fail = lmdb.Error("injected: the disk said no")

        async def main() -> None:
            with anyio.fail_after(10):
                with pytest.raises(StoreFlushError, match="injected"):
                    await commits.run(lambda txn: txn.kv_set("ns", "k", b"v"), "now")
                with pytest.raises(StoreFlushError):  # and the store makes no more commits
                    await commits.run(lambda txn: txn.kv_set("ns", "k2", b"v"), "now")

        anyio.run(main)
    finally:
        committer.close()
        with pytest.raises(StoreFlushError):
            store.close()


def test_at_process_a_commit_is_acknowledged_when_made(tmp_path: Path) -> None:
    with LmdbStore.open(tmp_path / "s", durability="process", flush_interval_s=3600) as store, \
            GroupCommitter(store) as committer:
        commits = AgentCommits(committer)

        async def main() -> None:
            for i in range(5):
                await commits.run(lambda txn, i=i: txn.kv_set("ns", f"k{i}", b"v"), "now")

        anyio.run(main)
        assert store.unflushed_commits == 5 and store.flushes == 0


def test_a_finished_loop_is_not_kept(tmp_path: Path) -> None:
    import gc

    with LmdbStore.open(tmp_path / "s") as store, GroupCommitter(store) as committer:
        commits = AgentCommits(committer)
        for i in range(3):
            anyio.run(commits.run, lambda txn, i=i: txn.kv_set("ns", f"k{i}", b"v"), "now")
        gc.collect()
        assert len(commits._loops) == 0, "each run's loop and its committer went with it"
