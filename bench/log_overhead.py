"""What keeping guest log lines in the store costs a tool call: ``python bench/log_overhead.py [--quick] [--json]``.

The ``logsteps`` bench guest logs L lines before each ``kv.incr``; every line is written
to the store's ``logs`` bucket in the commit of its step (:mod:`host.runtime.logs`). Tool
round trips through :class:`~host.runtime.Host`, alternated round by round in one process,
for:

* ``silent``: the same agent logging nothing (L = 0): the baseline;
* ``dropped_L``: L lines per call logged by the guest and held for the run's caller, but not
  written to the store (the flush replaced by one that forgets them): what logging cost
  before the store kept lines;
* ``kept_L``: the same, written to the store: the difference to ``dropped_L`` is the cost of
  keeping them (one head read and two blob writes per commit, the trim now and then).

At durability ``process`` (no fsync: a commit's CPU, not the disk's latency, which the
lines share with the step's own write). On a shared machine a difference of tens of
microseconds drowns in that figure's noise, hence the second one:

* the flush alone: one transaction writing a real agent record (as every commit does),
  against the same transaction also writing L pending lines through
  :func:`host.runtime.logs.flush`, on a real LMDB store, alternated in blocks.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # `python bench/log_overhead.py`: the repository root on the path, for `bench.*`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import json
import shutil
import statistics
import tempfile
import time
from typing import Any

from bench.rig import load_bundle, machine
from host.errors import TorporError


def measure(rounds: int, agents: int, n: int, lines: tuple[int, ...]) -> dict[str, Any]:
    import anyio

    from host.runtime import Host
    from host.runtime import logs as logs_mod

    b = load_bundle("logsteps")
    keep = logs_mod.flush

    def forget(txn: Any, agent_id: str, pending: logs_mod.Pending) -> tuple[int, int]:
        return len(pending.lines), pending.skipped

    cases = [("silent", 0, True), *((f"dropped_{k}", k, False) for k in lines), *((f"kept_{k}", k, True) for k in lines)]
    rates: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    cpu: dict[str, list[float]] = {name: [] for name, _, _ in cases}  # process CPU (all threads) per call
    tmp = Path(tempfile.mkdtemp(prefix="torpor-bench-logs-"))
    kept_lines = 0
    try:
        with Host(tmp, warm_idle_s=60.0, durability="process") as host:
            anyio.run(lambda: host.run(b, {"n": 1, "lines": 1}))  # load and compile outside the timing

            async def batch(k: int) -> tuple[int, list[str]]:
                results = []

                async def one() -> None:
                    results.append(await host.run(b, {"n": n, "lines": k}))

                async with anyio.create_task_group() as tg:
                    for _ in range(agents):
                        tg.start_soon(one)
                if any(r.status != "completed" for r in results):
                    raise TorporError("a logsteps agent did not complete")
                return sum(r.tool_calls for r in results), [r.agent_id for r in results]

            for _ in range(rounds):
                for name, k, store_them in cases:
                    logs_mod.flush = keep if store_them else forget
                    try:
                        t0, c0 = time.perf_counter(), time.process_time()
                        calls, ids = anyio.run(batch, k)
                        rates[name].append(calls / (time.perf_counter() - t0))
                        cpu[name].append((time.process_time() - c0) / calls * 1e6)
                    finally:
                        logs_mod.flush = keep
                    if store_them and k:
                        kept_lines = len(host.logs(ids[0])["lines"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if lines and kept_lines == 0:
        raise TorporError("no line was kept: the flush was not measured")
    med = {name: statistics.median(v) for name, v in rates.items()}
    us = {name: 1e6 / v for name, v in med.items()}
    cpu_us = {name: statistics.median(v) for name, v in cpu.items()}
    return {
        "agents": agents, "calls_per_agent": n, "rounds": rounds, "durability": "process",
        "round_trips_per_s": {k: round(v) for k, v in med.items()},
        "us_per_call": {k: round(v, 2) for k, v in us.items()},
        "keeping_cost_us_per_call": {str(k): round(us[f"kept_{k}"] - us[f"dropped_{k}"], 2) for k in lines},
        "kept_vs_dropped": {str(k): round(us[f"kept_{k}"] / us[f"dropped_{k}"], 3) for k in lines},
        "cpu_us_per_call": {k: round(v, 2) for k, v in cpu_us.items()},
        "keeping_cpu_us_per_call": {str(k): round(cpu_us[f"kept_{k}"] - cpu_us[f"dropped_{k}"], 2) for k in lines},
        "lines_kept_per_agent": kept_lines,
        "all_round_trips_per_s": {k: [round(x) for x in v] for k, v in rates.items()},
    }


def flush_alone(blocks: int, per_block: int, lines: tuple[int, ...]) -> dict[str, Any]:
    """Microseconds per commit transaction: a record alone, and with 1 or L lines flushed."""
    from host.runtime import logs as logs_mod
    from snapshots.lmdb_store import LmdbStore

    tmp = Path(tempfile.mkdtemp(prefix="torpor-bench-logflush-"))
    # A record of the size a run's commits write (a steps agent's is about 1.3 kB of JSON).
    rec = {"agent_id": "01BENCHAAAAAAAAAAAAAAAAAAA", "name": "logsteps", "status": "running",
           "bundle_digest": "0" * 64, "module_digest": "1" * 64, "usage": {"fuel_used": 123456, "tool_calls": 7},
           "audit_head": "2" * 64, "audit_seq": 9, "created_at": time.time(), "pad": "x" * 900}
    times: dict[str, list[float]] = {"record": [], **{f"record+{k}_lines": [] for k in lines}}
    cpus: dict[str, list[float]] = {k: [] for k in times}  # the thread's CPU: what load on the machine does not add
    try:
        store = LmdbStore.open(tmp / "db", durability="process")
        try:
            for _ in range(blocks):
                for name in times:
                    k = 0 if name == "record" else int(name.split("+")[1].split("_")[0])
                    pending = logs_mod.Pending()
                    t = c = 0.0
                    for _ in range(per_block):
                        for j in range(k):
                            pending.add("info", f"step {j}: a line of a typical length, some fifty bytes")

                        def write(txn: Any, p: logs_mod.Pending = pending, k: int = k) -> tuple[int, int]:
                            txn.put_agent(rec)
                            return logs_mod.flush(txn, str(rec["agent_id"]), p) if k else (0, 0)

                        t0, c0 = time.perf_counter(), time.thread_time()
                        done = store.transact(write)
                        t += time.perf_counter() - t0
                        c += time.thread_time() - c0
                        pending.take(*done)
                    times[name].append(t / per_block * 1e6)
                    cpus[name].append(c / per_block * 1e6)
        finally:
            store.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    cmed = {k: statistics.median(v) for k, v in cpus.items()}
    return {"blocks": blocks, "per_block": per_block, "us_per_commit": {k: round(v, 2) for k, v in med.items()},
            "flush_us": {str(k): round(med[f"record+{k}_lines"] - med["record"], 2) for k in lines},
            "cpu_us_per_commit": {k: round(v, 2) for k, v in cmed.items()},
            "flush_cpu_us": {str(k): round(cmed[f"record+{k}_lines"] - cmed["record"], 2) for k in lines}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a small smoke run (seconds)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--rounds", type=int, default=None, help="alternated rounds (default 9; --quick 2)")
    p.add_argument("--agents", type=int, default=None, help="agents per round and case (default 8; --quick 2)")
    p.add_argument("--n", type=int, default=None, help="tool calls per agent (default 200; --quick 20)")
    args = p.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 9)
    agents = args.agents or (2 if args.quick else 8)
    n = args.n or (20 if args.quick else 200)
    res = {"bench": "log_overhead", "machine": machine(), **measure(rounds, agents, n, (1, 10)),
           "flush_alone": flush_alone(5 if args.quick else 31, 50 if args.quick else 400, (1, 10))}
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"tool round trips of logsteps, {agents} agents x {n} calls, {rounds} rounds alternated, durability process")
    for name, rate in res["round_trips_per_s"].items():
        print(f"  {name:<10} {rate:>8,} round trips/s  {res['us_per_call'][name]:>8.2f} us/call  "
              f"{res['cpu_us_per_call'][name]:>8.2f} us CPU/call")
    for k, cost in res["keeping_cost_us_per_call"].items():
        print(f"  keeping {k} line(s) per call in the store: {cost:+.2f} us/call "
              f"(x{res['kept_vs_dropped'][k]} of the same run with them dropped)")
    alone = res["flush_alone"]
    print(f"one commit transaction, {alone['blocks']} alternated blocks of {alone['per_block']}:")
    for name, us in alone["us_per_commit"].items():
        print(f"  {name:<16} {us:>8.2f} us  {alone['cpu_us_per_commit'][name]:>8.2f} us CPU")
    for k, us in alone["flush_us"].items():
        print(f"  flushing {k} line(s) in it: {us:+.2f} us ({alone['flush_cpu_us'][k]:+.2f} us CPU)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
