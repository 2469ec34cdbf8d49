"""Spawn and spawn-plus-run of `hello`, Torpor against plain wasmtime-py, in one process.

    python bench/bench_spawn.py [--n 10000] [--json]

*spawn*: a fresh, isolated instance of a cached bundle, armed with its fuel
budget, memory cap and deadline, up to the guest's first instruction.
*spawn+run*: the same, then `hello` runs to completion with its input and
output through the ABI. The baseline does the same work the naive way with
wasmtime-py's public API (new Store, InstancePre.instantiate, exports, call).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import wasmtime

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stats import machine, percentiles, table

from host import bundle as bundle_mod
from host.execution import Execution
from host.runtime import Host

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000, help="spawns per case (default 10000)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.n <= 0:
        ap.error("--n must be a positive number of spawns")

    b = bundle_mod.load_bytes(bundle_mod.build_dir(ROOT / "guest_sdk" / "examples" / "hello"))
    with tempfile.TemporaryDirectory() as tmp:
        host = Host(tmp)
        loaded, pre = host.load_module(b)
        limits = host.limits_for(b, None)
        payload = json.dumps({"name": "ada"}).encode()

        def torpor_spawn() -> None:
            Execution(loaded, pre, limits, payload).prepare()

        def torpor_spawn_run() -> None:
            out = Execution(loaded, pre, limits, payload).start()
            assert out.output == {"greeting": "hello, ada"}  # type: ignore[union-attr]

        # Baseline: the same module, naive wasmtime-py (the ABI imports as plain Python functions).
        eng = loaded.engine.wasmtime
        mod = loaded.module
        state: dict[str, object] = {}
        linker = wasmtime.Linker(eng)
        i32 = wasmtime.ValType.i32()

        def ft(p: int, r: int) -> wasmtime.FuncType:
            return wasmtime.FuncType([i32] * p, [i32] * r)

        def b_input_len() -> int:
            return len(payload)

        def b_input_read(ptr: int, cap: int) -> int:
            mem = state["mem"]
            mem.write(state["store"], payload[:cap], ptr)  # type: ignore[attr-defined]
            return min(cap, len(payload))

        def b_output_write(ptr: int, n: int) -> int:
            mem = state["mem"]
            state["out"] = json.loads(mem.read(state["store"], ptr, ptr + n))  # type: ignore[attr-defined]
            return 0

        linker.define_func("torpor", "input_len", ft(0, 1), b_input_len)
        linker.define_func("torpor", "input_read", ft(2, 1), b_input_read)
        linker.define_func("torpor", "output_write", ft(2, 1), b_output_write)
        linker.define_func("torpor", "log", ft(3, 1), lambda a, b, c: 0)
        linker.define_func("torpor", "response_len", ft(0, 1), lambda: 0)
        linker.define_func("torpor", "response_read", ft(2, 1), lambda a, b: 0)
        linker.define_func("torpor", "abort", ft(3, 0), lambda a, b, c: None)
        base_pre = linker.instantiate_pre(mod)

        def baseline_spawn() -> None:
            store = wasmtime.Store(eng)
            store.set_fuel(limits.fuel)
            store.set_epoch_deadline(1000)
            inst = base_pre.instantiate(store)
            ex = inst.exports(store)
            state["mem"] = ex["memory"]
            state["entry"] = ex["torpor_main"]
            state["store"] = store

        def baseline_spawn_run() -> None:
            baseline_spawn()
            state["entry"](state["store"])  # type: ignore[operator]
            assert state["out"] == {"greeting": "hello, ada"}

        def measure(fn: object, n: int) -> dict[str, float]:
            for _ in range(min(500, n)):
                fn()  # type: ignore[operator]
            samples = []
            gc.disable()
            try:
                for _ in range(n):
                    t0 = time.perf_counter_ns()
                    fn()  # type: ignore[operator]
                    samples.append(time.perf_counter_ns() - t0)
            finally:
                gc.enable()
            return percentiles(samples)

        rows = {
            "torpor spawn": measure(torpor_spawn, args.n),
            "wasmtime-py naive spawn (baseline)": measure(baseline_spawn, args.n),
            "torpor spawn+run hello": measure(torpor_spawn_run, args.n),
            "wasmtime-py naive spawn+run (baseline)": measure(baseline_spawn_run, args.n),
        }
        host.close()
    result = {
        "machine": machine(),
        "cases": rows,
        "spawn_p50_us": rows["torpor spawn"]["p50_us"],
        "spawn_p99_us": rows["torpor spawn"]["p99_us"],
        "baseline_spawn_p50_us": rows["wasmtime-py naive spawn (baseline)"]["p50_us"],
        "spawn_speedup_p50": rows["wasmtime-py naive spawn (baseline)"]["p50_us"] / rows["torpor spawn"]["p50_us"],
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(table(rows))
        print(f"\nspawn p50 {result['spawn_p50_us']:.1f} µs (target ≤ 75), p99 {result['spawn_p99_us']:.1f} µs (target ≤ 500); "
              f"{result['spawn_speedup_p50']:.2f}x the naive baseline at p50")
    return 0


if __name__ == "__main__":
    sys.exit(main())
