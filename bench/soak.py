"""``torpor bench soak``: many agents of mixed kinds through one embedded host, for minutes
(also ``python bench/soak.py ...``).

Why: a host that serves agents for days must not grow. Each kind of agent exercises
one path of the host (a plain run, hibernation at tool calls, failing tools, each
budget ending an agent, each poison value refused at the import), and a leak on any
path shows as a resident set that keeps rising once the caches are warm. So one
:class:`~host.runtime.Host` runs them, ``--concurrency`` at a time, until ``--agents``
have ended and ``--minutes`` have passed; the process's resident set (all of it, and its
anonymous part, which the store's file-backed pages do not inflate), its open
descriptors and its memory mappings are sampled as it goes; and every agent's end
state (status, error code, output) is held to what its input implies, both as the
run returned it and as the store keeps it afterwards. The RSS slope after warm-up is
a least-squares fit, per minute and per 1,000 agents.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # `python bench/soak.py ...`: the repository root on the path, for `bench.*`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import gc
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.rig import BENCH_GUESTS, EXAMPLES, draw_plot, load_bundle, machine, map_count, positive
from host.errors import TorporError
from host.sandbox import bundle as bundle_mod
from host.sandbox import guest_json
from host.sandbox.bundle import Bundle

#: Policies the soak guest's module is packed with again, one per budget it runs into.
VARIANTS: dict[str, str] = {
    "fuel": 'fuel = 2_000_000\nmemory = "16MiB"\nwall_clock = "10s"',
    "wall_clock": 'fuel = 1_000_000_000_000\nmemory = "16MiB"\nwall_clock = "100ms"',
    "memory": 'fuel = 200_000_000\nmemory = "4MiB"\nwall_clock = "10s"',
    "tool_calls": 'fuel = 200_000_000\nmemory = "16MiB"\nwall_clock = "10s"\ntool_calls = 3',
}

#: Poison values a guest hands the host (as its output, as tool arguments, as a kv key).
POISON: dict[str, str] = {
    "deep_array": "[" * 20_000 + "]" * 20_000,
    "deep_object": '{"a":' * 5_000 + "1" + "}" * 5_000,
    "lone_surrogate_value": '{"key": "k", "value": "\\ud800"}',
    "lone_surrogate_key": '{"key": "\\udfff", "value": 1}',
    "beyond_double": '{"key": "k", "value": 1e999}',
    "int_beyond_64_bits": '{"key": "k", "value": 18446744073709551616}',
    "huge_int_key": '{"key": "k", "value": 1, "' + "9" * 40 + '": ' + "9" * 400 + "}",
}
_REFUSED = {"rc": -2, "code": "invalid_json"}  # what the import answers a poison value


@dataclass(frozen=True)
class Expect:
    """The end state an agent's input implies: its status, its error's code, its output
    (``None``: any output; the error code ``None``: no error)."""

    status: str
    code: str | None = None
    output: Any = None
    check_output: bool = True


@dataclass(frozen=True)
class Kind:
    """One kind of agent: its bundle, its share of the mix, and from the agent's number
    its input and the end state that input implies."""

    name: str
    bundle: str
    weight: int
    make: Callable[[int], tuple[Any, Expect]]


def _hello(i: int) -> tuple[Any, Expect]:
    name = f"agent {i} ✓"
    return {"name": name}, Expect("completed", output={"greeting": f"hello, {name}"})


def _steps(i: int) -> tuple[Any, Expect]:
    n = 1 + i % 6
    return {"n": n}, Expect("completed", output={"sum": n * (n + 1) // 2, "last": n})


def _inventory(i: int) -> tuple[Any, Expect]:
    # An unknown SKU (the tool fails: rejected) and a quantity sent as a string
    # (invalid_args, retried as a number) of a SKU never in stock (tool_failed with
    # what is available, 0: backordered). Nothing of it depends on the warehouse's state.
    order_id = f"S-{i}"
    order = [{"sku": "kiwi", "qty": 1}, {"sku": "plum", "qty": "2"}]
    out = {"order_id": order_id, "reserved": [], "backordered": [{"sku": "plum", "qty": 2}],
           "rejected": [{"line": 0, "error": "tool_failed", "message": "unknown sku: kiwi"}], "open_backorders": 1}
    return {"order_id": order_id, "order": order}, Expect("completed", output=out)


def _budget(mode: str, code: str, status: str = "failed", **more: Any) -> Callable[[int], tuple[Any, Expect]]:
    def make(i: int) -> tuple[Any, Expect]:
        return {"mode": mode, **more}, Expect(status, code=code, check_output=False)

    return make


_POISON_NAMES = sorted(POISON)


def _poison(i: int) -> tuple[Any, Expect]:
    mode = "output" if i % 2 else "call"
    text = POISON[_POISON_NAMES[(i // 2) % len(_POISON_NAMES)]]
    return {"mode": mode, "text": text}, Expect("completed", output=_REFUSED)


def _sound_value(i: int) -> tuple[Any, Expect]:
    # The soak guest with a value the host takes: the poison kind's healthy twin.
    text = json.dumps({"key": f"k{i % 7}", "value": [i, 2.5, "é"]})
    if i % 2:
        return {"mode": "output", "text": text}, Expect("completed", output=json.loads(text))
    return {"mode": "call", "text": text}, Expect("completed", output={"rc": 0, "code": "ok"})


KINDS: tuple[Kind, ...] = (
    Kind("hello", "hello", 20, _hello),
    Kind("steps", "steps", 16, _steps),
    Kind("inventory", "inventory", 10, _inventory),
    Kind("fuel", "soak-fuel", 8, _budget("spin", "out_of_fuel")),
    Kind("memory", "soak-memory", 8, _budget("grow", "memory_limit")),
    Kind("wall_clock", "soak-wall_clock", 3, _budget("spin", "deadline_exceeded")),
    Kind("tool_calls", "soak-tool_calls", 8, _budget("calls", "budget_exceeded", status="terminated", n=5)),
    Kind("poison", "soak", 20, _poison),
    Kind("sound_value", "soak", 7, _sound_value),
)
_WHEEL = [k for k in KINDS for _ in range(k.weight)]


def kind_of(i: int) -> Kind:
    """The kind of agent number ``i``: the mix by weight, interleaved by a fixed stride."""
    return _WHEEL[(i * 37) % len(_WHEEL)]


def bundles() -> dict[str, Bundle]:
    """Every bundle the mix runs: the examples, and the soak guest under each variant's policy."""
    out = {name: load_bundle(name) for name in ("hello", "steps", "inventory", "soak")}
    soak = out["soak"]
    policy = (BENCH_GUESTS / "soak" / "policy.toml").read_text()
    head, _, tools = policy.partition("[tools.")
    for variant, budgets in VARIANTS.items():
        text = (head.split("[budgets]")[0].replace('name = "soak"', f'name = "soak-{variant}"')
                + f"[budgets]\n{budgets}\n\n[tools.{tools}")
        out[f"soak-{variant}"] = bundle_mod.load_bytes(bundle_mod.pack(soak.module, text), source=f"soak-{variant}")
    return out


