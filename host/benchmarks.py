"""``torpor bench``: load tests of cold start, suspend/resume, density and tool round trips.

Each benchmark measures Torpor and, in the same process and the same run, a
baseline doing the same work the obvious way, because a figure without its
baseline on the same machine says little:

* ``coldstart``: spawn a fresh instance of a cached bundle (and spawn + run
  ``hello``) against naive wasmtime-py and against a Python subprocess per agent;
* ``suspend``: suspend (unwind + capture + encode + durable LMDB commit) and
  resume (read + decode + restore + rewind) of real guests at real tool calls,
  against a snapshot that copies and compresses the whole linear memory;
* ``density``: hibernate N agents (real snapshots of a real guest, committed to
  a real LMDB store through the GroupCommitter) and report disk bytes, RSS and
  rate; then hold as many warm instances as the process can and say where it
  stopped and why;
* ``steps``: tool round trips per second, through the real host runtime with
  warm instances, through the bare execution core, and against a baseline
  whose tool import answers synchronously (no unwind, no durability).

The benchmarks drive :class:`~host.sandbox.execution.Execution` and the store directly
where they measure a mechanism (so that the figure is the mechanism's, not the
orchestrator's), and :class:`~host.runtime.Host` where they measure what a
user of the runtime gets. Latencies go into HDR histograms when the
``hdrhistogram`` package is installed (exact sorted samples otherwise); a PNG
is drawn with matplotlib when it is installed.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import wasmtime

from host.errors import ConfigError, TorporError
from host.ids import new_agent_id
from host.sandbox import abi, imports
from host.sandbox import bundle as bundle_mod
from host.sandbox.bundle import Bundle
from host.sandbox.engine import PROFILES, Engine, EngineConfig, LoadedModule
from host.sandbox.execution import (
    Captured,
    Completed,
    Execution,
    Failed,
    Limits,
    Outcome,
    PendingCall,
    Suspended,
    current,
    define_import,
)
from snapshots.delta import full_copy
from snapshots.errors import SnapshotError, StoreError
from snapshots.format import GlobalValue, Snapshot, decode_snapshot, encode_snapshot
from snapshots.group_commit import GroupCommitter
from snapshots.lmdb_store import LmdbStore, resolve_durability

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "guest_sdk" / "examples"
BENCH_GUESTS = ROOT / "bench" / "guests"

#: The targets of issues 2, 3 and 6 (2-core machine, one process).
TARGETS: dict[str, float] = {
    "spawn_p50_us": 75.0,
    "spawn_p99_us": 500.0,
    "suspend_p50_us": 250.0,
    "resume_p50_us": 250.0,
    "bytes_per_agent": 512.0,
    "hibernations_per_s": 10_000.0,
    "warm_instances": 30_000.0,
    "rss_per_warm_kib": 24.0,
    "round_trips_per_s": 10_000.0,
}

BIG_FUEL = 10**15  # benchmarks measure time, not budgets
BENCH_MARKER = "torpor-bench"


# -- measurement helpers ------------------------------------------------------------
class Latency:
    """Latency samples in nanoseconds, summarised as p50/p90/p99/max in microseconds.

    Why HDR histograms: a million samples summarised in constant memory with
    3 significant digits at every percentile; the raw samples are also kept
    (up to ``keep``) for the plot.
    """

    def __init__(self, keep: int = 200_000) -> None:
        self._keep = keep
        self.samples: list[int] = []
        self.count = 0
        self._hist: Any = None
        try:
            from hdrh.histogram import HdrHistogram

            self._hist = HdrHistogram(1, 600 * 10**9, 3)
        except ImportError:  # exact percentiles from the kept samples instead
            self._hist = None

    def add(self, ns: int) -> None:
        ns = max(1, int(ns))
        self.count += 1
        if self._hist is not None:
            self._hist.record_value(ns)
        if len(self.samples) < self._keep:
            self.samples.append(ns)

    def summary(self) -> dict[str, float]:
        if self.count == 0:
            return {"n": 0, "p50_us": 0.0, "p90_us": 0.0, "p99_us": 0.0, "max_us": 0.0, "mean_us": 0.0}
        if self._hist is not None:
            h = self._hist
            pick = [h.get_value_at_percentile(q) for q in (50, 90, 99)]
            mx, mean = h.get_max_value(), h.get_mean_value()
        else:
            xs = sorted(self.samples)
            pick = [xs[min(len(xs) - 1, int(q * len(xs)))] for q in (0.50, 0.90, 0.99)]
            mx, mean = xs[-1], sum(xs) / len(xs)
        return {"n": self.count, "p50_us": round(pick[0] / 1000, 1), "p90_us": round(pick[1] / 1000, 1),
                "p99_us": round(pick[2] / 1000, 1), "max_us": round(mx / 1000, 1), "mean_us": round(mean / 1000, 1)}


class Progress:
    """A one-line progress counter on stderr (``\\r``-rewritten), at most 5 updates a second.

    On by default only when stderr is a terminal, so logs and CI output stay clean.
    """

    def __init__(self, label: str, total: int, enabled: bool) -> None:
        self.label, self.total, self.enabled = label, total, enabled
        self._t0 = self._last = time.monotonic()
        self._shown = False

    def update(self, done: int, extra: str = "") -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.2 and done < self.total:
            return
        self._last = now
        rate = done / max(now - self._t0, 1e-9)
        pct = 100.0 * done / self.total if self.total else 100.0
        bar = "#" * int(pct / 5)
        sys.stderr.write(f"\r{self.label:<12} [{bar:<20}] {done:>9,}/{self.total:,} {pct:5.1f}% {rate:>9,.0f}/s {extra}   ")
        sys.stderr.flush()
        self._shown = True

    def done(self) -> None:
        if self.enabled and self._shown:
            sys.stderr.write("\n")
            sys.stderr.flush()


def rss_kib() -> int:
    """The process's resident set (VmRSS) in KiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:  # pragma: no cover - not Linux
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def map_count() -> int:
    """The process's number of memory mappings (what vm.max_map_count limits)."""
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:  # pragma: no cover - not Linux
        return -1


def _read_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def mem_available_kib() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1])
    except OSError:  # pragma: no cover
        pass
    return None


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1]) // 1024
    try:
        from importlib.metadata import version

        wt = version("wasmtime")
    except Exception:  # pragma: no cover
        wt = "unknown"
    return {"cpus": os.cpu_count(), "cpu": cpu, "mem_mib": mem, "python": platform.python_version(),
            "system": f"{platform.system()} {platform.release()}", "wasmtime": wt,
            "vm_max_map_count": _read_int("/proc/sys/vm/max_map_count")}


def cpu_speed_ms() -> float:
    """Milliseconds a fixed pure-Python loop takes (best of 3): a yardstick for this
    machine's speed at the moment, because a shared VM's speed drifts (the same loop
    took 0.28 and 0.51 s a minute apart here). Recorded before and after each benchmark
    so that figures from different runs can be compared with their conditions."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        total = 0
        for i in range(300_000):
            total += i
        best = min(best, time.perf_counter() - t0)
    return round(best * 1000, 2)


def _positive(name: str, value: int) -> int:
    if value is None or value <= 0:
        raise ConfigError(f"{name} must be a positive number, got {value}")
    return value


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Keep the cyclic GC out of timed loops (it would bill a whole-heap pause to one sample)."""
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


