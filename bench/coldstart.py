"""``torpor bench coldstart``: spawn latency of a cached bundle against naive wasmtime-py and a
Python subprocess per agent (also ``python bench/coldstart.py [--quick] [--json] ...``)."""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # `python bench/coldstart.py ...`: the repository root on the path, for `bench.*`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import json
import subprocess
import time
from collections.abc import Callable
from typing import Any

import wasmtime

from bench.rig import (
    Latency,
    Progress,
    Rig,
    cdf,
    draw_plot,
    load_bundle,
    machine,
    make_engine,
    make_rig,
    no_gc,
    positive,
    table,
)
from host.errors import TorporError
from host.sandbox import abi, interrupts
from host.sandbox.execution import Completed, Execution

_HELLO_PY = (
    "import json,sys\n"
    "d=json.load(sys.stdin)\n"
    "sys.stdout.write(json.dumps({'greeting':'hello, '+d['name']}))\n"
)


def _naive_baseline(rig: Rig, payload: bytes) -> tuple[Callable[[], None], Callable[[], None]]:
    """Spawn (and spawn + run) with plain wasmtime-py: Wasmtime's default engine, public API only."""
    cfg = wasmtime.Config()
    cfg.consume_fuel = True
    cfg.epoch_interruption = True
    eng = wasmtime.Engine(cfg)
    mod = wasmtime.Module(eng, rig.bundle.module)
    state: dict[str, Any] = {}
    linker = wasmtime.Linker(eng)
    i32 = wasmtime.ValType.i32()

    def ft(p: int, r: int) -> wasmtime.FuncType:
        return wasmtime.FuncType([i32] * p, [i32] * r)

    def input_read(ptr: int, cap: int) -> int:
        state["mem"].write(state["store"], payload[:cap], ptr)
        return min(cap, len(payload))

    def output_write(ptr: int, n: int) -> int:
        state["out"] = json.loads(state["mem"].read(state["store"], ptr, ptr + n))
        return 0

    linker.define_func("torpor", "input_len", ft(0, 1), lambda: len(payload))
    linker.define_func("torpor", "input_read", ft(2, 1), input_read)
    linker.define_func("torpor", "output_write", ft(2, 1), output_write)
    linker.define_func("torpor", "log", ft(3, 1), lambda a, b, c: 0)
    linker.define_func("torpor", "response_len", ft(0, 1), lambda: 0)
    linker.define_func("torpor", "response_read", ft(2, 1), lambda a, b: 0)
    linker.define_func("torpor", "abort", ft(3, 0), lambda a, b, c: None)
    pre = linker.instantiate_pre(mod)

    def spawn() -> None:
        store = wasmtime.Store(eng)
        store.set_limits(memory_size=rig.limits.memory_bytes)
        store.set_fuel(1_000_000_000)
        store.set_epoch_deadline(1000)
        inst = pre.instantiate(store)
        ex = inst.exports(store)
        state["mem"] = ex["memory"]
        state["entry"] = ex[abi.ENTRY_EXPORT]
        state["store"] = store

    def spawn_run() -> None:
        spawn()
        state["entry"](state["store"])
        if state.get("out") != {"greeting": "hello, ada"}:
            raise TorporError(f"baseline hello answered {state.get('out')!r}")

    return spawn, spawn_run


