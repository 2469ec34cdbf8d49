"""The pagemap shortcut of ``diff_memory`` (pages never touched are skipped unread) gives
exactly the answer of the full scan, on real Wasmtime memories and on plain mappings."""

from __future__ import annotations

import ctypes
import json
import mmap
import random

import pytest

from bench.rig import checkpoint_of, load_bundle, make_engine, make_rig, restore_from
from host.sandbox.execution import Suspended
from snapshots.delta import diff_memory


@pytest.mark.parametrize("profile", ["dense", "dense-cow", "fast"])
@pytest.mark.parametrize("guest", ["steps", "mib"])
def test_same_delta_on_wasmtime_memories(guest: str, profile: str) -> None:
    rig = make_rig(make_engine(profile), load_bundle(guest))
    ex = rig.execution(json.dumps({"n": 40}).encode())
    out = ex.start()
    k = 0
    while isinstance(out, Suspended):
        k += 1
        buf = ex._buffer()
        fast = diff_memory(rig.loaded.pristine, buf, untouched_is_pristine=True)
        assert fast == diff_memory(rig.loaded.pristine, buf)
        # and a fresh instance restored from it, before anything else touches it
        restored = restore_from(rig, checkpoint_of(rig, ex, "01M81DJXWJ0W63726FJQHGNCFZ", k, out.call))
        rbuf = restored._buffer()
        assert diff_memory(rig.loaded.pristine, rbuf, untouched_is_pristine=True) == fast
        restored.release()
        assert fast.chunks, "a suspended agent always differs from its pristine image"
        out = ex.resume(0, b'{"value":%d}' % k)
    assert k == 40


def test_same_delta_on_an_anonymous_mapping() -> None:
    size = 64 * 4096 + 100
    pristine = bytes(random.Random(1).randrange(256) for _ in range(3 * 4096 + 7))
    m = mmap.mmap(-1, size)
    m[: len(pristine)] = pristine
    rnd = random.Random(2)
    arr = (ctypes.c_ubyte * size).from_buffer(m)
    for _ in range(30):
        i = rnd.randrange(size)
        arr[i] ^= 1 + rnd.randrange(255)
        fast = diff_memory(pristine, arr, untouched_is_pristine=True)
        assert fast == diff_memory(pristine, arr)
        for cs in (512, 1024, 8192):  # a chunk inside a page uses the pagemap too
            assert diff_memory(pristine, arr, cs, untouched_is_pristine=True) == diff_memory(pristine, arr, cs)
    del arr
    m.close()
