"""Where a hibernated small agent's bytes on disk go, and what LMDB append order would save.

    python bench/record_size.py [--agents 20000]

Real checkpoints of the ``steps`` guest at its first tool call (as ``torpor bench
density`` writes them), encoded in snapshot format versions 1 and 2, then stored in a
bare LMDB environment the way ``snapshots/lmdb_store.py`` lays them out (key
agent_id + 0x00 + seq, value created_at + record), in batches of 512 per commit:

* in arrival order with ordinary puts (what the store does today: ULIDs are time
  ordered, but random within a millisecond, and LMDB splits pages in the middle), and
* sorted, with MDB_APPEND (pages filled to the brim; what an append-aware store could
  do for new agents' first checkpoints),

each with and without the small agent record the density benchmark writes beside it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lmdb

from bench.rig import checkpoint_of, load_bundle, make_engine, make_rig
from host.ids import new_agent_id
from host.sandbox.execution import Suspended
from snapshots.format import encode_snapshot


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", type=int, default=20000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.agents <= 0:
        ap.error("--agents must be a positive number")
    rig = make_rig(make_engine(None), load_bundle("steps"))
    recs = []
    v1 = 0
    for i in range(args.agents):
        ex = rig.execution(b'{"n": %d}' % (3 + i % 50))
        out = ex.start()
        assert isinstance(out, Suspended)
        aid = new_agent_id()
        snap = checkpoint_of(rig, ex, aid, 1, out.call)
        v1 += len(encode_snapshot(snap, pristine=rig.loaded.pristine, version=1))
        blob = encode_snapshot(snap, pristine=rig.loaded.pristine)
        ex.release()
        rec = json.dumps({"name": "steps", "status": "suspended", "bundle_digest": rig.bundle.digest, "checkpoints": 1,
                          "pending": out.call.to_dict()}, separators=(",", ":")).encode()
        recs.append((aid.encode(), blob, rec))
    n = len(recs)

    def store(append: bool, with_record: bool) -> float:
        d = tempfile.mkdtemp(prefix="torpor-record-size-")
        try:
            env = lmdb.open(d, map_size=1 << 32, max_dbs=4, sync=False)
            c, a = env.open_db(b"checkpoints"), env.open_db(b"agents")
            rows = sorted(recs) if append else recs
            for k in range(0, n, 512):
                with env.begin(write=True) as t:
                    for aid, blob, rec in rows[k : k + 512]:
                        t.put(aid + b"\0" + struct.pack(">Q", 1), struct.pack("<d", 0.0) + blob, db=c, append=append)
                        if with_record:
                            t.put(aid, rec, db=a, append=append)
            with env.begin() as t:
                st = [t.stat(c), t.stat(a)]
            env.close()
            pages = sum(s["leaf_pages"] + s["branch_pages"] + s["overflow_pages"] for s in st)
            return round(pages * 4096 / n, 1)
        finally:
            shutil.rmtree(d, ignore_errors=True)

    res = {
        "agents": n,
        "snapshot_v1_bytes": round(v1 / n, 1),
        "snapshot_v2_bytes": round(sum(len(r[1]) for r in recs) / n, 1),
        "agent_record_bytes": round(sum(len(r[2]) for r in recs) / n, 1),
        "lmdb_checkpoint_only_arrival_order": store(False, False),
        "lmdb_checkpoint_only_sorted_append": store(True, False),
        "lmdb_with_record_arrival_order": store(False, True),
        "lmdb_with_record_sorted_append": store(True, True),
    }
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for k, v in res.items():
            print(f"{k:40} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