def _time_loop(fn: Callable[[], None], n: int, progress: Progress, warmup: int = 200) -> Latency:
    """``n`` timed calls of ``fn``; a signal is honoured between calls.

    Why the check here: Ctrl-C or SIGTERM landing inside Wasmtime (a spawn's
    instantiation) is only recorded, for the execution to raise when it is back in
    Python, and a spawn that succeeds never looks again, so a loop of spawns would
    run on.
    """
    for _ in range(min(warmup, n)):
        fn()
    lat = Latency()
    with no_gc():
        for i in range(n):
            t0 = time.perf_counter_ns()
            fn()
            lat.add(time.perf_counter_ns() - t0)
            if i & 255 == 0:
                progress.update(i)
                interrupts.raise_if_requested()
    progress.update(n)
    progress.done()
    return lat


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Spawn latency of a cached bundle against naive wasmtime-py and a Python subprocess."""
    n = positive("--n", args.n if args.n is not None else (300 if args.quick else 10_000))
    n_sub = positive("--subprocesses", args.subprocesses if args.subprocesses is not None else (5 if args.quick else 200))
    engine = make_engine(args.engine)
    rig = make_rig(engine, load_bundle("hello"))
    payload = b'{"name":"ada"}'
    show = args.progress

    def spawn() -> None:
        Execution(rig.loaded, rig.pre, rig.limits, payload).prepare()

    def spawn_run() -> None:
        out = Execution(rig.loaded, rig.pre, rig.limits, payload).start()
        if not isinstance(out, Completed) or out.output != {"greeting": "hello, ada"}:
            raise TorporError(f"hello did not complete: {out}")

    naive_spawn, naive_spawn_run = _naive_baseline(rig, payload)

    def subprocess_agent() -> None:
        r = subprocess.run([sys.executable, "-I", "-c", _HELLO_PY], input=b'{"name": "ada"}', capture_output=True,
                           check=False)
        if r.returncode != 0 or b"hello, ada" not in r.stdout:
            raise TorporError(f"the subprocess baseline failed: {r.stderr.decode(errors='replace')[:200]}")

    lats = {
        "torpor spawn": _time_loop(spawn, n, Progress("spawn", n, show)),
        "wasmtime-py naive spawn": _time_loop(naive_spawn, n, Progress("naive spawn", n, show)),
        "torpor spawn+run hello": _time_loop(spawn_run, n, Progress("spawn+run", n, show)),
        "wasmtime-py naive spawn+run": _time_loop(naive_spawn_run, n, Progress("naive +run", n, show)),
        "python subprocess per agent": _time_loop(subprocess_agent, n_sub, Progress("subprocess", n_sub, show), warmup=2),
    }
    cases = {k: v.summary() for k, v in lats.items()}
    res: dict[str, Any] = {
        "bench": "coldstart", "engine": engine.config.profile, "machine": machine(), "cases": cases,
        "spawn_p50_us": cases["torpor spawn"]["p50_us"],
        "spawn_p90_us": cases["torpor spawn"]["p90_us"],
        "spawn_p99_us": cases["torpor spawn"]["p99_us"],
        "spawn_max_us": cases["torpor spawn"]["max_us"],
        "spawn_run_p50_us": cases["torpor spawn+run hello"]["p50_us"],
        "baseline_spawn_p50_us": cases["wasmtime-py naive spawn"]["p50_us"],
        "baseline_spawn_p99_us": cases["wasmtime-py naive spawn"]["p99_us"],
        "baseline_spawn_run_p50_us": cases["wasmtime-py naive spawn+run"]["p50_us"],
        "baseline_subprocess_p50_us": cases["python subprocess per agent"]["p50_us"],
    }

    def draw(plt: Any) -> None:
        _fig, ax = plt.subplots(figsize=(8, 5))
        cdf(ax, {k: v.samples for k, v in lats.items()}, f"cold start, {engine.config.profile} engine ({n:,} spawns)")

    res.update(draw_plot(args.plot, draw))
    return res


def show(r: dict[str, Any]) -> None:
    print(table(r["cases"]))
    print(f"\nspawn p50 {r['spawn_p50_us']} µs (target ≤ 75), p99 {r['spawn_p99_us']} µs (target ≤ 500); "
          f"naive wasmtime-py p50 {r['baseline_spawn_p50_us']} µs; a Python subprocess p50 "
          f"{r['baseline_subprocess_p50_us'] / 1000:.1f} ms  [engine {r['engine']}]")


if __name__ == "__main__":
    from bench.cli import main

    sys.exit(main(["coldstart", *sys.argv[1:]]))
