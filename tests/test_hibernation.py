"""Hibernation through the host: warm and cold paths agree, checkpoints, fork, and what resume refuses."""

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

from host.errors import AgentNotFound, AgentStateError, TorporError
from host.runtime import Host, RunResult
from host.runtime.guest import GuestRunner
from host.sandbox import bundle as bundle_mod


def run(host: Host, b: bundle_mod.Bundle, input: Any = None, **kw: Any) -> RunResult:
    return anyio.run(lambda: host.run(b, input, **kw))


def expected_acc(n: int) -> int:
    acc = 7
    for i in range(n):
        acc = (acc * 31 + i) & ((1 << 64) - 1)
    return acc - (1 << 64) if acc >= 1 << 63 else acc


def test_cold_and_warm_paths_reach_the_same_state(bundles: BundleFactory, tmp_path: Path) -> None:
    b = bundles.load(GUESTS / "slowtool")
    with Host(tmp_path / "warm", warm_idle_s=10.0) as warm:
        w = run(warm, b, {"n": 8, "ms": 20})
        w_info = warm.inspect(w.agent_id)
    with Host(tmp_path / "cold", warm_idle_s=0.001) as cold:
        c = run(cold, b, {"n": 8, "ms": 20})
        c_info = cold.inspect(c.agent_id)
    assert w.status == c.status == "completed", (w.error, c.error)
    assert w.output == c.output == {"acc": expected_acc(8), "calls": 8}
    assert w_info["usage"]["hibernations"] == 0
    assert c_info["usage"]["hibernations"] == 8  # released at every wait, rebuilt from its snapshot
    assert c.checkpoints == w.checkpoints == 8


def test_memory_pressure_sends_waiting_agents_cold(bundles: BundleFactory, tmp_path: Path) -> None:
    b = bundles.load(GUESTS / "slowtool")
    with Host(tmp_path, warm_idle_s=10.0, max_warm=0) as host:
        res = run(host, b, {"n": 3, "ms": 1})
        assert res.output == {"acc": expected_acc(3), "calls": 3}
        assert host.inspect(res.agent_id)["usage"]["hibernations"] == 3


def test_a_warm_memory_budget_sends_waiting_agents_cold(bundles: BundleFactory, tmp_path: Path) -> None:
    """Memory pressure counts bytes too: an agent whose memory does not fit what is left
    of ``max_warm_bytes`` goes cold at once, however few instances wait warm."""
    b = bundles.load(GUESTS / "slowtool")
    with Host(tmp_path / "tight", warm_idle_s=10.0, max_warm_bytes=64 * 1024) as host:  # < one memory
        res = run(host, b, {"n": 3, "ms": 1})
        assert res.output == {"acc": expected_acc(3), "calls": 3}
        assert host.inspect(res.agent_id)["usage"]["hibernations"] == 3
        assert host.warm_waiting == 0 and host.warm_bytes == 0
    with Host(tmp_path / "roomy", warm_idle_s=10.0, max_warm_bytes=1 << 30) as host:
        res = run(host, b, {"n": 3, "ms": 1})
        assert res.output == {"acc": expected_acc(3), "calls": 3}
        assert host.inspect(res.agent_id)["usage"].get("hibernations", 0) == 0
        assert host.warm_bytes == 0
    for bad in (-1, 1.5, True):
        with pytest.raises(TorporError, match="max_warm_bytes"):
            Host(tmp_path / "bad", max_warm_bytes=bad)  # type: ignore[arg-type]
    with pytest.raises(TorporError, match="engine profile"):
        Host(tmp_path / "bad", engine="nope")
    with Host(tmp_path / "bad"):  # a refused Host left nothing open on the directory
        pass


