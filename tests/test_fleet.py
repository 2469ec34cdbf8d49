"""A fleet of real ``torpor serve`` processes on a real 3-node JetStream cluster: a host
SIGKILLed mid-run, then a NATS node, its agents finished by the other host, no tool call
run twice, every audit chain intact; a host paused past its lease, whose late steps the
fencing refuses.

``steps`` agents count with ``kv.incr``, once per recorded call: a call run twice (by the
dead host and again by its successor) would push ``last`` past ``n``.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
from conftest import BundleFactory
from serve_helpers import free_port

from bench.fleet import agents, seed, start_host, stop
from bench.nats_cluster import NatsCluster
from host.runtime.agent import TERMINAL
from host.trust import audit
from snapshots.nats_store import NatsStore


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
    finally:
        stop(a)
        if b is not None:
            stop(b)
        if node_killed:
            nats_cluster.restart(2)
    with NatsStore.open(url, tmp_path / "check", stream=stream) as s:
        s.sync()
        report = audit.verify_store(s)
        assert report.ok, report.summary()
        with s.read() as r:
            for aid in ids:  # one journal entry per call, calls 1..n (nothing run twice, nothing lost)
                assert [c for c, _ in r.iter_journal(aid)] == list(range(1, n + 1))
        taken = [aid for aid in ids if any(e["kind"] == "agent.resumed" and e.get("host")
                                           for e in audit.records(s, aid))]
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
        ids = [httpx.post(base_a + "/v1/runs", headers=hdr, json={"agent": steps, "input": {"n": n}},
                          timeout=60).json()["agent_id"] for _ in range(count)]
        deadline = time.monotonic() + 60
        while not any(int(r.get("checkpoints", 0)) > 0 for r in agents(base_b, secret)):
            assert time.monotonic() < deadline
            time.sleep(0.02)
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
        time.sleep(3 * lease)  # a's drives wake up, try to commit their next step, and are refused
        assert a.poll() is None, "the paused host crashed when it woke"
        assert "was taken over by another host" in (tmp_path / "a.log").read_text()  # refused, said so
        rows = agents(base_a, secret)  # a still answers, and reads what b did
        bad = [(r["agent_id"], r["status"], r.get("output")) for r in rows
               if r["status"] != "completed" or r.get("output") != {"sum": n * (n + 1) // 2, "last": n}]
        assert not bad, bad
    finally:
        if b is not None:
            stop(b)
        stop(a)
    with NatsStore.open(url, tmp_path / "check", stream=stream) as s:
        s.sync()
        report = audit.verify_store(s)
        assert report.ok, report.summary()
        with s.read() as r:
            for aid in ids:
                assert [c for c, _ in r.iter_journal(aid)] == list(range(1, n + 1))
                assert r.get_agent(aid)["status"] == "completed"
        taken = [aid for aid in ids if any(e["kind"] == "agent.resumed" and e.get("host")
                                           for e in audit.records(s, aid))]
        assert taken, "the paused host's agents were not taken over"
