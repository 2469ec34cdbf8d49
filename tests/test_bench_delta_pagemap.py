"""The pagemap shortcut of ``diff_memory`` (pages never touched, and pages of a
copy-on-write image only read, are skipped unread) gives exactly the answer of the full
scan, on real Wasmtime memories and on plain mappings: a write anywhere the guest can
write is captured."""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import random

import pytest

from bench.rig import checkpoint_of, load_bundle, make_engine, make_rig, restore_from
from host.sandbox.execution import MemoryAt, Suspended
from snapshots import delta as delta_mod
from snapshots.delta import diff_memory

PAGE = mmap.PAGESIZE


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


def _file_bit() -> bool:
    if delta_mod._pagemap() is None:
        pytest.skip("/proc/self/pagemap is not available or not truthful here")
    return delta_mod._pagemap_file_bit


@pytest.mark.parametrize("kernels", ["native", "python"])
def test_pages_of_a_private_file_mapping_only_read_are_skipped_and_written_ones_captured(
        kernels: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Wasmtime's copy-on-write image: a MAP_PRIVATE mapping of a memfd holding the
    pristine image. Every page read (each is then the file's own page), a few written
    anywhere (first byte, last byte, a page's edges, the middle): the narrow scan compares
    only the written pages and finds exactly what the full scan finds."""
    if kernels == "python":
        monkeypatch.setattr(delta_mod, "_kernels_lib", [None])
    assert _file_bit(), "Linux tells a private mapping's read file page from its written copy (pagemap bit 61)"
    pages = 96
    rnd = random.Random(3)
    pristine = rnd.randbytes(pages * PAGE)
    fd = os.memfd_create("torpor-test-image")
    try:
        os.write(fd, pristine)
        m = mmap.mmap(fd, len(pristine), flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    arr = (ctypes.c_ubyte * len(pristine)).from_buffer(m)
    assert ctypes.string_at(ctypes.addressof(arr), len(pristine)) == pristine  # every page read: the file's own
    assert diff_memory(pristine, arr, untouched_is_pristine=True, private_mapping=True).chunks == ()
    assert delta_mod._touched_chunks(delta_mod._region(arr), PAGE, True) == []
    offsets = {0, len(pristine) - 1, PAGE - 1, PAGE, 17 * PAGE + 123, *rnd.sample(range(len(pristine)), 12)}
    for off in offsets:
        arr[off] = pristine[off] ^ (1 + rnd.randrange(255))
    written = sorted({off // PAGE for off in offsets})
    assert delta_mod._touched_chunks(delta_mod._region(arr), PAGE, True) == written
    for cs in (1024, PAGE, 4 * PAGE):
        fast = diff_memory(pristine, arr, cs, untouched_is_pristine=True, private_mapping=True)
        assert fast == diff_memory(pristine, arr, cs)
        assert list(fast.indices) == sorted({off // cs for off in offsets})
    # a page written back to its pristine bytes is compared (an anonymous copy now) and left out
    for off in offsets:
        if off < PAGE:
            arr[off] = pristine[off]
    assert 0 not in diff_memory(pristine, arr, untouched_is_pristine=True, private_mapping=True).indices
    del arr
    m.close()


@pytest.mark.parametrize(("profile", "guest"), [("dense", "mib"), ("fast", "mib"), ("dense-cow", "steps-js"),
                                               ("pooled", "steps-js"), ("dense", "steps-js")])
def test_a_write_anywhere_in_a_suspended_agent_is_captured(profile: str, guest: str) -> None:
    """On every engine layout: an agent suspended, all of its memory read (the image's
    pages become the file's own where the image is copy-on-write), then bytes written
    across the whole memory, image and heap, as a guest's stores would: the capture holds
    every written chunk, equals the full scan, and restores to the same memory. (The JS
    guest's image has data pages the agent never writes, which the copy-on-write layouts
    skip; the C guest's has one, which it writes.)"""
    rig = make_rig(make_engine(profile), load_bundle(guest))
    ex = rig.execution(json.dumps({"n": 3}).encode())
    out = ex.start()
    assert isinstance(out, Suspended)
    base, size = ex._mem_base_len()
    cs = rig.loaded.chunk_size
    pristine = bytes(rig.loaded.pristine)
    ctypes.string_at(base, size)  # every page read
    rnd = random.Random(profile)
    image_end = len(pristine.rstrip(b"\0"))
    offsets = {0, size - 1, image_end - 1, image_end, *rnd.sample(range(size), 40),
               *rnd.sample(range(image_end), 20)}
    mem = (ctypes.c_ubyte * size).from_address(base)
    for off in offsets:
        mem[off] = (pristine[off] if off < len(pristine) else 0) ^ 0x5A
    captured = ex.capture().memory
    assert captured == diff_memory(pristine, MemoryAt(base, size), cs)
    assert {off // cs for off in offsets} <= set(captured.indices)
    if rig.engine.config.memory_init_cow and guest == "steps-js" and _file_bit():
        touched = delta_mod._touched_chunks(delta_mod._region(MemoryAt(base, size)), PAGE, True)
        data_pages = {p for p in range(len(pristine) // PAGE) if any(pristine[p * PAGE:(p + 1) * PAGE])}
        assert touched is not None and data_pages - set(touched)  # image pages only read were skipped
    restored = restore_from(rig, checkpoint_of(rig, ex, "01M81DJXWJ0W63726FJQHGNCFZ", 1, out.call))
    rbase, rsize = restored._mem_base_len()
    assert ctypes.string_at(rbase, rsize) == ctypes.string_at(base, size)
    restored.release()
    ex.release()
