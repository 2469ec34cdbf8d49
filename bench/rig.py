"""The benchmarks' shared harness: latency histograms, progress, the machine, the agents.

Everything ``bench/coldstart.py``, ``suspend``, ``density``, ``steps`` and the
one-off scripts of ``bench/`` share: a :class:`Rig` is a bundle loaded the way the
host loads it, so that a figure measured through it is the mechanism's own.
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import wasmtime

from host.errors import ConfigError, TorporError
from host.sandbox import abi, imports
from host.sandbox import bundle as bundle_mod
from host.sandbox.bundle import Bundle
from host.sandbox.engine import Engine, EngineConfig, LoadedModule
from host.sandbox.execution import (
    Captured,
    Execution,
    Limits,
    PendingCall,
    Suspended,
    current,
    define_import,
)
from snapshots.format import Snapshot

# guest_sdk/ is data to the benchmarks (C sources), found beside bench/ as the toolchain finds its
# headers: in a checkout and in site-packages alike.
EXAMPLES = Path(__file__).resolve().parents[1] / "guest_sdk" / "examples"
BENCH_GUESTS = Path(__file__).resolve().parent / "guests"

#: The targets of issues 2, 3 and 6 (2-core machine, one process), and of the CLI's
#: start-up (issue "The house": each command at most 150 ms p50 on a store of 10,000 agents).
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
    "help_p50_ms": 150.0,
    "ps_p50_ms": 150.0,
    "ps_json_p50_ms": 150.0,
    "inspect_p50_ms": 150.0,
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


def read_int(path: str) -> int | None:
    """The first integer in a file (a /proc or /sys setting), None if unreadable."""
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def mem_available_kib() -> int | None:
    """RAM the kernel could still hand out (MemAvailable) in KiB, None if it does not say."""
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
            "vm_max_map_count": read_int("/proc/sys/vm/max_map_count")}


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


def positive(name: str, value: int) -> int:
    """``value`` if it is a positive count; a one-line ConfigError naming the option otherwise."""
    if value is None or value <= 0:
        raise ConfigError(f"{name} must be a positive number, got {value}")
    return value


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
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
    """An engine of the named profile (None: ``$TORPOR_ENGINE`` or the default)."""
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


def spawn_latency(rig: Rig, n: int, progress: Progress, release: Latency | None = None) -> Latency:
    """``n`` spawns of one agent (input ``{"n": 1}``): an instance in the pristine state (fresh,
    or recycled: host/sandbox/recycle.py), each with its own seed, run to its first tool call
    (a JS agent: its first await) and unwound there; what a spawn costs before anything is
    written. ``release``: where the release after each spawn is timed (its reset, if recycled)."""
    import json

    lat = Latency()
    payload = json.dumps({"n": 1}).encode()
    with no_gc():
        for i in range(n):
            ex = rig.execution(payload)
            ex.seed = abi.agent_seed(f"bench-{i}")
            t0 = time.perf_counter_ns()
            out = ex.start()
            t1 = time.perf_counter_ns()
            if not isinstance(out, Suspended):
                raise TorporError(f"{rig.bundle.name} did not stop at its first tool call on spawn: {out}")
            t2 = time.perf_counter_ns()
            ex.release()
            if release is not None:
                release.add(time.perf_counter_ns() - t2)
            lat.add(t1 - t0)
            progress.update(i + 1)
    progress.done()
    return lat


def answer(seq: int) -> bytes:
    """What the benchmarks' ``kv.incr`` answers to call ``seq``."""
    return b'{"value":%d}' % seq


def checkpoint_of(rig: Rig, ex: Execution, agent_id: str, seq: int, call: PendingCall) -> Snapshot:
    """The checkpoint the runtime would write at this tool call (same fields, same shapes)."""
    cap = ex.capture()
    usage = {"suspensions": seq, "fuel_used": ex.fuel_used, "tool_calls": call.seq,
             "calls_by_tool": {call.tool: call.seq}}
    return Snapshot(agent_id=agent_id, seq=seq, module_digest=rig.bundle.module_digest, abi_version=abi.ABI_VERSION,
                    memory=cap.memory, globals=cap.globals, async_buf=cap.async_buf, entry=abi.ENTRY_EXPORT,
                    pending=call.to_dict(), usage=usage, created_at=time.time())


def restore_from(rig: Rig, snap: Snapshot, cls: type[Execution] = Execution) -> Execution:
    """A fresh instance holding ``snap``'s state, parked at its pending tool call."""
    pending = PendingCall.from_snapshot(snap) or PendingCall.from_dict({})
    return cls.restore(rig.loaded, rig.pre, rig.limits, b"", Captured(snap.memory, snap.globals, snap.async_buf),
                       fuel_used=int(snap.usage.get("fuel_used", 0)), call_seq=pending.seq, pending=pending)


# -- plotting -----------------------------------------------------------------------------
def draw_plot(path: str | None, draw: Callable[[Any], None]) -> dict[str, Any]:
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


def cdf(ax: Any, series: dict[str, Sequence[int]], title: str, unit: str = "µs") -> None:
    """Cumulative distributions of nanosecond samples, in ``unit`` (µs or ms) on a log scale."""
    div = 1e6 if unit == "ms" else 1e3
    for name, xs in series.items():
        if not xs:
            continue
        ys = sorted(x / div for x in xs)
        n = len(ys)
        ax.plot(ys, [(i + 1) / n for i in range(n)], label=name)
    ax.set_xscale("log")
    ax.set_xlabel(f"latency ({unit}, log scale)")
    ax.set_ylabel("fraction of samples ≤ x")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def table(rows: dict[str, dict[str, float]]) -> str:
    """Latency summaries (:meth:`Latency.summary`) as an aligned text table, one case a line."""
    w = max([len(k) for k in rows] + [4])
    out = [f"{'case':{w}} {'n':>8} {'p50 µs':>10} {'p90 µs':>10} {'p99 µs':>10} {'max µs':>10}"]
    for name, r in rows.items():
        out.append(f"{name:{w}} {int(r['n']):>8} {r['p50_us']:>10.1f} {r['p90_us']:>10.1f} {r['p99_us']:>10.1f} "
                   f"{r['max_us']:>10.1f}")
    return "\n".join(out)


def in_processes(target: Callable[..., None], args: Sequence[tuple[Any, ...]], progress: Progress,
                 what: str) -> list[dict[str, Any]]:
    """Run ``target(*a, barrier, results)`` in a fresh ("spawn") process for each ``a`` of
    ``args`` and return what each put on ``results`` as ``("ok", dict)``, in the order they
    finished. ``barrier`` holds every process until all have come (they time the same
    moments); a process reports ``("error", text)`` (and aborts the barrier) instead, and
    then this raises TorporError naming ``what`` failed."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(args), timeout=600)
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*a, barrier, results), daemon=True) for a in args]
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
        raise TorporError(f"{what} failed: " + "; ".join(errors))
    return outs
