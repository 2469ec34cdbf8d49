"""The snapshot record: round trips, size, and refusal of every kind of bad input."""

from __future__ import annotations

import ctypes
import hashlib
import math
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapshots import (
    FORMAT_VERSION,
    GlobalValue,
    MemoryDelta,
    Snapshot,
    SnapshotCorrupt,
    SnapshotError,
    SnapshotMismatch,
    SnapshotVersionError,
    apply_delta,
    decode_snapshot,
    diff_memory,
    encode_snapshot,
    peek_snapshot,
)

PAGE = 65536


# Every test here runs on the native delta kernels and on the pure-Python paths.
pytestmark = pytest.mark.usefixtures("snapshot_kernels")
DIGEST = hashlib.sha256(b"agent module").hexdigest()
OTHER_DIGEST = hashlib.sha256(b"another module").hexdigest()


def small_agent_memory(touch_bss: bool) -> tuple[bytes, bytearray]:
    """A 17-page C-agent-like memory: rodata at 1024, stack below 69632, heap above.

    The agent changed a few hundred bytes of its stack page and of one heap page (and,
    with ``touch_bss``, a malloc word that shares its page with the rodata strings).
    """
    rnd = random.Random(7)
    pristine = bytearray(17 * PAGE)
    words = [b"torpor_main\0", b"http.get\0", b"calling tool %s\0", b"application/json\0"]
    rodata = b"".join(rnd.choice(words) for _ in range(120))[:1800]
    pristine[1024 : 1024 + len(rodata)] = rodata
    mem = bytearray(pristine)
    stack = b"".join(
        struct.pack("<I", rnd.choice([69632 + 16 * rnd.randrange(20), rnd.randrange(64), 0]))
        for _ in range(64)
    )
    mem[69632 - len(stack) : 69632] = stack
    heap = (
        struct.pack("<II", 0x83, 0)
        + b'{"tool":"http.get","args":{"url":"https://api.example.com/items"}}\0'
    )
    mem[69632 : 69632 + len(heap)] = heap
    if touch_bss:
        bss = 1024 + len(rodata) + 8
        mem[bss : bss + 8] = struct.pack("<II", 69632 + 128, 3)
    return bytes(pristine), mem


def make_snapshot(memory: MemoryDelta, **over: object) -> Snapshot:
    fields: dict[str, object] = {
        "agent_id": "agt_01HZX3K9Q4M2B7N8P5R6T1V0WY",
        "seq": 3,
        "module_digest": DIGEST,
        "abi_version": 1,
        "memory": memory,
        "globals": (GlobalValue("__stack_pointer", "i32", 69632 - 256),),
        "async_buf": (69632 + 512, 1024),
        "entry": "torpor_main",
        "pending": {
            "tool": "http.get",
            "args": {"url": "https://api.example.com/items"},
            "call": 3,
        },
        "usage": {"fuel": 1234567, "tool_calls": 3},
        "created_at": 1732270000.25,
    }
    fields.update(over)
    return Snapshot(**fields)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def small() -> tuple[bytes, bytearray, Snapshot]:
    pristine, mem = small_agent_memory(touch_bss=False)
    return pristine, mem, make_snapshot(diff_memory(pristine, mem))


def resign(body: bytes) -> bytes:
    return body + hashlib.blake2b(body, digest_size=16).digest()


def test_round_trip_raw(small: tuple[bytes, bytearray, Snapshot]) -> None:
    _, _, snap = small
    assert decode_snapshot(encode_snapshot(snap)) == snap


def test_round_trip_xor_restores_memory(small: tuple[bytes, bytearray, Snapshot]) -> None:
    pristine, mem, snap = small
    data = encode_snapshot(snap, pristine=pristine)
    back = decode_snapshot(
        data, pristine=pristine, expect_module_digest=DIGEST, expect_abi_version=1
    )
    assert back == snap
    target = bytearray(pristine)
    apply_delta(back.memory, (ctypes.c_ubyte * len(target)).from_buffer(target))
    assert target == mem


def test_small_agent_record_size() -> None:
    """The density target: a hibernated small agent in a few hundred bytes.

    About 64 bytes are the record's own (header, digest, checksum, zstd frame); the rest
    is this agent's metadata (~170 bytes of ids and JSON) and ~330 changed memory bytes.
    """
    for touch_bss in (False, True):
        pristine, mem = small_agent_memory(touch_bss)
        snap = make_snapshot(diff_memory(pristine, mem))
        xor = encode_snapshot(snap, pristine=pristine)
        assert len(xor) <= 450, len(xor)
        if touch_bss:  # XOR keeps the rodata page out of the record
            assert len(xor) + 150 < len(encode_snapshot(snap))


