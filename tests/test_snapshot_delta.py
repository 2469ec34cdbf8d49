"""Linear-memory deltas: diff against the pristine image, apply onto a fresh memory."""

from __future__ import annotations

import ctypes
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import snapshots.delta as delta_mod
from snapshots import MemoryDelta, SnapshotMismatch, apply_delta, diff_memory, full_copy

PAGE = 65536


# Every test here runs on the native delta kernels and on the pure-Python paths.
pytestmark = pytest.mark.usefixtures("snapshot_kernels")


def ctypes_view(buf: bytearray) -> ctypes.Array[ctypes.c_ubyte]:
    """How the host hands over Wasmtime memory: a ctypes array over its address."""
    return (ctypes.c_ubyte * len(buf)).from_buffer(buf)


def pristine_image(pages: int = 2) -> bytes:
    img = bytearray(pages * PAGE)
    img[1024:3072] = os.urandom(2048)  # data segments
    return bytes(img)


def restore(pristine: bytes, delta: MemoryDelta) -> bytearray:
    target = bytearray(pristine) + bytearray(delta.memory_size - len(pristine))
    apply_delta(delta, ctypes_view(target))
    return target


def test_unchanged_memory_has_empty_delta() -> None:
    pristine = pristine_image()
    delta = diff_memory(pristine, ctypes_view(bytearray(pristine)))
    assert delta.chunks == ()
    assert delta.memory_size == len(pristine)
    assert delta.chunk_size == 4096


