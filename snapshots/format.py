"""The versioned, self-checking byte format of one agent checkpoint.

Layout of a record (all integers little-endian)::

    envelope  magic b"\\x8eTPS" | format version u8          <- stable across all versions
    header    flags u8 | abi_version u32 | module digest (32 raw bytes)
    payload   one zstd frame (magicless, content size, no zstd checksum)
    trailer   blake2b-128 of every byte before it          <- stable across all versions

Why this shape:

* The magic, the version byte and the 16-byte trailing checksum are the same in every
  format version, so a decoder can always tell "damaged" (checksum fails: the bit flip may
  even be in the version byte) from "intact but too new" (checksum holds, version unknown).
* Module digest and ABI version sit outside the compressed payload so that a foreign or
  stale checkpoint is refused before anything is decompressed.
* The payload holds varint fields, the chunk indices, then JSON only for the parts that
  are JSON by nature (the pending tool call, the usage counters), then the chunk bytes.
  The format's own cost is about 64 bytes (magic, version, flags, ABI, 32-byte digest,
  checksum, zstd frame header); the rest is the agent's ids, JSON and changed memory.
  For the benchmark's small agent (bench/bench_snapshot_codec.py) that is 278 bytes with
  no memory change and about 480 with a stack and a heap chunk changed.
* Chunks are XOR'd against the module's pristine image when the encoder is given it
  (flag bit 0). A changed chunk that shares its page with data segments (.rodata next to
  the .bss that malloc keeps its state in) then compresses to the few bytes that really
  changed instead of the whole page of strings; chunks over zero pristine memory (stack,
  heap) are the same either way. The price is that decoding such a record needs the
  pristine image, which a restoring host has anyway: it is the memory of the fresh
  instance it restores into. Measured on the benchmark's 17-page memory: stack + heap
  chunk changed, 479 bytes raw and 479 XOR; plus one .bss word next to 2 KB of rodata,
  1,121 raw and 490 XOR.
* Version 2 (the only difference from version 1) compresses the payload with a zstd
  raw-content dictionary: a fixed list of the strings checkpoint metadata is made of
  (``_STATIC_DICT_V2``, part of the format: changing it is a new version), followed, when
  the record is XOR'd against a pristine image, by that image's non-zero bytes (its
  data segments: rodata strings that freed-but-dirty heap memory is full of copies of).
  Both are known to any decoder that can decode the record at all, so nothing is
  stored. Measured on real ``steps`` checkpoints (bench/RESULTS.md): about 467 bytes
  per record in version 1, 400 in version 2. A dictionary trained on an agent's
  checkpoints would need storing and versioning beside the module; not done.
* Version 3 is for large payloads (at least ``CHUNK_ABOVE``, 64 KiB: an agent holding a
  conversation). Its record keeps, between the header and the trailer, not a zstd frame
  but a reference to the payload's content-defined chunks (``snapshots.chunks``): the
  same uncompressed payload as version 2, cut where its content says, each piece stored
  once in the store's chunk table under its SHA-256 and compressed there. A checkpoint
  then adds the pieces no earlier checkpoint (of this agent, or of any agent) holds,
  however the agent's data moved in memory, instead of every byte that differs from the
  pristine image: measured with ``torpor bench conversation`` (200 turns of 2,000
  bytes), 25 MB of checkpoints before, under 3 MB of checkpoints and chunks after
  (bench/RESULTS.md). The record itself is a few hundred bytes and its checksum covers
  the reference; every piece is checked against its digest as it is read, so a changed
  or missing piece is SnapshotCorrupt naming it. Decoding needs the chunks
  (``chunks_from``, the store's ``get_chunk``). Small agents stay at version 2: a
  format-3 record would cost them a lookup per piece and more bytes.
* Flag bit 1 (0x02, set on the format-3 records this version writes): the metadata keeps
  the pending call's arguments apart from the rest (``_meta_apart``), so that a decoder
  parses the small rest and leaves the arguments as bytes until something reads them
  (``Snapshot.pending`` is lazily decoded: ``snapshots.lazy``). At 400 turns of ``torpor
  bench conversation`` they are 0.85 MB of JSON whose parse was a third of a resume's CPU,
  and resuming a call whose answer is journaled never reads them. Format-3 records
  without the flag (written before it) decode as before; a Torpor that predates the
  flag refuses the records that carry it as too new, never misreads them. A decoded
  format-3 record also keeps its memory chunks where they lie: in the chunk tree's
  pieces (``delta.Pieces``), from which a restore copies them straight into the
  instance's memory; only the payload's head is copied together for the parse.

This module never reads a clock: ``created_at`` comes from the caller. A host writes
checkpoints with :func:`encode_checkpoint`, which picks version 2 or 3 by size.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import struct
import threading
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import zstandard

from . import chunks, fastjson
from .delta import (
    MemoryDelta,
    Pieces,
    _kernels,
    _region,
    _src,
    _xor_mask,
    derived_from_image,
    same_image,
    xor_into,
)
from .errors import (
    RecordCorrupt,
    SnapshotCorrupt,
    SnapshotError,
    SnapshotMismatch,
    SnapshotVersionError,
)
from .lazy import Lazy, LazyField, raw

if TYPE_CHECKING:
    from .delta import Pristine

__all__ = [
    "CHUNKED_VERSION",
    "CHUNK_ABOVE",
    "FORMAT_VERSION",
    "MAGIC",
    "SUPPORTED_VERSIONS",
    "GlobalValue",
    "Snapshot",
    "SnapshotHeader",
    "chunk_ref",
    "decode_snapshot",
    "encode_checkpoint",
    "encode_snapshot",
    "peek_snapshot",
]

MAGIC = b"\x8eTPS"
FORMAT_VERSION = 2
#: The format of a checkpoint whose payload is stored as content chunks (encode_checkpoint).
CHUNKED_VERSION = 3
SUPPORTED_VERSIONS: tuple[int, ...] = (1, 2, 3)
#: Payloads of at least this many bytes are stored as chunks (format 3); smaller ones inline.
CHUNK_ABOVE = 64 * 1024

GlobalKind = Literal["i32", "i64", "f32", "f64"]

_FLAG_XOR = 0x01
# The pending call's arguments stored apart from the rest of the metadata, so that a
# decoder parses them only when they are read (see _meta_apart); set on format-3 records.
_FLAG_ARGS_APART = 0x02
_KNOWN_FLAGS = _FLAG_XOR | _FLAG_ARGS_APART

_ENVELOPE = struct.Struct("<4sB")  # magic, format version
_HEADER_V1 = struct.Struct("<BI32s")  # flags, abi_version, module digest
_PREFIX_LEN = _ENVELOPE.size + _HEADER_V1.size
_CHECKSUM_LEN = 16
_MIN_RECORD = _PREFIX_LEN + 1 + _CHECKSUM_LEN

# The payload starts with these unsigned varints, then created_at as a little-endian f64:
# seq, memory_size, chunk_size, async addr, async size, n_chunks, n_globals,
# len(agent_id), len(entry), len(json). Varints, because a small agent's record is a few
# hundred bytes and fixed-width fields would spend 30 of them on zeros.
_N_VARINTS = 10
_FAST_LEVEL_ABOVE = 32 * 1024  # payload bytes; see encode_snapshot's level

_KIND_CODES: dict[str, int] = {"i32": 0, "i64": 1, "f32": 2, "f64": 3}
_KIND_NAMES: tuple[GlobalKind, ...] = ("i32", "i64", "f32", "f64")
_INT_RANGES = {"i32": (-(2**31), 2**32), "i64": (-(2**63), 2**64)}
_F64 = struct.Struct("<d")
_U32_MAX = 2**32 - 1


@dataclass(frozen=True, slots=True)
class GlobalValue:
    """One wasm global of the suspended instance, by export name.

    Integers may be given signed or unsigned (Wasmtime hands out signed); the value is
    stored exactly as given. Floats keep their bit pattern, NaN payloads included.
    """

    name: str
    kind: GlobalKind
    value: int | float

    def __post_init__(self) -> None:
        if self.kind not in _KIND_CODES:
            raise ValueError(
                f"global {self.name!r}: kind must be one of i32/i64/f32/f64, got {self.kind!r}"
            )
        if self.kind in _INT_RANGES:
            lo, hi = _INT_RANGES[self.kind]
            if (
                isinstance(self.value, bool)
                or not isinstance(self.value, int)
                or not lo <= self.value < hi
            ):
                raise ValueError(f"global {self.name!r}: {self.value!r} is not a valid {self.kind}")
        elif isinstance(self.value, bool) or not isinstance(self.value, (int, float)):
            raise ValueError(f"global {self.name!r}: {self.value!r} is not a valid {self.kind}")


@dataclass(frozen=True, kw_only=True)
class Snapshot:
    """Everything needed to resume a suspended agent in a fresh instance of its module.

    ``pending`` may be given as a :class:`~snapshots.lazy.Lazy`: a decoded large
    checkpoint's pending call keeps its arguments undecoded until something reads them
    (:meth:`pending_call` gives the call without reading them). Reading ``pending`` gives
    the same dict either way.
    """

    agent_id: str
    seq: int
    module_digest: str
    abi_version: int
    memory: MemoryDelta
    globals: tuple[GlobalValue, ...]
    async_buf: tuple[int, int]
    entry: str
    pending: LazyField[dict[str, Any] | None] = LazyField()  # noqa: RUF009 (a descriptor: no default)
    usage: dict[str, Any]
    created_at: float

    def __post_init__(self) -> None:
        if not self.agent_id:
            raise ValueError("agent_id must be a non-empty string")
        if not 1 <= self.seq < 2**64:
            raise ValueError(f"seq counts checkpoints from 1, got {self.seq}")
        if self.module_digest not in _valid_digests and not _valid_digest(self.module_digest):
            raise ValueError(
                f"module_digest must be the 64-digit hex sha256 of the module, got {self.module_digest!r}"
            )
        if not 0 <= self.abi_version <= _U32_MAX:
            raise ValueError(f"abi_version must fit in 32 bits, got {self.abi_version}")
        addr, size = self.async_buf
        if not (0 <= addr <= _U32_MAX and 0 <= size <= _U32_MAX):
            raise ValueError(
                f"async_buf must be a (address, size) pair of u32, got {self.async_buf}"
            )

    def pending_call(self) -> tuple[int, str, Any] | None:
        """The pending call's seq, tool and arguments, or None; the arguments are a
        :class:`~snapshots.lazy.Lazy` while not decoded (a resume whose answer is
        recorded never needs them). KeyError/ValueError as ``int(pending["seq"])``."""
        held = raw(self, "pending")
        if isinstance(held, _DecodedPending) and not held.ready:
            return int(held.head["seq"]), str(held.head["tool"]), held.args
        pending = self.pending
        if pending is None:
            return None
        return int(pending["seq"]), str(pending["tool"]), pending.get("args")


class _DecodedPending(Lazy[dict[str, Any] | None]):
    """A decoded pending call whose arguments (stored apart) are parsed on first read."""

    __slots__ = ("args", "head")

    def __init__(self, head: dict[str, Any], args: Lazy[Any]) -> None:
        super().__init__(lambda: {**head, "args": args.get()})
        self.head = head
        self.args = args


@dataclass(frozen=True, slots=True)
class SnapshotHeader:
    """What can be learnt from a record without decompressing it (see ``peek_snapshot``)."""

    format_version: int
    abi_version: int
    module_digest: str
    xor_pristine: bool
    size: int


# Digests already checked: a host writes thousands of checkpoints of a few modules.
_valid_digests: set[str] = set()


def _valid_digest(digest: str) -> bool:
    if len(digest) != 64 or not _is_hex(digest):
        return False
    if len(_valid_digests) >= 1024:
        _valid_digests.clear()
    _valid_digests.add(digest)
    return True


def _is_hex(s: str) -> bool:
    try:
        int(s, 16)
    except ValueError:
        return False
    return s == s.lower()


_local = threading.local()


def _compressor(level: int, zdict: zstandard.ZstdCompressionDict | None = None) -> zstandard.ZstdCompressor:
    """A per-thread compressor per level and dictionary: building one costs more than a small record."""
    cache: dict[tuple[int, int], zstandard.ZstdCompressor] | None = getattr(_local, "cctx", None)
    if cache is None:
        cache = _local.cctx = {}
    key = (level, id(zdict))
    cctx = cache.get(key)
    if cctx is None:
        params = zstandard.ZstdCompressionParameters.from_level(
            level,
            format=zstandard.FORMAT_ZSTD1_MAGICLESS,
            write_content_size=1,
            write_checksum=0,
            write_dict_id=0,
        )
        if len(cache) > 64:
            cache.clear()
        cctx = cache[key] = zstandard.ZstdCompressor(compression_params=params, dict_data=zdict)
    return cctx


def _decompressor(zdict: zstandard.ZstdCompressionDict | None = None) -> zstandard.ZstdDecompressor:
    cache: dict[int, zstandard.ZstdDecompressor] | None = getattr(_local, "dctx", None)
    if cache is None:
        cache = _local.dctx = {}
    dctx = cache.get(id(zdict))
    if dctx is None:
        if len(cache) > 64:
            cache.clear()
        dctx = cache[id(zdict)] = zstandard.ZstdDecompressor(
            dict_data=zdict, format=zstandard.FORMAT_ZSTD1_MAGICLESS
        )
    return dctx


# Format version 2's dictionary, fixed part: what the metadata of checkpoints is made of.
# Later strings are cheaper to reference, so the commonest come last.
_STATIC_DICT_V2 = b"".join(
    (
        b'"wall_s":"tokens":"denials":"hibernations":"approval":"retryable":false',
        b'"args":{"key":"counter","by":1}},{"value":"url":"query":"id":',
        b"kv.getkv.setkv.incrclock.nowlog",
        b"torpor.g0torpor.g1__stack_pointer",
        b'torpor_main[{"seq":1,"tool":"kv.incr","args":{"key":"counter","by":1}},',
        b'{"suspensions":1,"fuel_used":1,"tool_calls":1,"calls_by_tool":{"kv.incr":1}}]',
    )
)
_MAX_PRISTINE_DICT = 64 * 1024
_static_zdict: list[zstandard.ZstdCompressionDict] = []


def _dictionary(pristine: Pristine | None) -> zstandard.ZstdCompressionDict:
    """The version-2 dictionary: the static strings, then the pristine image's data."""
    if pristine is None:
        if not _static_zdict:
            _static_zdict.append(
                zstandard.ZstdCompressionDict(_STATIC_DICT_V2, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
            )
        return _static_zdict[0]

    def build(data: bytes) -> zstandard.ZstdCompressionDict:
        stripped = data.strip(b"\0")[:_MAX_PRISTINE_DICT]
        return zstandard.ZstdCompressionDict(_STATIC_DICT_V2 + stripped, dict_type=zstandard.DICT_TYPE_RAWCONTENT)

    return derived_from_image(pristine, "zstd-dictionary-v2", build)


def _check_pristine_size(pristine: Pristine, memory_size: int) -> None:
    size = len(pristine) if isinstance(pristine, bytes) else _region(pristine).size
    if size > memory_size:
        raise _pristine_too_big(size, memory_size)


def _pristine_too_big(size: int, memory_size: int) -> SnapshotMismatch:
    return SnapshotMismatch(
        f"the pristine image is {size} bytes but the checkpoint's memory is "
        f"{memory_size} bytes: this pristine image is not from the checkpoint's module"
    )


def _meta_json(value: Any) -> bytes:
    """The metadata's JSON (no NaN: ``ValueError``), the standard library's bytes (:mod:`.fastjson`)."""
    return fastjson.compact(value, allow_nan=False)


def _uvarints(values: list[int]) -> bytes:
    """``values`` (each >= 0) as consecutive LEB128 varints; one call per record section."""
    if all(0 <= v < 0x80 for v in values):
        return bytes(values)
    out = bytearray()
    append = out.append
    for v in values:
        if v < 0:
            raise ValueError(f"cannot store negative {v} as an unsigned varint")
        while v >= 0x80:
            append((v & 0x7F) | 0x80)
            v >>= 7
        append(v)
    return bytes(out)


def _put_uvarint(out: bytearray, value: int) -> None:
    """Append ``value`` (>= 0) as an LEB128 varint."""
    if value < 0:
        raise ValueError(f"cannot store negative {value} as an unsigned varint")
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


_head_scratch = threading.local()


def _parse_head(p: bytes) -> tuple[list[int], float, bytes, int]:
    """The payload's header varints, created_at, packed chunk indices and the position
    after them (one C call when the kernels are built)."""
    lib = _kernels()
    if lib is not None:
        hdr = (ctypes.c_uint64 * _N_VARINTS)()
        created = ctypes.c_double()
        idx: ctypes.Array[ctypes.c_uint32] | None = getattr(_head_scratch, "idx", None)
        if idx is None:
            idx = _head_scratch.idx = (ctypes.c_uint32 * 1024)()
        end = lib.tp_parse_head(p, len(p), hdr, _N_VARINTS, ctypes.byref(created), idx, len(idx))
        if end == -2:
            if hdr[5] > len(p):  # each index takes a byte at least: the count is a lie
                raise ValueError(f"{hdr[5]} chunks announced in a {len(p)}-byte payload")
            idx = _head_scratch.idx = (ctypes.c_uint32 * int(hdr[5]))()
            end = lib.tp_parse_head(p, len(p), hdr, _N_VARINTS, ctypes.byref(created), idx, len(idx))
        if end < 0:
            raise ValueError("the payload's head is malformed (truncated varints or chunk indices)")
        return list(hdr), created.value, ctypes.string_at(idx, 4 * int(hdr[5])), int(end)
    fields, pos = _get_uvarints(p, 0, _N_VARINTS)
    (created_at,) = _F64.unpack_from(p, pos)
    index_bytes, pos = _read_gaps(p, pos + 8, fields[5])
    return fields, created_at, index_bytes, pos


def _read_gaps(buf: bytes, pos: int, count: int) -> tuple[bytes, int]:
    """``count`` gap varints from ``pos`` as packed ascending uint32 chunk indices."""
    lib = _kernels()
    if lib is not None and count:
        out = (ctypes.c_uint32 * count)()
        end = lib.tp_read_gaps(buf, len(buf), pos, count, out)
        if end < 0:
            raise ValueError("chunk index gaps run past the payload or overflow 32 bits")
        return bytes(out), int(end)
    gaps, pos = _get_uvarints(buf, pos, count)
    index = 0
    indices = array("I")
    for gap in gaps:
        index += gap
        indices.append(index)  # out of uint32 range: OverflowError, an inconsistent record
    return indices.tobytes(), pos


def _get_uvarints(buf: bytes, pos: int, count: int, *, wide: bool = False) -> tuple[list[int], int]:
    """Read ``count`` LEB128 varints from ``pos``; return (values, next position).

    One call for all of them (in C when the kernels are built): the payload opens
    with ten, and a Python call per varint cost more than the rest of the parse.
    ``wide``: values may exceed 64 bits (zigzag-coded unsigned i64 globals); Python only.
    """
    if count == 0:
        return [], pos
    lib = None if wide else _kernels()
    if lib is not None:
        out = (ctypes.c_uint64 * count)()
        end = lib.tp_uvarints(buf, len(buf), pos, count, out)
        if end < 0:
            raise ValueError("varint runs past the end of the payload or is longer than 10 bytes")
        return list(out), int(end)
    values: list[int] = []
    value = shift = 0
    while len(values) < count:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            values.append(value)
            value = shift = 0
        else:
            shift += 7
            if shift > 70:
                raise ValueError("varint longer than 10 bytes")
    return values, pos


def encode_snapshot(
    s: Snapshot, *, level: int | None = None, pristine: Pristine | None = None, version: int = FORMAT_VERSION
) -> bytes:
    """Serialise ``s`` into one self-checking record (format 1 or 2: the whole payload inline).

    ``level``: the zstd level; by default 3 for payloads under 32 KiB (a hibernated
    small agent's bytes on disk are what matter there) and -1 above (a large delta is
    on the suspend path: -1 compresses a 53 KiB delta 20 µs faster here, within 1 %
    of level 3's size).

    Pass the module's ``pristine`` image (as given to ``diff_memory``) to store chunks as
    XOR against it, which makes records over data-segment pages several times smaller;
    the same image must then be passed to ``decode_snapshot``. A host stores
    checkpoints with :func:`encode_checkpoint`, which chooses between this and format 3.
    """
    if version not in SUPPORTED_VERSIONS or version == CHUNKED_VERSION:
        raise ValueError(f"cannot write snapshot format version {version} inline; it writes 1 and 2 "
                         "(format 3 is written by encode_checkpoint)")
    out, flags = _raw_payload(s, pristine)
    zdict = _dictionary(pristine) if version >= 2 else None
    if level is None:
        level = 3 if len(out) < _FAST_LEVEL_ABOVE else -1
    frame = _compressor(level, zdict).compress(out)
    prefix = _record_prefix(version, flags, s.abi_version, s.module_digest)
    check = hashlib.blake2b(prefix, digest_size=_CHECKSUM_LEN)
    check.update(frame)
    return b"".join((prefix, frame, check.digest()))


def encode_checkpoint(s: Snapshot, *, pristine: Pristine | None = None,
                      chunk_above: int = CHUNK_ABOVE) -> tuple[bytes, chunks.Chunks]:
    """``s`` as a checkpoint to store: the record, and the content chunks it names.

    A payload under ``chunk_above`` bytes (every small agent's) is one format-2 record
    and no chunks, as before. A larger one (an agent holding a conversation) is a
    format-3 record: a reference to the payload's content-defined chunks
    (``snapshots.chunks``), which the store keeps once however many checkpoints and
    agents share them, so that a checkpoint adds what changed since the others, even
    when data moved in memory. The chunks are returned whole: the store writes (and
    compresses) only those it does not hold yet.
    """
    if s.memory.changed_bytes < chunk_above:  # else the payload is chunked whatever the rest
        out, flags = _raw_payload(s, pristine)
        if len(out) < chunk_above:
            zdict = _dictionary(pristine)
            frame = _compressor(3 if len(out) < _FAST_LEVEL_ABOVE else -1, zdict).compress(out)
            prefix = _record_prefix(FORMAT_VERSION, flags, s.abi_version, s.module_digest)
            check = hashlib.blake2b(prefix, digest_size=_CHECKSUM_LEN)
            check.update(frame)
            return b"".join((prefix, frame, check.digest())), {}
    # Format 3 keeps the pending call's arguments apart: a resume does not parse them.
    out, flags = _raw_payload(s, pristine, args_apart=True)
    found: chunks.Chunks = {}
    ref = chunks.write_tree(bytes(out), found.setdefault)
    prefix = _record_prefix(CHUNKED_VERSION, flags, s.abi_version, s.module_digest)
    body = prefix + ref
    return body + hashlib.blake2b(body, digest_size=_CHECKSUM_LEN).digest(), found


def chunk_ref(data: bytes) -> bytes | None:
    """The chunk reference of a format-3 record (checked first), None for an inline record."""
    version, _flags, _abi, _digest = _check_envelope(data)
    if version != CHUNKED_VERSION:
        return None
    return bytes(data)[_PREFIX_LEN:-_CHECKSUM_LEN]


def _raw_payload(s: Snapshot, pristine: Pristine | None, *,
                 args_apart: bool = False) -> tuple[bytearray | memoryview, int]:
    """The uncompressed payload of ``s`` and the record's flags (``args_apart``: the
    metadata laid out as ``_meta_apart`` says, and its flag set)."""
    mem = s.memory
    flags = 0
    if pristine is not None:
        flags |= _FLAG_XOR
        _check_pristine_size(pristine, mem.memory_size)
    agent = s.agent_id.encode()
    entry = s.entry.encode()
    try:
        if args_apart:
            flags |= _FLAG_ARGS_APART
            meta = _meta_apart(s.pending, s.usage)
        else:
            meta = _meta_json([s.pending, s.usage])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"pending and usage must be JSON-able (no NaN): {exc}") from exc
    if len(agent) > 0xFFFF or len(entry) > 0xFFFF or len(s.globals) > 0xFFFF:
        raise ValueError("agent_id, entry and the list of globals must each stay under 65,536")
    n = len(mem.index_bytes) // 4
    header = [s.seq, mem.memory_size, mem.chunk_size, s.async_buf[0], s.async_buf[1], n,
              len(s.globals), len(agent), len(entry), len(meta)]
    tail = b"".join((agent, entry, meta, _globals_bytes(s.globals)))
    lib = _kernels()
    out: bytearray | memoryview
    if lib is not None and min(header) >= 0 and max(header) < 2**64:
        out = _payload_native(lib, header, s.created_at, mem, tail, pristine)
    else:
        payload = bytearray(_uvarints(header))
        payload += _F64.pack(s.created_at)
        indices = mem.indices
        # gaps: ascending indices stay one byte each
        payload += _uvarints([b - a for a, b in zip((0, *indices), indices, strict=False)])
        payload += tail
        start = len(payload)
        payload += mem.data
        if pristine is not None:
            xor_into(payload, start, mem.memory_size, mem.chunk_size, mem.index_bytes, pristine)
        out = payload
    return out, flags