def test_peek_reads_header_only(small: tuple[bytes, bytearray, Snapshot]) -> None:
    pristine, _, snap = small
    data = encode_snapshot(snap, pristine=pristine)
    head = peek_snapshot(data)
    assert (head.format_version, head.abi_version, head.module_digest) == (
        FORMAT_VERSION,
        1,
        DIGEST,
    )
    assert head.xor_pristine and head.size == len(data)


def test_xor_record_needs_pristine(small: tuple[bytes, bytearray, Snapshot]) -> None:
    pristine, _, snap = small
    data = encode_snapshot(snap, pristine=pristine)
    with pytest.raises(SnapshotError, match="pass pristine="):
        decode_snapshot(data)


def test_xor_with_wrong_size_pristine_is_mismatch(small: tuple[bytes, bytearray, Snapshot]) -> None:
    pristine, _, snap = small
    data = encode_snapshot(snap, pristine=pristine)
    with pytest.raises(SnapshotMismatch, match="not from the checkpoint's module"):
        decode_snapshot(data, pristine=pristine + bytes(PAGE))


def test_truncated_at_every_length(small: tuple[bytes, bytearray, Snapshot]) -> None:
    pristine, _, snap = small
    data = encode_snapshot(snap, pristine=pristine)
    for n in range(len(data)):
        with pytest.raises(SnapshotCorrupt, match="unusable"):
            decode_snapshot(data[:n], pristine=pristine)


def test_every_single_bit_flip_is_caught(small: tuple[bytes, bytearray, Snapshot]) -> None:
    pristine, _, snap = small
    data = encode_snapshot(snap, pristine=pristine)
    for byte in range(len(data)):
        for bit in range(8):
            bad = bytearray(data)
            bad[byte] ^= 1 << bit
            with pytest.raises(SnapshotCorrupt):
                decode_snapshot(bytes(bad), pristine=pristine)


def test_bad_magic_and_garbage() -> None:
    with pytest.raises(SnapshotCorrupt, match="bad magic"):
        decode_snapshot(b"PK\x03\x04" + bytes(100))
    with pytest.raises(SnapshotCorrupt, match="bad magic"):
        decode_snapshot(b"{}")
    with pytest.raises(SnapshotCorrupt, match="truncated"):
        decode_snapshot(b"")


def test_wrong_module_digest(small: tuple[bytes, bytearray, Snapshot]) -> None:
    _, _, snap = small
    data = encode_snapshot(snap)
    with pytest.raises(SnapshotMismatch) as info:
        decode_snapshot(data, expect_module_digest=OTHER_DIGEST)
    assert DIGEST in str(info.value) and OTHER_DIGEST in str(info.value)


def test_wrong_abi(small: tuple[bytes, bytearray, Snapshot]) -> None:
    _, _, snap = small
    with pytest.raises(SnapshotMismatch, match="ABI version 1, expected ABI version 2"):
        decode_snapshot(encode_snapshot(snap), expect_abi_version=2)


def test_unknown_format_version(small: tuple[bytes, bytearray, Snapshot]) -> None:
    _, _, snap = small
    body = bytearray(encode_snapshot(snap)[:-16])
    body[4] = 99  # the version byte, with a valid checksum: written by a newer Torpor
    with pytest.raises(SnapshotVersionError, match=r"version 99 is not supported.*reads versions 1"):
        decode_snapshot(resign(bytes(body)))


def test_unknown_feature_flags(small: tuple[bytes, bytearray, Snapshot]) -> None:
    _, _, snap = small
    body = bytearray(encode_snapshot(snap)[:-16])
    body[5] |= 0x80
    with pytest.raises(SnapshotVersionError, match="feature flags"):
        decode_snapshot(resign(bytes(body)))


def test_inconsistent_payload_with_valid_checksum(small: tuple[bytes, bytearray, Snapshot]) -> None:
    _, _, snap = small
    data = encode_snapshot(snap)
    body = data[:-16]
    prefix = body[:42]
    for payload in (b"\x00" * 5, b"not zstd at all"):
        with pytest.raises(SnapshotCorrupt, match="inconsistent"):
            decode_snapshot(resign(prefix + payload))


