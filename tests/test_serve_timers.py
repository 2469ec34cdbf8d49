"""Who wakes sleeping agents: a real ``torpor serve`` (uvicorn on 127.0.0.1), no other command.

An agent that sleeps (``timer.sleep``) or waits on a rate (``on_limit = "wait"``) parks
``sleeping``; the server's timer loop resumes it at its time and it completes. A server
SIGKILLed while agents sleep leaves them in the store with their wake-ups; a new ``serve``
on the store wakes each at its original time (not before), and no recorded call runs twice.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from conftest import GUESTS, BundleFactory
from serve_helpers import InProcessServer, auth, register, start_process, token

from host.runtime import timers
from host.trust import audit
from snapshots.errors import StoreUnavailable
from snapshots.lmdb_store import LmdbStore


def _until_status(c: httpx.Client, secret: str, aid: str, status: str, limit: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + limit
    while True:
        rec: dict[str, Any] = c.get(f"/v1/agents/{aid}", headers=auth(secret)).json()
        if rec["status"] == status:
            return rec
        assert rec["status"] in ("running", "suspended", "sleeping"), rec
        assert time.monotonic() < deadline, f"agent {aid} never {status}: {rec['status']}"
        time.sleep(0.02)


def test_the_server_wakes_a_sleeping_agent_and_a_rate_limited_one(bundles: BundleFactory, tmp_path: Path) -> None:
    store = tmp_path / "store"
    [ref] = register(store, bundles.guest("sleeper"))
    with InProcessServer(store) as srv:
        t = token(srv.host.store, "acme", "runs:write", "runs:read")
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            slept = c.post("/v1/runs", headers=auth(t), json={"agent": ref, "input": {"ms": 600, "sleeps": 1,
                                                                                    "incr": 1}}).json()["agent_id"]
            limited = c.post("/v1/runs", headers=auth(t), json={"agent": ref, "input": {"ms": 0, "sleeps": 0,
                                                                                      "incr": 8}}).json()["agent_id"]
            asleep = _until_status(c, t, slept, "sleeping")
            assert asleep["wake_at"] > time.time() - 1
            assert any(w.agent_id == slept and w.at == asleep["wake_at"] for w in srv.host.wakeups())
            done = c.get(f"/v1/agents/{slept}/wait", params={"timeout": 60}, headers=auth(t)).json()
            assert done["status"] == "completed" and done["output"]["count"] == 1, done
            assert done["finished_at"] >= asleep["wake_at"]  # woken at its time, not before
            other = c.get(f"/v1/agents/{limited}/wait", params={"timeout": 60}, headers=auth(t)).json()
            assert other["status"] == "completed" and other["output"]["count"] == 8, other
            assert other["usage"]["calls_by_tool"]["kv.incr"] == 8 and other["usage"].get("denials", 0) == 0
            kinds = [r["kind"] for r in srv.host.audit_records(limited)]
            assert "agent.sleeping" in kinds and "agent.woke" in kinds  # it did park on the rate
        assert srv.host.wakeups() == []


def test_sigkill_while_agents_sleep_then_a_new_serve_wakes_them_at_their_time(bundles: BundleFactory,
                                                                               tmp_path: Path) -> None:
    store = tmp_path / "store"
    [ref] = register(store, bundles.guest("sleeper"))
    secret = token(store, "acme", "runs:write", "runs:read")
    n = 12
    proc, url = start_process(store, "--durability", "process")
    try:
        with httpx.Client(base_url=url, timeout=120) as c:
            ids = [c.post("/v1/runs", headers=auth(secret), json={"agent": ref, "input": {
                "ms": 1500 + 100 * i, "sleeps": 1, "incr": 3}}).json()["agent_id"] for i in range(n)]
            wake = {aid: _until_status(c, secret, aid, "sleeping")["wake_at"] for aid in ids}
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    s = LmdbStore.open(store / "db", readonly=True, create=False)
    try:
        left = {w.agent_id: w.at for w in timers.entries(s)}
    finally:
        s.close()
    assert left == wake  # every wake-up survived the kill, with its time

    proc, url = start_process(store, "--durability", "process")
    try:
        with httpx.Client(base_url=url, timeout=120) as c:
            done = [c.get(f"/v1/agents/{aid}/wait", params={"timeout": 60}, headers=auth(secret)).json()
                    for aid in ids]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    bad = [(r["agent_id"], r["status"], r.get("output")) for r in done
           if r["status"] != "completed" or r["output"]["count"] != 3]  # an incr run twice would say 4
    assert not bad, bad
    s = LmdbStore.open(store / "db", readonly=True, create=False)
    try:
        for aid in ids:
            with s.read() as txn:
                [sleep] = [e for _, e in txn.iter_journal(aid) if e["tool"] == "timer.sleep"]
            assert sleep["wake_at"] == wake[aid]  # the original deadline, journaled before the kill
            assert json.loads(sleep["response"])["unix_ms"] >= int(wake[aid] * 1000)  # not woken early
        assert timers.entries(s) == []
        report = audit.verify_store(s)
    finally:
        s.close()
    assert report.ok, report.summary()


def test_resume_all_wakes_the_due_and_says_who_still_sleeps(bundles: BundleFactory, tmp_path: Path) -> None:
    store = tmp_path / "store"
    bundle = bundles.path(GUESTS / "sleeper")

    def torpor(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "host.cli", *args, "--store", str(store)],
                              capture_output=True, text=True, timeout=120)

    long = torpor("run", str(bundle), "--input", json.dumps({"ms": 3_600_000, "sleeps": 1, "incr": 0}))
    assert long.returncode == 4 and "sleeping until" in long.stdout, long.stdout + long.stderr
    short = torpor("run", str(bundle), "--input", json.dumps({"ms": 1000, "sleeps": 1, "incr": 2}), "--json")
    assert short.returncode == 4 and json.loads(short.stdout)["status"] == "sleeping", short.stdout + short.stderr
    wake_at = json.loads(short.stdout)["wake_at"]
    ps = torpor("ps")
    assert len(re.findall(r"sleeping (?:[0-9.]+[smh]|due) ", ps.stdout)) == 2, ps.stdout
    assert re.search(r"sleeping (59\.[0-9]m|60\.0m) ", ps.stdout), ps.stdout  # the hour-long one
    time.sleep(max(0.0, wake_at - time.time()))
    woke = torpor("resume", "--all")
    assert woke.returncode == 0, woke.stdout + woke.stderr
    assert "completed" in woke.stdout and "1 agent still sleeps; the next wakes at" in woke.stdout, woke.stdout
    sleeper_id = long.stdout.split()[1].rstrip(":")  # "agent ID: sleeping"
    early = torpor("resume", sleeper_id)
    assert early.returncode == 2 and "not_due" in early.stderr, early.stdout + early.stderr


def test_the_timers_benchmark_runs() -> None:
    from bench import timers as bench_timers

    out = bench_timers.run(6, 0.5)
    server = out["rows"]["server timer loop: deadline -> awake"]
    assert server["n"] == 6 and out["rows"]["baseline anyio.sleep: deadline -> running"]["n"] == 6
    assert 0 <= server["p50_us"] <= server["max_us"] < 30e6  # awake within seconds of its deadline


def test_sigkill_during_short_sleeps_then_resume_keeps_every_deadline(bundles: BundleFactory, tmp_path: Path) -> None:
    """Short sleeps are held in-process; a host killed in one leaves the agent suspended with
    the wake time journaled, and the resume waits for that time, not a new one."""
    store = tmp_path / "store"
    bundle = bundles.path(GUESTS / "sleeper")
    proc = subprocess.Popen([sys.executable, "-m", "host.cli", "run", str(bundle), "--store", str(store),
                             "--durability", "process", "--input", json.dumps({"ms": 40, "sleeps": 60, "incr": 1})],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while True:  # kill it once it has journaled some sleeps (a store being written is read read-only)
        time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it was killed"
        assert time.monotonic() < deadline
        try:  # the child may have made the directory but not yet the environment in it
            s = LmdbStore.open(store / "db", readonly=True, create=False)
        except StoreUnavailable:
            continue
        try:
            with s.read() as txn:
                n = sum(1 for r in txn.iter_agent_summaries() if r.tool_calls >= 10)
        finally:
            s.close()
        if n:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    s = LmdbStore.open(store / "db", readonly=True, create=False)
    try:
        with s.read() as txn:
            [rec] = [txn.get_agent(r.agent_id) for r in txn.iter_agent_summaries()]
            cut = txn.get_journal(rec["agent_id"], rec["pending"]["seq"])  # the call the kill cut short
    finally:
        s.close()
    done = subprocess.run([sys.executable, "-m", "host.cli", "resume", "--all", "--store", str(store), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    [res] = json.loads(done.stdout)
    assert res["status"] == "completed" and res["output"]["count"] == 1, res
    s = LmdbStore.open(store / "db", readonly=True, create=False)
    try:
        with s.read() as txn:
            sleeps = [e for _, e in txn.iter_journal(res["agent_id"]) if e["tool"] == "timer.sleep"]
    finally:
        s.close()
    assert len(sleeps) == 60 and all(e["state"] == "done" for e in sleeps)
    assert all(json.loads(e["response"])["unix_ms"] >= int(e["wake_at"] * 1000) for e in sleeps)  # none early
    gaps = [b["wake_at"] - a["wake_at"] for a, b in itertools.pairwise(sleeps)]
    assert min(gaps) >= 0.04  # each deadline 40 ms after the one before
    if cut is not None and cut["tool"] == "timer.sleep" and cut["state"] == "intent":  # killed mid-sleep (almost always)
        [same] = [e for e in sleeps if e["checkpoint"] == cut["checkpoint"]]
        assert same["wake_at"] == cut["wake_at"]  # the deadline journaled before the kill, not a new one