def _meta_apart(pending: dict[str, Any] | None, usage: dict[str, Any]) -> bytes:
    """The metadata with the pending call's arguments apart from the rest:
    ``head length varint | head | args``, head the JSON of ``[pending without its
    arguments, usage]``, args the JSON of the arguments.

    Why: at 400 turns of a conversation the arguments are 0.85 MB of JSON, and parsing
    them was a third of a resume's CPU; apart, a decoder parses the small head and leaves
    the arguments as bytes until they are read (``Snapshot.pending``). ``args`` is empty,
    and head holds ``pending`` whole, when the arguments are not its last key (so the
    decoded dict keeps the order of keys) or it has none.
    """
    args = b""
    if isinstance(pending, dict) and pending and next(reversed(pending)) == "args":
        head = dict(pending)
        args = _meta_json(head.pop("args"))
        pending = head
    head_json = _meta_json([pending, usage])
    return _uvarints([len(head_json)]) + head_json + args


def _decoded_meta(p: bytes, pos: int, end: int,
                  apart: bool) -> tuple[dict[str, Any] | Lazy[dict[str, Any] | None] | None, Any]:
    """The pending call and the usage from the metadata at ``p[pos:end]``; the arguments
    of a record that keeps them apart stay undecoded (see ``_meta_apart``)."""
    if end > len(p):
        raise ValueError("the metadata runs past the end of the payload")
    if not apart:
        pending, usage = json.loads(p[pos:end])
    else:
        (head_len,), pos = _get_uvarints(p, pos, 1)
        if pos + head_len > end:
            raise ValueError("the metadata's head runs past the metadata")
        pending, usage = json.loads(p[pos : pos + head_len])
        pos += head_len
        if pos < end:
            if not isinstance(pending, dict):
                raise ValueError("arguments are stored for a pending call that is not an object")
            args: Lazy[Any] = Lazy(functools.partial(_decoded_args, p, pos, end))
            return _DecodedPending(pending, args), usage
    if pending is not None and not isinstance(pending, dict):
        raise ValueError("pending must be an object or null")
    return pending, usage