def test_globals_keep_exact_values() -> None:
    nan_bits = struct.unpack("<d", struct.pack("<Q", 0x7FF8_0000_DEAD_BEEF))[0]
    globs = (
        GlobalValue("a", "i32", -(2**31)),
        GlobalValue("b", "i32", 2**32 - 1),
        GlobalValue("c", "i64", 2**64 - 1),
        GlobalValue("d", "i64", -(2**63)),
        GlobalValue("e", "f32", 1.5),
        GlobalValue("f", "f64", -math.inf),
        GlobalValue("g", "f64", nan_bits),
    )
    snap = make_snapshot(MemoryDelta(PAGE, 4096, ()), globals=globs)
    back = decode_snapshot(encode_snapshot(snap))
    assert back.globals[:6] == globs[:6]
    assert struct.pack("<d", back.globals[6].value) == struct.pack("<d", nan_bits)


def test_invalid_values_refused() -> None:
    with pytest.raises(ValueError, match="not a valid i32"):
        GlobalValue("x", "i32", 2**32)
    with pytest.raises(ValueError, match="kind"):
        GlobalValue("x", "v128", 0)  # type: ignore[arg-type]
    mem = MemoryDelta(0, 4096, ())
    with pytest.raises(ValueError, match="seq"):
        make_snapshot(mem, seq=0)
    with pytest.raises(ValueError, match="module_digest"):
        make_snapshot(mem, module_digest="abc")
    with pytest.raises(ValueError, match="JSON-able"):
        encode_snapshot(make_snapshot(mem, usage={"x": object()}))


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.text(max_size=20)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def snapshots_(draw: st.DrawFn) -> tuple[bytes, Snapshot]:
    chunk = draw(st.sampled_from([256, 4096]))
    pristine = bytes(draw(st.binary(max_size=3 * chunk)))
    size = len(pristine) + draw(st.integers(0, 2 * chunk))
    mem = bytearray(pristine) + bytearray(size - len(pristine))
    for pos, data in draw(
        st.lists(
            st.tuples(st.integers(0, max(size - 1, 0)), st.binary(min_size=1, max_size=64)),
            max_size=5,
        )
    ):
        if size:
            mem[pos : pos + len(data)] = data[: size - pos]
    kinds = st.sampled_from(["i32", "i64", "f32", "f64"])
    globs = []
    for name, kind in draw(
        st.lists(st.tuples(st.text(min_size=1, max_size=20), kinds), max_size=4)
    ):
        if kind == "i32":
            value: int | float = draw(st.integers(-(2**31), 2**32 - 1))
        elif kind == "i64":
            value = draw(st.integers(-(2**63), 2**64 - 1))
        else:
            value = draw(st.floats(allow_nan=False))
        globs.append(GlobalValue(name, kind, value))
    snap = Snapshot(
        agent_id=draw(st.text(min_size=1, max_size=40)),
        seq=draw(st.integers(1, 2**64 - 1)),
        module_digest=hashlib.sha256(draw(st.binary(max_size=8))).hexdigest(),
        abi_version=draw(st.integers(0, 2**32 - 1)),
        memory=diff_memory(pristine, mem, chunk_size=chunk),
        globals=tuple(globs),
        async_buf=(draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**32 - 1))),
        entry=draw(st.text(max_size=30)),
        pending=draw(st.none() | st.dictionaries(st.text(max_size=10), json_values, max_size=4)),
        usage=draw(st.dictionaries(st.text(max_size=10), json_values, max_size=4)),
        created_at=draw(st.floats(allow_nan=False)),
    )
    return pristine, snap


@settings(max_examples=80, deadline=None)
@given(case=snapshots_(), xor=st.booleans(), level=st.sampled_from([1, 3, 19]))
def test_encode_decode_property(case: tuple[bytes, Snapshot], xor: bool, level: int) -> None:
    pristine, snap = case
    data = encode_snapshot(snap, level=level, pristine=pristine if xor else None)
    back = decode_snapshot(
        data,
        pristine=pristine if xor else None,
        expect_module_digest=snap.module_digest,
        expect_abi_version=snap.abi_version,
    )
    assert back == snap


