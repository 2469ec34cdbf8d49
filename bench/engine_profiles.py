"""What each engine profile costs a compute-bound guest, and one warm instance's mappings.

    python bench/engine_profiles.py [--rounds 200]

The ``dense`` default trades bounds-check elision (guard pages) for density; this
prints the price on bench/guests/crunch (a memory-bound C loop), best of 5, and
spawn + run of ``hello`` for comparison (see bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.rig import load_bundle, make_engine, make_rig, map_count
from host.sandbox.engine import PROFILES
from host.sandbox.execution import Completed, Suspended


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out = {}
    crunch, hello, steps = load_bundle("crunch"), load_bundle("hello"), load_bundle("steps")
    for profile in PROFILES:
        eng = make_engine(profile)
        rig = make_rig(eng, crunch)
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            res = rig.execution(json.dumps({"n": args.rounds}).encode()).start()
            best = min(best, time.perf_counter() - t0)
            assert isinstance(res, Completed), res
        hr = make_rig(eng, hello)
        ts = []
        for _ in range(2000):
            t0 = time.perf_counter_ns()
            hr.execution(b'{"name":"ada"}').start()
            ts.append(time.perf_counter_ns() - t0)
        ts.sort()
        sr = make_rig(eng, steps)
        m0 = map_count()
        held = []
        for _ in range(500):
            ex = sr.execution(b'{"n": 3}')
            assert isinstance(ex.start(), Suspended)
            held.append(ex)
        maps = (map_count() - m0) / 500
        out[profile] = {"crunch_ms": round(best * 1000, 1), "hello_spawn_run_p50_us": round(ts[len(ts) // 2] / 1000, 1),
                        "maps_per_warm_instance": round(maps, 2)}
        del held
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{'profile':12} {'crunch ms':>10} {'hello spawn+run p50 µs':>24} {'mappings/warm instance':>24}")
        for p, r in out.items():
            print(f"{p:12} {r['crunch_ms']:>10} {r['hello_spawn_run_p50_us']:>24} {r['maps_per_warm_instance']:>24}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