def _decoded_args(p: bytes, start: int, end: int) -> Any:
    """A pending call's arguments stored apart, parsed when first read."""
    try:
        return json.loads(p[start:end])
    except ValueError as exc:  # the checksum and the chunks' digests held: the encoder's fault
        raise _inconsistent(exc) from exc


_prefixes: dict[tuple[int, int, int, str], bytes] = {}


def _record_prefix(version: int, flags: int, abi: int, digest: str) -> bytes:
    """Magic, version, flags, ABI and digest: the same for every checkpoint of a module."""
    key = (version, flags, abi, digest)
    prefix = _prefixes.get(key)
    if prefix is None:
        prefix = _ENVELOPE.pack(MAGIC, version) + _HEADER_V1.pack(flags, abi, bytes.fromhex(digest))
        if len(_prefixes) >= 256:
            _prefixes.clear()
        _prefixes[key] = prefix
    return prefix


def _globals_bytes(globals_: tuple[GlobalValue, ...]) -> bytes:
    out = bytearray()
    for g in globals_:
        name = g.name.encode()
        if len(name) > 0xFF:
            raise ValueError(f"global name {g.name!r} is longer than 255 bytes")
        out.append(_KIND_CODES[g.kind])
        out.append(len(name))
        out += name
        if g.kind in _INT_RANGES:
            v = int(g.value)
            _put_uvarint(out, v * 2 if v >= 0 else -v * 2 - 1)  # zigzag
        else:
            out += _F64.pack(float(g.value))
    return bytes(out)


