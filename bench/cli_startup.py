"""``torpor bench cli``: how long a fresh ``torpor`` process takes, on a store of 10,000 agents.

Why whole processes timed from outside (``subprocess.run``, wall clock): what a
command costs its user is the interpreter starting, the imports and the work
together. The baseline is ``python -c pass`` on the same interpreter, the floor
no Python command goes below; every figure is also given as a ratio to it. The
rounds are interleaved (each round runs every case once, in an order rotated
by one from the last) so that the machine's drift hits every case alike. Each
run's CPU time (user + system, from the kernel's accounting of the child) is
recorded beside its wall clock: on a shared machine the wall clock stretches
with the other processes' load, the CPU time much less.

Also ``python bench/cli_startup.py [--quick] [--json] ...``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # `python bench/cli_startup.py ...`: the repository root on the path, for `bench.*`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import json
import os
import resource
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from typing import Any

from bench.rig import Latency, Progress, cdf, draw_plot, load_bundle, machine, positive
from host.errors import ConfigError, TorporError
from host.ids import new_agent_id
from snapshots.lmdb_store import LmdbStore
from snapshots.store import INPUTS_BUCKET, WriteTxn

#: The cases, by the key of their headline figures: (label, arguments after ``torpor``).
#: ``S`` is the store, ``AGENT`` an agent in the middle of it.
CASES: dict[str, tuple[str, tuple[str, ...]]] = {
    "python": ("python -c pass", ()),
    "help": ("torpor --help", ("--help",)),
    "ps": ("torpor ps --store S", ("ps", "--store", "S")),
    "ps_json": ("torpor ps --store S --json", ("ps", "--store", "S", "--json")),
    "inspect": ("torpor inspect AGENT --store S", ("inspect", "AGENT", "--store", "S")),
}

AUDIT_BUCKET = "audit"
COPIES_PER_TXN = 1000


def _copies(src: str, ids: list[str], rec: dict[str, Any], cps: list[tuple[int, bytes, float]],
            journal: list[tuple[int, dict[str, Any]]], input_: bytes | None,
            audit: list[tuple[str, bytes]]) -> Callable[[WriteTxn], None]:
    """One transaction function writing a copy of agent ``src``'s records under each id."""
    old = src.encode()

    def write(txn: WriteTxn) -> None:
        for aid in ids:
            txn.put_agent({**rec, "agent_id": aid})
            for seq, blob, created_at in cps:
                txn.put_checkpoint(aid, seq, blob, created_at)
            for call_seq, entry in journal:
                txn.put_journal(aid, call_seq, entry)
            if input_ is not None:
                txn.put_blob(INPUTS_BUCKET, aid, input_)
            new = aid.encode()
            for key, value in audit:
                txn.put_blob(AUDIT_BUCKET, aid + key[len(src):], value.replace(old, new))

    return write