def mismatch(expect: Expect, status: str, error: dict[str, Any] | None, output: Any) -> str | None:
    """How an agent's end state differs from what its input implies, or None."""
    code = (error or {}).get("code")
    if status != expect.status or code != expect.code:
        return f"expected {expect.status}/{expect.code}, got {status}/{code}: {(error or {}).get('message')}"
    if expect.check_output and output != expect.output:
        return f"expected output {json.dumps(expect.output)[:200]}, got {json.dumps(output)[:200]}"
    return None


# -- the process, sampled ------------------------------------------------------------------------
def _status_kib() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile"):
                    out[key] = int(rest.split()[0])
    except OSError:  # pragma: no cover - not Linux
        pass
    return out


def open_fds() -> int:
    """The process's open file descriptors."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # pragma: no cover - not Linux
        return -1


def sample(t0: float, done: int, pool: Any = None) -> dict[str, Any]:
    """One sample: seconds since the start, agents ended, RSS (all, anonymous, file) in MiB,
    descriptors, mappings, and what the memory pool keeps resident for reuse (part of the
    anonymous RSS, bounded by ``$TORPOR_MEMORY_POOL_MAX``)."""
    st = _status_kib()
    kept = pool.stats().get("hot_resident_bytes", 0) if pool is not None else 0
    return {"t_s": round(time.monotonic() - t0, 2), "agents": done,
            "rss_mib": round(st.get("VmRSS", 0) / 1024, 2), "rss_anon_mib": round(st.get("RssAnon", 0) / 1024, 2),
            "rss_file_mib": round(st.get("RssFile", 0) / 1024, 2), "pool_kept_mib": round(kept / (1 << 20), 2),
            "fds": open_fds(), "maps": map_count()}


def slope(xs: list[float], ys: list[float]) -> float | None:
    """The least-squares slope of ``ys`` against ``xs`` (None with fewer than 3 points)."""
    n = len(xs)
    if n < 3:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


def _fit(samples: list[dict[str, Any]], key: str) -> dict[str, float | None]:
    per_s = slope([s["t_s"] for s in samples], [s[key] for s in samples])
    per_agent = slope([s["agents"] for s in samples], [s[key] for s in samples])
    return {"mib_per_minute": None if per_s is None else round(per_s * 60, 3),
            "mib_per_1000_agents": None if per_agent is None else round(per_agent * 1000, 3)}


# -- the run --------------------------------------------------------------------------------------
def soak(store: Path, *, agents: int, seconds: float, concurrency: int, interval: float,
         warmup_s: float, durability: str | None, engine: str | None,
         progress: Callable[[int, str], None] | None = None) -> dict[str, Any]:
    """Run the mix through one host on ``store`` and report what it found (see the module doc)."""
    import anyio

    from host.runtime import Host

    bs = bundles()
    # Nothing here grows with the agents (but the store): what the benchmark kept per agent
    # would be a leak of its own in the figures.
    tally: Counter[str] = Counter()
    ends: Counter[tuple[str, str | None]] = Counter()  # (status, error code) every agent should end in
    mismatches: list[dict[str, Any]] = []
    mismatched = [0]

    def mismatch_found(entry: dict[str, Any]) -> None:
        mismatched[0] += 1
        if len(mismatches) < 20:
            mismatches.append(entry)

    samples: list[dict[str, Any]] = []
    spawned = [0]
    done = [0]
    # The inventory example's tool is the operator's, in the example's directory.
    with Host(store, engine=engine, durability=durability, tools_dirs=[EXAMPLES / "inventory"]) as host:
        gc.collect()
        t0 = time.monotonic()
        start = sample(t0, 0, host.engine.memory_pool)  # the host open, nothing run yet
        start["gc_objects"] = len(gc.get_objects())
        next_sample = [t0 + interval]

        async def one(i: int, limiter: anyio.CapacityLimiter) -> None:
            kind = kind_of(i)
            payload, expect = kind.make(i)
            stored_why = None
            try:
                res = await host.run(bs[kind.bundle], payload)
                why = mismatch(expect, res.status, res.error, res.output)
                outcome = f"{res.status}/{(res.error or {}).get('code') or '-'}"
                rec = host.get_agent(res.agent_id)  # and as the store keeps it
                stored_why = mismatch(expect, str(rec.get("status")), rec.get("error"), rec.get("output"))
                ends[(expect.status, expect.code)] += 1
            except TorporError as exc:  # refused before it became an agent: never expected here
                why, outcome = f"refused: error[{exc.code}] {exc}", f"refused/{exc.code}"
            finally:
                limiter.release_on_behalf_of(i)
            tally[f"{kind.name}: {outcome}"] += 1
            if why:
                mismatch_found({"agent": i, "kind": kind.name, "where": "run", "why": why})
            if stored_why:
                mismatch_found({"agent": i, "kind": kind.name, "where": "store", "why": stored_why})
            done[0] += 1
            now = time.monotonic()
            if now >= next_sample[0]:
                next_sample[0] = now + interval
                samples.append(sample(t0, done[0], host.engine.memory_pool))
                if progress:
                    s = samples[-1]
                    progress(done[0], f"rss {s['rss_mib']:.0f} MiB, fds {s['fds']}, maps {s['maps']}")

        async def main() -> None:
            limiter = anyio.CapacityLimiter(concurrency)
            end = t0 + seconds
            async with anyio.create_task_group() as tg:
                while spawned[0] < agents or time.monotonic() < end:
                    i = spawned[0]
                    await limiter.acquire_on_behalf_of(i)
                    spawned[0] += 1
                    tg.start_soon(one, i, limiter)

        anyio.run(main)
        elapsed = time.monotonic() - t0
        gc.collect()
        end = sample(t0, done[0], host.engine.memory_pool)
        end["gc_objects"] = len(gc.get_objects())
        samples.append(end)
        # What the store keeps at the end: as many agents in each end state as were expected
        # there (each one's record was also checked as its run returned).
        with host.store.read() as txn:
            kept = Counter((str(r.get("status")), (r.get("error") or {}).get("code")) for r in txn.iter_agents())
    for state in sorted(set(kept) | set(ends), key=str):
        if kept[state] != ends[state]:
            mismatch_found({"agent": None, "kind": None, "where": "store at the end",
                            "why": f"{kept[state]} agents end {state[0]}/{state[1]}, {ends[state]} should"})
    after = [s for s in samples if s["t_s"] >= warmup_s] or samples[len(samples) // 2:]
    warm = after[0] if after else end
    return {
        "agents": done[0], "seconds": round(elapsed, 1), "agents_per_s": round(done[0] / max(elapsed, 1e-9), 1),
        "concurrency": concurrency, "warmup_s": warmup_s, "outcomes": dict(sorted(tally.items())),
        "mismatches": mismatched[0], "failed": bool(mismatched[0]), "end_states": {
            f"{status}/{code or '-'}": n for (status, code), n in sorted(ends.items(), key=str)}, "mismatch_examples": mismatches[:20],
        "start": start, "after_warmup": warm, "end": end, "samples": samples, "samples_after_warmup": len(after),
        "rss_slope": _fit(after, "rss_mib"), "rss_anon_slope": _fit(after, "rss_anon_mib"),
        "pool_kept_slope": _fit(after, "pool_kept_mib"),
        "rss_after_warmup_mib": {"first": after[0]["rss_mib"] if after else None,
                                 "last": after[-1]["rss_mib"] if after else None,
                                 "max": max((s["rss_mib"] for s in after), default=None)},
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """``torpor bench soak``: the mix through one host for ``--minutes`` and at least ``--agents``."""
    from bench.rig import Progress
    from snapshots.lmdb_store import resolve_durability

    agents = positive("--agents", args.agents if args.agents is not None else (300 if args.quick else 10_000))
    minutes = float(args.minutes if args.minutes is not None else (0.0 if args.quick else 10.0))
    if minutes < 0:
        raise TorporError("--minutes must be >= 0", code="invalid_config")
    concurrency = positive("--concurrency", args.concurrency if args.concurrency is not None else 32)
    interval = 0.25 if args.quick else max(1.0, min(10.0, minutes * 60 / 200))
    warmup_s = minutes * 60 * 0.2 if minutes else 0.0  # the first fifth: caches fill, the store's map grows
    bar = Progress("soak", agents, args.progress)
    tmp = Path(tempfile.mkdtemp(prefix="torpor-bench-soak-"))
    try:
        res = soak(tmp, agents=agents, seconds=minutes * 60, concurrency=concurrency, interval=interval,
                   warmup_s=warmup_s, durability=args.durability, engine=args.engine,
                   progress=lambda n, extra: bar.update(min(n, agents), extra))
        bar.done()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res.update({"bench": "soak", "machine": machine(), "durability": resolve_durability(args.durability),
                "kinds": {k.name: k.weight for k in KINDS}, "poison": sorted(POISON),
                "guest_json_max_depth": guest_json.MAX_DEPTH})
    samples = res["samples"]

    def draw(plt: Any) -> None:
        _fig, ax = plt.subplots(1, 1, figsize=(10, 5))
        ts = [s["t_s"] / 60 for s in samples]
        ax.plot(ts, [s["rss_mib"] for s in samples], label="RSS")
        ax.plot(ts, [s["rss_anon_mib"] for s in samples], label="RSS, anonymous")
        if warmup_s:
            ax.axvline(warmup_s / 60, color="gray", linestyle=":", label="end of warm-up")
        ax.set_xlabel("minutes")
        ax.set_ylabel("MiB")
        ax.set_title(f"soak: {res['agents']:,} agents through one host ({res['rss_slope']['mib_per_minute']} "
                     "MiB/min after warm-up)")
        ax.legend()

    res.update(draw_plot(args.plot, draw))
    return res


def show(res: dict[str, Any]) -> None:
    """The figures for people."""
    s0, s1 = res["start"], res["end"]
    print(f"soak: {res['agents']:,} agents in {res['seconds']} s ({res['agents_per_s']}/s), "
          f"{res['concurrency']} at a time, durability {res['durability']}")
    for outcome, n in res["outcomes"].items():
        print(f"  {outcome:<48} {n:>8,}")
    print(f"end states not as their input implies: {res['mismatches']}")
    for m in res["mismatch_examples"][:5]:
        print(f"  {m}")
    print(f"RSS {s0['rss_mib']} -> {s1['rss_mib']} MiB (anonymous {s0['rss_anon_mib']} -> {s1['rss_anon_mib']}); "
          f"after warm-up ({res['warmup_s']:.0f} s, {res['samples_after_warmup']} samples): "
          f"RSS slope {res['rss_slope']['mib_per_minute']} MiB/min, {res['rss_slope']['mib_per_1000_agents']} MiB "
          f"per 1,000 agents; anonymous {res['rss_anon_slope']['mib_per_minute']} MiB/min, "
          f"{res['rss_anon_slope']['mib_per_1000_agents']} MiB per 1,000 agents")
    print(f"memory pool's kept pages {s0['pool_kept_mib']} -> {s1['pool_kept_mib']} MiB (slope after warm-up "
          f"{res['pool_kept_slope']['mib_per_minute']} MiB/min)")
    w = res["after_warmup"]
    print(f"open descriptors {s0['fds']} at start, {w['fds']} after warm-up, {s1['fds']} at the end; mappings "
          f"{s0['maps']}, {w['maps']}, {s1['maps']}; Python objects {s0['gc_objects']:,} -> {s1['gc_objects']:,}")


if __name__ == "__main__":
    from bench.cli import main

    sys.exit(main(["soak", *sys.argv[1:]]))