_payload_local = threading.local()


def _payload_scratch(size: int) -> ctypes.Array[ctypes.c_char]:
    """A per-thread buffer of at least ``size`` bytes, reused: the payload is only read
    by the compressor, and a fresh zero-filled 50 KiB buffer per checkpoint cost ~10 µs."""
    buf: ctypes.Array[ctypes.c_char] | None = getattr(_payload_local, "buf", None)
    if buf is None or len(buf) < size:
        buf = _payload_local.buf = ctypes.create_string_buffer(max(size, 64 * 1024))
    return buf


def _payload_native(lib: Any, header: list[int], created: float, mem: MemoryDelta, tail: bytes,
                    pristine: Pristine | None) -> memoryview:
    """The payload the Python path of encode_snapshot builds, in one C call."""
    n = len(mem.index_bytes) // 4
    data, ref = mem._stored
    if ref is not None and pristine is not None and same_image(ref, pristine):
        pristine = None  # the chunks are already XOR'd against this very image
    elif ref is not None:
        data = mem.data
    cap = 10 * len(header) + 8 + 5 * n + len(tail) + len(data)
    buf = _payload_scratch(cap)
    mask = None if pristine is None else _xor_mask(mem.chunk_size, mem.index_bytes, pristine)
    pri_addr = pri_len = 0
    if mask is not None:
        assert pristine is not None
        preg = _region(pristine)
        pri_addr, pri_len = preg.addr, preg.size
    size = lib.tp_encode_payload(
        buf, len(buf), (ctypes.c_uint64 * len(header))(*header), len(header), created, mem.index_bytes, n,
        tail, len(tail), _src(data), len(data), pri_addr, pri_len, mem.chunk_size, mem.memory_size,
        mask, len(mask) if mask is not None else 0,
    )
    if size < 0:  # pragma: no cover - cap is computed for the worst case
        raise RuntimeError("snapshot payload buffer too small")
    return memoryview(buf).cast("B")[:size]


