"""``torpor bench interrupts``: Ctrl-C and SIGTERM at random instants into real ``torpor``
processes, hundreds of times (also ``python bench/interrupts.py ...``).

Why a loop: a signal that lands at the wrong instant (inside a call from Wasmtime, in
the middle of a commit, while a result is printed) does harm only at that instant, so
one interrupt proves little and a test suite can afford a handful. Here each store
gets a few agents of the ``steps`` example (``torpor run``, each making ``--steps``
tool calls, each call a commit), then ``torpor resume --all`` again and again, and
most of these processes get a SIGINT (one in five a SIGTERM instead) at an instant
drawn uniformly over the time the command takes, counted from when its handlers are
in force (the CLI's SIGTERM handler appears in ``/proc/PID/status``: before it, the
signal is the interpreter's start-up, not the host's). Each interrupted process must
exit 130 (143 for SIGTERM) or, when the signal came too late, complete normally;
never die of a signal (a negative return code: an abort, a segfault) and never print
``double free``, ``internal error`` or a traceback. Then one ``torpor resume --all``
uninterrupted must finish every agent with the exact sum (each call answered once:
the counter would be off by a step run twice or lost) and ``torpor audit verify``
must find every chain intact.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # `python bench/interrupts.py ...`: the repository root on the path, for `bench.*`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from typing import Any

from bench.rig import Latency, Progress, draw_plot, load_bundle, machine, positive

#: What an interrupted command's stderr must never hold.
FORBIDDEN = ("double free", "internal error", "Traceback", "corrupted", "Fatal Python error", "Segmentation fault")
#: SIGTERM for one interrupt in this many.
SIGTERM_EVERY = 5


def _sig_caught(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler of its own for ``signum`` (``SigCgt``)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except (OSError, ValueError):
        pass
    return False


def _default_signals() -> None:
    # A shell's background jobs start with SIGINT ignored; a terminal's Ctrl-C finds the default.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class Driver:
    """Runs ``torpor`` commands on one store, interrupting them, and keeps the tally."""

    def __init__(self, rng: random.Random, env: dict[str, str]) -> None:
        self.rng = rng
        self.env = env
        self.tally: Counter[str] = Counter()
        self.problems: list[dict[str, Any]] = []
        self.instants = Latency()  # when each signal landed, after the handlers were in force
        self.span = 2.0  # the longest a command took after its handlers were in force (s), to draw instants from

    def command(self, argv: list[str], signum: int | None, *,
                learn: bool = False) -> subprocess.CompletedProcess[str] | None:
        """Run ``torpor ARGV``; with ``signum``, send it at a random instant of its work.
        ``learn``: an uninterrupted command whose duration is that of the interrupted ones
        (the last ``resume --all``), to draw the instants from."""
        proc = subprocess.Popen([sys.executable, "-m", "host.cli", *argv], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=self.env, preexec_fn=_default_signals)
        sent, at = False, 0.0
        try:
            deadline = time.monotonic() + 60
            while proc.poll() is None and not _sig_caught(proc.pid, signal.SIGTERM) and time.monotonic() < deadline:
                time.sleep(0.002)
            ready = time.monotonic()
            if signum is not None:
                at = self.rng.uniform(0, self.span)
                time.sleep(at)
                if proc.poll() is None:
                    os.kill(proc.pid, signum)
                    sent = True
            out, err = proc.communicate(timeout=300)
            if learn:
                self.span = max(self.span * 0.9, min(30.0, time.monotonic() - ready))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            self.problems.append({"argv": argv, "why": "hung for 300 s after the signal", "stderr": err[-1000:]})
            return None
        code = proc.returncode
        name = "" if signum is None else signal.Signals(signum).name
        if sent:
            self.instants.add(int(at * 1e9))
            self.tally[f"{name} delivered"] += 1
        if code < 0:
            self.tally["died of a signal"] += 1
            self.problems.append({"argv": argv, "why": f"died of signal {-code}", "stderr": err[-2000:]})
        elif sent and code == 128 + (signum or 0):
            self.tally[f"{name}: exit {code}"] += 1
        elif code == 0:
            self.tally[f"{name or 'uninterrupted'}: completed"] += 1
        else:
            self.tally[f"{name or 'uninterrupted'}: exit {code}"] += 1
            self.problems.append({"argv": argv, "why": f"exit {code}", "stderr": err[-2000:], "stdout": out[-1000:]})
        bad = [w for w in FORBIDDEN if w in err]
        if bad:
            self.tally["forbidden output"] += 1
            self.problems.append({"argv": argv, "why": f"stderr holds {bad}", "stderr": err[-2000:]})
        return subprocess.CompletedProcess(argv, code, out, err)

    def signal_for(self, k: int) -> int:
        return signal.SIGTERM if k % SIGTERM_EVERY == SIGTERM_EVERY - 1 else signal.SIGINT


def one_store(driver: Driver, bundle: Path, store: Path, *, agents: int, steps: int, interrupts: int,
              durability: str) -> dict[str, Any]:
    """Agents on one store, interrupted ``interrupts`` times; then finished and checked."""
    base = ["--store", str(store), "--durability", durability]
    sent = started = 0
    # Each `run` interrupted (its agent is then resumed by resume --all); more of them while
    # every one was stopped before it created the store.
    while sent < interrupts and (started < agents or not (store / "db").is_dir()):
        driver.command(["run", str(bundle), "--input", json.dumps({"n": steps}), *base], driver.signal_for(sent))
        sent += 1
        started += 1
    if not (store / "db").is_dir():  # nothing got as far as the store: nothing to resume
        return {"agents": 0, "wrong": 0}
    while sent < interrupts:  # resume --all, several agents at once, interrupted again and again
        driver.command(["resume", "--all", *base], driver.signal_for(sent))
        sent += 1
    final = driver.command(["resume", "--all", *base, "--json"], None, learn=True)
    ps = driver.command(["ps", "--store", str(store), "--json"], None)
    verify = driver.command(["audit", "verify", "--store", str(store), "--json"], None)
    rows = json.loads(ps.stdout) if ps is not None and ps.returncode == 0 else []
    want = {"sum": steps * (steps + 1) // 2, "last": steps}
    wrong: list[str] = []
    if final is None or final.returncode != 0:
        wrong.append("the final resume --all did not succeed")
    if len(rows) > started:
        wrong.append(f"{len(rows)} agents in the store, {started} were started")
    for row in rows:
        shown = driver.command(["inspect", row["agent_id"], "--store", str(store), "--json"], None)
        info = json.loads(shown.stdout) if shown is not None and shown.returncode == 0 else {}
        if info.get("status") != "completed" or info.get("output") != want:
            wrong.append(f"agent {row['agent_id']}: {info.get('status')} {info.get('output')}")
    if verify is None or verify.returncode != 0:
        wrong.append("audit verify: " + (verify.stdout[-500:] if verify else "hung"))
    for w in wrong:
        driver.problems.append({"store": str(store), "why": w})
    return {"agents": len(rows), "wrong": len(wrong)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """``torpor bench interrupts``: ``--interrupts`` signals over stores of ``--agents`` agents each."""
    total = positive("--interrupts", args.interrupts if args.interrupts is not None else (8 if args.quick else 300))
    agents = positive("--agents", args.agents if args.agents is not None else (2 if args.quick else 3))
    steps = positive("--steps", args.steps if args.steps is not None else (40 if args.quick else 200))
    per_store = max(agents, positive("--per-store", args.per_store if args.per_store is not None else
                                     (4 if args.quick else 10)))
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="torpor-bench-interrupts-"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("TORPOR_DEBUG", None)
    driver = Driver(rng, env)
    bar = Progress("interrupts", total, args.progress)
    stores: list[dict[str, Any]] = []
    t0 = time.monotonic()
    try:
        bundle = tmp / "steps.torpor"
        bundle.write_bytes(load_bundle("steps").raw)
        done = 0
        while done < total:
            n = min(per_store, total - done)
            durability = ("sync", "process")[len(stores) % 2]
            got = one_store(driver, bundle, tmp / f"store{len(stores)}", agents=min(agents, n), steps=steps,
                            interrupts=n, durability=durability)
            stores.append({**got, "durability": durability})
            done += n
            bar.update(done, f"problems {len(driver.problems)}")
        bar.done()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tally = dict(sorted(driver.tally.items()))
    delivered = sum(v for k, v in tally.items() if k.endswith(" delivered"))
    res: dict[str, Any] = {
        "bench": "interrupts", "machine": machine(), "seed": args.seed, "seconds": round(time.monotonic() - t0, 1),
        "stores": len(stores), "agents": sum(s["agents"] for s in stores), "steps": steps,
        "signals_sent_for": total, "delivered": delivered, "outcomes": tally,
        "aborts": tally.get("died of a signal", 0), "forbidden_output": tally.get("forbidden output", 0),
        "agents_wrong": sum(s["wrong"] for s in stores), "problems": len(driver.problems),
        "problem_examples": driver.problems[:10], "instant_after_handlers": driver.instants.summary(),
    }
    samples = driver.instants.samples

    def draw(plt: Any) -> None:
        _fig, ax = plt.subplots(1, 1, figsize=(9, 4))
        ax.hist([s / 1e9 for s in samples], bins=40)
        ax.set_xlabel("seconds after the CLI's handlers were in force")
        ax.set_ylabel("signals")
        ax.set_title(f"interrupts: {delivered} delivered, {res['aborts']} aborts, {res['problems']} problems")

    res.update(draw_plot(args.plot, draw))
    res["failed"] = bool(res["problems"])
    return res


def show(res: dict[str, Any]) -> None:
    """The figures for people."""
    print(f"interrupts: {res['delivered']} signals delivered into {res['stores']} stores of {res['agents']} agents "
          f"({res['steps']} tool calls each) in {res['seconds']} s")
    for outcome, n in res["outcomes"].items():
        print(f"  {outcome:<32} {n:>6}")
    inst = res["instant_after_handlers"]
    print(f"instants after the handlers were in force: p50 {inst['p50_us'] / 1e6:.2f} s, p90 "
          f"{inst['p90_us'] / 1e6:.2f} s, max {inst['max_us'] / 1e6:.2f} s")
    print(f"aborts (death by a signal) {res['aborts']}, forbidden output {res['forbidden_output']}, agents not "
          f"finished exactly once {res['agents_wrong']}, problems {res['problems']}")
    for p in res["problem_examples"][:5]:
        print(f"  {p}")


if __name__ == "__main__":
    from bench.cli import main

    sys.exit(main(["interrupts", *sys.argv[1:]]))