def test_a_large_input_is_written_once_and_read_back_exactly(bundles: BundleFactory, tmp_path: Path) -> None:
    """Every commit rewrites the agent record, so the input lives apart from it (the
    ``inputs`` bucket, written at spawn): a tool call costs no more with a large input.
    Inspect, fork and replay read it back; records of older hosts carry it inline."""
    from host.runtime.agent import LiveAgent
    from host.runtime.replay import replay

    b = bundles.load(GUESTS / "slowtool")
    pad = "é" * 20_000
    with Host(tmp_path, warm_idle_s=0.001) as host:  # cold at every wait
        res = run(host, b, {"n": 3, "ms": 5, "pad": pad})
        assert res.output == {"acc": expected_acc(3), "calls": 3}
        rec = host.get_agent(res.agent_id)
        assert "input" not in rec and "input_raw" not in rec
        assert rec["input_bytes"] == len(json.dumps({"n": 3, "ms": 5, "pad": pad}, separators=(",", ":")))
        assert len(json.dumps(rec).encode()) < 5_000  # the 40 KB input is not in it
        assert host.inspect(res.agent_id)["input"] == {"n": 3, "ms": 5, "pad": pad}
        fork = host.fork(res.agent_id, 1)
        assert host.inspect(fork)["input"]["pad"] == pad
        assert replay(host, res.agent_id).matched
    agent = LiveAgent.__new__(LiveAgent)
    for record, expected in (({"input": {"n": 1, "s": "é"}}, b'{"n":1,"s":"\\u00e9"}'),
                             ({"input": {"n": 1}, "input_raw": '{"n": 1}'}, b'{"n": 1}')):
        agent.record, agent._input = record, None  # a record of an older host
        assert agent.input_bytes == expected


