"""What encoding a journaled call's commit costs: ``python bench/commit_encoding.py [--json] [--rounds N]``.

Every tool call commits its agent record (about 1 KB of JSON, with its listing summary),
its journal entry, one audit step (sorted-key JSON, hashed) and two digests (the arguments
and the answer). Those used to be written by the standard library's ``json`` encoder; they
are now written by :mod:`snapshots.fastjson` (orjson, where a walk of the value finds that
its bytes are the standard library's). Both are timed here on the very values a real run of
the ``steps`` agent stores (read back from its store), alternated round by round in one
process; each figure is the best of the rounds (a shared machine only ever adds time) and
the median. The bytes are checked equal before anything is timed.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # `python bench/commit_encoding.py`: the repository root on the path, for `bench.*`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import json
import shutil
import statistics
import tempfile
import timeit
from collections.abc import Callable
from typing import Any

from bench.rig import load_bundle, machine
from snapshots import fastjson

_STD_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_STD_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode


def _stored_values() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """An agent record (as a commit writes it, mid-run), a journal entry and an audit step of a real run."""
    import anyio

    from host.runtime.host import Host
    from host.trust import audit

    tmp = Path(tempfile.mkdtemp(prefix="torpor-bench-encoding-"))
    try:
        with Host(tmp) as host:
            res = anyio.run(lambda: host.run(load_bundle("steps"), {"n": 5}))
            with host.store.read() as txn:
                record = txn.get_agent(res.agent_id)
                _, entry = next(iter(txn.iter_journal(res.agent_id)))
            step = next(r for r in audit.stored_records(host.store, res.agent_id) if r["kind"] == audit.STEP_KIND
                        and any(e.get("kind") == "tool.answered" for e in r["events"]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert record is not None
    record = {k: v for k, v in record.items() if k != "agent_id"}  # as put_agent stores it
    record.update(status="running", output=None, finished_at=None)  # as every commit but the last
    step.pop("hash")
    return record, entry, step


def run(rounds: int) -> dict[str, Any]:
    record, entry, step = _stored_values()
    cases: dict[str, tuple[Callable[[], bytes], Callable[[], bytes]]] = {
        "agent_record": (lambda: _STD_COMPACT(record).encode(), lambda: fastjson.compact(record)),
        "journal_entry": (lambda: _STD_COMPACT(entry).encode(), lambda: fastjson.compact(entry)),
        "audit_step": (lambda: _STD_CANONICAL(step).encode(), lambda: fastjson.canonical(step)),
    }
    for name, (std, fast) in cases.items():
        if std() != fast():
            raise AssertionError(f"{name}: fastjson wrote other bytes than the standard library")
    samples: dict[str, dict[str, list[float]]] = {n: {"std": [], "fast": []} for n in cases}
    number = 2000
    for _ in range(rounds):
        for name, (std, fast) in cases.items():
            for side, fn in (("std", std), ("fast", fast)):
                samples[name][side].append(timeit.timeit(fn, number=number) / number * 1e6)
    out: dict[str, Any] = {"bench": "commit_encoding", "machine": machine(), "rounds": rounds,
                           "bytes": {"agent_record": len(cases["agent_record"][1]()),
                                     "journal_entry": len(cases["journal_entry"][1]()),
                                     "audit_step": len(cases["audit_step"][1]())},
                           "us": {}}
    for name, sides in samples.items():
        best = {side: min(v) for side, v in sides.items()}
        out["us"][name] = {"std_best": round(best["std"], 2), "fast_best": round(best["fast"], 2),
                           "std_median": round(statistics.median(sides["std"]), 2),
                           "fast_median": round(statistics.median(sides["fast"]), 2),
                           "ratio_best": round(best["std"] / best["fast"], 2)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    out = run(args.rounds)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"bytes: {out['bytes']}")
    for name, r in out["us"].items():
        print(f"{name:14s} standard library {r['std_best']:6.2f} µs (median {r['std_median']:.2f})   "
              f"fastjson {r['fast_best']:6.2f} µs (median {r['fast_median']:.2f})   {r['ratio_best']:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
