"""``torpor bench density``: hibernate N agents into LMDB, then hold as many warm instances as the
process can (also ``python bench/density.py [--quick] [--json] ...``)."""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # `python bench/density.py ...`: the repository root on the path, for `bench.*`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import contextlib
import gc
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

import wasmtime

from bench.rig import (
    BENCH_MARKER,
    Progress,
    Rig,
    answer,
    checkpoint_of,
    draw_plot,
    in_processes,
    load_bundle,
    machine,
    make_engine,
    make_rig,
    map_count,
    mem_available_kib,
    positive,
    read_int,
    rss_kib,
)
from host.errors import ConfigError, TorporError
from host.ids import new_agent_id
from host.sandbox.execution import Completed, Execution, Failed, Outcome, PendingCall, Suspended
from snapshots.format import encode_snapshot
from snapshots.group_commit import GroupCommitter
from snapshots.lmdb_store import LmdbStore, resolve_durability


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
        limit_maps = read_int("/proc/sys/vm/max_map_count")
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
            out2 = ex.resume(0, answer(k))
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
    snaps = [(checkpoint_of(rig, ex, new_agent_id(), 1, call), call) for ex, call in warm]
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


def _hibernate_worker(profile: str, store_dir: str, n: int, per_txn: int, batch: int, rounds: int, agent: str,
                      barrier: Any, results: Any) -> None:
    """One process of :func:`_parallel_hibernate` (a module-level function: it is pickled).

    ``rounds``: how many batches the busiest process hibernates; a process with fewer
    agents keeps meeting the others at the barrier until then."""
    try:
        rig = make_rig(make_engine(profile), load_bundle(agent))
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
                        processes: int, progress: Progress, agent: str = "steps") -> dict[str, Any]:
    """Hibernate ``n`` agents with ``processes`` host processes sharing one store.

    How Torpor uses more than one core: a host process per core, all on the same
    store (LMDB serialises their commits; each process group-commits its own). The
    processes hibernate their batches in lockstep (a barrier before and after each),
    so ``hibernations_per_s`` is all agents over the longest process's time spent
    hibernating: the rate of the machine, not a sum of rates measured at different
    moments.
    """
    used0, disk0 = store.used_bytes(), _disk_bytes(store_dir)
    ck0, ag0 = _db_bytes(store, "checkpoints"), _db_bytes(store, "agents")
    share = [n // processes + (1 if i < n % processes else 0) for i in range(processes)]
    rounds = max(-(-k // batch) for k in share)
    t0 = time.perf_counter()
    outs = in_processes(_hibernate_worker, [(profile, str(store_dir), k, per_txn, batch, rounds, agent) for k in share],
                        progress, "a hibernating process")
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


def _verify_hibernated(rig: Rig, store: LmdbStore, sample: int = 20) -> str:
    """Resume a sample of the hibernated agents from the store into fresh instances and run
    each to its end: ``ok/sample``, where ok is those that completed with the sums the
    agent's input implies (``n`` calls answered 1..n: sum n(n+1)/2, last n)."""
    from bench.rig import restore_from
    from snapshots.format import decode_snapshot

    with store.read() as txn:
        ids = [a["agent_id"] for a in txn.iter_agents() if a.get("bundle_digest") == rig.bundle.digest]
    picked = ids[:: max(1, len(ids) // sample)][:sample]
    ok = 0
    for aid in picked:
        with store.read() as txn:
            blob = txn.get_checkpoint(aid, 1)
            if blob is None:
                continue
            snap = decode_snapshot(blob, expect_module_digest=rig.bundle.module_digest, pristine=rig.loaded.image,
                                   chunks_from=txn.get_chunk)
        ex = restore_from(rig, snap)
        try:
            out: Outcome = ex.resume(0, answer(1))
            k = 1
            while isinstance(out, Suspended):
                k += 1
                out = ex.resume(0, answer(k))
        finally:
            ex.release()
        ok += isinstance(out, Completed) and out.output == {"sum": k * (k + 1) // 2, "last": k}
    return f"{ok}/{len(picked)}"


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Hibernate N agents into LMDB, then hold as many warm instances as the process can."""
    n = positive("--agents", args.agents if args.agents is not None else (2000 if args.quick else 1_000_000))
    warm = positive("--warm", args.warm if args.warm is not None else (300 if args.quick else 100_000))
    batch = positive("--batch", args.batch)
    processes = positive("--processes", args.processes)
    if processes > n:
        raise ConfigError(f"--processes {processes} is more than --agents {n}: each process needs agents to hibernate")
    engine = make_engine(args.engine)
    # The agent hibernated: steps (C, the default), or the same agent in JavaScript or Python.
    agent = getattr(args, "agent", None) or "steps"
    rig = make_rig(engine, load_bundle(agent))
    res: dict[str, Any] = {"bench": "density", "agent": agent, "engine": engine.config.profile, "machine": machine()}
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
            per_txn = positive("--per-txn", args.per_txn)
            if processes > 1:
                committer.close()
                h = _parallel_hibernate(engine.config.profile, store, store_dir, n, per_txn, batch, processes,
                                        Progress("hibernate", n, False), agent)
            else:
                h = _hibernate_phase(rig, store, committer, store_dir, n, per_txn, batch,
                                     Progress("hibernate", n, args.progress))
            h["per_txn"] = args.per_txn
            h.setdefault("processes", 1)
            # Prove they are real: a sample resumed from the store, run to its end.
            h["hibernated_verified"] = _verify_hibernated(rig, store)
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

    res.update(draw_plot(args.plot, draw))
    return res


def show(r: dict[str, Any]) -> None:
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
    print(f"  RSS growth        {r['rss_growth_mib']} MiB over the run; {r['commits']:,} commits; "
          f"{r.get('hibernated_verified', '-')} of a sample resumed from the store and completed")
    print(f"warm instances      {r['warm_instances']:,} at {r['rss_per_warm_kib']} KiB RSS each "
          f"({r.get('maps_per_instance', 0)} mappings each; targets ≥ 30,000 at ≤ 24 KiB)")
    print(f"  stopped because   {r['warm_stop_reason']}  [engine {r['engine']}]")


if __name__ == "__main__":
    from bench.cli import main

    sys.exit(main(["density", *sys.argv[1:]]))