def test_short_segments_of_concurrent_agents_run_inline(bundles: BundleFactory, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """After its first segment, an agent whose segments are short runs them on the event
    loop, also while other agents run: the decision rests on the segment's own run time,
    not on the wall time of a thread hop and its wait for a worker.

    No timing is asserted: every hop is made to wait a full second (a worker pool busier
    than any machine), and a segment counts as short below half a second. Had the hop's
    wait been counted, every one of the 84 segments would hop; a busy machine cannot make
    a `steps` segment take half a second.
    """
    b = bundles.load(EXAMPLES / "steps")
    hops: list[str] = []
    real = GuestRunner.in_thread

    async def slow_hop(self: GuestRunner, fn: Any, *args: Any) -> Any:
        hops.append(getattr(fn, "__name__", "?"))
        await anyio.sleep(1.0)
        return await real(self, fn, *args)

    monkeypatch.setattr(GuestRunner, "in_thread", slow_hop)
    with Host(tmp_path, warm_idle_s=60.0) as host:
        host.guest.inline_segment_s = 0.5
        results: list[RunResult] = []

        async def main() -> None:
            async with anyio.create_task_group() as tg:
                for _ in range(4):
                    tg.start_soon(lambda: _append(results, host.run(b, {"n": 20})))

        anyio.run(main)
    assert [r.output for r in results] == [{"sum": 210, "last": 20}] * 4
    assert len(hops) == 4, hops  # the first segment of each agent, and no other


async def _append(results: list[RunResult], run: Any) -> None:
    results.append(await run)


def test_a_new_agent_goes_by_its_modules_last_first_segment(bundles: BundleFactory, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A new agent has no segment of its own to go by: its first segment runs inline when
    the last first segment of its module was short (``hello``'s whole run is shorter than
    the two hand-offs of a hop), and in a thread when it was long, or never seen."""
    b = bundles.load(EXAMPLES / "hello")
    hops: list[str] = []
    real = GuestRunner.in_thread

    async def counted(self: GuestRunner, fn: Any, *args: Any) -> Any:
        hops.append(getattr(fn, "__name__", "?"))
        return await real(self, fn, *args)

    monkeypatch.setattr(GuestRunner, "in_thread", counted)
    with Host(tmp_path) as host:
        host.guest.inline_segment_s = 0.5  # every hello segment is short, however busy the machine
        for i in range(3):
            assert run(host, b, {"name": f"a{i}"}).output == {"greeting": f"hello, a{i}"}
        assert len(hops) == 1, hops  # the module's first agent only
        host.guest.inline_segment_s = 0.0  # now no segment counts as short
        assert run(host, b, {"name": "b"}).status == "completed"
        assert run(host, b, {"name": "c"}).status == "completed"
        assert len(hops) == 3, hops


def test_stack_too_deep_to_suspend_fails_cleanly(bundles: BundleFactory, tmp_path: Path) -> None:
    b = bundles.load(GUESTS / "deepwait")
    with Host(tmp_path) as host:
        ok = run(host, b, {"depth": 20})
        assert ok.status == "completed", ok.error
        for depth in (600, 1500):  # overflows the 16 KiB buffer; the deeper one faults past it
            deep = run(host, b, {"depth": depth})
            assert deep.status == "failed" and deep.error is not None
            assert deep.error["code"] == "suspend_overflow", deep.error
        assert run(host, bundles.load(EXAMPLES / "hello"), {"name": "x"}).status == "completed"


def test_fork_continues_from_an_earlier_checkpoint(bundles: BundleFactory, tmp_path: Path) -> None:
    with Host(tmp_path) as host:
        res = run(host, bundles.load(EXAMPLES / "steps"), {"n": 20})
        assert res.output == {"sum": 210, "last": 20}
        child = host.fork(res.agent_id, 10)
        info = host.inspect(child)
        assert info["status"] == "suspended"
        assert info["parent"] == {"agent_id": res.agent_id, "checkpoint": 10}
        out = anyio.run(lambda: host.resume(child))
        # Calls 1..10 are the parent's; the fork's own counter starts where the parent's ended (20).
        assert out.status == "completed"
        assert out.output == {"sum": sum(range(1, 11)) + sum(range(21, 31)), "last": 30}
        with pytest.raises(TorporError, match="no checkpoint 999"):
            host.fork(res.agent_id, 999)


def test_resume_refuses_unknown_and_finished_agents(bundles: BundleFactory, tmp_path: Path) -> None:
    with Host(tmp_path) as host:
        res = run(host, bundles.load(EXAMPLES / "hello"), {"name": "x"})
        with pytest.raises(AgentStateError, match="completed"):
            anyio.run(lambda: host.resume(res.agent_id))
        with pytest.raises(AgentNotFound):
            anyio.run(lambda: host.resume("01NOSUCHAGENT0000000000000"))


def _flip_checkpoint_byte(db_dir: Path, agent_id: str, seq: int, offset: int) -> None:
    env = lmdb.open(str(db_dir), max_dbs=32)
    cps = env.open_db(b"checkpoints")
    key = agent_id.encode() + b"\0" + seq.to_bytes(8, "big")
    with env.begin(write=True, db=cps) as txn:
        value = bytearray(txn.get(key))
        value[offset] ^= 0x40
        txn.put(key, bytes(value))
    env.close()


def test_corrupt_checkpoint_is_refused_not_restored(bundles: BundleFactory, tmp_path: Path) -> None:
    with Host(tmp_path) as host:
        res = run(host, bundles.load(EXAMPLES / "steps"), {"n": 5})
        child = host.fork(res.agent_id, 3)
    _flip_checkpoint_byte(tmp_path / "db", child, 1, 40)
    with Host(tmp_path) as host:
        res = anyio.run(lambda: host.resume(child))
        # Parked, naming the damage; nothing deleted: an operator can fork an earlier one.
        assert res.status == "corrupt" and res.error is not None and res.error["code"] == "snapshot_corrupt"
        assert "checkpoint 1" in res.error["message"]
        with host.store.read() as txn:
            assert txn.get_checkpoint(child, 1) is not None
        with pytest.raises(AgentStateError, match="corrupt"):
            anyio.run(lambda: host.resume(child))


def test_two_host_processes_share_one_store(bundles: BundleFactory, tmp_path: Path) -> None:
    bundle = str(bundles.example("steps"))
    cmd = [sys.executable, "-m", "host.cli", "run", bundle, "--input", '{"n": 60}', "--store", str(tmp_path), "--json"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for (stdout, stderr), p in zip(outs, procs, strict=True):
        assert p.returncode == 0, stderr
        assert json.loads(stdout)["output"] == {"sum": 1830, "last": 60}
    with Host(tmp_path) as host:
        assert sorted(a["status"] for a in host.list_agents()) == ["completed", "completed"]
