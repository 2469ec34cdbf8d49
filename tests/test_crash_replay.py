"""Checkpoints only every K calls: SIGKILL between them, resume, and the journal replays the rest.

With ``$TORPOR_CHECKPOINT_EVERY`` above 1, a ``kv.incr`` call between checkpoints writes its
journal entry, its effect and its audit only (:meth:`ToolCallPipeline.journal_only`); after a
crash the guest is re-executed from its last checkpoint and fed the journaled answers
(:meth:`ToolCallPipeline.replayed`). The host is killed once the store holds a random number
of journal entries (watched from outside through LMDB), so most kills land between two
checkpoints; ``torpor resume --all`` must finish with the exact sum and last value (a call run
again would change both), one journal entry and one ``tool.answered`` audit record per call,
and the agent's ``tool_calls`` equal to N (nothing counted twice). A guest whose re-execution
does not make the journaled call is parked ``corrupt`` with ``replay_diverged``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import anyio
import pytest
from conftest import BundleFactory, store_entries
from test_crash_resume import _cli

from host.runtime import tool_call
from host.runtime.host import Host
from host.sandbox import bundle as bundle_mod
from host.trust import audit
from snapshots.format import decode_snapshot

N, EVERY = 300, 32


def cut_mid_run(host: Host, b: bundle_mod.Bundle, calls: int) -> str:
    """Run the steps agent ``b`` on ``host`` and cut its run once it has journaled ``calls``
    calls, as a crash would: its commits stay. The agent's id."""

    def journaled() -> int:
        with host.store.read() as txn:
            return sum(len(list(txn.iter_journal(r["agent_id"]))) for r in host.list_agents())

    async def cut() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: host.run(b, {"n": 100_000}))
            deadline = time.monotonic() + 60
            while journaled() < calls and time.monotonic() < deadline:
                await anyio.sleep(0.005)
            tg.cancel_scope.cancel()

    anyio.run(cut)
    (agent_id,) = [r["agent_id"] for r in host.list_agents()]
    return agent_id


def _latest_checkpoint_call(host: Host, agent_id: str) -> int:
    b = host.loader.by_digest(host.get_agent(agent_id)["bundle_digest"])
    pristine = host.loader.module(b)[0].image
    with host.store.read() as txn:
        seq = txn.latest_checkpoint(agent_id)
        assert seq is not None
        snap = decode_snapshot(txn.get_checkpoint(agent_id, seq), pristine=pristine, chunks_from=txn.get_chunk)
    return int(snap.pending["seq"])


@pytest.mark.parametrize(("durability", "trials"), [("sync", 4), ("process", 2)])
def test_sigkill_between_checkpoints_then_resume(bundles: BundleFactory, tmp_path: Path, durability: str,
                                                 trials: int) -> None:
    bundle = str(bundles.example("steps"))
    rng = random.Random(42)
    env = {**os.environ, "TORPOR_DURABILITY": durability, "TORPOR_CHECKPOINT_EVERY": str(EVERY)}
    warm = tmp_path / "warm"
    subprocess.run(_cli("run", bundle, "--input", json.dumps({"n": 0}), "--store", str(warm), "--json"),
                   check=True, capture_output=True, timeout=300, env=env)
    between = 0
    for trial in range(trials):
        store = tmp_path / f"s{trial}"
        shutil.copytree(warm / "cache", store / "cache")
        proc = subprocess.Popen(_cli("run", bundle, "--input", json.dumps({"n": N}), "--store", str(store), "--json"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        target = rng.randint(EVERY // 2, N // 2)
        deadline = time.monotonic() + 60
        while proc.poll() is None and store_entries(store / "db", b"journal") < target and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(rng.uniform(0, 0.002))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)

        host = Host(store, durability=durability)
        try:
            (agent_id,) = [r["agent_id"] for r in host.list_agents()]
            with host.store.read() as txn:
                journaled = max(seq for seq, _ in txn.iter_journal(agent_id))
            at_checkpoint = _latest_checkpoint_call(host, agent_id)
            finished = host.get_agent(agent_id)["status"] == "completed"  # the run beat its kill
        finally:
            host.close()
        between += not finished and journaled > at_checkpoint  # the kill left calls only the journal holds

        res = subprocess.run(_cli("resume", "--all", "--store", str(store), "--json"), capture_output=True,
                             text=True, timeout=120, env=env)
        assert res.returncode == 0, res.stderr[-2000:]
        assert len(json.loads(res.stdout)) == (0 if finished else 1), res.stdout

        host = Host(store, durability=durability)
        try:
            rec = host.get_agent(agent_id)
            assert rec["status"] == "completed", (trial, rec.get("error"))
            assert rec["output"] == {"sum": N * (N + 1) // 2, "last": N}, (trial, rec["output"])
            assert rec["usage"]["tool_calls"] == N  # no call counted twice
            assert rec["checkpoints"] < N // 4  # a checkpoint every EVERY calls (and at each resume's first)
            with host.store.read() as txn:
                assert [seq for seq, _ in txn.iter_journal(agent_id)] == list(range(1, N + 1))
            answered = [r["call_seq"] for r in audit.records(host.store, agent_id) if r["kind"] == "tool.answered"]
            assert sorted(answered) == list(range(1, N + 1))  # no audit record written twice
            assert audit.verify_store(host.store, agent_id=agent_id).ok
        finally:
            host.close()
    assert between >= trials - 1, f"only {between} of {trials} kills landed between checkpoints"


def test_a_diverging_reexecution_is_replay_diverged(bundles: BundleFactory, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A journal entry past the checkpoint whose arguments the guest does not make again: the
    resumed agent is parked ``corrupt`` with ``replay_diverged``, no answer fed, nothing run."""
    monkeypatch.setattr(tool_call, "CHECKPOINT_EVERY_S", 3600.0)  # the window is counted in calls alone
    b = bundle_mod.load(bundles.example("steps"))
    host = Host(tmp_path / "store", checkpoint_every=1000)
    try:
        agent_id = cut_mid_run(host, b, 10)
        at_checkpoint = _latest_checkpoint_call(host, agent_id)
        with host.store.read() as txn:
            journaled = max(seq for seq, _ in txn.iter_journal(agent_id))
            entry = txn.get_journal(agent_id, journaled)
        assert journaled > at_checkpoint + 2, (journaled, at_checkpoint)
        host.store.transact(lambda txn: txn.put_journal(agent_id, journaled, {**entry, "args": {"key": "other"}}))
        counter_before = host.get_agent(agent_id)["usage"]["tool_calls"]
        result = anyio.run(lambda: host.resume(agent_id))
        assert result.status == "corrupt"
        assert result.error is not None and result.error["code"] == "replay_diverged", result.error
        assert f"call {journaled}" in result.error["message"]
        assert host.get_agent(agent_id)["usage"]["tool_calls"] == counter_before  # nothing ran or counted
    finally:
        host.close()


def test_checkpoint_every_is_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A window that is not a whole number >= 1 is refused before anything is opened."""
    from host.errors import ConfigError

    for bad in (0, -3):
        with pytest.raises(ConfigError, match="checkpoint_every"):
            Host(tmp_path / "a", checkpoint_every=bad)
    monkeypatch.setenv("TORPOR_CHECKPOINT_EVERY", "lots")
    with pytest.raises(ConfigError, match="TORPOR_CHECKPOINT_EVERY"):
        Host(tmp_path / "b")
    monkeypatch.setenv("TORPOR_CHECKPOINT_EVERY", "16")
    with Host(tmp_path / "c") as host:
        assert host.calls.checkpoint_every == 16
    assert not (tmp_path / "a" / "db").exists()
