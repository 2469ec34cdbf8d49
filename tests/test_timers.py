"""Durable sleeps and rate-limit back-offs in the embedded host: real Wasmtime, the C guest
``tests/guests/sleeper`` compiled by the project's toolchain, real LMDB stores.

A short sleep is held in-process; a long one parks the agent ``sleeping`` with its wake-up
in the store's wake index (same commit), refused before its time, woken by
``Host.wake_due`` at it; a rate-limited call whose grant says ``on_limit = "wait"`` waits
instead of being denied, and is decided (and counted) once, when it goes through. Bad sleep
arguments are answered ``invalid_args`` to the guest; policy typos are refused at load.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import GUESTS, BundleFactory

from host.errors import AgentStateError
from host.runtime import Host, timers
from host.runtime.host import RunResult
from host.runtime.replay import replay
from host.sandbox.bundle import Bundle
from policies import PolicyError, parse_policy
from snapshots.store import TIMERS_BUCKET

SLEEPER = GUESTS / "sleeper"


def _run(store: Path, fn: Any) -> Any:
    async def main() -> Any:
        with Host(store) as host:
            return await fn(host)

    return anyio.run(main)


def _journal(host: Host, agent_id: str) -> list[dict[str, Any]]:
    with host.store.read() as txn:
        return [e for _, e in txn.iter_journal(agent_id)]


def test_a_short_sleep_is_held_in_process_and_journals_its_wake_time(bundles: BundleFactory, tmp_path: Path) -> None:
    b = bundles.load(SLEEPER)

    async def go(host: Host) -> tuple[RunResult, list[dict[str, Any]]]:
        res = await host.run(b, {"ms": 20, "sleeps": 3, "incr": 1})
        return res, _journal(host, res.agent_id)

    res, journal = _run(tmp_path / "s", go)
    assert res.status == "completed", res.error
    assert res.output["count"] == 1 and res.output["elapsed_ms"] >= 60
    sleeps = [e for e in journal if e["tool"] == "timer.sleep"]
    assert len(sleeps) == 3 and all(e["state"] == "done" and e["wake_at"] > 0 for e in sleeps)


def test_a_long_sleep_parks_sleeping_is_refused_early_and_wakes_at_its_time(bundles: BundleFactory,
                                                                            tmp_path: Path) -> None:
    b = bundles.load(SLEEPER)
    store = tmp_path / "s"

    async def park(host: Host) -> RunResult:
        return await host.run(b, {"ms": 400, "sleeps": 1, "incr": 2})

    t0 = time.time()
    res = _run(store, park)
    assert res.status == "sleeping" and res.wake_at is not None
    assert t0 + 0.4 <= res.wake_at <= time.time() + 0.4
    aid = res.agent_id

    async def early(host: Host) -> None:
        rec = host.get_agent(aid)
        assert rec["status"] == "sleeping" and rec["wake_at"] == res.wake_at and rec["owner"] is None
        [w] = host.wakeups()
        assert (w.agent_id, w.at, w.reason) == (aid, res.wake_at, "sleep")
        assert host.due() == []
        with pytest.raises(AgentStateError) as err:
            await host.resume(aid)
        assert err.value.code == "not_due" and "sleeps until" in str(err.value)
        assert host.get_agent(aid)["status"] == "sleeping" and len(host.wakeups()) == 1  # untouched
        assert await host.resume_all() == []  # nothing due, nothing resumable

    _run(store, early)  # a new Host: the appointment is in the store, not in a process
    time.sleep(max(0.0, res.wake_at - time.time()))

    async def wake(host: Host) -> tuple[list[RunResult], list[str]]:
        results = await host.wake_due()
        return results, [kind for kind, _ in _events(host, aid)]

    [done], kinds = _run(store, wake)
    assert done.status == "completed" and done.output["count"] == 2, done
    assert done.output["elapsed_ms"] >= 400
    assert "agent.sleeping" in kinds and kinds.index("agent.woke") > kinds.index("agent.sleeping")

    with Host(store) as host:
        wakeups, journal = host.wakeups(), _journal(host, aid)
    assert wakeups == []
    [sleep] = [e for e in journal if e["tool"] == "timer.sleep"]
    assert sleep["state"] == "done" and sleep["wake_at"] == res.wake_at  # the deadline journaled at the call
    assert json.loads(sleep["response"])["unix_ms"] >= int(res.wake_at * 1000)


def _events(host: Host, aid: str) -> list[tuple[str, dict[str, Any]]]:
    return [(r["kind"], r) for r in host.audit_records(aid)]


def test_rate_limit_wait_parks_then_completes_each_call_counted_once(bundles: BundleFactory, tmp_path: Path) -> None:
    b = bundles.load(SLEEPER)
    store = tmp_path / "s"

    async def go(host: Host) -> tuple[RunResult, dict[str, Any], list[str]]:
        first = await host.run(b, {"ms": 0, "sleeps": 0, "incr": 8})  # 5/s: the 6th waits ~1 s
        assert first.status == "sleeping", first
        [w] = host.wakeups()
        assert w.reason == "rate_limited"
        results: list[RunResult] = []
        while host.wakeups():
            await anyio.sleep(max(0.0, host.wakeups()[0].at - time.time()))
            results += await host.wake_due()
        rec = host.get_agent(first.agent_id)
        report = replay(host, first.agent_id)  # the waits are in the journal: a replay is exact
        assert report.matched and report.calls_replayed == 10, report.summary()
        return results[-1], rec, [k for k, _ in _events(host, first.agent_id)]

    last, rec, kinds = _run(store, go)
    assert last.status == "completed" and last.output["count"] == 8, last
    assert last.output["elapsed_ms"] >= 900  # 8 calls at 5/s take a second
    u = rec["usage"]
    # each incr decided and counted once: no denial, no call run twice (the counter says 8)
    assert u["calls_by_tool"]["kv.incr"] == 8 and u.get("denials", 0) == 0
    assert kinds.count("tool.deferred") >= 1 and "tool.denied" not in kinds
    assert kinds.count("agent.sleeping") == kinds.count("agent.woke") >= 1


def _variant(tmp_path: Path, policy_extra: str) -> Path:
    d = tmp_path / "sleeper_variant"
    shutil.copytree(SLEEPER, d)
    text = (d / "policy.toml").read_text()
    (d / "policy.toml").write_text(text.replace('on_limit = "wait"\n', 'on_limit = "wait"\n' + policy_extra))
    return d


@pytest.mark.parametrize("cap", ["max_wait", "wall_clock"])
def test_a_wait_beyond_max_wait_or_the_run_deadline_is_denied_as_today(bundles: BundleFactory, tmp_path: Path,
                                                                       cap: str) -> None:
    d = _variant(tmp_path, 'max_wait = "20ms"\n' if cap == "max_wait" else "")
    if cap == "wall_clock":  # the 6th call could go through in ~1 s; the run may last 500 ms
        (d / "policy.toml").write_text((d / "policy.toml").read_text().replace('wall_clock = "30s"', 'wall_clock = "500ms"'))
    b: Bundle = bundles.load(d)

    async def go(host: Host) -> RunResult:
        return await host.run(b, {"ms": 0, "sleeps": 0, "incr": 8})

    res = _run(tmp_path / "s", go)
    assert res.status == "completed" and res.output == {"error": "rate_limited", "at": 5}, res.output


def test_bad_sleep_arguments_are_answered_invalid_args(bundles: BundleFactory, tmp_path: Path) -> None:
    b = bundles.load(SLEEPER)
    bad = [{"ms": -1}, {"ms": 1e13}, {"ms": 31 * 86400 * 1000}, {"ms": "10"}, {"ms": True}, {"ms": None}, {},
           {"ms": 5, "until": 1}, {"until": -3}, {"until": time.time() + 40 * 86400}, {"seconds": 2}, [1]]

    async def go(host: Host) -> list[RunResult]:
        out = [await host.run(b, {"raw": raw}) for raw in bad]
        assert host.wakeups() == []  # nothing parked, nothing scheduled
        return out

    for raw, res in zip(bad, _run(tmp_path / "s", go), strict=True):
        assert res.status == "completed", (raw, res.error)
        assert res.output["ok"] is False and res.output["code"] == "invalid_args", (raw, res.output)


def test_sleep_until_a_past_time_answers_at_once(bundles: BundleFactory, tmp_path: Path) -> None:
    b = bundles.load(SLEEPER)

    async def go(host: Host) -> RunResult:
        return await host.run(b, {"raw": {"until": 1.5}})

    res = _run(tmp_path / "s", go)
    assert res.output == {"ok": True, "code": "ok", "message": ""}


@pytest.mark.parametrize(("extra", "says"), [
    ('on_limit = "wiat"', "did you mean 'wait'"),
    ('on_limt = "wait"', "did you mean 'on_limit'"),
    ('on_limit = "wait"\nmax_wait = "soon"', "max_wait"),
    ('max_wait = "1s"', 'it bounds on_limit = "wait"'),
])
def test_policy_typos_in_on_limit_are_refused(extra: str, says: str) -> None:
    with pytest.raises(PolicyError) as err:
        parse_policy(f'[agent]\nname = "x"\n[tools."kv.incr"]\nrate = "5/s"\n{extra}\n')
    assert says in str(err.value)


def test_on_limit_wait_needs_a_rate() -> None:
    with pytest.raises(PolicyError, match="has none"):
        parse_policy('[agent]\nname = "x"\n[tools."kv.incr"]\non_limit = "wait"\n')


def test_a_fork_of_a_sleeping_agent_keeps_the_journaled_deadline(bundles: BundleFactory, tmp_path: Path) -> None:
    b = bundles.load(SLEEPER)

    async def go(host: Host) -> tuple[RunResult, RunResult, list[str]]:
        parent = await host.run(b, {"ms": 300, "sleeps": 1, "incr": 1})
        assert parent.status == "sleeping" and parent.wake_at is not None
        child = host.fork(parent.agent_id, parent.checkpoints)
        assert host.get_agent(child)["wake_at"] is None  # the parent's wake-up is not the fork's
        resumed = await host.resume(child)  # suspended, not sleeping: it resumes, and waits for the same time
        assert resumed.status == "sleeping" and resumed.wake_at == parent.wake_at
        await anyio.sleep(max(0.0, parent.wake_at - time.time()))
        woken = {r.agent_id: r for r in await host.wake_due()}
        return woken[parent.agent_id], woken[child], [w.agent_id for w in host.wakeups()]

    p_done, c_done, left = _run(tmp_path / "s", go)
    assert p_done.status == c_done.status == "completed" and left == []
    assert p_done.output["count"] == 1 and c_done.output["count"] == 1


def test_stale_and_damaged_wake_ups_are_dropped_not_resumed(bundles: BundleFactory, tmp_path: Path) -> None:
    b = bundles.load(SLEEPER)

    async def go(host: Host) -> tuple[list[str], list[Any]]:
        done = await host.run(b, {"ms": 0, "sleeps": 0, "incr": 1})
        assert done.status == "completed"

        def plant(txn: Any) -> None:
            timers.put(txn, done.agent_id, time.time() - 1, "sleep")  # its agent does not sleep
            txn.put_blob(TIMERS_BUCKET, "0000000000000.000001/garbage", b"\xff not json")

        host.store.transact(plant)
        assert len(host.wakeups()) == 2
        return host.due(), host.wakeups()

    due, left = _run(tmp_path / "s", go)
    assert due == [] and left == []


def test_a_sleep_that_needs_approval_starts_its_wait_when_approved(bundles: BundleFactory, tmp_path: Path) -> None:
    d = tmp_path / "sleeper_approval"
    shutil.copytree(SLEEPER, d)
    text = (d / "policy.toml").read_text()
    (d / "policy.toml").write_text(text.replace('[tools."timer.sleep"]\n', '[tools."timer.sleep"]\napproval = true\n'))
    b = bundles.load(d)

    async def go(host: Host) -> tuple[RunResult, float, RunResult]:
        parked = await host.run(b, {"ms": 300, "sleeps": 1, "incr": 1})
        assert parked.status == "waiting_approval" and host.wakeups() == []
        await anyio.sleep(0.4)  # longer than the sleep: its time counts from the approval, not the call
        approved_at = time.time()
        asleep = await host.approve(parked.agent_id, note="ok")
        await anyio.sleep(max(0.0, (asleep.wake_at or 0) - time.time()))
        [done] = await host.wake_due()
        return asleep, approved_at, done

    asleep, approved_at, done = _run(tmp_path / "s", go)
    assert asleep.status == "sleeping" and asleep.wake_at is not None and asleep.wake_at >= approved_at + 0.3
    assert done.status == "completed" and done.output["count"] == 1, done