def test_changed_chunks_found_and_copied() -> None:
    pristine = pristine_image()
    mem = bytearray(pristine)
    mem[0] ^= 1
    mem[2000] ^= 0xFF  # inside the data segment
    mem[PAGE + 5] = 7
    mem[-1] = 9
    delta = diff_memory(pristine, ctypes_view(mem))
    assert [i for i, _ in delta.chunks] == [0, PAGE // 4096, len(mem) // 4096 - 1]
    assert restore(pristine, delta) == mem
    assert delta.changed_bytes == 3 * 4096


def test_grown_memory_compared_against_zeros() -> None:
    pristine = pristine_image(1)
    mem = bytearray(pristine) + bytearray(3 * PAGE)
    mem[PAGE + 100] = 1  # first grown page
    mem[4 * PAGE - 1] = 2  # last byte of the grown memory
    delta = diff_memory(pristine, ctypes_view(mem))
    assert delta.memory_size == 4 * PAGE
    assert [i for i, _ in delta.chunks] == [PAGE // 4096, 4 * PAGE // 4096 - 1]
    assert restore(pristine, delta) == mem


def test_grown_but_untouched_memory_is_empty_delta() -> None:
    pristine = pristine_image(1)
    mem = bytearray(pristine) + bytearray(10 * PAGE)
    delta = diff_memory(pristine, ctypes_view(mem))
    assert delta.chunks == () and delta.memory_size == 11 * PAGE


def test_unaligned_sizes_and_partial_last_chunk() -> None:
    pristine = bytes(range(256)) * 20 + b"\x01\x02\x03"  # 5123 bytes, not chunk-aligned
    mem = bytearray(pristine) + bytearray(3000)
    mem[5122] = 0  # last pristine byte, in the straddling chunk
    mem[8000] = 5  # in the grown tail, partial last chunk
    delta = diff_memory(pristine, ctypes_view(mem), chunk_size=1024)
    assert [i for i, _ in delta.chunks] == [5, 7]
    assert len(delta.chunks[-1][1]) == len(mem) - 7 * 1024
    assert restore(pristine, delta) == mem


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview", "ctypes"])
def test_accepts_any_buffer(kind: str) -> None:
    pristine = pristine_image(1)
    mem = bytearray(pristine)
    mem[4096 * 3 + 1] = 42
    current: object = {
        "bytes": bytes(mem),
        "bytearray": mem,
        "memoryview": memoryview(mem),
        "ctypes": ctypes_view(mem),
    }[kind]
    delta = diff_memory(pristine, current)  # type: ignore[arg-type]
    assert [i for i, _ in delta.chunks] == [3]
    assert full_copy(current) == bytes(mem)  # type: ignore[arg-type]


def test_copy_fallback_matches_memcmp(monkeypatch: pytest.MonkeyPatch) -> None:
    pristine = pristine_image(1)
    mem = bytearray(pristine) + bytearray(PAGE)
    for pos in (0, 5000, PAGE - 1, PAGE + 4096 * 7):
        mem[pos] ^= 0x55
    expected = diff_memory(pristine, ctypes_view(mem))
    monkeypatch.setattr(delta_mod, "_memcmp", None)
    assert diff_memory(pristine, ctypes_view(mem)) == expected


def test_pristine_larger_than_memory_is_mismatch() -> None:
    with pytest.raises(SnapshotMismatch, match="never shrinks"):
        diff_memory(bytes(8192), bytearray(4096))


def test_apply_requires_exact_size() -> None:
    pristine = pristine_image(1)
    mem = bytearray(pristine) + bytearray(PAGE)
    mem[-5] = 1
    delta = diff_memory(pristine, mem)
    with pytest.raises(SnapshotMismatch, match=f"grow the fresh instance's memory to {2 * PAGE}"):
        apply_delta(delta, bytearray(pristine))


def test_apply_refuses_read_only_target() -> None:
    delta = MemoryDelta(4096, 4096, ((0, b"x" * 4096),))
    with pytest.raises(ValueError, match="read-only"):
        apply_delta(delta, bytes(4096))


def test_memory_delta_validates_chunks() -> None:
    with pytest.raises(ValueError, match="ascending"):
        MemoryDelta(8192, 4096, ((1, bytes(4096)), (0, bytes(4096))))
    with pytest.raises(ValueError, match="outside"):
        MemoryDelta(4096, 4096, ((1, bytes(4096)),))
    with pytest.raises(ValueError, match="holds 10 bytes"):
        MemoryDelta(8192, 4096, ((0, bytes(10)),))
    with pytest.raises(ValueError, match="chunk_size"):
        MemoryDelta(8192, 0, ())


def test_empty_memory() -> None:
    delta = diff_memory(b"", bytearray())
    assert delta == MemoryDelta(0, 4096, ())
    apply_delta(delta, bytearray())


@settings(max_examples=60, deadline=None)
@given(
    pages=st.integers(1, 3),
    extra=st.integers(0, 20000),
    chunk=st.sampled_from([512, 4096, 5000]),
    writes=st.lists(
        st.tuples(st.integers(0, 4 * PAGE), st.binary(min_size=1, max_size=600)), max_size=8
    ),
)
def test_diff_apply_round_trip(
    pages: int, extra: int, chunk: int, writes: list[tuple[int, bytes]]
) -> None:
    pristine = bytearray(pages * 8192)
    pristine[100:900] = bytes(range(200)) * 4
    pristine_b = bytes(pristine)
    mem = bytearray(pristine_b) + bytearray(extra)
    for pos, data in writes:
        pos %= len(mem)
        mem[pos : pos + len(data)] = data[: len(mem) - pos]
    delta = diff_memory(pristine_b, ctypes_view(mem), chunk_size=chunk)
    assert restore(pristine_b, delta) == mem
    # Only chunks that really differ are listed.
    ref = pristine_b + bytes(extra)
    for index, data in delta.chunks:
        assert data != ref[index * chunk : index * chunk + len(data)]


def test_package_imports_no_runtime() -> None:
    """snapshots/ stores and encodes only: no wasmtime, anyio, host/ or policies/."""
    import subprocess
    import sys

    code = (
        "import sys, snapshots, snapshots.lmdb_store, snapshots.group_commit;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'wasmtime', 'anyio', 'host', 'policies'});"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.compares_paths
def test_native_and_python_kernels_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same memory diffs, XORs and applies to the same bytes on both paths."""
    if delta_mod._kernels() is None:
        pytest.skip("native delta kernels unavailable")
    rng = __import__("random").Random(7)
    pristine = bytearray(3 * 8192)
    pristine[100:5000] = rng.randbytes(4900)
    pristine_b = bytes(pristine)
    for extra in (0, 1, 4095, 4097, 3 * PAGE):
        mem = bytearray(pristine_b) + bytearray(extra)
        for _ in range(12):
            pos = rng.randrange(len(mem))
            mem[pos] ^= 1 + rng.randrange(255)
        native = diff_memory(pristine_b, ctypes_view(mem))
        xn = delta_mod.xor_with_pristine(native, native.data, pristine_b)
        monkeypatch.setattr(delta_mod, "_kernels_lib", [None])
        python = diff_memory(pristine_b, ctypes_view(mem))
        xp = delta_mod.xor_with_pristine(python, python.data, pristine_b)
        monkeypatch.undo()
        assert native == python and xn == xp
        assert delta_mod.xor_with_pristine(native, xn, pristine_b) == native.data
        assert restore(pristine_b, native) == mem


def test_packed_delta_validates_lengths() -> None:
    from array import array

    with pytest.raises(ValueError, match="expected 8192"):
        MemoryDelta.packed(8192, 4096, array("I", [0, 1]).tobytes(), bytes(8191))
    with pytest.raises(ValueError, match="expected 4100"):  # the last chunk is cut short
        MemoryDelta.packed(4100, 4096, array("I", [0, 1]).tobytes(), bytes(4096))
    with pytest.raises(ValueError, match="whole uint32"):
        MemoryDelta.packed(4100, 4096, b"\0\0", b"")
    d = MemoryDelta.packed(4100, 4096, array("I", [0, 1]).tobytes(), bytes(4100))
    assert d.indices == (0, 1) and len(d.chunks[1][1]) == 4
    with pytest.raises(AttributeError):
        d.memory_size = 5  # type: ignore[misc]


def test_pagemap_is_probed_and_reopened_after_fork() -> None:
    """The pagemap is only trusted after a written page reads as present, and a forked
    child does not keep reading its parent's."""
    fd = delta_mod._pagemap()
    if fd is None:
        pytest.skip("no truthful /proc/self/pagemap on this system")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            forgot = delta_mod._pagemap_fd is None  # the parent's descriptor was dropped
            os.write(w, b"ok" if forgot and delta_mod._pagemap() is not None else b"no")
        finally:
            os._exit(0)
    os.close(w)
    try:
        assert os.read(r, 2) == b"ok"
    finally:
        os.waitpid(pid, 0)
        os.close(r)


def test_a_prepared_pristine_image_gives_the_same_deltas_and_records() -> None:
    """PristineImage is the bytes prepared once: every delta, record and restore is the
    same as with the bytes. On the native path a chunk over data segments is held XOR'd
    against the image (as the format stores it); its plain bytes are still what it reads."""
    from snapshots import PristineImage, Snapshot, decode_snapshot, encode_snapshot

    pristine = pristine_image()
    image = PristineImage(pristine)
    assert len(image) == len(pristine) and bytes(image) == pristine
    mem = bytearray(pristine) + bytearray(PAGE)
    mem[2000] ^= 0xFF  # over the data segment
    mem[PAGE + 5] = 7
    mem[-3] = 1  # grown part
    by_bytes = diff_memory(pristine, ctypes_view(mem))
    by_image = diff_memory(image, ctypes_view(mem))
    assert by_image == by_bytes
    assert by_image.data == by_bytes.data == b"".join(bytes(mem[i * 4096 : (i + 1) * 4096]) for i in by_bytes.indices)
    assert restore(pristine, by_image) == mem
    snaps = [Snapshot(agent_id="a", seq=1, module_digest="ab" * 32, abi_version=1, memory=d, globals=(),
                      async_buf=(0, 0), entry="torpor_main", pending=None, usage={}, created_at=1.0)
             for d in (by_bytes, by_image)]
    records = {encode_snapshot(s, pristine=p) for s in snaps for p in (pristine, image)}
    assert len(records) == 1
    (record,) = records
    for p in (pristine, image):
        assert decode_snapshot(record, pristine=p).memory == by_bytes
    with pytest.raises(ValueError, match="read-only"):
        apply_delta(by_image, image)  # type: ignore[arg-type]