@pytest.mark.compares_paths
def test_native_and_python_encoders_write_identical_records(monkeypatch: pytest.MonkeyPatch) -> None:
    """The C payload builder is byte for byte the Python one (same record, same checksum),
    and each path decodes what the other wrote."""
    import snapshots.delta as delta_mod

    if delta_mod._kernels() is None:
        pytest.skip("native delta kernels unavailable")
    rng = random.Random(11)
    for touch_bss in (False, True):
        pristine, mem = small_agent_memory(touch_bss)
        for extra in (0, 3 * PAGE):
            grown = mem + bytearray(extra)
            if extra:
                grown[len(mem) + 5] = 7
            delta = diff_memory(pristine, (ctypes.c_ubyte * len(grown)).from_buffer(grown))
            snap = Snapshot(agent_id="01M81K2HE50RH14HH99EMX78NW", seq=rng.randrange(1, 2**40),
                            module_digest=DIGEST, abi_version=1, memory=delta,
                            globals=(GlobalValue("__stack_pointer", "i32", 65000), GlobalValue("g", "i64", 2**64 - 1),
                                     GlobalValue("f", "f64", -0.0)),
                            async_buf=(70000, 4096), entry="torpor_main", pending={"seq": 3, "tool": "kv.get"},
                            usage={"fuel_used": 12345}, created_at=1795349893.25)
            for xor in (None, pristine):
                native = encode_snapshot(snap, pristine=xor)
                with monkeypatch.context() as m:
                    m.setattr(delta_mod, "_kernels_lib", [None])
                    python = encode_snapshot(snap, pristine=xor)
                    assert decode_snapshot(native, pristine=xor) == snap
                assert native == python
                assert decode_snapshot(python, pristine=xor) == snap


def test_decoded_delta_restores_memory_exactly() -> None:
    """A decoded delta keeps the chunks over data segments as stored (XOR'd) and un-XORs
    them while writing memory; memory, ``data`` and equality all match the original."""
    pristine, mem = small_agent_memory(touch_bss=True)
    delta = diff_memory(pristine, (ctypes.c_ubyte * len(mem)).from_buffer(mem))
    back = decode_snapshot(encode_snapshot(make_snapshot(delta), pristine=pristine), pristine=pristine).memory
    target = bytearray(pristine)
    apply_delta(back, (ctypes.c_ubyte * len(target)).from_buffer(target))
    assert target == mem
    assert back.data == delta.data and back == delta and hash(back) == hash(delta)
    again = bytearray(pristine)
    apply_delta(back, (ctypes.c_ubyte * len(again)).from_buffer(again))  # after data was computed
    assert again == mem


@settings(max_examples=150, deadline=None)
@given(
    edits=st.lists(
        st.tuples(st.sampled_from(["flip", "insert", "delete", "truncate"]), st.integers(0, 10**6),
                  st.integers(0, 255)),
        min_size=1, max_size=4,
    ),
    xor=st.booleans(),
)
def test_mangled_payload_with_valid_checksum_never_crashes(edits: list[tuple[str, int, int]], xor: bool) -> None:
    """A record whose payload was altered, then recompressed and resealed (what a bug or
    an attacker with write access to the store could produce), decodes to a Snapshot or
    raises a SnapshotError: the parsers, native ones included, never read or write out
    of bounds, and what decodes restores into a memory of its own size only."""
    import zstandard

    from snapshots import SnapshotError
    from snapshots import format as fmt

    pristine, mem = small_agent_memory(touch_bss=True)
    delta = diff_memory(pristine, (ctypes.c_ubyte * len(mem)).from_buffer(mem))
    ref = pristine if xor else None
    record = encode_snapshot(make_snapshot(delta), pristine=ref)
    zdict = fmt._dictionary(ref)
    payload = bytearray(fmt._decompressor(zdict).decompress(record[fmt._PREFIX_LEN : -16]))
    for op, pos, byte in edits:
        pos %= max(1, len(payload))
        if op == "flip" and payload:
            payload[pos] ^= byte or 1
        elif op == "insert":
            payload[pos:pos] = bytes([byte])
        elif op == "delete" and payload:
            del payload[pos]
        elif op == "truncate":
            del payload[pos:]
    frame = fmt._compressor(3, zdict).compress(bytes(payload))
    try:
        snap = decode_snapshot(resign(record[: fmt._PREFIX_LEN] + frame), pristine=ref)
    except SnapshotError:
        return
    except zstandard.ZstdError:  # pragma: no cover - must have been turned into SnapshotCorrupt
        raise AssertionError("a zstd error escaped decode_snapshot") from None
    if not len(pristine) <= snap.memory.memory_size <= 64 * 2**20:
        return  # a host refuses to grow a fresh instance to such a size (memory limit)
    target = bytearray(pristine) + bytearray(snap.memory.memory_size - len(pristine))
    apply_delta(snap.memory, (ctypes.c_ubyte * len(target)).from_buffer(target))
