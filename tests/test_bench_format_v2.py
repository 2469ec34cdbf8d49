"""Snapshot format version 2 (zstd dictionary of metadata strings + the pristine image):
smaller records from real guests, and version-1 records still decode."""

from __future__ import annotations

import json

from bench.rig import checkpoint_of, load_bundle, make_engine, make_rig
from host.ids import new_agent_id
from host.sandbox.execution import Suspended
from snapshots.format import FORMAT_VERSION, decode_snapshot, encode_snapshot, peek_snapshot


def test_v2_is_smaller_and_both_versions_round_trip() -> None:
    rig = make_rig(make_engine(None), load_bundle("steps"))
    pristine = rig.loaded.pristine
    v1_total = v2_total = 0
    for n in range(3, 23):
        ex = rig.execution(json.dumps({"n": n}).encode())
        out = ex.start()
        assert isinstance(out, Suspended)
        snap = checkpoint_of(rig, ex, new_agent_id(), 1, out.call)
        ex.release()
        v1 = encode_snapshot(snap, pristine=pristine, version=1)
        v2 = encode_snapshot(snap, pristine=pristine)
        plain = encode_snapshot(snap)  # no pristine: the static dictionary only
        assert peek_snapshot(v1).format_version == 1 and peek_snapshot(v2).format_version == FORMAT_VERSION == 2
        for blob in (v1, v2):
            assert decode_snapshot(blob, pristine=pristine) == snap
        assert decode_snapshot(plain) == snap
        v1_total += len(v1)
        v2_total += len(v2)
    assert v2_total < v1_total * 0.9, (v1_total, v2_total)
