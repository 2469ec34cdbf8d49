"""GroupCommitter: many transaction functions, few durable commits, isolated failures."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from snapshots import GroupCommitter, LmdbStore, StoreError, StoreFull, WriteTxn


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LmdbStore]:
    with LmdbStore.open(tmp_path / "store") as s:
        yield s


def hibernate(agent_id: str, blob: bytes) -> Any:
    def fn(t: WriteTxn) -> str:
        t.put_checkpoint(agent_id, 1, blob, 1.0)
        t.put_agent({"agent_id": agent_id, "state": "hibernated", "seq": 1})
        return agent_id

    return fn


def test_batches_many_into_few_commits(store: LmdbStore) -> None:
    blob = os.urandom(300)
    before = store.commits
    with GroupCommitter(store, max_batch=256) as gc:
        futures = [gc.submit(hibernate(f"agent-{i:05d}", blob)) for i in range(2000)]
        assert [f.result(timeout=30) for f in futures] == [f"agent-{i:05d}" for i in range(2000)]
        assert gc.items == 2000
        assert gc.batches < 200  # 2000 functions, far fewer commits
        assert store.commits - before == gc.batches
    with store.read() as r:
        assert len(list(r.iter_agents())) == 2000
        assert r.get_checkpoint("agent-01999", 1) == blob


def test_failure_fails_only_its_own_future(store: LmdbStore) -> None:
    gate = threading.Event()
    with GroupCommitter(store, max_batch=64, max_delay_s=0.05) as gc:
        # Hold the writer so that all of these land in one batch.
        blocker = gc.submit(lambda t: gate.wait(5))
        ok1 = gc.submit(hibernate("ok-1", b"a"))

        def half_then_fail(t: WriteTxn) -> None:
            t.put_agent({"agent_id": "ghost"})
            raise RuntimeError("tool policy said no")

        bad = gc.submit(half_then_fail)
        dup = gc.submit(lambda t: t.put_checkpoint("ok-1", 1, b"again", 2.0))  # CheckpointExists
        ok2 = gc.submit(hibernate("ok-2", b"b"))
        gate.set()
        assert blocker.result(timeout=10) is True
        assert ok1.result(timeout=10) == "ok-1" and ok2.result(timeout=10) == "ok-2"
        with pytest.raises(RuntimeError, match="policy said no"):
            bad.result(timeout=10)
        with pytest.raises(StoreError, match="immutable"):
            dup.result(timeout=10)
    with store.read() as r:
        assert r.get_agent("ghost") is None  # the failed function's own write rolled back
        assert r.get_checkpoint("ok-1", 1) == b"a"
        assert r.get_agent("ok-2") is not None


def test_one_batch_when_queued_together(store: LmdbStore) -> None:
    gate = threading.Event()
    with GroupCommitter(store, max_batch=512) as gc:
        first = gc.submit(lambda t: gate.wait(5))
        futures = [gc.submit(hibernate(f"a{i}", b"x")) for i in range(300)]
        batches_before = gc.batches
        gate.set()
        first.result(timeout=10)
        for f in futures:
            f.result(timeout=10)
        assert gc.batches - batches_before <= 2  # the 300 queued ones share one commit


def test_close_flushes_and_refuses_new_work(store: LmdbStore) -> None:
    gc = GroupCommitter(store)
    futures = [gc.submit(hibernate(f"f{i}", b"x")) for i in range(100)]
    gc.close()
    assert all(f.done() and f.exception() is None for f in futures)
    with pytest.raises(StoreError, match="closed"):
        gc.submit(hibernate("late", b"x"))
    gc.close()


def test_map_growth_inside_a_batch(tmp_path: Path) -> None:
    with LmdbStore.open(tmp_path / "tiny", map_size=64 * 1024) as s, GroupCommitter(s) as gc:
        blob = os.urandom(1000)
        futures = [gc.submit(hibernate(f"g{i:04d}", blob)) for i in range(500)]
        for f in futures:
            f.result(timeout=30)
        assert s.grows >= 1
        with s.read() as r:
            assert len(list(r.iter_agents())) == 500


def test_store_failure_fails_the_whole_batch(
    store: LmdbStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(fns: Any, sync: str = "now") -> Any:
        raise StoreFull("disk full (simulated)")

    with GroupCommitter(store) as gc:
        monkeypatch.setattr(store, "transact_batch", disk_full)
        futures: list[Future[Any]] = [gc.submit(hibernate(f"x{i}", b"x")) for i in range(3)]
        for f in futures:
            with pytest.raises(StoreFull):
                f.result(timeout=10)
        monkeypatch.undo()
        assert gc.submit(hibernate("after", b"x")).result(timeout=10) == "after"


def test_concurrent_submitters(store: LmdbStore) -> None:
    with GroupCommitter(store) as gc:
        errors: list[BaseException] = []

        def worker(k: int) -> None:
            try:
                for i in range(200):
                    gc.submit(lambda t, i=i: t.kv_incr("c", "n", 1)).result(timeout=30)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
    with store.read() as r:
        assert r.kv_get("c", "n") == b"800"


def test_invalid_parameters(store: LmdbStore) -> None:
    with pytest.raises(ValueError, match="max_batch"):
        GroupCommitter(store, max_batch=0)
    with pytest.raises(ValueError, match="max_delay_s"):
        GroupCommitter(store, max_delay_s=-1)


def _thread_of(agent_id: str) -> Any:
    def fn(t: WriteTxn) -> str:
        t.put_agent({"agent_id": agent_id, "state": "x"})
        return threading.current_thread().name

    return fn


def test_idle_committer_commits_inline_at_process_durability(tmp_path: Path) -> None:
    """No sync to wait for: a lone request is committed on the caller's thread, durably
    written (another reader sees it) before submit returns."""
    with LmdbStore.open(tmp_path / "p", durability="process") as s, GroupCommitter(s) as gc:
        fut = gc.submit(_thread_of("agent-1"))
        assert fut.done() and fut.result() == threading.current_thread().name
        assert gc.inline_commits == 1 and gc.batches == 1
        with s.read() as txn:
            assert txn.get_agent("agent-1") is not None
        # A failing function fails only its Future, inline too, and leaves no writes.
        def boom(t: WriteTxn) -> None:
            t.put_agent({"agent_id": "agent-2", "state": "x"})
            raise ValueError("tool bug")

        bad = gc.submit(boom)
        with pytest.raises(ValueError, match="tool bug"):
            bad.result()
        with s.read() as txn:
            assert txn.get_agent("agent-2") is None


def test_sync_durability_never_commits_on_the_caller(store: LmdbStore) -> None:
    with GroupCommitter(store) as gc:
        assert gc.submit(_thread_of("agent-1")).result(timeout=10) == "torpor-group-commit"
        assert gc.inline_commits == 0


def test_busy_writer_queues_instead_of_committing_inline(tmp_path: Path) -> None:
    with LmdbStore.open(tmp_path / "p", durability="process") as s, GroupCommitter(s) as gc:
        entered, release = threading.Event(), threading.Event()

        def slow(t: WriteTxn) -> str:
            entered.set()
            release.wait(10)
            return threading.current_thread().name

        # The first request commits inline on a helper thread and holds the writer busy.
        first: list[Future[str]] = []
        helper = threading.Thread(target=lambda: first.append(gc.submit(slow)), name="helper")
        helper.start()
        assert entered.wait(10)
        second = gc.submit(_thread_of("agent-3"))
        assert not second.done()  # queued behind the busy commit, not run here
        release.set()
        helper.join(10)
        assert first[0].result(timeout=10) == "helper"
        assert second.result(timeout=10) == "torpor-group-commit"


def test_try_inline_and_commit_without_a_future(tmp_path: Path) -> None:
    """The suspend path's entry points: an Outcome (value or the function's error) when
    the commit ran here, None when it must go to the writer; ``commit`` waits either way."""
    with LmdbStore.open(tmp_path / "p", durability="process") as s, GroupCommitter(s) as gc:
        done = gc.try_inline(_thread_of("agent-1"))
        assert done is not None and done.error is None and done.value == threading.current_thread().name

        def boom(t: WriteTxn) -> None:
            t.put_agent({"agent_id": "agent-2", "state": "x"})
            raise ValueError("tool bug")

        failed = gc.try_inline(boom)
        assert failed is not None and isinstance(failed.error, ValueError)
        with pytest.raises(ValueError, match="tool bug"):
            gc.commit(boom)
        assert gc.commit(_thread_of("agent-3")) == threading.current_thread().name
        assert gc.inline_commits == 4
        with s.read() as txn:
            assert txn.get_agent("agent-1") is not None and txn.get_agent("agent-3") is not None
            assert txn.get_agent("agent-2") is None
    with LmdbStore.open(tmp_path / "s") as s, GroupCommitter(s) as gc:  # sync: never inline
        assert gc.try_inline(_thread_of("agent-4")) is None
        assert gc.commit(_thread_of("agent-4")) == "torpor-group-commit"
        with s.read() as txn:
            assert txn.get_agent("agent-4") is not None
