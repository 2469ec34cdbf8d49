"""Benchmark of the instance side of a resume, with and without the memory pool.

Run:  python bench/memory_pool.py [--n 20000] [--json]

What is measured, in one run, for the 896 KiB bench agent ``mib`` on the ``dense``
engine, once with Wasmtime's own allocation (``memory_pool=False``) and once with the
recycling pool (host/sandbox/memory_pool.c):

* the loop: instantiate; ``memory.grow`` by 12 pages (2 -> 14: what a restore of ``mib``
  does without a size hint); drop the instance;
* ``Execution.restore`` of a real checkpoint of ``mib`` taken at its third tool call,
  piece by piece: a fresh instance (with the snapshot's size as a hint), the grow to the
  snapshot's size, writing the changed chunks, setting the globals; then the release.

The read and decode of the checkpoint are not included (see ``torpor bench suspend``
for the whole resume). Page faults: run under ``perf stat -e page-faults``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.rig import load_bundle, make_rig
from host.sandbox.engine import Engine, EngineConfig
from host.sandbox.execution import PAGE, Execution
from snapshots.delta import apply_delta


def _summary(xs: list[int]) -> dict[str, float]:
    xs = sorted(xs)
    return {f"p{q}_us": round(xs[min(len(xs) - 1, len(xs) * q // 100)] / 1000, 1) for q in (50, 90, 99)}


def measure(pool: bool, n: int) -> dict[str, Any]:
    rig = make_rig(Engine(EngineConfig(memory_pool=pool)), load_bundle("mib"))
    if pool and rig.engine.memory_pool is None:
        raise SystemExit("the native memory pool is unavailable (TORPOR_NATIVE=0, or no zig)")
    out: dict[str, Any] = {}

    ex = rig.execution(b"")
    ti, tg, tr = [], [], []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        ex._instantiate()
        t1 = time.perf_counter_ns()
        ex._mem.grow(ex._store, 12)
        t2 = time.perf_counter_ns()
        ex.release()
        t3 = time.perf_counter_ns()
        ti.append(t1 - t0)
        tg.append(t2 - t1)
        tr.append(t3 - t2)
    out["loop: instantiate"] = _summary(ti)
    out["loop: grow 2->14 pages"] = _summary(tg)
    out["loop: release"] = _summary(tr)

    ex = rig.execution(b'{"n": 3}')
    ex.start()
    cap = ex.capture()
    pending = ex.pending
    assert pending is not None
    ex.release()
    names = ("instantiate", "grow", "write chunks", "globals", "restore total", "release")
    parts: dict[str, list[int]] = {k: [] for k in names}
    size = cap.memory.memory_size
    for _ in range(n):
        t0 = time.perf_counter_ns()
        r = Execution(rig.loaded, rig.pre, rig.limits, b"", call_seq=pending.seq)
        r._instantiate(size)
        t1 = time.perf_counter_ns()
        cur = r._mem.data_len(r._store)
        r._mem.grow(r._store, (size - cur + PAGE - 1) // PAGE)
        t2 = time.perf_counter_ns()
        apply_delta(cap.memory, r._buffer())
        t3 = time.perf_counter_ns()
        r.restore_globals(cap.globals)
        t4 = time.perf_counter_ns()
        r.release()
        t5 = time.perf_counter_ns()
        for k, v in zip(names, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0, t5 - t4), strict=True):
            parts[k].append(v)
    for k, samples in parts.items():
        out[f"restore: {k}"] = _summary(samples)
    if rig.engine.memory_pool is not None:
        out["pool_stats"] = rig.engine.memory_pool.stats()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000, help="iterations per case (default 20,000)")
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    args = ap.parse_args()
    results = {"wasmtime": measure(False, args.n), "pool": measure(True, args.n)}
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{'case (µs)':32s} {'wasmtime p50':>13s} {'p99':>7s} {'pool p50':>10s} {'p99':>7s}")
    for k, v in results["wasmtime"].items():
        p = results["pool"][k]
        print(f"{k:32s} {v['p50_us']:13.1f} {v['p99_us']:7.1f} {p['p50_us']:10.1f} {p['p99_us']:7.1f}")


if __name__ == "__main__":
    main()
