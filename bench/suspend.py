"""``torpor bench suspend``: suspend and resume at real tool calls, delta snapshots against
full-memory copies, commits at durability sync and process (also ``python bench/suspend.py ...``).

``--also NAME`` measures more agents beside ``steps`` and ``mib`` in the same run, such as
``steps-zig`` (the same agent in Zig): each agent's spawn (to its first suspension),
suspend, resume and bytes per checkpoint then sit in one comparison table.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # `python bench/suspend.py ...`: the repository root on the path, for `bench.*`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import contextlib
import ctypes
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

from bench.rig import (
    Latency,
    Progress,
    Rig,
    TimedExecution,
    answer,
    cdf,
    checkpoint_of,
    draw_plot,
    load_bundle,
    machine,
    make_engine,
    make_rig,
    no_gc,
    positive,
    restore_from,
    spawn_latency,
    table,
)
from host.errors import TorporError
from host.ids import new_agent_id
from host.sandbox import abi
from host.sandbox.execution import Execution, Outcome, PendingCall, Suspended
from snapshots.delta import full_copy
from snapshots.format import GlobalValue, decode_snapshot, encode_snapshot
from snapshots.group_commit import GroupCommitter
from snapshots.lmdb_store import LmdbStore


def _suspend_agent(rig: Rig, store: LmdbStore, committer: GroupCommitter, cycles: int, baseline: bool,
                   progress: Progress) -> dict[str, Any]:
    """``cycles`` suspend/resume round trips of one agent, hibernating at every tool call."""
    import zstandard

    cctx = zstandard.ZstdCompressor(level=3)
    dctx = zstandard.ZstdDecompressor()
    sus, res_, cpu, commit, unwind, rel = Latency(), Latency(), Latency(), Latency(), Latency(), Latency()
    sizes: list[int] = []
    agent_id = new_agent_id()
    ex: Execution = rig.execution(json.dumps({"n": cycles + 1}).encode(), TimedExecution)
    out: Outcome = ex.start()
    with no_gc():
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
                value = encode_snapshot(checkpoint_of(rig, ex, agent_id, k, call), pristine=rig.loaded.image)
            t_enc = time.perf_counter_ns()
            committer.commit(_put_checkpoint(agent_id, k, value))
            t_durable = time.perf_counter_ns()
            ex.release()  # timed apart: a recycled instance is put back to the pristine state here
            rel.add(time.perf_counter_ns() - t_durable)
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
                ex = restore_from(rig, snap, TimedExecution)
            out = ex.resume(0, answer(k))
            assert isinstance(ex, TimedExecution)
            res_.add(ex.t_rewound - t0)
            progress.update(k)
    progress.done()
    sizes.sort()
    return {"durability": store.durability, "memory_bytes": ex.memory_size(), "suspend": sus.summary(),
            "resume": res_.summary(), "release": rel.summary(),
            "unwind": unwind.summary(), "suspend_no_commit": cpu.summary(), "commit": commit.summary(),
            "record_bytes_p50": sizes[len(sizes) // 2], "record_bytes_max": sizes[-1],
            "_samples": {"suspend": sus.samples, "resume": res_.samples}}


def _put_checkpoint(agent_id: str, seq: int, value: bytes) -> Callable[[Any], None]:
    def write(txn: Any) -> None:
        txn.put_checkpoint(agent_id, seq, value, 0.0)

    return write


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Suspend and resume at real tool calls, delta snapshots against full-memory copies.

    The delta runs go once into a store at ``durability="sync"`` (a commit waits for an
    ``fdatasync``) and once into one at ``"process"`` (a commit ends in the page cache,
    a background thread flushes every second), so that the cost of the sync is measured
    in the same run; every figure in the JSON carries the level it was measured at.
    """
    cycles = positive("--n", args.n if args.n is not None else (100 if args.quick else 3000))
    # Per agent: (key in the JSON, full-copy baseline?, durability level of the store).
    runs = (("torpor", False, "sync"), ("baseline", True, "sync"), ("torpor_process", False, "process"))
    also = tuple(dict.fromkeys(n for n in (getattr(args, "also", None) or []) if n not in ("steps", "mib")))
    engine = make_engine(args.engine)
    spawns: dict[str, dict[str, Any]] = {}
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
            for name in ("steps", *also, "mib"):
                rig = make_rig(engine, load_bundle(name))
                spawn = spawn_latency(rig, cycles, Progress(f"{name} spawn", cycles, args.progress))
                samples[f"{name} spawn"] = {"spawn": spawn.samples}
                spawns[name] = {"spawn": spawn.summary(), "module_bytes": len(rig.bundle.module)}
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
        # steps and each --also agent side by side (the same agent in other languages).
        "compare": {name: _compare_row(agents[name], spawns[name]) for name in ("steps", *also)},
    }

    def draw(plt: Any) -> None:
        _fig, axes = plt.subplots(1, 2, figsize=(13, 5))
        cdf(axes[0], {k: v["suspend"] for k, v in samples.items() if "suspend" in v},
            "suspend: unwind + encode + LMDB commit")
        cdf(axes[1], {k: v["resume"] for k, v in samples.items() if "resume" in v},
            "resume: read + decode + restore + rewind")

    res.update(draw_plot(args.plot, draw))
    return res


def _compare_row(agent: dict[str, Any], spawn: dict[str, Any]) -> dict[str, Any]:
    """One agent's line of the comparison: p50 (and p99) µs, bytes per checkpoint."""
    return {
        "module_bytes": spawn["module_bytes"], "memory_bytes": agent["torpor"]["memory_bytes"],
        "spawn_p50_us": spawn["spawn"]["p50_us"], "spawn_p99_us": spawn["spawn"]["p99_us"],
        "suspend_process_p50_us": agent["torpor_process"]["suspend"]["p50_us"],
        "suspend_process_p99_us": agent["torpor_process"]["suspend"]["p99_us"],
        "suspend_no_commit_p50_us": agent["torpor_process"]["suspend_no_commit"]["p50_us"],
        "suspend_sync_p50_us": agent["torpor"]["suspend"]["p50_us"],
        "resume_p50_us": agent["torpor"]["resume"]["p50_us"], "resume_p99_us": agent["torpor"]["resume"]["p99_us"],
        "record_bytes_p50": agent["torpor"]["record_bytes_p50"], "record_bytes_max": agent["torpor"]["record_bytes_max"],
    }


def show(r: dict[str, Any]) -> None:
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
    print(table(rows))
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
    compare = r.get("compare", {})
    if len(compare) > 1:
        print("\nside by side (p50 µs; spawn = a fresh instance run to its first tool call; suspend @process; "
              "bytes per checkpoint p50):")
        for name, c in compare.items():
            print(f"  {name:>12}: spawn {c['spawn_p50_us']:>8.1f}  suspend {c['suspend_process_p50_us']:>8.1f} "
                  f"(no commit {c['suspend_no_commit_p50_us']:.1f})  resume {c['resume_p50_us']:>8.1f}  "
                  f"{c['record_bytes_p50']:>6} B/checkpoint  module {c['module_bytes']:,} B  "
                  f"memory {c['memory_bytes'] // 1024} KiB")


if __name__ == "__main__":
    from bench.cli import main

    sys.exit(main(["suspend", *sys.argv[1:]]))
