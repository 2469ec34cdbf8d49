"""``torpor bench conversation``: what a long-running LLM agent leaves in the store.

An agent (``bench/guests/conversation``) keeps a conversation in its memory, grows it by
B bytes a turn over N turns and sends all of it to a tool at every turn (``llm.chat``
against a loopback model server started here, or ``kv.set``), as every LLM agent sends
all its messages to the model. For each N it reports the bytes stored for that agent by
kind (checkpoints, the content chunks they share, journal, audit) and the LMDB file,
beside the zstd size of the final conversation; the time per turn (from the
checkpoints' timestamps); and suspend and resume at the last turn (p50/p99): resume is
reading the last checkpoint from the store, decoding it and restoring it into a fresh
instance; suspend is capturing that instance, encoding it and committing it. Each round
also times a *cold* resume first, with the process's cache of verified chunks
(``snapshots.chunks``) emptied, as in a process that has not read this agent before; the
resume then timed finds them cached, as a host resuming its agents again does.
``--profile FILE`` writes a cProfile of the resume rounds of the last case.

Then "last checkpoint only": the agent's older checkpoints pruned and the store
compacted (where the store can), as an agent whose policy keeps one checkpoint ends up.

The bytes are counted from the LMDB databases directly (key + value of every record of
each database; one agent per store), so the same module measures a store of any format:
the figures before the chunk store were taken with this module on the commit before it.
Also ``python bench/conversation.py ...``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # `python bench/conversation.py ...`: the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import importlib
import itertools
import json
import shutil
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from bench.rig import (
    BENCH_GUESTS,
    Latency,
    Progress,
    draw_plot,
    machine,
    make_engine,
    make_rig,
    restore_from,
)
from host.errors import ConfigError, TorporError

_KINDS = ("checkpoints", "chunks", "journal", "audit")


class _ModelHandler(BaseHTTPRequestHandler):
    """An OpenAI-style chat completion endpoint that answers a short fixed-size reply."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = json.loads(self.rfile.read(length) or b"{}")
        n = len(body.get("messages", []))
        text = f"answer {n}: noted, the request is in hand and the status will follow."
        out = json.dumps({"id": "c", "object": "chat.completion", "model": "bench-echo",
                          "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                       "finish_reason": "stop"}],
                          "usage": {"prompt_tokens": length // 4, "completion_tokens": 16,
                                    "total_tokens": length // 4 + 16}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args: Any) -> None:
        pass


def _model_server() -> ThreadingHTTPServer:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _ModelHandler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def _bundle(port: int, retention: int | None, agent: str = "conversation") -> Any:
    """The conversation guest (``conversation``, in C, or ``conversation-js``) with its policy
    pointed at this run's model server."""
    from host.sandbox import bundle as bundle_mod

    tmp = Path(tempfile.mkdtemp(prefix="torpor-bench-conv-src-"))
    try:
        shutil.copytree(BENCH_GUESTS / agent, tmp / agent)
        pol = tmp / agent / "policy.toml"
        text = pol.read_text().replace("127.0.0.1:8400", f"127.0.0.1:{port}")
        if retention is not None:
            text += f"\n[retention]\ncheckpoints = {retention}\n"
        pol.write_text(text)
        return bundle_mod.load_bytes(bundle_mod.build_dir(tmp / agent), source=agent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _bytes_by_kind(store: Any) -> dict[str, int]:
    """Key + value bytes of every record of each database, and the LMDB file's size.

    Read through the LMDB environment of the open store (an ``LmdbStore``), not its
    API, so that the same count holds for a store of any format."""
    import lmdb

    env = store._env
    out: dict[str, int] = {}
    for kind in _KINDS:
        try:
            db = env.open_db(kind.encode(), create=False)
        except lmdb.NotFoundError:
            out[kind] = 0
            continue
        with env.begin(db=db) as txn:
            out[kind] = sum(len(k) + len(v) for k, v in txn.cursor())
    out["total"] = sum(out[k] for k in _KINDS)
    out["lmdb_file"] = (Path(store.path) / "data.mdb").stat().st_size
    return out


def _compact(store: Any) -> str:
    """Reclaim what nothing references, where the store can (the chunk store)."""
    fn = getattr(store, "compact", None)
    if fn is None:
        return "no compaction in this store"
    return f"compacted: {fn()}"


def _one(b: Any, engine_name: str | None, turns: int, size: int, tool: str, summarise: int, rounds: int,
         progress: Progress, profile: str | None = None, compiled: Path | None = None) -> dict[str, Any]:
    import anyio
    import zstandard

    from host.runtime.host import Host
    from snapshots.format import decode_snapshot, encode_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="torpor-bench-conv-"))
    try:
        if compiled is not None:  # the module compiled once per run, not once per case (untimed)
            shutil.copytree(compiled, tmp / "cache", dirs_exist_ok=True)
        host = Host(tmp, warm_idle_s=60.0)
        try:
            t0 = time.perf_counter()
            res = anyio.run(lambda: host.run(b, {"turns": turns, "bytes": size, "tool": tool,
                                                 "summarise": summarise}))
            wall = time.perf_counter() - t0
            if res.status != "completed":
                raise TorporError(f"the conversation agent did not complete: {res.status} {res.error}")
            aid = res.agent_id
            output = res.output
            store: Any = host.store
            with store.read() as txn:
                cps = txn.list_checkpoints(aid)
                journal = list(txn.iter_journal(aid))
            stamps = [c.created_at for c in cps]
            gaps = [b_ - a for a, b_ in itertools.pairwise(stamps)]
            tail = gaps[-max(5, len(gaps) // 10):] if gaps else []
            head = gaps[: max(5, len(gaps) // 10)] if gaps else []
            last_call = journal[-1][1]["args"]
            conversation = json.dumps(last_call.get("messages", last_call.get("value")),
                                      separators=(",", ":")).encode()
            zsize = len(zstandard.ZstdCompressor(level=3).compress(conversation))
            by_kind = _bytes_by_kind(store)
            # suspend and resume at the last turn, through the store's public API
            rig = make_rig(make_engine(engine_name, cache_dir=tmp / "cache"), b)  # the host compiled it there
            last = cps[-1].seq
            sus, resu, cold, cpu = Latency(), Latency(), Latency(), Latency()
            # cold: this process's cache of verified chunks emptied first (a resume in a
            # process that has not read this agent's chunks yet); absent before the cache.
            forget = getattr(importlib.import_module("snapshots.chunks"), "clear_cache", None)
            scratch = "bench-scratch"
            snap = None
            prof = None
            if profile:
                import cProfile

                prof = cProfile.Profile()
            for i in range(rounds):
                if forget is not None:  # a cold resume, then the warm one timed below
                    forget()
                    c0 = time.perf_counter_ns()
                    with store.read() as txn:
                        blob = txn.get_checkpoint(aid, last)
                        snap = decode_snapshot(blob, expect_module_digest=b.module_digest,
                                               pristine=rig.loaded.image, chunks_from=txn.get_chunk)
                    warm = restore_from(rig, snap)
                    cold.add(time.perf_counter_ns() - c0)
                    del warm  # its instance torn down outside the timed region
                if prof is not None:
                    prof.enable()
                r0, t0_cpu = time.perf_counter_ns(), time.thread_time_ns()
                with store.read() as txn:
                    blob = txn.get_checkpoint(aid, last)
                    snap = decode_snapshot(blob, expect_module_digest=b.module_digest, pristine=rig.loaded.image,
                                           chunks_from=txn.get_chunk)
                ex = restore_from(rig, snap)
                resu.add(time.perf_counter_ns() - r0)
                cpu.add(time.thread_time_ns() - t0_cpu)  # this thread's CPU: what the load does not add
                if prof is not None:
                    prof.disable()
                # The pending call's arguments, left undecoded by the resume, are decoded here,
                # outside both timings: the copy below reads them, a host's suspend does not
                # (it encodes the new call the guest made) and its resume does not either.
                _ = snap.pending
                s0 = time.perf_counter_ns()
                cap = ex.capture()
                from dataclasses import replace

                data, new = encode_checkpoint(replace(snap, agent_id=scratch, seq=i + 1, memory=cap.memory,
                                                      globals=cap.globals, created_at=time.time()),
                                              pristine=rig.loaded.image)
                store.transact(lambda txn, data=data, new=new, i=i: txn.put_checkpoint(scratch, i + 1, data,
                                                                                      time.time(), new))
                sus.add(time.perf_counter_ns() - s0)
                del ex, cap  # torn down here, not inside the next resume's timed region
            if prof is not None and profile:
                prof.dump_stats(profile)
            with store.write() as txn:
                txn.prune_checkpoints(scratch, 10**9)
            # last checkpoint only
            with store.write() as txn:
                txn.prune_checkpoints(aid, last)
            note = _compact(store)
            last_only = _bytes_by_kind(store)
            # the agent's state: its checkpoint and the chunks it names (not the journal's)
            state_only = last_only["checkpoints"]
            if hasattr(store, "stats"):
                per = store.stats()["agents"][aid]
                state_only = per["checkpoints"] + per.get("checkpoints_chunks", 0)
                last_only["by_kind"] = per
            progress.update(1)
        finally:
            host.close()
        if compiled is not None and (tmp / "cache").is_dir():
            shutil.copytree(tmp / "cache", compiled, dirs_exist_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "turns": turns, "bytes_per_turn": size, "tool": tool, "summarise_every": summarise, "output": output,
        "stored": by_kind, "conversation_bytes": len(conversation), "conversation_zstd": zsize,
        "wall_s": round(wall, 3), "turn_ms_mean": round(1000 * wall / max(1, turns), 3),
        "turn_ms_first10pct": round(1000 * sum(head) / max(1, len(head)), 3),
        "turn_ms_last10pct": round(1000 * sum(tail) / max(1, len(tail)), 3),
        "suspend_last": sus.summary(), "resume_last": resu.summary(),
        "resume_last_cold": cold.summary() if cold.samples else None, "resume_last_cpu": cpu.summary(),
        "last_checkpoint_only": {"stored": last_only, "state_bytes": state_only, "compaction": note,
                                 "target_bytes": 3 * zsize + 64 * 1024},
    }


#: The conversation agent in each guest language (bench/guests/).
AGENTS = ("conversation", "conversation-js", "conversation-py")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The conversation benchmark; ``args`` as ``torpor bench conversation`` parses them.

    ``--agent a,b,...`` measures several agents one after the other in this run (the
    same model server, cases and machine): the result has each agent's figures under
    ``agents`` and their bytes added per turn side by side in ``per_turn_bytes``."""
    names = [a for a in (getattr(args, "agent", None) or "conversation").split(",") if a]
    for name in names:
        if name not in AGENTS:
            raise ConfigError(f"--agent {name!r}: not one of {', '.join(AGENTS)}")
    if len(names) == 1:
        return _run_agent(args, names[0], args.plot)
    # one plot per agent: torpor-bench-conversation.png -> torpor-bench-conversation-conversation-py.png
    runs = {name: _run_agent(args, name, args.plot and str(Path(args.plot).with_stem(f"{Path(args.plot).stem}-{name}")))
            for name in names}
    res: dict[str, Any] = {"machine": machine(), "agents": runs}
    res["per_turn_bytes"] = {name: r.get("added_per_turn_at_last") for name, r in runs.items()}
    res["stored_total"] = {name: {str(c["turns"]): c["stored"]["total"] for c in r["cases"]
                                  if not c["summarise_every"]} for name, r in runs.items()}
    return res


def _run_agent(args: argparse.Namespace, agent: str, plot: str | None) -> dict[str, Any]:
    turns = [int(x) for x in (args.turns or ("10,20" if args.quick else "50,100,200,400")).split(",")]
    size = args.bytes or 2000
    rounds = args.rounds or (5 if args.quick else 50)
    tools = [t for t in (args.tool or "llm").split(",") if t]
    srv = _model_server()
    try:
        b = _bundle(srv.server_address[1], None, agent)
        cases = [(n, t, 0) for t in tools for n in turns]
        summarise_n = max(turns)
        if not args.no_summarise:
            cases.append((summarise_n, tools[0], 25 if not args.quick else 5))
        progress = Progress("conversation", len(cases), args.progress)
        last = len(cases) - 1
        compiled = Path(tempfile.mkdtemp(prefix="torpor-bench-conv-cache-"))
        try:
            out = [_one(b, args.engine, n, size, t, s, rounds, progress, args.profile if k == last else None, compiled)
                   for k, (n, t, s) in enumerate(cases)]
        finally:
            shutil.rmtree(compiled, ignore_errors=True)
        progress.done()
    finally:
        srv.shutdown()
    res: dict[str, Any] = {"machine": machine(), "agent": b.name, "cases": out}
    grow = [c for c in out if not c["summarise_every"] and c["tool"] == tools[0]]
    if len(grow) >= 2:
        a, z = grow[-2], grow[-1]
        res["added_per_turn_at_last"] = round((z["stored"]["total"] - a["stored"]["total"]) / (z["turns"] - a["turns"]))
        res["turn_time_ratio"] = round(z["turn_ms_last10pct"] / max(1e-9, grow[0]["turn_ms_last10pct"]), 2)
    res.update(draw_plot(plot, lambda plt: _draw(plt, grow)))
    return res


def _draw(plt: Any, cases: list[dict[str, Any]]) -> None:
    _fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    xs = [c["turns"] for c in cases]
    for kind in (*_KINDS, "total"):
        ax[0].plot(xs, [c["stored"][kind] / 2**20 for c in cases], marker="o", label=kind)
    ax[0].plot(xs, [c["conversation_zstd"] / 2**20 for c in cases], "k--", label="zstd(conversation)")
    ax[0].set_xlabel("turns")
    ax[0].set_ylabel("MiB stored for the agent")
    ax[0].legend()
    ax[1].plot(xs, [c["turn_ms_last10pct"] for c in cases], marker="o", label="time per turn (last 10%)")
    ax[1].plot(xs, [c["resume_last"]["p99_us"] / 1000 for c in cases], marker="o", label="resume p99")
    ax[1].set_xlabel("turns")
    ax[1].set_ylabel("ms")
    ax[1].legend()


def show(r: dict[str, Any]) -> None:
    """The figures as a table (one per agent)."""
    if "agents" in r:
        for name, one in r["agents"].items():
            print(f"== {name}")
            show(one)
        print("bytes added per turn between the last two N: " +
              ", ".join(f"{name} {v:,}" if v is not None else f"{name} -" for name, v in r["per_turn_bytes"].items()))
        return
    print("turns tool  summ   ckpts KiB  chunks KiB  journal KiB  audit KiB  total KiB  file KiB  "
          "zstd(conv) KiB  turn ms  resume p50/p99 µs  suspend p50/p99 µs  last-only state KiB")
    for c in r["cases"]:
        s = c["stored"]
        print(f"{c['turns']:5d} {c['tool']:4s} {c['summarise_every']:4d} {s['checkpoints'] / 1024:11.0f} "
              f"{s['chunks'] / 1024:11.0f} {s['journal'] / 1024:12.0f} {s['audit'] / 1024:10.0f} "
              f"{s['total'] / 1024:10.0f} {s['lmdb_file'] / 1024:9.0f} {c['conversation_zstd'] / 1024:15.0f} "
              f"{c['turn_ms_last10pct']:8.2f} {c['resume_last']['p50_us']:8.0f}/{c['resume_last']['p99_us']:<8.0f} "
              f"{c['suspend_last']['p50_us']:8.0f}/{c['suspend_last']['p99_us']:<8.0f} "
              f"{c['last_checkpoint_only']['state_bytes'] / 1024:12.0f}")
    for c in r["cases"]:
        cold, cpu = c.get("resume_last_cold"), c["resume_last_cpu"]
        print(f"resume at {c['turns']} turns: CPU time p50/p99 µs {cpu['p50_us']:.0f}/{cpu['p99_us']:.0f}" +
              (f"; with no verified chunk cached (cold) p50/p99 µs {cold['p50_us']:.0f}/{cold['p99_us']:.0f}"
               if cold else ""))
    if "added_per_turn_at_last" in r:
        print(f"bytes added per turn between the last two N: {r['added_per_turn_at_last']:,}; "
              f"time per turn at the largest N / the smallest: {r['turn_time_ratio']}x")


if __name__ == "__main__":
    from bench.cli import main

    sys.exit(main(["conversation", *sys.argv[1:]]))