# -- the agents -------------------------------------------------------------------------
@dataclass
class Rig:
    """A bundle loaded into an engine: what spawning one of its agents needs."""

    bundle: Bundle
    engine: Engine
    loaded: LoadedModule
    pre: wasmtime.InstancePre
    limits: Limits

    def execution(self, payload: bytes, cls: type[Execution] = Execution) -> Execution:
        return cls(self.loaded, self.pre, self.limits, payload)


def load_bundle(name: str) -> Bundle:
    """An example agent (``guest_sdk/examples``) or a bench guest (``bench/guests``), built now."""
    for base in (EXAMPLES, BENCH_GUESTS):
        if (base / name / "policy.toml").exists():
            return bundle_mod.load_bytes(bundle_mod.build_dir(base / name), source=name)
    raise ConfigError(f"no example or bench guest named {name!r}")


def make_engine(profile: str | None, cache_dir: Path | None = None) -> Engine:
    return Engine(EngineConfig.for_profile(profile), cache_dir=cache_dir)


def make_rig(engine: Engine, b: Bundle, *, sync_tools: bool = False) -> Rig:
    """Load ``b`` the way the host does (same checks, same linker) with a bench budget.

    ``sync_tools`` links a ``tool_call`` that answers at once without unwinding
    (the round-trip baseline: a plain synchronous host function).
    """
    loaded = engine.load(b.module, b.module_digest)
    has_tools = bool(b.policy.grants)
    loaded.check_imports(has_tools, frozenset(), b.policy.agent.name)

    def make_linker(eng: wasmtime.Engine) -> wasmtime.Linker:
        linker = wasmtime.Linker(eng)
        imports.define(linker, tools=has_tools and not sync_tools)
        if sync_tools:
            define_import(linker, abi.IMPORT_MODULE, abi.TOOL_IMPORT, 4, 1, _sync_tool_call)
        return linker

    pre = loaded.instance_pre(("bench", has_tools, sync_tools), make_linker)
    budgets = b.policy.budgets
    limits = Limits(fuel=BIG_FUEL, memory_bytes=int(getattr(budgets, "memory", None) or 64 << 20),
                    deadline_s=float(getattr(budgets, "wall_clock", None) or 30.0))
    return Rig(b, engine, loaded, pre, limits)


def _sync_tool_call(name_ptr: int, name_len: int, args_ptr: int, args_len: int) -> int:
    """Baseline ``tool_call``: a counter answered in place, as a plain host function would."""
    ex = current()
    ex.call_seq += 1
    ex.response = b'{"value":%d}' % ex.call_seq
    ex.response_status = 0
    return 0


class TimedExecution(Execution):
    """An Execution that timestamps the start of each unwind and the end of each rewind."""

    t_unwind: int = 0
    t_rewound: int = 0

    def begin_unwind(self, call: PendingCall) -> None:
        self.t_unwind = time.perf_counter_ns()
        super().begin_unwind(call)

    def finish_rewind(self) -> int:
        status = super().finish_rewind()
        self.t_rewound = time.perf_counter_ns()
        return status


def _answer(seq: int) -> bytes:
    return b'{"value":%d}' % seq


def _snapshot(rig: Rig, ex: Execution, agent_id: str, seq: int, call: PendingCall) -> Snapshot:
    """The checkpoint the runtime would write at this tool call (same fields, same shapes)."""
    cap = ex.capture()
    usage = {"suspensions": seq, "fuel_used": ex.fuel_used, "tool_calls": call.seq,
             "calls_by_tool": {call.tool: call.seq}}
    return Snapshot(agent_id=agent_id, seq=seq, module_digest=rig.bundle.module_digest, abi_version=abi.ABI_VERSION,
                    memory=cap.memory, globals=cap.globals, async_buf=cap.async_buf, entry=abi.ENTRY_EXPORT,
                    pending=call.to_dict(), usage=usage, created_at=time.time())


def _restore(rig: Rig, snap: Snapshot, cls: type[Execution] = Execution) -> Execution:
    pending = PendingCall.from_dict(snap.pending or {})
    return cls.restore(rig.loaded, rig.pre, rig.limits, b"", Captured(snap.memory, snap.globals, snap.async_buf),
                       fuel_used=int(snap.usage.get("fuel_used", 0)), call_seq=pending.seq, pending=pending)


# -- plotting -----------------------------------------------------------------------------
def _plot(path: str | None, draw: Callable[[Any], None]) -> dict[str, Any]:
    """Draw with matplotlib into ``path``; without matplotlib, say so instead of failing."""
    if not path:
        return {"plot": None, "plot_note": "plot disabled (--no-plot)"}
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        why = "is not installed (pip install 'torpor[bench]')" if exc.name == "matplotlib" else f"cannot load ({exc})"
        return {"plot": None, "plot_note": f"matplotlib {why}; no plot drawn"}
    try:
        draw(plt)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        plt.savefig(path, dpi=110, bbox_inches="tight")
    except OSError as exc:
        raise ConfigError(f"cannot write the plot {path}: {exc.strerror or exc}") from exc
    finally:
        plt.close("all")
    return {"plot": str(path)}


def _cdf(ax: Any, series: dict[str, Sequence[int]], title: str) -> None:
    for name, xs in series.items():
        if not xs:
            continue
        ys = sorted(x / 1000 for x in xs)
        n = len(ys)
        ax.plot(ys, [(i + 1) / n for i in range(n)], label=name)
    ax.set_xscale("log")
    ax.set_xlabel("latency (µs, log scale)")
    ax.set_ylabel("fraction of samples ≤ x")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


# -- coldstart ---------------------------------------------------------------------------
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
    for _ in range(min(warmup, n)):
        fn()
    lat = Latency()
    with _no_gc():
        for i in range(n):
            t0 = time.perf_counter_ns()
            fn()
            lat.add(time.perf_counter_ns() - t0)
            if i & 255 == 0:
                progress.update(i)
    progress.update(n)
    progress.done()
    return lat


def bench_coldstart(args: argparse.Namespace) -> dict[str, Any]:
    """Spawn latency of a cached bundle against naive wasmtime-py and a Python subprocess."""
    n = _positive("--n", args.n if args.n is not None else (300 if args.quick else 10_000))
    n_sub = _positive("--subprocesses", args.subprocesses if args.subprocesses is not None else (5 if args.quick else 200))
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
        _cdf(ax, {k: v.samples for k, v in lats.items()}, f"cold start, {engine.config.profile} engine ({n:,} spawns)")

    res.update(_plot(args.plot, draw))
    return res