def _check_envelope(data: bytes) -> tuple[int, int, int, str]:
    """Verify magic, checksum and version; return (version, flags, abi, digest)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"a snapshot record is bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < _MIN_RECORD:
        if data[: len(MAGIC)] != MAGIC[: len(data)]:
            raise SnapshotCorrupt(
                f"not a Torpor snapshot (bad magic {data[:4].hex() or 'none'}); "
                "this checkpoint is unusable: restore an earlier one"
            )
        raise SnapshotCorrupt(
            f"snapshot record truncated: {len(data)} bytes, the smallest valid record is "
            f"{_MIN_RECORD}; this checkpoint is unusable: restore an earlier one"
        )
    magic, version = _ENVELOPE.unpack_from(data)
    if magic != MAGIC:
        raise SnapshotCorrupt(
            f"not a Torpor snapshot (bad magic {magic.hex()}, expected {MAGIC.hex()}); "
            "this checkpoint is unusable: restore an earlier one"
        )
    body, checksum = data[:-_CHECKSUM_LEN], data[-_CHECKSUM_LEN:]
    if hashlib.blake2b(body, digest_size=_CHECKSUM_LEN).digest() != checksum:
        raise SnapshotCorrupt(
            f"snapshot record of {len(data)} bytes fails its checksum (truncated or "
            "bit-flipped on disk or in transit); this checkpoint is unusable: restore an earlier one"
        )
    if version not in SUPPORTED_VERSIONS:
        raise SnapshotVersionError(
            f"snapshot format version {version} is not supported by this Torpor "
            f"(it reads versions {', '.join(map(str, SUPPORTED_VERSIONS))}); "
            "restore it with the Torpor release that wrote it or a newer one"
        )
    flags, abi, digest = _HEADER_V1.unpack_from(data, _ENVELOPE.size)
    if flags & ~_KNOWN_FLAGS:
        raise SnapshotVersionError(
            f"snapshot uses feature flags {flags:#04x} unknown to this Torpor "
            f"(it knows {_KNOWN_FLAGS:#04x}); restore it with the Torpor release that wrote it"
        )
    return version, flags, abi, digest.hex()


def peek_snapshot(data: bytes) -> SnapshotHeader:
    """Verify a record and read its header without decompressing the payload.

    Lets a host find which module (and so which pristine image) a checkpoint needs
    before it loads anything.
    """
    version, flags, abi, digest = _check_envelope(data)
    return SnapshotHeader(version, abi, digest, bool(flags & _FLAG_XOR), len(data))


def decode_snapshot(
    data: bytes,
    *,
    expect_module_digest: str | None = None,
    expect_abi_version: int | None = None,
    pristine: Pristine | None = None,
    chunks_from: Callable[[bytes], bytes | None] | None = None,
) -> Snapshot:
    """Parse and verify a record written by ``encode_snapshot``.

    Never returns a Snapshot from damaged, foreign or too-new bytes: it raises
    SnapshotCorrupt, SnapshotMismatch or SnapshotVersionError instead. ``pristine`` is
    required when the record was encoded with one; it must be the pristine image of the
    module named by the record's digest (check it with ``expect_module_digest``).
    """
    version, flags, abi, digest = _check_envelope(data)
    if expect_module_digest is not None and digest != expect_module_digest.lower():
        raise SnapshotMismatch(
            f"checkpoint belongs to module sha256:{digest}, expected module sha256:"
            f"{expect_module_digest.lower()}: restore it with the module it was taken from"
        )
    if expect_abi_version is not None and abi != expect_abi_version:
        raise SnapshotMismatch(
            f"checkpoint was taken under agent ABI version {abi}, expected ABI version "
            f"{expect_abi_version}: restore it with a host that speaks ABI {abi}"
        )
    xor = bool(flags & _FLAG_XOR)
    if xor and pristine is None:
        raise SnapshotError(
            "this checkpoint stores memory relative to its module's pristine image: pass "
            "pristine=<memory of a freshly instantiated module> to decode_snapshot"
        )
    apart = bool(flags & _FLAG_ARGS_APART)
    if version == CHUNKED_VERSION:
        return _parse_payload(_chunked_payload(bytes(data), chunks_from), abi, digest, pristine if xor else None,
                              apart, in_place=True)
    frame = bytes(data)[_PREFIX_LEN:-_CHECKSUM_LEN]
    try:
        zdict = _dictionary(pristine if xor else None) if version >= 2 else None
        payload = _decompressor(zdict).decompress(frame)
    except zstandard.ZstdError as exc:
        raise _inconsistent(exc) from exc
    return _parse_payload(payload, abi, digest, pristine if xor else None, apart)


def _chunked_payload(data: bytes, chunks_from: Callable[[bytes], bytes | None] | None) -> bytes | Pieces:
    """The payload a format-3 record names, read from the chunk store, every chunk checked
    (as pieces, not copied together, when the native kernels are there)."""
    if chunks_from is None:
        raise SnapshotError("this checkpoint keeps its payload in the store's chunks: pass "
                            "chunks_from=<the store's get_chunk> to decode_snapshot")
    try:
        return chunks.read_pieces(data[_PREFIX_LEN:-_CHECKSUM_LEN], chunks_from)
    except RecordCorrupt as exc:
        raise SnapshotCorrupt(f"a chunk of this checkpoint is unusable: {exc}; restore an earlier "
                              "checkpoint") from exc
    except ValueError as exc:
        raise _inconsistent(exc) from exc


def _head_of(pieces: Pieces) -> bytes:
    """The bytes of a payload in pieces up to its memory chunks, copied together (or a
    bound on them: the memory chunks' length is known only once the head is parsed)."""
    fields, pos = _get_uvarints(pieces.gather(0, 10 * _N_VARINTS), 0, _N_VARINTS)
    n_chunks, n_globals, agent_len, entry_len, meta_len = fields[5], fields[6], fields[7], fields[8], fields[9]
    # created_at; a gap varint per chunk (10 bytes at most); the strings; a global: kind,
    # name length, name (255 bytes at most), value (10 bytes at most)
    bound = pos + 8 + 10 * n_chunks + agent_len + entry_len + meta_len + n_globals * (2 + 255 + 10)
    return pieces.gather(0, bound)


def _inconsistent(exc: Exception) -> SnapshotCorrupt:
    # The checksum held, so the encoder itself wrote inconsistent bytes.
    return SnapshotCorrupt(
        f"snapshot payload is inconsistent although its checksum holds ({exc}); "
        "this checkpoint is unusable: restore an earlier one"
    )


def _parse_payload(payload: bytes | Pieces, abi: int, digest: str, pristine: Pristine | None,
                   apart: bool = False, in_place: bool = False) -> Snapshot:
    """The snapshot a payload holds. ``in_place``: the memory chunks stay in the payload
    (a large payload's megabytes: see ``delta._Tail``) instead of being sliced out of it;
    of a payload in pieces only what precedes them is copied together."""
    try:
        p = payload if isinstance(payload, bytes) else _head_of(payload)
        fields, created_at, index_bytes, pos = _parse_head(p)
        (
            seq,
            memory_size,
            chunk_size,
            async_addr,
            async_size,
            _n_chunks,  # the indices came with the head
            n_globals,
            agent_len,
            entry_len,
            meta_len,
        ) = fields
        agent_id = p[pos : pos + agent_len].decode()
        pos += agent_len
        entry = p[pos : pos + entry_len].decode()
        pos += entry_len
        pending, usage = _decoded_meta(p, pos, pos + meta_len, apart)
        pos += meta_len
        globals_: list[GlobalValue] = []
        for _ in range(n_globals):
            code, name_len = p[pos], p[pos + 1]
            pos += 2
            name = p[pos : pos + name_len].decode()
            pos += name_len
            value: int | float
            if code < 2:
                (z,), pos = _get_uvarints(p, pos, 1, wide=True)
                value = (z >> 1) ^ -(z & 1)
            else:
                (value,) = _F64.unpack_from(p, pos)
                pos += 8
            globals_.append(GlobalValue(name, _KIND_NAMES[code], value))
        if not isinstance(usage, dict):
            raise ValueError("usage must be an object")
        if pos > len(p):
            raise ValueError("the payload's fields run past its end")
        if pristine is not None:
            _check_pristine_size(pristine, memory_size)
        if in_place or not isinstance(payload, bytes):
            memory = MemoryDelta.packed(memory_size, chunk_size, index_bytes, payload, xor_with=pristine, start=pos)
        else:
            memory = MemoryDelta.packed(memory_size, chunk_size, index_bytes, p[pos:], xor_with=pristine)
        return Snapshot(
            agent_id=agent_id,
            seq=seq,
            module_digest=digest,
            abi_version=abi,
            memory=memory,
            globals=tuple(globals_),
            async_buf=(async_addr, async_size),
            entry=entry,
            pending=pending,
            usage=usage,
            created_at=created_at,
        )
    except SnapshotMismatch:
        raise
    except (struct.error, ValueError, IndexError, TypeError, ZeroDivisionError, OverflowError) as exc:
        raise _inconsistent(exc) from exc
