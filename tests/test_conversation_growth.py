"""A Python and a JavaScript conversation agent store bytes linear in the conversation.

Issue 23's failure, re-run for the new languages: each turn's checkpoint wrote new chunks
whose size grew with the conversation (the runtimes' freed memory kept old copies of the
messages and free-list links that changed every turn, beside the live messages), so the
total grew with the square of the turns. Here each agent of ``bench/guests`` runs 40 turns
of 2,000 bytes in real Wasmtime; every turn's checkpoint is encoded as the host encodes it
(``encode_checkpoint`` against the pristine image) and the chunks no earlier checkpoint
held are counted, compressed as the store keeps them (the checkpoints' chunks only: the
journal's are the host's and already linear). What a turn adds from 20 to 40 must not be
much more than what it added from 10 to 20, and stays under 20 KB. Measured here with the
runtimes before the fix: Python 31.1 KB a turn from 10 to 20 and 49.9 KB from 20 to 40,
JavaScript 37.6 and 38.9 KB (both fail); after: Python 17.7 and 21.0, JavaScript 22.4
and 23.9; with the one allocator of guest_sdk/runtime_alloc.h (QuickJS's own arena
bypassed, dead frames zeroed): Python 13.9 and 15.4, JavaScript 13.5 and 13.7. The whole store's figures are the benchmark's (``bench/RESULTS.md``, "Long
conversations").
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import BundleFactory

from bench.rig import checkpoint_of, make_rig
from host.runtime import Host
from host.sandbox.execution import Completed, Suspended
from snapshots import chunks
from snapshots.format import encode_checkpoint

BENCH_GUESTS = Path(__file__).resolve().parent.parent / "bench" / "guests"
TURNS = 40


def _added_per_turn(host: Host, bundles: BundleFactory, agent: str) -> dict[int, int]:
    """Compressed bytes of the chunks each turn's checkpoint adds to the ones before it."""
    rig = make_rig(host.engine, bundles.load(BENCH_GUESTS / agent))
    ex = rig.execution(json.dumps({"turns": TURNS, "bytes": 2000, "tool": "kv"}).encode())
    held: set[bytes] = set()
    added: dict[int, int] = {}
    out = ex.start()
    k = 0
    while isinstance(out, Suspended):
        k += 1
        snap = checkpoint_of(rig, ex, "conv", k, out.call)
        _, found = encode_checkpoint(snap, pristine=rig.loaded.image)
        added[k] = sum(len(chunks.store_chunk(c)) for name, c in found.items() if name not in held)
        held.update(found)
        out = ex.resume(0, b'{"value":true}')
    assert isinstance(out, Completed) and out.output["turns"] == TURNS, out
    ex.release()
    return added


@pytest.mark.parametrize("agent", ["conversation-py", "conversation-js"])
def test_what_a_turn_stores_does_not_grow_with_the_conversation(host: Host, bundles: BundleFactory,
                                                                agent: str) -> None:
    added = _added_per_turn(host, bundles, agent)
    early = sum(added[k] for k in range(11, 21)) / 10
    late = sum(added[k] for k in range(21, TURNS + 1)) / (TURNS - 20)
    assert late <= 20_000, (agent, early, late)
    assert late <= early * 1.25, (agent, early, late)