def _print_coldstart(r: dict[str, Any]) -> None:
    print(_table(r["cases"]))
    print(f"\nspawn p50 {r['spawn_p50_us']} µs (target ≤ 75), p99 {r['spawn_p99_us']} µs (target ≤ 500); "
          f"naive wasmtime-py p50 {r['baseline_spawn_p50_us']} µs; a Python subprocess p50 "
          f"{r['baseline_subprocess_p50_us'] / 1000:.1f} ms  [engine {r['engine']}]")


# -- suspend ------------------------------------------------------------------------------
def _suspend_agent(rig: Rig, store: LmdbStore, committer: GroupCommitter, cycles: int, baseline: bool,
                   progress: Progress) -> dict[str, Any]:
    """``cycles`` suspend/resume round trips of one agent, hibernating at every tool call."""
    import zstandard

    cctx = zstandard.ZstdCompressor(level=3)
    dctx = zstandard.ZstdDecompressor()
    sus, res_, cpu, commit, unwind = Latency(), Latency(), Latency(), Latency(), Latency()
    sizes: list[int] = []
    agent_id = new_agent_id()
    ex: Execution = rig.execution(json.dumps({"n": cycles + 1}).encode(), TimedExecution)
    out: Outcome = ex.start()
    with _no_gc():
        for k in range(1, cycles + 1):
            if not isinstance(out, Suspended):
                raise TorporError(f"{rig.bundle.name} stopped suspending after {k - 1} tool calls: {out}")
            assert isinstance(ex, TimedExecution)
            t_unwind = ex.t_unwind
            t_back = time.perf_counter_ns()
            call = out.call
            if baseline:
                # Naive: the whole memory, zstd level 3, no delta, no pristine reference.
                blob = cctx.compress(full_copy(ex._buffer()))
                globals_ = [(g.name, g.value) for g in ex.capture_globals()]
                meta = json.dumps({"globals": globals_, "async_buf": ex.async_buf, "pending": call.to_dict(),
                                   "fuel_used": ex.fuel_used}).encode()
                value = len(meta).to_bytes(4, "little") + meta + blob
            else:
                value = encode_snapshot(_snapshot(rig, ex, agent_id, k, call), pristine=rig.loaded.image)
            t_enc = time.perf_counter_ns()
            committer.commit(_put_checkpoint(agent_id, k, value))
            t_durable = time.perf_counter_ns()
            ex.release()
            sus.add(t_durable - t_unwind)
            unwind.add(t_back - t_unwind)
            cpu.add(t_enc - t_unwind)
            commit.add(t_durable - t_enc)
            sizes.append(len(value))
            # Resume: read, decode, a fresh instance, restore, rewind into the tool call.
            t0 = time.perf_counter_ns()
            with store.read() as txn:
                raw = txn.get_checkpoint(agent_id, k)
            assert raw is not None
            if baseline:
                mlen = int.from_bytes(raw[:4], "little")
                meta_d = json.loads(raw[4 : 4 + mlen])
                mem = dctx.decompress(raw[4 + mlen :])
                ex = rig.execution(b"", TimedExecution)
                ex._instantiate()
                cur = ex._mem.data_len(ex._store)
                if len(mem) > cur:
                    ex._mem.grow(ex._store, (len(mem) - cur) // 65536)
                ctypes.memmove(ex._buffer(), mem, len(mem))
                ex.restore_globals(tuple(GlobalValue(name, kind, v) for (name, v), (_, kind)  # type: ignore[arg-type]
                                         in zip(meta_d["globals"], rig.loaded.global_exports, strict=True)))
                ex.async_buf = tuple(meta_d["async_buf"])
                ex.pending = PendingCall.from_dict(meta_d["pending"])
                ex.fuel_used = int(meta_d["fuel_used"])
                ex.call_seq = ex.pending.seq
            else:
                snap = decode_snapshot(raw, expect_module_digest=rig.bundle.module_digest,
                                       expect_abi_version=abi.ABI_VERSION, pristine=rig.loaded.image)
                ex = _restore(rig, snap, TimedExecution)
            out = ex.resume(0, _answer(k))
            assert isinstance(ex, TimedExecution)
            res_.add(ex.t_rewound - t0)
            progress.update(k)
    progress.done()
    sizes.sort()
    return {"durability": store.durability, "memory_bytes": ex.memory_size(), "suspend": sus.summary(),
            "resume": res_.summary(),
            "unwind": unwind.summary(), "suspend_no_commit": cpu.summary(), "commit": commit.summary(),
            "record_bytes_p50": sizes[len(sizes) // 2], "record_bytes_max": sizes[-1],
            "_samples": {"suspend": sus.samples, "resume": res_.samples}}


def _put_checkpoint(agent_id: str, seq: int, value: bytes) -> Callable[[Any], None]:
    def write(txn: Any) -> None:
        txn.put_checkpoint(agent_id, seq, value, 0.0)

    return write


def bench_suspend(args: argparse.Namespace) -> dict[str, Any]:
    """Suspend and resume at real tool calls, delta snapshots against full-memory copies.

    The delta runs go once into a store at ``durability="sync"`` (a commit waits for an
    ``fdatasync``) and once into one at ``"process"`` (a commit ends in the page cache,
    a background thread flushes every second), so that the cost of the sync is measured
    in the same run; every figure in the JSON carries the level it was measured at.
    """
    cycles = _positive("--n", args.n if args.n is not None else (100 if args.quick else 3000))
    # Per agent: (key in the JSON, full-copy baseline?, durability level of the store).
    runs = (("torpor", False, "sync"), ("baseline", True, "sync"), ("torpor_process", False, "process"))
    engine = make_engine(args.engine)
    tmp = Path(tempfile.mkdtemp(prefix="torpor-bench-suspend-"))
    agents: dict[str, Any] = {}
    samples: dict[str, Any] = {}
    flushes: dict[str, int] = {}
    try:
        with contextlib.ExitStack() as stack:
            stores: dict[str, LmdbStore] = {}
            committers: dict[str, GroupCommitter] = {}
            for level in ("sync", "process"):
                stores[level] = stack.enter_context(LmdbStore.open(tmp / f"db-{level}", durability=level))
                committers[level] = GroupCommitter(stores[level])
                stack.callback(committers[level].close)  # closed before its store (LIFO)
            for name in ("steps", "mib"):
                rig = make_rig(engine, load_bundle(name))
                for key, baseline, level in runs:
                    label = f"{name} {'full copy' if baseline else 'delta'} @{level}"
                    r = _suspend_agent(rig, stores[level], committers[level], cycles, baseline,
                                       Progress(label, cycles, args.progress))
                    samples[label] = r.pop("_samples")
                    agents.setdefault(name, {})[key] = r
            flushes = {level: store.flushes for level, store in stores.items()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    mib, steps = agents["mib"], agents["steps"]
    res: dict[str, Any] = {
        "bench": "suspend", "engine": engine.config.profile, "machine": machine(), "cycles": cycles,
        "agents": agents,
        # Which durability level each headline figure below was measured at.
        "durability": {"suspend_p50_us": "sync", "process_suspend_p50_us": "process",
                       "baseline_suspend_p50_us": "sync"},
        # The headline is the 1 MiB agent: the targets are stated for agents up to 1 MiB.
        "suspend_p50_us": mib["torpor"]["suspend"]["p50_us"],
        "suspend_p99_us": mib["torpor"]["suspend"]["p99_us"],
        "resume_p50_us": mib["torpor"]["resume"]["p50_us"],
        "resume_p99_us": mib["torpor"]["resume"]["p99_us"],
        "suspend_no_commit_p50_us": mib["torpor"]["suspend_no_commit"]["p50_us"],
        "commit_p50_us": mib["torpor"]["commit"]["p50_us"],
        "process_suspend_p50_us": mib["torpor_process"]["suspend"]["p50_us"],
        "process_suspend_p99_us": mib["torpor_process"]["suspend"]["p99_us"],
        "process_commit_p50_us": mib["torpor_process"]["commit"]["p50_us"],
        "process_flushes": flushes.get("process", 0),
        "record_bytes": mib["torpor"]["record_bytes_p50"],
        "baseline_suspend_p50_us": mib["baseline"]["suspend"]["p50_us"],
        "baseline_resume_p50_us": mib["baseline"]["resume"]["p50_us"],
        "baseline_record_bytes": mib["baseline"]["record_bytes_p50"],
        "small_suspend_p50_us": steps["torpor"]["suspend"]["p50_us"],
        "small_process_suspend_p50_us": steps["torpor_process"]["suspend"]["p50_us"],
        "small_resume_p50_us": steps["torpor"]["resume"]["p50_us"],
        "small_record_bytes": steps["torpor"]["record_bytes_p50"],
    }

    def draw(plt: Any) -> None:
        _fig, axes = plt.subplots(1, 2, figsize=(13, 5))
        _cdf(axes[0], {k: v["suspend"] for k, v in samples.items()}, "suspend: unwind + encode + LMDB commit")
        _cdf(axes[1], {k: v["resume"] for k, v in samples.items()}, "resume: read + decode + restore + rewind")

    res.update(_plot(args.plot, draw))
    return res


def _print_suspend(r: dict[str, Any]) -> None:
    rows: dict[str, dict[str, float]] = {}
    for name, a in r["agents"].items():
        for kind, d in a.items():
            what = "full copy (baseline)" if kind == "baseline" else "delta"
            tag = f"{what} @{d.get('durability', 'sync')}"
            mem = d["memory_bytes"] // 1024
            rows[f"{name} ({mem} KiB) suspend, {tag}"] = d["suspend"]
            rows[f"{name} ({mem} KiB)   no commit, {tag}"] = d["suspend_no_commit"]
            rows[f"{name} ({mem} KiB)   commit, {tag}"] = d["commit"]
            rows[f"{name} ({mem} KiB) resume, {tag}"] = d["resume"]
    print(_table(rows))
    for name, a in r["agents"].items():
        line = (f"{name}: record {a['torpor']['record_bytes_p50']} B (delta) vs {a['baseline']['record_bytes_p50']} B "
                f"(full copy); commit p50 {a['torpor']['commit']['p50_us']} µs @sync")
        if "torpor_process" in a:
            line += f", {a['torpor_process']['commit']['p50_us']} µs @process"
        print(line)
    process = (f", {r['process_suspend_p50_us']} µs @process ({r.get('process_flushes', 0)} background flushes)"
               if "process_suspend_p50_us" in r else "")
    print(f"\n1 MiB agent: suspend p50 {r['suspend_p50_us']} µs @sync{process}; resume p50 {r['resume_p50_us']} µs "
          f"(targets ≤ 250); full-copy baseline suspend p50 {r['baseline_suspend_p50_us']} µs @sync  "
          f"[engine {r['engine']}]")
    print("@sync: each commit is on disk before the agent goes on (survives a power loss); @process: in the OS "
          "page cache, flushed every second (survives the host process being killed, not a power loss)")


# -- density ------------------------------------------------------------------------------
def _open_bench_store(path: Path) -> LmdbStore:
    """Open a scratch store for benchmark records, refusing a store that holds real agents."""
    db = path / "db"
    if (db / "data.mdb").exists():
        store = LmdbStore.open(db)
        with store.read() as txn:
            marked = txn.get_blob("meta", BENCH_MARKER) is not None
            has_agents = next(iter(txn.iter_agents()), None) is not None
        if has_agents and not marked:
            store.close()
            raise ConfigError(f"{path} holds a store with real agents; point --store at an empty or scratch directory")
        return store
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the store directory {path}: {exc.strerror or exc}") from exc
    store = LmdbStore.open(db)
    store.transact(lambda txn: txn.put_blob("meta", BENCH_MARKER, b"1"))
    return store


def _disk_bytes(path: Path) -> int:
    """Bytes the store's files take on disk (allocated blocks, not apparent size)."""
    total = 0
    for p in (path / "db").glob("*.mdb"):
        with contextlib.suppress(OSError):
            total += p.stat().st_blocks * 512
    return total


def _db_bytes(store: LmdbStore, name: str) -> int:
    """Bytes of B-tree pages one named database of the store uses (read-only peek)."""
    db = store._dbs.get(name)
    if db is None:
        return 0
    with store._env.begin() as txn:
        st = txn.stat(db)
    return int(st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]) * int(st["psize"])


def _warm_phase(rig: Rig, limit: int, progress: Progress) -> dict[str, Any]:
    """Hold warm instances (each suspended at its first tool call) until ``limit`` or failure."""
    held: list[Execution] = []
    gc.collect()
    rss0, maps0 = rss_kib(), map_count()
    avail0 = mem_available_kib()
    curve: list[tuple[int, int, int]] = [(0, 0, 0)]
    stop = f"reached --warm {limit:,}"
    t0 = time.perf_counter()
    try:
        for i in range(limit):
            ex = rig.execution(b'{"n": 3}')
            out = ex.start()
            if not isinstance(out, Suspended):
                raise TorporError(f"a warm agent did not suspend: {out}")
            held.append(ex)
            if (i + 1) % 1000 == 0:
                curve.append((i + 1, rss_kib() - rss0, map_count() - maps0))
                progress.update(i + 1, f"rss {(rss_kib() - rss0) / (i + 1):.1f} KiB/inst")
                avail = mem_available_kib()
                if avail is not None and avail0 is not None and avail < max(512 * 1024, avail0 // 20):
                    stop = f"stopped with {avail // 1024} MiB of RAM left (safety margin)"
                    break
    except (wasmtime.WasmtimeError, MemoryError, OSError) as exc:
        maps = map_count()
        limit_maps = _read_int("/proc/sys/vm/max_map_count")
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if limit_maps and maps >= limit_maps - 64:
            stop = f"instance {len(held) + 1:,} failed ({why}): {maps:,} memory mappings, vm.max_map_count is {limit_maps:,}"
        else:
            stop = f"instance {len(held) + 1:,} failed: {why} ({maps:,} mappings)"
    except wasmtime.Trap as exc:
        stop = f"instance {len(held) + 1:,} trapped: {str(exc).strip().splitlines()[0]}"
    progress.done()
    dt = time.perf_counter() - t0
    n = len(held)
    rss = rss_kib() - rss0
    maps = map_count() - maps0
    curve.append((n, rss, maps))
    # Prove they are live: finish a sample of them in place.
    ok = 0
    for ex in held[:: max(1, n // 20)]:
        out2: Outcome = Suspended(ex.pending) if ex.pending else Failed("x", "x")
        k = 0
        while isinstance(out2, Suspended):
            k += 1
            out2 = ex.resume(0, _answer(k))
        ok += isinstance(out2, Completed) and out2.output == {"sum": 6, "last": 3}
    sample = len(held[:: max(1, n // 20)]) if n else 0
    for ex in held:
        ex.release()
    held.clear()
    gc.collect()
    return {"warm_instances": n, "rss_per_warm_kib": round(rss / n, 2) if n else 0.0,
            "maps_per_instance": round(maps / n, 2) if n else 0.0, "warm_rss_mib": round(rss / 1024, 1),
            "warm_stop_reason": stop, "warm_spawn_s": round(dt, 2), "warm_verified": f"{ok}/{sample}",
            "_curve": curve}


def _write_hibernated(group: list[tuple[str, bytes, dict[str, Any]]]) -> Callable[[Any], None]:
    """One transaction function for a group of hibernating agents: checkpoint + agent record each."""

    def write(txn: Any) -> None:
        for aid, blob, rec in group:
            txn.put_checkpoint(aid, 1, blob, 0.0)
            txn.put_agent(rec)

    return write


def _hibernate_batch(rig: Rig, committer: GroupCommitter, warm: list[tuple[Execution, PendingCall]],
                     per_txn: int) -> int:
    """Hibernate a batch of agents suspended at a tool call; return the snapshot bytes.

    Stage by stage rather than agent by agent: capture every agent, release every
    instance, then encode and commit. The work per agent is the same, but each stage's
    code and data (the diff kernels, the memory pool, zstd's tables, the JSON encoder)
    stay in the CPU caches across the batch instead of being evicted by the next
    agent's memory: measured 30 % more hibernations per second than interleaving the
    stages per agent. Groups of ``per_txn`` agents are handed to the GroupCommitter as
    soon as they are encoded, so committing overlaps encoding; the batch ends when
    everything is committed.
    """
    digest, name, pristine = rig.bundle.digest, rig.bundle.name, rig.loaded.image
    snaps = [(_snapshot(rig, ex, new_agent_id(), 1, call), call) for ex, call in warm]
    for ex, _ in warm:
        ex.release()
    futures = []
    group: list[tuple[str, bytes, dict[str, Any]]] = []
    size = 0
    for snap, call in snaps:
        blob = encode_snapshot(snap, pristine=pristine)
        size += len(blob)
        group.append((snap.agent_id, blob, {"agent_id": snap.agent_id, "name": name, "status": "suspended",
                                            "bundle_digest": digest, "checkpoints": 1, "pending": call.to_dict()}))
        if len(group) >= per_txn:
            futures.append(committer.submit(_write_hibernated(group)))
            group = []
    if group:
        futures.append(committer.submit(_write_hibernated(group)))
    for f in futures:
        f.result()
    return size


def _hibernate_phase(rig: Rig, store: LmdbStore, committer: GroupCommitter, store_dir: Path, n: int,
                     per_txn: int, batch: int, progress: Progress, barrier: Any = None) -> dict[str, Any]:
    """Hibernate ``n`` agents: run each to its first tool call, snapshot it, commit, drop it.

    Spawning and running an agent to its tool call is the agent's own work, not
    hibernation, so it is timed apart: ``hibernations_per_s`` is agents over the
    time spent capturing, encoding, committing (group commit, durable) and
    releasing (:func:`_hibernate_batch`); ``agents_per_s`` is the end-to-end rate
    including the spawns.

    ``per_txn`` agents share one transaction function (a host evicting a batch of
    idle agents at once; 1 gives each agent its own, isolated from the others'
    failures, as the runtime does for a checkpoint at a tool call). Either way the
    GroupCommitter merges whatever is queued into one durable commit.

    ``barrier`` (several processes, see :func:`_parallel_hibernate`): every process
    waits for the others before and after hibernating each batch, so that the timed
    stages of all processes run at the same time and no process's spawning competes
    with another's hibernating.
    """
    used0, disk0, rss0 = store.used_bytes(), _disk_bytes(store_dir), rss_kib()
    ck0, ag0 = _db_bytes(store, "checkpoints"), _db_bytes(store, "agents")
    hib_ns = 0
    sizes = 0
    curve: list[tuple[int, int, int]] = [(0, 0, 0)]
    done = 0
    t_start = time.perf_counter()
    interrupted = False
    try:
        while done < n:
            k = min(batch, n - done)
            warm: list[tuple[Execution, PendingCall]] = []
            for i in range(k):
                ex = rig.execution(b'{"n": %d}' % (3 + (done + i) % 50))
                out = ex.start()
                if not isinstance(out, Suspended):
                    raise TorporError(f"agent did not reach its tool call: {out}")
                warm.append((ex, out.call))
            if barrier is not None:
                barrier.wait()
            t0 = time.perf_counter_ns()
            sizes += _hibernate_batch(rig, committer, warm, per_txn)
            hib_ns += time.perf_counter_ns() - t0
            del warm
            if barrier is not None:
                barrier.wait()
            done += k
            if len(curve) < 400 and (done % max(batch, n // 200) < batch or done == n):
                curve.append((done, store.used_bytes() - used0, rss_kib() - rss0))
            progress.update(done, f"{done / max(hib_ns / 1e9, 1e-9):,.0f} hib/s")
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        committer.close()  # commits what was queued: the store stays consistent
        progress.done()
        if interrupted:
            print(f"\ninterrupted after {done:,} agents; the store at {store_dir} is consistent "
                  "(every LMDB commit is atomic)", file=sys.stderr)
    wall = time.perf_counter() - t_start
    used = store.used_bytes() - used0
    disk = _disk_bytes(store_dir) - disk0
    curve.append((done, used, rss_kib() - rss0))
    ck, ag = _db_bytes(store, "checkpoints") - ck0, _db_bytes(store, "agents") - ag0
    return {"agents": done, "bytes_per_agent": round(used / done, 1), "disk_bytes_per_agent": round(disk / done, 1),
            "checkpoint_bytes_per_agent": round(ck / done, 1), "record_bytes_per_agent": round(ag / done, 1),
            "snapshot_bytes_per_agent": round(sizes / done, 1),
            "store_used_mib": round(used / 2**20, 1), "store_file_mib": round(disk / 2**20, 1),
            "hibernations_per_s": round(done / (hib_ns / 1e9)), "hibernate_s": hib_ns / 1e9,
            "agents_per_s": round(done / wall),
            "hibernate_wall_s": round(wall, 1), "commits": committer.batches,
            "rss_growth_mib": round((rss_kib() - rss0) / 1024, 1), "_curve": curve}


def _hibernate_worker(profile: str, store_dir: str, n: int, per_txn: int, batch: int, rounds: int, barrier: Any,
                      results: Any) -> None:
    """One process of :func:`_parallel_hibernate` (a module-level function: it is pickled).

    ``rounds``: how many batches the busiest process hibernates; a process with fewer
    agents keeps meeting the others at the barrier until then."""
    try:
        rig = make_rig(make_engine(profile), load_bundle("steps"))
        store = LmdbStore.open(Path(store_dir) / "db")
        try:
            committer = GroupCommitter(store, max_batch=max(batch, 1))
            h = _hibernate_phase(rig, store, committer, Path(store_dir), n, per_txn, batch,
                                 Progress("", n, False), barrier)
            for _ in range(rounds - -(-n // batch)):
                barrier.wait()
                barrier.wait()
        finally:
            store.close()
        h.pop("_curve", None)
        results.put(("ok", h))
    except BaseException as exc:  # reported to the parent, which fails the benchmark
        with contextlib.suppress(Exception):
            barrier.abort()
        results.put(("error", f"{type(exc).__name__}: {exc}"))


def _parallel_hibernate(profile: str, store: LmdbStore, store_dir: Path, n: int, per_txn: int, batch: int,
                        processes: int, progress: Progress) -> dict[str, Any]:
    """Hibernate ``n`` agents with ``processes`` host processes sharing one store.

    How Torpor uses more than one core: a host process per core, all on the same
    store (LMDB serialises their commits; each process group-commits its own). The
    processes hibernate their batches in lockstep (a barrier before and after each),
    so ``hibernations_per_s`` is all agents over the longest process's time spent
    hibernating: the rate of the machine, not a sum of rates measured at different
    moments.
    """
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    used0, disk0 = store.used_bytes(), _disk_bytes(store_dir)
    ck0, ag0 = _db_bytes(store, "checkpoints"), _db_bytes(store, "agents")
    share = [n // processes + (1 if i < n % processes else 0) for i in range(processes)]
    rounds = max(-(-k // batch) for k in share)
    barrier = ctx.Barrier(processes, timeout=600)
    results = ctx.Queue()
    procs = [ctx.Process(target=_hibernate_worker, args=(profile, str(store_dir), k, per_txn, batch, rounds, barrier, results),
                         daemon=True) for k in share]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    outs: list[dict[str, Any]] = []
    errors: list[str] = []
    try:
        for _ in procs:
            status, payload = results.get(timeout=3600)
            (outs.append(payload) if status == "ok" else errors.append(payload))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
        progress.done()
    if errors:
        raise TorporError("a hibernating process failed: " + "; ".join(errors))
    wall = time.perf_counter() - t0
    done = sum(o["agents"] for o in outs)
    used = store.used_bytes() - used0
    disk = _disk_bytes(store_dir) - disk0
    ck, ag = _db_bytes(store, "checkpoints") - ck0, _db_bytes(store, "agents") - ag0
    hib_s = max(o["hibernate_s"] for o in outs)
    return {"agents": done, "processes": processes, "bytes_per_agent": round(used / done, 1),
            "disk_bytes_per_agent": round(disk / done, 1),
            "checkpoint_bytes_per_agent": round(ck / done, 1), "record_bytes_per_agent": round(ag / done, 1),
            "snapshot_bytes_per_agent": round(sum(o["snapshot_bytes_per_agent"] * o["agents"] for o in outs) / done, 1),
            "store_used_mib": round(used / 2**20, 1), "store_file_mib": round(disk / 2**20, 1),
            "hibernations_per_s": round(done / hib_s), "hibernate_s": hib_s,
            "per_process_hibernations_per_s": [o["hibernations_per_s"] for o in outs],
            "agents_per_s": round(done / wall), "hibernate_wall_s": round(wall, 1),
            "commits": sum(o["commits"] for o in outs),
            "rss_growth_mib": max(o["rss_growth_mib"] for o in outs), "_curve": [(0, 0, 0), (done, used, 0)]}


def bench_density(args: argparse.Namespace) -> dict[str, Any]:
    """Hibernate N agents into LMDB, then hold as many warm instances as the process can."""
    n = _positive("--agents", args.agents if args.agents is not None else (2000 if args.quick else 1_000_000))
    warm = _positive("--warm", args.warm if args.warm is not None else (300 if args.quick else 100_000))
    batch = _positive("--batch", args.batch)
    processes = _positive("--processes", args.processes)
    if processes > n:
        raise ConfigError(f"--processes {processes} is more than --agents {n}: each process needs agents to hibernate")
    engine = make_engine(args.engine)
    rig = make_rig(engine, load_bundle("steps"))
    res: dict[str, Any] = {"bench": "density", "engine": engine.config.profile, "machine": machine()}
    warm_curve: list[tuple[int, int, int]] = []
    hib_curve: list[tuple[int, int, int]] = []
    tmp = None
    if args.store:
        store_dir = Path(args.store)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="torpor-bench-density-"))
        store_dir = tmp
    try:
        # Opened first: once the warm phase has pushed the process to its mapping limit,
        # even opening an LMDB environment (one mmap) could fail.
        store = _open_bench_store(store_dir)
        committer = GroupCommitter(store, max_batch=max(batch, 1))  # its thread, too, before the warm phase
        try:
            if not args.no_warm:
                w = _warm_phase(rig, warm, Progress("warm", warm, args.progress))
                warm_curve = w.pop("_curve")
                res.update(w)
            else:
                res.update({"warm_instances": 0, "rss_per_warm_kib": 0.0, "warm_stop_reason": "skipped (--no-warm)"})
            per_txn = _positive("--per-txn", args.per_txn)
            if processes > 1:
                committer.close()
                h = _parallel_hibernate(engine.config.profile, store, store_dir, n, per_txn, batch, processes,
                                        Progress("hibernate", n, False))
            else:
                h = _hibernate_phase(rig, store, committer, store_dir, n, per_txn, batch,
                                     Progress("hibernate", n, args.progress))
            h["per_txn"] = args.per_txn
            h.setdefault("processes", 1)
        finally:
            committer.close()
            store.close()
        hib_curve = h.pop("_curve")
        res.update(h)
    finally:
        if tmp is not None and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    res["store"] = str(store_dir) if (args.store or args.keep) else None
    res["durability"] = resolve_durability(None)
    res["gib_per_million_agents"] = round(res["bytes_per_agent"] * 1e6 / 2**30, 2)

    def draw(plt: Any) -> None:
        _fig, axes = plt.subplots(1, 2, figsize=(13, 5))
        if warm_curve:
            xs = [c[0] for c in warm_curve]
            axes[0].plot(xs, [c[1] / 1024 for c in warm_curve], label="RSS growth (MiB)")
            ax2 = axes[0].twinx()
            ax2.plot(xs, [c[2] for c in warm_curve], color="tab:red", linestyle="--", label="memory mappings")
            ax2.set_ylabel("memory mappings")
            axes[0].set_xlabel("warm instances")
            axes[0].set_ylabel("MiB")
            axes[0].set_title(f"warm instances ({res['engine']} engine): {res.get('warm_stop_reason', '')[:60]}",
                              fontsize=9)
            axes[0].legend(loc="upper left")
        xs = [c[0] for c in hib_curve]
        axes[1].plot(xs, [c[1] / 2**20 for c in hib_curve], label="LMDB pages in use (MiB)")
        axes[1].plot(xs, [c[2] / 1024 for c in hib_curve], label="RSS growth (MiB)")
        axes[1].set_xlabel("hibernated agents")
        axes[1].set_ylabel("MiB")
        axes[1].set_title(f"hibernated agents: {res['bytes_per_agent']} B/agent, {res['hibernations_per_s']:,}/s")
        axes[1].legend()
        for ax in axes:
            ax.grid(True, alpha=0.3)

    res.update(_plot(args.plot, draw))
    return res


def _print_density(r: dict[str, Any]) -> None:
    print(f"hibernated agents   {r['agents']:,} in {r['hibernate_wall_s']} s ({r['agents_per_s']:,} agents/s end to end)")
    procs = r.get("processes", 1)
    where = (f"{procs} host processes on one store, in lockstep; per process "
             + ", ".join(f"{x:,}" for x in r.get("per_process_hibernations_per_s", [])) if procs > 1 else "1 host process")
    print(f"  hibernations/s    {r['hibernations_per_s']:,} (capture + encode + group commit + release; {where}; "
          f"target ≥ 10,000) @{r.get('durability', 'sync')}")
    print(f"  on disk           {r['bytes_per_agent']} B/agent in LMDB pages ({r['disk_bytes_per_agent']} B/agent of file), "
          f"snapshot {r['snapshot_bytes_per_agent']} B; {r['gib_per_million_agents']} GiB per million (target ≤ 1)")
    print(f"  of which          checkpoint {r['checkpoint_bytes_per_agent']} B/agent (target ≤ 512), agent record "
          f"{r['record_bytes_per_agent']} B/agent")
    print(f"  RSS growth        {r['rss_growth_mib']} MiB over the run; {r['commits']:,} commits")
    print(f"warm instances      {r['warm_instances']:,} at {r['rss_per_warm_kib']} KiB RSS each "
          f"({r.get('maps_per_instance', 0)} mappings each; targets ≥ 30,000 at ≤ 24 KiB)")
    print(f"  stopped because   {r['warm_stop_reason']}  [engine {r['engine']}]")


# -- steps ---------------------------------------------------------------------------------
def _engine_round_trips(rig: Rig, n: int) -> tuple[float, Latency]:
    """Round trips of one warm agent: the tool call unwinds and is rewound in place (or, in
    the synchronous baseline, simply returns, and only the total is timed)."""
    ex = rig.execution(json.dumps({"n": n}).encode())
    lat = Latency()
    with _no_gc():
        t0 = time.perf_counter_ns()
        out = ex.start()
        k = 0
        while isinstance(out, Suspended):
            k += 1
            t1 = time.perf_counter_ns()
            out = ex.resume(0, _answer(k))
            lat.add(time.perf_counter_ns() - t1)
        dt = time.perf_counter_ns() - t0
    if not isinstance(out, Completed) or out.output != {"sum": n * (n + 1) // 2, "last": n}:
        raise TorporError(f"steps answered {out}")
    return n / (dt / 1e9), lat


def _runtime_round_trips(b: Bundle, agents: int, n: int, profile_path: str | None,
                         progress: Progress) -> dict[str, Any]:
    """Tool round trips through the real host runtime: policy, journal, checkpoint, kv.incr."""
    import anyio

    from host.runtime.host import Host

    tmp = Path(tempfile.mkdtemp(prefix="torpor-bench-steps-"))
    try:
        host = Host(tmp, warm_idle_s=60.0)
        try:
            results: list[Any] = []

            async def one() -> None:
                results.append(await host.run(b, {"n": n}))
                progress.update(len(results))

            async def main() -> None:
                async with anyio.create_task_group() as tg:
                    for _ in range(agents):
                        tg.start_soon(one)

            anyio.run(lambda: host.run(b, {"n": 1}))  # load and compile outside the timing
            store: Any = host.store  # an LmdbStore: the embedded default
            used0 = store.used_bytes()
            prof = None
            if profile_path:
                import cProfile

                prof = cProfile.Profile()
                prof.enable()
            t0 = time.perf_counter()
            anyio.run(main)
            dt = time.perf_counter() - t0
            if prof is not None and profile_path:
                prof.disable()
                prof.dump_stats(profile_path)
            progress.done()
            bad = [r for r in results if r.status != "completed"]
            if bad:
                raise TorporError(f"{len(bad)} runtime agents did not complete: {bad[0].error}")
            calls = sum(r.tool_calls for r in results)
            used = store.used_bytes() - used0
        finally:
            host.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"round_trips_per_s": round(calls / dt), "runtime_agents": agents, "runtime_calls": calls,
            "runtime_wall_s": round(dt, 2), "runtime_bytes_per_tool_call": round(used / calls, 1)}


def bench_steps(args: argparse.Namespace) -> dict[str, Any]:
    """Tool round trips per second with warm instances: runtime, execution core, sync baseline."""
    n = _positive("--n", args.n if args.n is not None else (20 if args.quick else 200))
    agents = _positive("--agents", args.agents if args.agents is not None else (4 if args.quick else 64))
    engine_n = 2000 if args.quick else 50_000
    engine = make_engine(args.engine)
    b = load_bundle("steps")
    rig = make_rig(engine, b)
    sync_rig = make_rig(engine, b, sync_tools=True)
    _engine_round_trips(rig, 100)  # warm up
    core_rate, core_lat = _engine_round_trips(rig, engine_n)
    base_rate, _ = _engine_round_trips(sync_rig, engine_n)
    rt = _runtime_round_trips(b, agents, n, args.profile, Progress("runtime", agents, args.progress))
    res: dict[str, Any] = {
        "bench": "steps", "engine": engine.config.profile, "machine": machine(), "durability": resolve_durability(None),
        **rt,
        "core_round_trips_per_s": round(core_rate), "core_round_trip": core_lat.summary(),
        "baseline_round_trips_per_s": round(base_rate), "baseline_round_trip_mean_us": round(1e6 / base_rate, 2),
        "cprofile": args.profile,
    }

    def draw(plt: Any) -> None:
        _fig, axes = plt.subplots(1, 2, figsize=(13, 5))
        _cdf(axes[0], {"warm round trip (unwind + rewind in place)": core_lat.samples},
             f"one tool round trip, execution core (sync-import baseline: mean {res['baseline_round_trip_mean_us']} µs)")
        names = ["runtime (durable)", "execution core", "sync baseline"]
        vals = [res["round_trips_per_s"], res["core_round_trips_per_s"], res["baseline_round_trips_per_s"]]
        axes[1].bar(names, vals, color=["tab:blue", "tab:green", "tab:gray"])
        axes[1].axhline(TARGETS["round_trips_per_s"], color="tab:red", linestyle="--", label="target")
        axes[1].set_yscale("log")
        axes[1].set_ylabel("tool round trips per second (log)")
        axes[1].legend()

    res.update(_plot(args.plot, draw))
    return res


def _print_steps(r: dict[str, Any]) -> None:
    print(f"runtime (Host, {r['runtime_agents']} agents x {r['runtime_calls'] // r['runtime_agents']} kv.incr, "
          f"durable journal + checkpoint per call): {r['round_trips_per_s']:,} round trips/s (target ≥ 10,000)")
    print(f"  on disk per tool call: {r['runtime_bytes_per_tool_call']} B (checkpoint, journal, audit, agent record)")
    c = r["core_round_trip"]
    print(f"execution core (warm, unwind + rewind in place): {r['core_round_trips_per_s']:,}/s, p50 {c['p50_us']} µs, "
          f"p99 {c['p99_us']} µs")
    print(f"baseline (synchronous import, no unwind):        {r['baseline_round_trips_per_s']:,}/s, mean "
          f"{r['baseline_round_trip_mean_us']} µs  [engine {r['engine']}]")
    if r.get("cprofile"):
        print(f"cProfile of the runtime phase: {r['cprofile']} (python -m pstats {r['cprofile']})")


# -- CLI --------------------------------------------------------------------------------
def _table(rows: dict[str, dict[str, float]]) -> str:
    w = max([len(k) for k in rows] + [4])
    out = [f"{'case':{w}} {'n':>8} {'p50 µs':>10} {'p90 µs':>10} {'p99 µs':>10} {'max µs':>10}"]
    for name, r in rows.items():
        out.append(f"{name:{w}} {int(r['n']):>8} {r['p50_us']:>10.1f} {r['p90_us']:>10.1f} {r['p99_us']:>10.1f} "
                   f"{r['max_us']:>10.1f}")
    return "\n".join(out)


_BENCHES: dict[str, tuple[Callable[[argparse.Namespace], dict[str, Any]], Callable[[dict[str, Any]], None], str]] = {
    "coldstart": (bench_coldstart, _print_coldstart,
                  "spawn latency of a cached bundle vs naive wasmtime-py and a Python subprocess per agent"),
    "suspend": (bench_suspend, _print_suspend,
                "suspend/resume at real tool calls: delta snapshots vs full-memory copies, "
                "commits at durability sync and process"),
    "density": (bench_density, _print_density,
                "hibernate N agents into LMDB; hold as many warm instances as the process can"),
    "steps": (bench_steps, _print_steps, "tool round trips per second with warm instances"),
}


def _run(args: argparse.Namespace) -> int:
    fn, show, _ = _BENCHES[args.bench]
    if args.plot is None and not args.no_plot:
        args.plot = f"torpor-bench-{args.bench}.png"
    if args.no_plot:
        args.plot = None
    if args.progress is None:
        args.progress = sys.stderr.isatty()
    speed_before = cpu_speed_ms()
    try:
        res = fn(args)
    except (SnapshotError, StoreError) as exc:
        raise TorporError(f"bench {args.bench}: the store failed: {exc}", code=getattr(exc, "code", "store_error")) from exc
    if isinstance(res.get("machine"), dict):
        res["machine"]["cpu_speed_ms"] = {"before": speed_before, "after": cpu_speed_ms()}
    res["targets"] = {k: v for k, v in TARGETS.items() if k in res}
    res["command"] = "torpor bench " + " ".join(_argv_tail(args))
    if args.json:
        print(json.dumps(res, indent=2, default=str))
    else:
        show(res)
        speed = res.get("machine", {}).get("cpu_speed_ms")
        if speed:
            print(f"machine speed: a fixed Python loop took {speed['before']} ms before and {speed['after']} ms "
                  "after (lower is faster; compare runs taken at similar speeds)")
        if res.get("plot"):
            print(f"plot: {res['plot']}")
        elif res.get("plot_note"):
            print(f"plot: {res['plot_note']}")
    return 0


_MAIN_ARGV: list[str] = []


def _argv_tail(args: argparse.Namespace) -> list[str]:
    argv = list(_MAIN_ARGV or sys.argv[1:])
    return argv[argv.index(args.bench):] if args.bench in argv else [args.bench]


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``torpor bench COMMAND`` on the CLI's subparsers (called from ``build_parser``)."""
    bench: argparse.ArgumentParser = sub.add_parser("bench", help="load-test cold start, suspend/resume, density and tool round trips",
                           description=__doc__.split("\n\n")[0] if __doc__ else None)
    bsub = bench.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, (_, _, help_) in _BENCHES.items():
        sp = bsub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--json", action="store_true", help="print one JSON document")
        sp.add_argument("--quick", action="store_true", help="a small smoke run (seconds, for CI)")
        sp.add_argument("--engine", choices=PROFILES, default=None,
                        help="engine profile (default: $TORPOR_ENGINE or dense; see host/sandbox/engine.py and bench/RESULTS.md)")
        sp.add_argument("--plot", default=None, metavar="PNG",
                        help=f"where to draw the plot (default torpor-bench-{name}.png)")
        sp.add_argument("--no-plot", action="store_true", help="draw no plot")
        prog = sp.add_mutually_exclusive_group()
        prog.add_argument("--progress", dest="progress", action="store_true", default=None,
                          help="progress on stderr (default: when stderr is a terminal)")
        prog.add_argument("--no-progress", dest="progress", action="store_false")
        if name == "coldstart":
            sp.add_argument("--n", type=int, help="spawns per case (default 10,000; --quick 300)")
            sp.add_argument("--subprocesses", type=int, help="Python subprocesses for the baseline (default 200)")
        elif name == "suspend":
            sp.add_argument("--n", type=int,
                            help="suspend/resume cycles per agent, mode and durability level (default 3,000)")
        elif name == "density":
            sp.add_argument("--agents", type=int, help="agents to hibernate (default 1,000,000; --quick 2,000)")
            sp.add_argument("--warm", type=int, help="most warm instances to try to hold (default 100,000)")
            sp.add_argument("--no-warm", action="store_true", help="skip the warm-instance phase")
            sp.add_argument("--batch", type=int, default=512, help="agents per hibernation batch (default 512)")
            sp.add_argument("--processes", type=int, default=1,
                            help="host processes hibernating at once into the one store (default 1; "
                                 "one per core to use the machine)")
            sp.add_argument("--per-txn", type=int, default=64,
                            help="agents per transaction function within a batch (default 64; 1: one each)")
            sp.add_argument("--store", help="scratch store directory to hibernate into (default: a temporary one)")
            sp.add_argument("--keep", action="store_true", help="keep the temporary store and print where it is")
        elif name == "steps":
            sp.add_argument("--n", type=int, help="tool calls per runtime agent (default 200)")
            sp.add_argument("--agents", type=int, help="concurrent runtime agents (default 64)")
            sp.add_argument("--profile", metavar="FILE", help="write a cProfile of the runtime phase to FILE")
        sp.set_defaults(fn=_run)
    return bench


def main(argv: Sequence[str] | None = None) -> int:
    """``python bench/<name>.py ...`` and ``python -m host.benchmarks ...`` land here."""
    from host.cli.app import main as cli_main

    args = ["bench", *(sys.argv[1:] if argv is None else argv)]
    _MAIN_ARGV[:] = args
    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
