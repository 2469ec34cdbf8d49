"""The fleet on NATS JetStream: throughput against LMDB, and take-over time after a SIGKILL.

Two measurements, one 3-node JetStream cluster (``bench.nats_cluster``, real
``nats-server`` processes on loopback) per run:

* throughput: ``--agents`` ``steps`` agents of ``--n`` durable tool round trips each
  (``kv.incr``: a checkpoint, a journal entry and audit records committed per call), on 1,
  2 and 3 hosts of the fleet store (a process each, as a fleet's hosts are, each with its
  own NATS connection and local copy, the agents split between them and started together),
  beside one host on the LMDB store (``sync`` and ``process`` durability) in the same run:
  round trips per second; then hibernations per second (an agent's checkpoint and record
  committed, as ``bench.bench_snapshot_codec`` measures them on LMDB alone), through each
  host's group committer.
* take-over: ``--trials`` times, a ``torpor serve`` host process (lease ``--lease``) runs
  ``steps`` agents while another serves beside it; the first is SIGKILLed mid-run. Measured:
  from the kill to the first checkpoint of one of its agents written by the other host, and
  the same from its lease's expiry (the target: p50 at most 2 s after expiry with a 3 s
  lease); every agent must complete with the right output (none lost, no call run twice).

    python -m bench.fleet [--agents N] [--n N] [--trials N] [--lease S] [--quick] [--no-takeover]
                          [--no-throughput] [--json]

Helpers shared with ``tests/test_fleet.py``: :func:`seed` (bundles and a token on the fleet
store, written in-process as ``torpor push`` / ``tokens create`` would), :func:`start_host`
(a ``torpor serve --store nats://...`` process on a port, once ``/readyz`` answers).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx

from bench._stats import machine
from bench.bench_snapshot_codec import DIGEST, small_agent_record
from bench.nats_cluster import NatsCluster, _free_ports
from host.runtime import Host
from host.runtime.leases import HostLease
from host.sandbox import bundle as bundle_mod
from host.trust import operator_tokens
from snapshots.group_commit import GroupCommitter
from snapshots.nats_store import NatsStore


def seed(url: str, stream: str, local: Path, bundle_files: list[Path], tenant: str = "acme") -> tuple[list[str], str]:
    """Register bundles and create an operator token (all scopes) on the fleet store."""
    store = NatsStore.open(url, local / "copy", stream=stream)
    with Host(local, store=store) as host:
        refs = []
        for f in bundle_files:
            b = bundle_mod.load(f)
            host.register_bundle(b)
            refs.append(f"sha256:{b.digest}")
        secret = operator_tokens.create(store, tenant=tenant, scopes=["admin"])[0]
    return refs, secret


def start_host(url: str, stream: str, local: Path, *, lease: float, port: int,
               log: Path | None = None, work_slots: int | None = None) -> subprocess.Popen[bytes]:
    """A ``torpor serve`` host of the fleet; returns once ``/readyz`` answers (``work_slots``:
    how many agents it takes from the work queue at once; 0: a gateway only)."""
    out = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen([sys.executable, "-m", "host.cli", "serve", "--store", url, "--stream", stream,
                             "--local-dir", str(local), "--lease", str(lease), "--listen", f"127.0.0.1:{port}",
                             "--token-rate", "100000", "--token-burst", "100000", "--tenant-rate", "100000",
                             "--tenant-burst", "100000", "--log-level", "info",
                             *(["--work-slots", str(work_slots)] if work_slots is not None else [])],
                            stdout=out, stderr=out, env={**os.environ})
    if log is not None:
        out.close()  # type: ignore[union-attr]
    wait_ready(proc, f"http://127.0.0.1:{port}",
               lambda: log.read_text(errors="replace")[-3000:] if log is not None else "")
    return proc


def wait_ready(proc: subprocess.Popen[bytes], url: str, tail: Callable[[], str], limit_s: float = 120.0) -> None:
    """Return once the ``torpor serve`` process at ``url`` answers ``/readyz``; a process that
    exits first, or does not answer within ``limit_s``, is an error naming ``tail()`` (its last output)."""
    deadline = time.monotonic() + limit_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"torpor serve exited {proc.returncode}: {tail()}")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("torpor serve did not become ready")
        time.sleep(0.05)


def agents(base: str, secret: str) -> list[dict[str, Any]]:
    r = httpx.get(base + "/v1/agents", headers={"Authorization": f"Bearer {secret}"}, timeout=60)
    r.raise_for_status()
    return list(r.json()["agents"])


def stop(proc: subprocess.Popen[bytes], grace: float = 30) -> None:
    """SIGTERM (a drain), SIGKILL after ``grace`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


STEPS = Path(__file__).resolve().parent.parent / "guest_sdk" / "examples" / "steps"


def _steps_bundle(tmp: Path) -> Path:
    f = tmp / "steps.torpor"
    if not f.exists():
        f.write_bytes(bundle_mod.build_dir(STEPS))
    return f


async def _run_agents(host: Host, bundle: Any, agents_n: int, n: int) -> list[Any]:
    results: list[Any] = [None] * agents_n

    async def one(i: int) -> None:
        results[i] = await host.run(bundle, {"n": n})

    async with anyio.create_task_group() as tg:
        for i in range(agents_n):
            tg.start_soon(one, i)
    return results


def _hibernations(store: Any, host_no: int, count: int) -> float:
    """``count`` hibernations (an agent's checkpoint and record, the record of
    ``bench.bench_snapshot_codec``) through a group committer fed by 4 threads, as a host's
    worker pool would; the seconds they took."""
    _, record, _ = small_agent_record(bss=True)
    per = max(1, count // 4)

    def hib(i: int) -> Any:
        aid = f"agt_{hashlib.sha256(b'%d/%d' % (host_no, i)).hexdigest()[:26]}"  # random order, as a host sees them

        def fn(t: Any) -> None:
            t.put_checkpoint(aid, 1, record, 1732270000.25)
            t.put_agent({"agent_id": aid, "state": "hibernated", "seq": 1, "module": DIGEST[:16]})

        return fn

    with GroupCommitter(store) as gc:
        def submit(k: int) -> None:
            for f in [gc.submit(hib(k * per + i)) for i in range(per)]:
                f.result()

        threads = [threading.Thread(target=submit, args=(k,)) for k in range(4)]
        t0 = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        return time.perf_counter() - t0


def _worker(args: argparse.Namespace) -> int:
    """One host of a throughput case, in a process of its own (as a fleet's hosts are): open
    the store, compile the module (a warm-up run), say ``ready``, wait for ``go`` on stdin,
    run ``--agents`` agents at once, print what it measured as one JSON line."""
    if args.store.startswith("nats://"):
        store: Any = NatsStore.open(args.store, Path(args.dir) / "copy", stream=args.stream, replicas=3)
        host = Host(args.dir, store=store, lease_s=10.0)
    else:
        host = Host(args.dir, durability=args.store)
    with host:
        bundle = bundle_mod.load(Path(args.bundle))
        host.register_bundle(bundle)
        anyio.run(_run_agents, host, bundle, 1, 1)
        print("ready", flush=True)
        sys.stdin.readline()
        t0 = time.time()
        results = anyio.run(_run_agents, host, bundle, args.agents, args.n)
        t1 = time.time()
        want = {"sum": args.n * (args.n + 1) // 2, "last": args.n}
        print("ran", flush=True)
        sys.stdin.readline()  # every host's agents done: the hibernations start together too
        h0, c0 = time.time(), time.process_time()
        took = _hibernations(host.store, args.host_no, args.hibernations)
        print("hibernated", flush=True)
        sys.stdin.readline()  # every host's hibernations committed: apply them all here too
        if hasattr(host.store, "sync"):
            host.store.sync()
        cpu = time.process_time() - c0  # this host's CPU for its own and (applied) the others'
        print(json.dumps({"t0": t0, "t1": t1, "agents": args.agents, "round_trips": args.agents * args.n,
                          "h0": h0, "h1": h0 + took, "hibernations": 4 * max(1, args.hibernations // 4),
                          "hibernation_cpu_s": cpu,
                          "races": getattr(host.store, "races", None),
                          "conditions": dict(getattr(host.store, "conditions", {})),
                          "wrong": sum(1 for x in results if x.status != "completed" or x.output != want)}),
              flush=True)
    return 0


def _cpu_s(pids: list[int]) -> float:
    """The CPU seconds (user and system) the processes ``pids`` have used so far (Linux /proc)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / os.sysconf("SC_CLK_TCK")


def _throughput_case(store: str, stream: str, tmp: Path, bundle: Path, hosts: int, agents_n: int, n: int,
                     hibernations: int, servers: list[int] | None = None) -> dict[str, Any]:
    """``hosts`` worker processes on one store, ``agents_n`` agents split between them, started
    together. The hibernations' CPU is measured per host (its own commits and applying the
    others') and, with ``servers`` (the NATS nodes' pids), in the servers."""
    procs = []
    server_cpu = 0.0
    try:
        for i in range(hosts):
            share = agents_n // hosts + (1 if i < agents_n % hosts else 0)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "bench.fleet", "--worker", "--store", store, "--stream", stream,
                 "--dir", str(tmp / f"{stream}-{i}"), "--bundle", str(bundle), "--agents", str(share),
                 "--n", str(n), "--hibernations", str(hibernations // hosts), "--host-no", str(i)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        for proc in procs:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a {store} host of the throughput case did not start")
        for step in ("ready", "ran"):  # wait for every host, then start them all
            for proc in procs:
                assert proc.stdout is not None
                if step == "ran" and proc.stdout.readline().strip() != "ran":
                    raise RuntimeError(f"a {store} host of the throughput case failed")
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
        server_cpu = -_cpu_s(servers or [])
        for proc in procs:  # every host's hibernations committed: each applies the rest, then reports
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "hibernated":
                raise RuntimeError(f"a {store} host of the throughput case failed its hibernations")
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        rows = []
        for proc in procs:
            out, _ = proc.communicate(timeout=1800)
            if proc.returncode != 0:
                raise RuntimeError(f"a {store} host of the throughput case exited {proc.returncode}")
            rows.append(json.loads(out.strip().splitlines()[-1]))
        server_cpu += _cpu_s(servers or [])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    took = max(r["t1"] for r in rows) - min(r["t0"] for r in rows)
    trips = sum(r["round_trips"] for r in rows)
    hib = sum(r["hibernations"] for r in rows)
    hib_took = max(r["h1"] for r in rows) - min(r["h0"] for r in rows)
    races = [r["races"] for r in rows if r["races"] is not None]
    return {"hosts": hosts, "agents": agents_n, "round_trips": trips, "seconds": round(took, 3),
            "round_trips_per_s": round(trips / took, 1), "hibernations": hib,
            "hibernations_per_s": round(hib / hib_took, 1),
            # CPU per hibernation: in the hosts (committing their own, applying the others'), in the servers
            "host_cpu_ms_per_hibernation": round(1000 * sum(r["hibernation_cpu_s"] for r in rows) / hib, 3),
            "server_cpu_ms_per_hibernation": round(1000 * server_cpu / hib, 3) if servers else None,
            "races": sum(races) if races else None,
            "conditions": {k: sum(r["conditions"].get(k, 0) for r in rows) for k in ("partitions", "stream", "none")}
            if races else None,
            "wrong": sum(r["wrong"] for r in rows)}


def throughput(cluster: NatsCluster, tmp: Path, agents_n: int, n: int, hibernations: int) -> dict[str, Any]:
    """Round trips and hibernations per second: LMDB (sync, process) on one host, the fleet
    store on 1, 2 and 3 hosts (one process each, the work split between them)."""
    bundle = _steps_bundle(tmp)
    out: dict[str, Any] = {}
    for durability in ("sync", "process"):
        out[f"lmdb {durability}, 1 host"] = _throughput_case(
            durability, "-", tmp / f"lmdb-{durability}", bundle, 1, agents_n, n, hibernations)
    for count in (1, 2, 3):
        stream = f"B{uuid.uuid4().hex[:10]}"
        out[f"nats R3, {count} host{'s' if count > 1 else ''}"] = _throughput_case(
            cluster.url, stream, tmp, bundle, count, agents_n, n, hibernations,
            servers=[node.proc.pid for node in cluster.nodes if node.proc is not None])
    return out


def _victim_agents_done(base: str, secret: str, ids: set[str]) -> list[dict[str, Any]] | None:
    rows = [r for r in agents(base, secret) if r["agent_id"] in ids]
    if len(rows) == len(ids) and all(r["status"] in ("completed", "failed", "terminated", "in_doubt", "corrupt")
                                     for r in rows):
        return rows
    return None


def takeover(cluster: NatsCluster, tmp: Path, trials: int, lease: float, agents_n: int, n: int) -> dict[str, Any]:
    """SIGKILL a host mid-run ``trials`` times; when its agents' next checkpoint is written elsewhere."""
    stream = f"K{uuid.uuid4().hex[:10]}"
    [steps], secret = seed(cluster.url, stream, tmp / "seed", [_steps_bundle(tmp)])
    hdr = {"Authorization": f"Bearer {secret}"}
    want = {"sum": n * (n + 1) // 2, "last": n}
    port_b = _free_ports(1)[0]
    survivor = start_host(cluster.url, stream, tmp / "survivor", lease=lease, port=port_b, log=tmp / "survivor.log")
    base_b = f"http://127.0.0.1:{port_b}"
    observer = NatsStore.open(cluster.url, tmp / "observer" / "copy", stream=stream)
    # The survivor compiles the module on its first run of it: done here, not in the first trial.
    warm = httpx.post(base_b + "/v1/runs", headers=hdr, json={"agent": steps, "input": {"n": 1}, "wait": 60},
                      timeout=90)
    if warm.status_code != 201 or warm.json().get("status") != "completed":
        raise RuntimeError(f"the survivor could not run the warm-up agent: {warm.text[:500]}")
    samples: list[dict[str, float]] = []
    lost = wrong = 0
    try:
        for trial in range(trials):
            port = _free_ports(1)[0]
            victim = start_host(cluster.url, stream, tmp / f"victim-{trial}", lease=lease, port=port,
                                log=tmp / f"victim-{trial}.log")
            try:
                base = f"http://127.0.0.1:{port}"
                # Runs go through the fleet's work queue to whichever host pulls them: the
                # survivor is paused (past its pull's expiry) while they are posted and get
                # under way, so that the victim holds every one of them when it is killed.
                survivor.send_signal(signal.SIGSTOP)
                try:
                    time.sleep(1.5)
                    ids = {httpx.post(base + "/v1/runs", headers=hdr, json={"agent": steps, "input": {"n": n}},
                                      timeout=60).json()["agent_id"] for _ in range(agents_n)}
                    deadline = time.monotonic() + 60
                    while True:  # under way: checkpoints written, none finished
                        observer.sync()
                        with observer.read() as r:
                            if all(r.latest_checkpoint(a) for a in ids):
                                break
                        if time.monotonic() > deadline:
                            raise RuntimeError("the victim's agents did not get under way")
                        time.sleep(0.01)
                finally:
                    survivor.send_signal(signal.SIGCONT)
                killed_at = time.time()
                victim.send_signal(signal.SIGKILL)
                victim.wait()
            finally:
                if victim.poll() is None:
                    victim.kill()
                    victim.wait()
            expires = max((float(h.get("expires_at", 0)) for h in HostLease.holders(observer)
                           if h.get("pid") == victim.pid), default=float("nan"))
            first: float | None = None
            deadline = time.monotonic() + 60 + lease
            while first is None:
                observer.sync()
                with observer.read() as r:
                    after = [c.created_at for a in ids for c in r.list_checkpoints(a) if c.created_at > killed_at]
                if after:
                    first = min(after)
                elif time.monotonic() > deadline:
                    break
                else:
                    time.sleep(0.01)
            deadline = time.monotonic() + 120
            rows = None
            while rows is None and time.monotonic() < deadline:
                rows = _victim_agents_done(base_b, secret, ids)
                if rows is None:
                    time.sleep(0.1)
            if rows is None:
                lost += len(ids)
            else:
                wrong += sum(1 for row in rows if row["status"] != "completed" or row.get("output") != want)
            if first is not None:
                samples.append({"kill_to_checkpoint_s": first - killed_at, "expiry_to_checkpoint_s": first - expires})
            print(f"trial {trial + 1}/{trials}: " + (f"taken over {first - killed_at:.2f} s after the kill, "
                  f"{first - expires:.2f} s after the lease expired" if first is not None else "NOT taken over"),
                  file=sys.stderr, flush=True)
    finally:
        observer.close()
        stop(survivor)

    def summary(key: str) -> dict[str, float]:
        xs = sorted(s[key] for s in samples)
        return {"p50": round(statistics.median(xs), 3), "max": round(xs[-1], 3), "min": round(xs[0], 3)} if xs else {}

    return {"trials": trials, "taken_over": len(samples), "lease_s": lease, "agents_per_trial": agents_n, "n": n,
            "kill_to_checkpoint_s": summary("kill_to_checkpoint_s"),
            "expiry_to_checkpoint_s": summary("expiry_to_checkpoint_s"),
            "agents_lost": lost, "agents_wrong": wrong}


def run(args: argparse.Namespace) -> dict[str, Any]:
    quick = bool(args.quick)
    agents_n = args.agents or (4 if quick else 32)
    n = args.n or (10 if quick else 50)
    trials = args.trials or (2 if quick else 20)
    with tempfile.TemporaryDirectory(prefix="torpor-fleet-bench-") as d:
        tmp = Path(d)
        with NatsCluster(tmp / "nats", 3) as cluster:
            res: dict[str, Any] = {"machine": machine(), "load_avg": os.getloadavg()}
            res["throughput"] = {} if args.no_throughput else throughput(
                cluster, tmp, agents_n, n, args.hibernations or (400 if quick else 6000))
            if not args.no_takeover:
                res["takeover"] = takeover(cluster, tmp, trials, args.lease, 4, args.takeover_n)
            res["load_avg_after"] = os.getloadavg()
    return res


def show(res: dict[str, Any]) -> None:
    print(f"{'case':38} {'round trips':>12} {'seconds':>8} {'per s':>8} {'hibernations/s':>15} "
          f"{'host ms/hib':>12} {'server ms/hib':>14} {'races':>6} {'wrong':>6}")
    for name, c in res["throughput"].items():
        races = "-" if c.get("races") is None else c["races"]
        server = "-" if c.get("server_cpu_ms_per_hibernation") is None else c["server_cpu_ms_per_hibernation"]
        print(f"{name:38} {c['round_trips']:>12} {c['seconds']:>8} {c['round_trips_per_s']:>8} "
              f"{c['hibernations_per_s']:>15} {c['host_cpu_ms_per_hibernation']:>12} {server:>14} {races:>6} "
              f"{c['wrong']:>6}")
    print(f"load average before {res['load_avg']}, after {res['load_avg_after']}")
    t = res.get("takeover")
    if t is None:
        return
    print(f"take-over, lease {t['lease_s']} s, {t['taken_over']}/{t['trials']} trials: kill -> first checkpoint "
          f"elsewhere {t['kill_to_checkpoint_s']}; lease expiry -> it {t['expiry_to_checkpoint_s']}; "
          f"agents lost {t['agents_lost']}, wrong {t['agents_wrong']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--agents", type=int, default=None, help="agents per throughput case (default 32; --quick 4)")
    p.add_argument("--n", type=int, default=None, help="round trips per agent (default 50; --quick 10)")
    p.add_argument("--trials", type=int, default=None, help="SIGKILLs (default 20; --quick 2)")
    p.add_argument("--lease", type=float, default=3.0, help="the hosts' lease in seconds (default 3)")
    p.add_argument("--takeover-n", type=int, default=100, help="round trips of each agent of a take-over trial")
    p.add_argument("--quick", action="store_true", help="a small smoke run")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--no-takeover", action="store_true", help="measure the throughput only")
    p.add_argument("--no-throughput", action="store_true", help="measure the take-over only")
    # One host of a throughput case (run by the bench itself, in a process of its own).
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for flag in ("--store", "--stream", "--dir", "--bundle"):
        p.add_argument(flag, help=argparse.SUPPRESS)
    p.add_argument("--host-no", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--hibernations", type=int, default=None,
                   help="hibernations per throughput case, split between its hosts (default 6,000; --quick 400)")
    args = p.parse_args(argv)
    if args.worker:
        return _worker(args)
    res = run(args)
    res["command"] = "python -m bench.fleet " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.json:
        print(json.dumps(res, indent=2, default=str))
    else:
        show(res)
    t = res.get("takeover") or {}
    failed = t.get("agents_lost") or t.get("agents_wrong") or any(
        c["wrong"] for c in res["throughput"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
