"""A fleet of real ``torpor serve`` processes on a real 3-node JetStream cluster: a host
SIGKILLed mid-run, then a NATS node, its agents finished by the other host, no tool call
run twice, every audit chain intact; a host paused past its lease, whose late steps the
fencing refuses.

``steps`` agents count with ``kv.incr``, once per recorded call: a call run twice (by the
dead host and again by its successor) would push ``last`` past ``n``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import EXAMPLES, BundleFactory
from serve_helpers import free_port

from bench.fleet import agents, seed, start_host, stop
from bench.nats_cluster import NatsCluster
from host.runtime.agent import TERMINAL
from host.trust import audit
from snapshots.nats_store import NatsStore


def _check_store(url: str, path: Path, stream: str, ids: list[str], n: int) -> list[str]:
    """Every audit chain intact, every agent completed with its calls 1..n journalled once
    (nothing run twice, nothing lost); the agents another host resumed."""
    with NatsStore.open(url, path, stream=stream) as s:
        s.sync()
        report = audit.verify_store(s)
        assert report.ok, report.summary()
        with s.read() as r:
            for aid in ids:
                assert [c for c, _ in r.iter_journal(aid)] == list(range(1, n + 1)), aid
                assert r.get_agent(aid)["status"] == "completed", aid
        # Resumed from a checkpoint by a host (a run's first drive from the work queue is an
        # ``agent.resumed`` at checkpoint 0: not a take-over).
        return [aid for aid in ids if any(e["kind"] == "agent.resumed" and e.get("host") and e.get("checkpoint")
                                          for e in audit.records(s, aid))]


def test_a_killed_hosts_agents_finish_on_another(bundles: BundleFactory, nats_cluster: NatsCluster,
                                                 tmp_path: Path) -> None:
    stream = f"F{uuid.uuid4().hex[:12]}"
    url = nats_cluster.url
    [steps], secret = seed(url, stream, tmp_path / "seed", [bundles.example("steps")])
    lease, n, count = 2.0, 40, 8  # short, for a quick test, yet renewed in time on a loaded machine
    pa, pb = free_port(), free_port()
    a = start_host(url, stream, tmp_path / "a", lease=lease, port=pa, log=tmp_path / "a.log")
    b = None
    node_killed = False
    try:
        b = start_host(url, stream, tmp_path / "b", lease=lease, port=pb, log=tmp_path / "b.log")
        base_a, base_b = f"http://127.0.0.1:{pa}", f"http://127.0.0.1:{pb}"
        hdr = {"Authorization": f"Bearer {secret}"}
        ids = []
        for i in range(count):  # most on a, two on b: b has its own work as well
            base = base_b if i % 4 == 3 else base_a
            r = httpx.post(base + "/v1/runs", headers=hdr, json={"agent": steps, "input": {"n": n}}, timeout=60)
            assert r.status_code == 201, r.text
            ids.append(r.json()["agent_id"])
        # let a get under way, then kill it mid-run
        deadline = time.monotonic() + 60
        while not any(int(r.get("checkpoints", 0)) > 0 for r in agents(base_b, secret)):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        a.send_signal(signal.SIGKILL)
        a.wait()
        killed_at = time.monotonic()
        at_kill = {r["agent_id"]: r["status"] for r in agents(base_b, secret)}
        assert any(s not in TERMINAL for s in at_kill.values()), "nothing was in flight at the kill"
        nats_cluster.kill(2)  # and a NATS node: the stream goes on with two of its three replicas
        node_killed = True

        deadline = time.monotonic() + 120
        while True:
            rows = agents(base_b, secret)
            if len(rows) == count and all(r["status"] in TERMINAL for r in rows):
                break
            assert time.monotonic() < deadline, (rows, (tmp_path / "b.log").read_text()[-3000:])
            time.sleep(0.1)
        took = time.monotonic() - killed_at
        bad = [(r["agent_id"], r["status"], r.get("output"), r.get("error")) for r in rows
               if r["status"] != "completed" or r.get("output") != {"sum": n * (n + 1) // 2, "last": n}]
        assert not bad, bad
        assert sorted(r["agent_id"] for r in rows) == sorted(ids)
        assert took < lease + 30, took
        # torpor fleet status: a's lease expired (killed), b's live; nothing left orphaned
        for _ in range(10):  # the stream may still be electing a leader without the killed node (a timeout)
            status = subprocess.run([sys.executable, "-m", "host.cli", "fleet", "status", "--store", url, "--stream",
                                     stream, "--local-dir", str(tmp_path / "status"), "--json"],
                                    capture_output=True, text=True)
            if status.returncode != 2 or "timeout" not in status.stdout + status.stderr:
                break
            time.sleep(1)
        assert status.returncode == 0, status.stdout + status.stderr
        fleet = json.loads(status.stdout)
        by_pid = {h["pid"]: h for h in fleet["hosts"]}
        assert by_pid[a.pid]["live"] is False and by_pid[b.pid]["live"] is True
        assert fleet["orphaned"] == 0 and fleet["agents"] == {"completed": count}
        assert fleet["work"]["pending"] == 0, fleet["work"]  # every run and wake-up taken from the queue
    finally:
        stop(a)
        if b is not None:
            stop(b)
        if node_killed:
            nats_cluster.restart(2)
    taken = _check_store(url, tmp_path / "check", stream, ids, n)
    assert taken, "no agent was resumed by another host"  # the kill's agents, finished by b


def test_a_paused_host_past_its_lease_cannot_commit(bundles: BundleFactory, nats_cluster: NatsCluster,
                                                    tmp_path: Path) -> None:
    """A partition, as SIGSTOP past the lease then SIGCONT: the other host takes the agents
    over and finishes them; the paused host's late steps are refused by the fencing."""
    stream = f"F{uuid.uuid4().hex[:12]}"
    url = nats_cluster.url
    [steps], secret = seed(url, stream, tmp_path / "seed", [bundles.example("steps")])
    lease, n, count = 1.0, 60, 4
    pa, pb = free_port(), free_port()
    a = start_host(url, stream, tmp_path / "a", lease=lease, port=pa, log=tmp_path / "a.log")
    b = None
    try:
        b = start_host(url, stream, tmp_path / "b", lease=lease, port=pb, log=tmp_path / "b.log")
        base_a, base_b = f"http://127.0.0.1:{pa}", f"http://127.0.0.1:{pb}"
        hdr = {"Authorization": f"Bearer {secret}"}
        # b paused while the runs are posted (past its pull's expiry), so that a takes every one
        # of them from the work queue
        b.send_signal(signal.SIGSTOP)
        try:
            time.sleep(1.5)
            ids = [httpx.post(base_a + "/v1/runs", headers=hdr, json={"agent": steps, "input": {"n": n}},
                              timeout=60).json()["agent_id"] for _ in range(count)]
            deadline = time.monotonic() + 60
            while not any(int(r.get("checkpoints", 0)) > 0 for r in agents(base_a, secret)):
                assert time.monotonic() < deadline
                time.sleep(0.02)
        finally:
            b.send_signal(signal.SIGCONT)
        a.send_signal(signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 120
            while True:
                rows = agents(base_b, secret)
                if all(r["status"] in TERMINAL for r in rows):
                    break
                assert time.monotonic() < deadline, rows
                time.sleep(0.1)
        finally:
            a.send_signal(signal.SIGCONT)
        # a's drives wake up, try to commit their next step, and are refused (a loaded machine
        # may take a while to run them: polled, not one look after a fixed sleep)
        deadline = time.monotonic() + 60
        while "was taken over by another host" not in (tmp_path / "a.log").read_text():  # refused, said so
            assert a.poll() is None, "the paused host crashed when it woke"
            assert time.monotonic() < deadline, (tmp_path / "a.log").read_text()[-2000:]
            time.sleep(0.1)
        assert a.poll() is None, "the paused host crashed when it woke"
        rows = agents(base_a, secret)  # a still answers, and reads what b did
        bad = [(r["agent_id"], r["status"], r.get("output")) for r in rows
               if r["status"] != "completed" or r.get("output") != {"sum": n * (n + 1) // 2, "last": n}]
        assert not bad, bad
    finally:
        if b is not None:
            stop(b)
        stop(a)
    taken = _check_store(url, tmp_path / "check", stream, ids, n)
    assert taken, "the paused host's agents were not taken over"


@pytest.mark.timeout(900)
def test_300_agents_on_3_hosts_with_a_host_and_a_node_killed(bundles: BundleFactory, nats_cluster: NatsCluster,
                                                             tmp_path: Path) -> None:
    """The scale test of issue 17: 300 ``steps`` agents of 100 calls across 3 ``torpor serve``
    hosts on the 3-node cluster; one host SIGKILLed mid-run, then one NATS node: every agent
    completes with last == 100 and sum == 5050, each call journalled once, every audit intact.
    (TORPOR_FLEET_AGENTS and TORPOR_FLEET_N make it smaller or larger.)"""
    count = int(os.environ.get("TORPOR_FLEET_AGENTS", "300"))
    n = int(os.environ.get("TORPOR_FLEET_N", "100"))
    stream = f"F{uuid.uuid4().hex[:12]}"
    url = nats_cluster.url
    # The steps example with room in its wall-clock budget: its 30 s are per run, from start to
    # end, and 300 agents queued on two cores (fewer after the kill) take longer than that each.
    [steps], secret = seed(url, stream, tmp_path / "seed", [bundles.example_with_wall_clock("steps", "900s")])
    want = {"sum": n * (n + 1) // 2, "last": n}
    hdr = {"Authorization": f"Bearer {secret}"}
    started = time.monotonic()
    procs: list[subprocess.Popen[bytes]] = []
    node_killed = False
    try:
        ports = [free_port() for _ in range(3)]
        for i, port in enumerate(ports):
            procs.append(start_host(url, stream, tmp_path / f"h{i}", lease=2.0, port=port,
                                    log=tmp_path / f"h{i}.log"))
        bases = [f"http://127.0.0.1:{p}" for p in ports]
        with httpx.Client(timeout=120, limits=httpx.Limits(max_connections=24)) as client:

            def submit(i: int) -> str:
                # As a client should: one idempotency key a run, the request sent again after a
                # transport error (a shared client's connection dropped under load once: EBADF),
                # so a retried request finds the run the first one started, never a second run.
                key = {**hdr, "Idempotency-Key": f"{stream}-{i}"}
                for attempt in range(3):
                    try:
                        r = client.post(bases[i % 3] + "/v1/runs", headers=key, json={"agent": steps, "input": {"n": n}})
                        break
                    except httpx.TransportError:
                        if attempt == 2:
                            raise
                assert r.status_code in (200, 201), r.text
                return str(r.json()["agent_id"])

            with ThreadPoolExecutor(24) as pool:  # as clients would: many at once, on every host
                ids = list(pool.map(submit, range(count)))
        submitted = time.monotonic()
        # mid-run: every host's agents under way, none of host 0's done
        deadline = time.monotonic() + 120
        while True:
            rows = agents(bases[1], secret)
            done = sum(1 for r in rows if r["status"] in TERMINAL)
            if sum(int(r.get("checkpoints", 0)) for r in rows) > count * n // 5:
                break
            assert time.monotonic() < deadline, rows[:3]
            time.sleep(0.1)
        assert done < count, "everything finished before the kill"
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait()
        killed_at = time.monotonic()
        time.sleep(1.0)
        nats_cluster.kill(2)
        node_killed = True
        deadline = time.monotonic() + 600
        while True:
            try:
                rows = agents(bases[1], secret)
            except httpx.HTTPError:  # the stream electing a leader without the killed node
                rows = []
            if len(rows) == count and all(r["status"] in TERMINAL for r in rows):
                break
            assert time.monotonic() < deadline, ((tmp_path / "h1.log").read_text()[-3000:])
            time.sleep(0.5)
        finished = time.monotonic()
        bad = [(r["agent_id"], r["status"], r.get("output"), r.get("error")) for r in rows
               if r["status"] != "completed" or r.get("output") != want]
        assert not bad, bad[:5]
    finally:
        for proc in procs:
            stop(proc)
        if node_killed:
            nats_cluster.restart(2)
    taken = _check_store(url, tmp_path / "check", stream, ids, n)
    assert taken, "no agent of the killed host was resumed by another"
    print(f"\n{count} agents x {n} calls on 3 hosts: submitted in {submitted - started:.1f} s, "
          f"all done {finished - submitted:.1f} s after (host killed at {killed_at - submitted:.1f} s)")


def _resumes(store: NatsStore, aid: str) -> list[dict[str, Any]]:
    return [e for e in audit.records(store, aid) if e["kind"] == "agent.resumed"]


def test_work_goes_through_the_queue_to_whichever_host_has_room(bundles: BundleFactory, nats_cluster: NatsCluster,
                                                                tmp_path: Path) -> None:
    """Item 2 of issue 17: host a is a gateway only (``--work-slots 0``): every run posted to it
    and the approval answered on it are driven by b, through the work queue; b is SIGKILLed
    holding unacknowledged work, and c, started after, gets it delivered again and finishes
    every run; messages published twice for the same agents start nothing twice."""
    stream = f"F{uuid.uuid4().hex[:12]}"
    url = nats_cluster.url
    asks = tmp_path / "asks"  # steps whose every call needs a person's approval
    shutil.copytree(EXAMPLES / "steps", asks)
    policy = asks / "policy.toml"
    policy.write_text(policy.read_text().replace('name = "steps"', 'name = "asks"') + "approval = true\n")
    [steps, asking], secret = seed(url, stream, tmp_path / "seed", [bundles.example("steps"), bundles.path(asks)])
    lease, n, count = 2.0, 200, 4
    hdr = {"Authorization": f"Bearer {secret}"}
    pa, pb, pc = free_port(), free_port(), free_port()
    a = start_host(url, stream, tmp_path / "a", lease=lease, port=pa, log=tmp_path / "a.log", work_slots=0)
    b = c = None
    check = NatsStore.open(url, tmp_path / "check", stream=stream)
    try:
        b = start_host(url, stream, tmp_path / "b", lease=lease, port=pb, log=tmp_path / "b.log")
        base_a = f"http://127.0.0.1:{pa}"
        # an approval answered on a wakes the agent on b
        r = httpx.post(base_a + "/v1/runs", headers=hdr, json={"agent": asking, "input": {"n": 1}, "wait": 60},
                       timeout=90)
        assert r.status_code == 201 and r.json()["status"] == "waiting_approval", r.text
        asked = r.json()["agent_id"]
        r = httpx.post(f"{base_a}/v1/agents/{asked}/approve", headers=hdr, json={"note": "ok"}, timeout=60)
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 60
        while (row := next(x for x in agents(base_a, secret) if x["agent_id"] == asked))["status"] not in TERMINAL:
            assert time.monotonic() < deadline, row
            time.sleep(0.05)
        assert row["status"] == "completed" and row["output"] == {"sum": 1, "last": 1}, row
        check.sync()
        hosts = [e["host"] for e in _resumes(check, asked)]
        assert len(hosts) == 2 and all(f":{b.pid}:" in h for h in hosts), hosts  # its run, then its wake-up

        # runs posted to the gateway, each published twice more (a run's id again, a fresh wake-up)
        ids = [httpx.post(base_a + "/v1/runs", headers=hdr, json={"agent": steps, "input": {"n": n}},
                          timeout=60).json()["agent_id"] for _ in range(count)]
        queue = check.work_queue(ack_wait=2 * lease)
        for aid in ids:
            queue.publish("run", aid, f"run:{aid}")
            queue.publish("wake", aid, f"test:{aid}")
        deadline = time.monotonic() + 60
        while not all(int(x.get("checkpoints", 0)) > 0 for x in agents(base_a, secret) if x["agent_id"] in ids):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        b.send_signal(signal.SIGKILL)  # holding the runs' messages, unacknowledged
        b.wait()
        at_kill = {x["agent_id"]: x["status"] for x in agents(base_a, secret)}
        assert any(at_kill[aid] not in TERMINAL for aid in ids), "every run ended before the kill"
        c = start_host(url, stream, tmp_path / "c", lease=lease, port=pc, log=tmp_path / "c.log")
        deadline = time.monotonic() + 120
        while not all(x["status"] in TERMINAL for x in agents(base_a, secret)):
            assert time.monotonic() < deadline, (tmp_path / "c.log").read_text()[-3000:]
            time.sleep(0.1)
        rows = {x["agent_id"]: x for x in agents(base_a, secret)}
        bad = [(aid, rows[aid]["status"], rows[aid].get("output")) for aid in ids
               if rows[aid]["status"] != "completed" or rows[aid].get("output") != {"sum": n * (n + 1) // 2, "last": n}]
        assert not bad, bad
        time.sleep(2 * lease + 1)  # b's messages delivered again after the ack wait, to c
        assert "delivered again" in (tmp_path / "c.log").read_text()
        assert queue.state()["pending"] == 0 and queue.state()["unacknowledged"] == 0
        check.sync()
        for aid in ids:
            # one run: started once (a resume at checkpoint 0), whatever was delivered twice
            assert [e["checkpoint"] for e in _resumes(check, aid)].count(0) == 1, _resumes(check, aid)
        ready_a = httpx.get(base_a + "/readyz", timeout=30).json()["work"]
        assert ready_a["slots"] == 0 and ready_a["taken"] == 0 and ready_a["published"] >= count + 2, ready_a
        # the gateway drove nothing
        assert all(f":{a.pid}:" not in e["host"] for aid in [asked, *ids] for e in _resumes(check, aid))
    finally:
        check.close()
        for p in (a, b, c):
            if p is not None:
                stop(p)
    taken = _check_store(url, tmp_path / "verify", stream, ids, n)
    assert taken, "no run held by the killed host was resumed by c"