def build_store(store_dir: Path, agents: int, progress: Progress) -> dict[str, Any]:
    """A store of ``agents`` agents: one real run of the ``steps`` example, then copies of it.

    Why copies: running 10,000 agents would take minutes for records that are alike
    anyway; a copy has the real agent's record, checkpoints, journal, input and audit
    records (its id swapped in), so that the store's B-trees hold what 10,000 real runs
    would leave, at the same sizes. The copies' audit hash chains are not re-signed:
    ``torpor audit verify`` would flag them, ``ps`` and ``inspect`` do not read them.
    """
    import anyio

    from host.runtime import Host

    t0 = time.perf_counter()
    b = load_bundle("steps")
    with Host(store_dir) as h:
        res = anyio.run(lambda: h.run(b, {"n": 3}))
    if res.status != "completed":
        raise TorporError(f"the steps agent did not complete: {res.error}")
    src = res.agent_id
    ids = [src]
    store = LmdbStore.open(store_dir / "db")
    try:
        with store.read() as txn:
            rec = txn.get_agent(src)
            cps = [(c.seq, txn.get_checkpoint(src, c.seq) or b"", c.created_at) for c in txn.list_checkpoints(src)]
            journal = list(txn.iter_journal(src))
            input_ = txn.get_blob(INPUTS_BUCKET, src)
            audit = list(txn.iter_blobs(AUDIT_BUCKET, f"{src}/"))
        if rec is None:
            raise TorporError(f"the steps agent {src} is not in its store")
        while len(ids) < agents:
            group = [new_agent_id() for _ in range(min(COPIES_PER_TXN, agents - len(ids)))]
            store.transact(_copies(src, group, rec, cps, journal, input_, audit))
            ids.extend(group)
            progress.update(len(ids))
        used = store.used_bytes()
    finally:
        store.close()
        progress.done()
    return {"agents": len(ids), "inspected": ids[len(ids) // 2], "store_mib": round(used / 2**20, 1),
            "store_build_s": round(time.perf_counter() - t0, 1), "checkpoints_per_agent": len(cps),
            "audit_records_per_agent": len(audit)}


def _torpor() -> tuple[list[str], dict[str, str]]:
    """The ``torpor`` console script beside this interpreter (what a user types), else
    ``python -m host.cli`` with the ``host`` beside ``bench/`` on the path; and the environment
    to run it in."""
    env = dict(os.environ)
    # A user's Python keeps compiled bytecode (pip writes it at install, an editable
    # install at first import); a machine that turns that off would time the compiler.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    script = Path(sys.executable).with_name("torpor")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)], env
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return [sys.executable, "-m", "host.cli"], env


def _children_cpu_ns() -> int:
    """CPU time (user + system) of this process's waited-for children so far, in ns."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return int((ru.ru_utime + ru.ru_stime) * 1e9)


def _load_average() -> float | None:
    """The 1-minute load average: other processes on the machine slow every case, the baseline too."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover - not available
        return None


def _check(name: str, proc: subprocess.CompletedProcess[str], store: dict[str, Any]) -> None:
    """The commands must do their work, not fail fast: one run of each is checked."""
    if proc.returncode != 0:
        raise TorporError(f"`{CASES[name][0]}` exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
    if name == "ps_json" and len(json.loads(proc.stdout)) != store["agents"]:
        raise TorporError(f"`torpor ps --json` did not list the store's {store['agents']:,} agents")
    if name in ("ps", "inspect") and store["inspected"] not in proc.stdout:
        raise TorporError(f"`{CASES[name][0]}` did not show agent {store['inspected']}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start-up of ``torpor --help``, ``ps``, ``ps --json`` and ``inspect`` against ``python -c pass``."""
    agents = positive("--agents", args.agents if args.agents is not None else (200 if args.quick else 10_000))
    rounds = positive("--rounds", args.rounds if args.rounds is not None else (3 if args.quick else 40))
    if args.store and Path(args.store).exists() and any(Path(args.store).iterdir()):
        raise ConfigError(f"--store {args.store} is not empty; name a new directory for the benchmark's store")
    tmp = Path(tempfile.mkdtemp(prefix="torpor-bench-cli-"))
    store_dir = Path(args.store).resolve() if args.store else tmp / "store"
    try:
        store = build_store(store_dir, agents, Progress("store", agents, args.progress))
        torpor, env = _torpor()
        argvs: dict[str, list[str]] = {}
        for name, (_, tail) in CASES.items():
            tail_ = [str(store_dir) if a == "S" else store["inspected"] if a == "AGENT" else a for a in tail]
            argvs[name] = [sys.executable, "-c", "pass"] if name == "python" else [*torpor, *tail_]
        for name, argv in argvs.items():  # checked once each, which also warms the page cache
            _check(name, subprocess.run(argv, capture_output=True, text=True, cwd=tmp, env=env, check=False), store)
        load_before = _load_average()
        lats = {name: Latency() for name in CASES}
        cpus = {name: Latency() for name in CASES}
        names = list(CASES)
        progress = Progress("rounds", rounds, args.progress)
        for r in range(rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                c0 = _children_cpu_ns()
                t0 = time.perf_counter_ns()
                proc = subprocess.run(argvs[name], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp,
                                      env=env, check=False)
                lats[name].add(time.perf_counter_ns() - t0)
                cpus[name].add(_children_cpu_ns() - c0)
                if proc.returncode != 0:
                    raise TorporError(f"`{CASES[name][0]}` exited {proc.returncode}: "
                                      f"{proc.stderr.decode(errors='replace').strip()[-300:]}")
            progress.update(r + 1)
        progress.done()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = lats["python"].summary()
    cases: dict[str, Any] = {}
    res: dict[str, Any] = {"bench": "cli", "machine": machine(), "rounds": rounds, "torpor": " ".join(torpor),
                           **store, "store": str(store_dir) if args.store else None,
                           "load_average": {"before": load_before, "after": _load_average()}, "cases": cases}
    base_cpu = cpus["python"].summary()
    for name, lat in lats.items():
        s = lat.summary()
        s["p50_ratio"] = round(s["p50_us"] / base["p50_us"], 2)
        s["p90_ratio"] = round(s["p90_us"] / base["p90_us"], 2)
        cpu = cpus[name].summary()
        s["cpu_p50_us"], s["cpu_p90_us"] = cpu["p50_us"], cpu["p90_us"]
        s["cpu_p50_ratio"] = round(cpu["p50_us"] / base_cpu["p50_us"], 2)
        cases[CASES[name][0]] = s
        res[f"{name}_p50_ms"] = round(s["p50_us"] / 1000, 1)
        res[f"{name}_p90_ms"] = round(s["p90_us"] / 1000, 1)
        res[f"{name}_p50_ratio"] = s["p50_ratio"]
        res[f"{name}_cpu_p50_ms"] = round(cpu["p50_us"] / 1000, 1)

    def draw(plt: Any) -> None:
        _fig, ax = plt.subplots(figsize=(8, 5))
        cdf(ax, {CASES[k][0]: v.samples for k, v in lats.items()},
            f"start-up of a fresh process, store of {store['agents']:,} agents ({rounds} rounds)", unit="ms")

    res.update(draw_plot(args.plot, draw))
    return res


def show(r: dict[str, Any]) -> None:
    """The table of p50/p90 in ms and as multiples of ``python -c pass``, wall clock and CPU."""
    w = max(len(k) for k in r["cases"])
    print(f"{'':{w}} {'':>5} {'wall clock':^35} {'CPU time':^17}")
    print(f"{'case':{w}} {'n':>5} {'p50 ms':>8} {'p90 ms':>8} {'p50 ×py':>8} {'p90 ×py':>8} {'p50 ms':>8} "
          f"{'p50 ×py':>8}")
    for name, c in r["cases"].items():
        print(f"{name:{w}} {int(c['n']):>5} {c['p50_us'] / 1000:>8.1f} {c['p90_us'] / 1000:>8.1f} "
              f"{c['p50_ratio']:>8.2f} {c['p90_ratio']:>8.2f} {c['cpu_p50_us'] / 1000:>8.1f} "
              f"{c['cpu_p50_ratio']:>8.2f}")
    print(f"\nS: a store of {r['agents']:,} agents (one run of steps {{\"n\": 3}} and copies of its records; "
          f"{r['store_mib']} MiB, built in {r['store_build_s']} s); AGENT: {r['inspected']}; torpor is {r['torpor']}")
    print(f"torpor --help p50 {r['help_p50_ms']} ms, ps {r['ps_p50_ms']} ms, ps --json {r['ps_json_p50_ms']} ms, "
          f"inspect {r['inspect_p50_ms']} ms (targets ≤ 150 each); python -c pass p50 {r['python_p50_ms']} ms")
    load = r.get("load_average") or {}
    print(f"load average (1 min) {load.get('before')} before the rounds, {load.get('after')} after")
    if r.get("store"):
        print(f"store kept at {r['store']}")


if __name__ == "__main__":
    from bench.cli import main

    sys.exit(main(["cli", *sys.argv[1:]]))
