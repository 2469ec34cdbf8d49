"""A fleet of real ``torpor serve`` processes on a real 3-node JetStream cluster: a host
SIGKILLed mid-run, its agents finished by the other, no tool call run twice, every audit
chain intact.

``steps`` agents count with ``kv.incr``, once per recorded call: a call run twice (by the
dead host and again by its successor) would push ``last`` past ``n``.
"""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path

import httpx
from conftest import BundleFactory
from fleet_helpers import agents, seed, start_host, stop
from serve_helpers import free_port

from bench.nats_cluster import NatsCluster
from host.runtime.agent import TERMINAL
from host.trust import audit
from snapshots.nats_store import NatsStore


def test_a_killed_hosts_agents_finish_on_another(bundles: BundleFactory, nats_cluster: NatsCluster,
                                                 tmp_path: Path) -> None:
    stream = f"F{uuid.uuid4().hex[:12]}"
    url = nats_cluster.url
    [steps], secret = seed(url, stream, tmp_path / "seed", [bundles.example("steps")])
    lease, n, count = 1.5, 40, 8
    pa, pb = free_port(), free_port()
    a = start_host(url, stream, tmp_path / "a", lease=lease, port=pa, log=tmp_path / "a.log")
    b = None
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
    finally:
        stop(a)
        if b is not None:
            stop(b)
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
