"""Write tracking (host/sandbox/write_watch.py): the pages reported written are exactly the
pages written since protection, on a plain mapping and on a real dense-layout memory,
and a capture that trusts them equals the full scan however the agent and the host
write, across suspensions and restores."""

from __future__ import annotations

import ctypes
import json
import mmap
import random

import pytest

from bench.rig import checkpoint_of, load_bundle, make_engine, make_rig, restore_from
from host.sandbox import write_watch
from host.sandbox.execution import MemoryAt, Suspended
from snapshots.delta import diff_memory

PAGE = write_watch.PAGE


@pytest.fixture
def watching(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tracking on, for memories of any size, in a fresh userfaultfd state."""
    monkeypatch.setenv(write_watch.ENV_ENABLED, "1")
    monkeypatch.setattr(write_watch, "MIN_BYTES", PAGE)
    monkeypatch.setattr(write_watch, "_state", {})
    if not write_watch.available():
        # CI's runners are Linux >= 6.7 with unprivileged user-mode userfaultfd; a sandbox
        # that filters the syscall (a container's seccomp) leaves tracking off, which the
        # capture then does without (tests/test_bench_delta_pagemap.py).
        pytest.skip("userfaultfd with asynchronous write-protection is not available here")


def test_on_by_default_and_off_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(write_watch.ENV_ENABLED, raising=False)
    assert write_watch.enabled_by_env()
    monkeypatch.setenv(write_watch.ENV_ENABLED, "0")
    monkeypatch.setattr(write_watch, "_state", {})
    assert not write_watch.enabled_by_env() and write_watch.track(0, 64 << 20) is None


@pytest.mark.usefixtures("watching")
def test_written_pages_are_exactly_those_written_since_protection() -> None:
    pages = 200
    m = mmap.mmap(-1, pages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    arr = (ctypes.c_ubyte * (pages * PAGE)).from_buffer(m)
    base = ctypes.addressof(arr)
    for p in range(0, pages, 3):  # some pages present before tracking starts, some never touched
        arr[p * PAGE] = 1
    t = write_watch.track(base, pages * PAGE)
    assert t is not None
    assert write_watch.written_pages(t) == []
    rnd = random.Random(5)
    for _ in range(4):
        wrote = sorted(set(rnd.sample(range(pages), 25)) | {0, pages - 1})
        for p in wrote:
            arr[p * PAGE + rnd.randrange(PAGE)] = 1 + rnd.randrange(255)
        _ = sum(arr[p * PAGE] for p in range(1, pages, 7))  # reads are not writes
        assert write_watch.written_pages(t) == wrote  # and protected again: the next round starts clean
    write_watch.untrack(t)
    arr[5 * PAGE] = 3  # no longer protected: a write is an ordinary write
    del arr
    m.close()


@pytest.mark.usefixtures("watching")
def test_a_tracked_capture_equals_the_full_scan_across_suspensions_and_restores() -> None:
    """The dense layout (memory pool): every capture of a tracked agent, with bytes also
    written anywhere by the host between captures, equals the full scan; each restore
    starts tracking again and restores the same memory."""
    rig = make_rig(make_engine("dense"), load_bundle("mib"))
    ex = rig.execution(json.dumps({"n": 30}).encode())
    out = ex.start()
    assert ex._watch is not None, "a fresh dense memory is tracked"
    cs = rig.loaded.chunk_size
    pristine = bytes(rig.loaded.pristine)
    rnd = random.Random(9)
    k = 0
    while isinstance(out, Suspended):
        k += 1
        base, size = ex._mem_base_len()
        if k % 3 == 0:  # writes the guest did not make: the host's, anywhere
            mem = (ctypes.c_ubyte * size).from_address(base)
            for off in rnd.sample(range(size), 5):
                mem[off] = (pristine[off] if off < len(pristine) else 0) ^ 0xA5
        captured = ex.capture().memory
        assert captured == diff_memory(pristine, MemoryAt(base, size), cs), k
        if k % 10 == 0:
            snap = checkpoint_of(rig, ex, "01M81DJXWJ0W63726FJQHGNCFZ", k, out.call)
            before = ctypes.string_at(base, size)
            ex.release()
            ex = restore_from(rig, snap)
            assert ex._watch is not None
            assert ctypes.string_at(*ex._mem_base_len()) == before
        out = ex.resume(0, b'{"value":%d}' % k)
    assert k == 30
    ex.release()
