"""How late a sleeping agent wakes: the server's timer loop against an in-memory timer.

N agents (the C guest ``tests/guests/sleeper``) each call ``timer.sleep`` with a deadline
spread evenly over ``--spread`` seconds (4 by default: 50 wakes a second for 200 agents), so each parks ``sleeping`` (hibernated, its wake-up in the store's
wake index). Then the real timer loop of ``torpor serve`` (``Scheduler.timers``, in this
process, on one ``Host``) wakes them. Lateness is how long after its deadline each agent
was awake again: restored from its checkpoint, its wake committed (the ``late_s`` of its
``agent.woke`` audit record). The baseline, in the same run and process, is the obvious
timer that keeps everything in memory: N tasks each ``anyio.sleep`` to the same deadlines.
Each wake is a whole resume (restore, rewind, the answer's commits, the agent's finish), so
a short spread measures how many of those the host does a second as much as the timer.

    python bench/timers.py [--agents N] [--spread S] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from bench._stats import machine, percentiles, table
from host.runtime import Host, timers
from host.sandbox import bundle as bundle_mod
from host.server.scheduler import Scheduler

SLEEPER = Path(__file__).resolve().parent.parent / "tests" / "guests" / "sleeper"
LEAD_S = 1.0  # and start this long after the last agent parked


async def _baseline(deadlines: list[float]) -> list[int]:
    late: list[int] = []

    async def one(at: float) -> None:
        await anyio.sleep(max(0.0, at - time.time()))
        late.append(int((time.time() - at) * 1e9))

    async with anyio.create_task_group() as tg:
        for at in deadlines:
            tg.start_soon(one, at)
    return late


async def _server(host: Host, b: Any, n: int, spread: float) -> tuple[list[int], float]:
    t0 = time.perf_counter()
    ids = []
    for _ in range(n):  # parked with a placeholder deadline far off, then all re-timed below
        res = await host.run(b, {"ms": 3_600_000, "sleeps": 1, "incr": 0})
        assert res.status == "sleeping", res
        ids.append(res.agent_id)
    park_s = (time.perf_counter() - t0) / n
    # The deadlines, spread and in the future: each agent's journaled deadline, record and
    # wake-up moved together in one write (parking N agents takes an unknown time first).
    base = time.time() + LEAD_S
    deadlines = {aid: base + spread * i / n for i, aid in enumerate(ids)}

    def retime(txn: Any) -> None:
        for aid, at in deadlines.items():
            rec = txn.get_agent(aid)
            timers.remove(txn, aid, rec["wake_at"])
            timers.put(txn, aid, at, "sleep")
            seq = rec["pending"]["seq"]
            entry = txn.get_journal(aid, seq)
            txn.put_journal(aid, seq, {**entry, "wake_at": at})
            rec["wake_at"] = at
            txn.put_agent(rec)

    host.store.transact(retime)
    sched = Scheduler(host)
    async with anyio.create_task_group() as tg:
        sched.attach(tg)
        tg.start_soon(sched.timers)
        while any(host.get_agent(a)["status"] != "completed" for a in ids):
            await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    late = []
    for aid in ids:
        [woke] = [r for r in host.audit_records(aid) if r["kind"] == "agent.woke"]
        late.append(int(float(woke["late_s"]) * 1e9))
    return late, park_s


def run(n: int, spread: float = 4.0) -> dict[str, Any]:
    b = bundle_mod.load_bytes(bundle_mod.build_dir(SLEEPER), source=str(SLEEPER))
    with tempfile.TemporaryDirectory() as d:
        async def main() -> dict[str, Any]:
            with Host(Path(d) / "store", durability="process") as host:
                server_late, park_s = await _server(host, b, n, spread)
            base = time.time() + LEAD_S
            baseline_late = await _baseline([base + spread * i / n for i in range(n)])
            return {"rows": {"server timer loop: deadline -> awake": percentiles(server_late),
                             "baseline anyio.sleep: deadline -> running": percentiles(baseline_late)},
                    "park_ms_mean": park_s * 1000}

        out: dict[str, Any] = anyio.run(main)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, help="sleeping agents (default 200; --quick 20)")
    parser.add_argument("--spread", type=float, default=4.0, help="seconds the deadlines are spread over (default 4)")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    n = args.agents or (20 if args.quick else 200)
    if args.spread <= 0:
        parser.error("--spread must be a positive number of seconds")
    spread = 1.0 if args.quick else args.spread
    out = run(n, spread)
    if args.json:
        print(json.dumps({"machine": machine(), "agents": n, "spread_s": spread, **out}, indent=2))
    else:
        print(f"{n} agents, deadlines spread over {spread:g}s; lateness in µs")
        print(table(out["rows"]))
        print(f"spawn + run to the park, mean: {out['park_ms_mean']:.2f} ms per agent")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
