"""Content-addressed chunks: large values stored as the pieces they share with others.

Why: an LLM agent keeps its conversation in memory and sends all of it to the model at
every turn. Stored whole, every checkpoint repeats the conversation (and every journal
entry repeats the arguments), so what the store holds grows with the square of the
turns. Cut into chunks named by their digest, a checkpoint or an entry stores only the
chunks no earlier value holds: a turn adds about its new message.

Why content-defined cuts (a gear hash, as FastCDC): fixed-size pieces stop matching as
soon as data moves in memory (a buffer reallocated, a history rewritten): every piece
after the move differs. A cut decided by the last 64 bytes of content falls at the same
place in the same content wherever it sits, so after a move only the pieces around its
edges are new. The native kernel is ``chunk_kernels.c``; the pure-Python cut below
gives the same cuts.

A value becomes a *tree*: its chunks' digests, concatenated, are an index; an index of
more than :data:`INLINE_INDEX` bytes is cut again (with smaller pieces) and stored as
chunks too, until it is short. The reference kept in the record is that short index,
so a checkpoint record stays a few hundred bytes and what a turn adds does not grow
with the number of chunks: only the index pieces around the changes are new. Layout
of a reference::

    levels u8 | total length varint | index length varint | index (32-byte digests)

``levels`` is 1 when the index lists data chunks, 2 when it lists index chunks whose
concatenation lists data chunks, and so on.

A stored chunk is ``codec u8 | bytes`` (0: as is, 1: a zstd frame), named by the
SHA-256 of its content. Every chunk read is checked against its name
(:func:`load_chunk`), so a changed or missing chunk is an error naming it, never other
bytes; a chunk store keyed by digest is also what a replicated object store (JetStream)
keeps well. Nothing here knows where chunks live: the caller gives ``put``/``get``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import zstandard

from . import native_build
from .delta import Pieces, _kernels, _new_bytes
from .errors import RecordCorrupt

__all__ = [
    "DIGEST_SIZE",
    "INLINE_INDEX",
    "ChunkPut",
    "Chunks",
    "clear_cache",
    "cut",
    "digest",
    "load_chunk",
    "read_pieces",
    "read_tree",
    "set_cache_limit",
    "store_chunk",
    "tree_digests",
    "write_tree",
]

DIGEST_SIZE = 32
#: An index longer than this (in bytes: 32 a chunk) is itself stored as chunks.
INLINE_INDEX = 8 * DIGEST_SIZE
# (min, mask, max). The mask takes the hash's high bits: those depend on the last 64
# bytes, the low ones on the last few only (which repeat in text of few words).
#: Data chunks: at least 1 KiB, about 4 KiB past that on average, at most 32 KiB. Smaller
#: pieces make a turn add fewer bytes; larger ones make a resume read fewer pieces (each
#: a lookup, a decompression and a digest): measured with ``torpor bench conversation``
#: at 150 turns, 512/2K/16K stored 2.49 MB and read 1.4x the pieces of this choice (2.76 MB);
#: 2K/8K/64K stored 3.6 MB.
DATA_CUT = (1024, ((1 << 12) - 1) << 52, 32 * 1024)
#: Index chunks: at least 128 bytes, about 256 past that, at most 2 KiB (4 to 64 digests).
INDEX_CUT = (128, ((1 << 8) - 1) << 56, 2048)
_CODEC_RAW, _CODEC_ZSTD = 0, 1
_ZSTD_MARK = bytes((_CODEC_ZSTD,))
_MAX_LEVELS = 8

#: Chunks to store: digest -> content (the store compresses those it does not hold).
Chunks = dict[bytes, "bytes | memoryview"]
#: Writes a chunk unless the store already holds it.
ChunkPut = Callable[[bytes, "bytes | memoryview"], object]


def _gear() -> tuple[int, ...]:
    return tuple(int.from_bytes(hashlib.sha256(b"torpor-gear" + bytes([i])).digest()[:8], "little")
                 for i in range(256))


GEAR = _gear()
_MASK64 = (1 << 64) - 1
_lib: list[Any] = []
_gear_c: list[Any] = []


def _kernel() -> Any:
    if not _lib:
        lib = native_build.load("chunk_kernels", Path(__file__).with_name("chunk_kernels.c"))
        if lib is not None:
            sz = ctypes.c_size_t
            lib.tp_cdc_cut.restype = sz
            lib.tp_cdc_cut.argtypes = [ctypes.c_char_p, sz, ctypes.c_void_p, sz, ctypes.c_uint64, sz,
                                       ctypes.c_void_p, sz]
            lib.tp_unique_names.restype = sz
            lib.tp_unique_names.argtypes = [ctypes.c_char_p, sz, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_void_p]
            _gear_c.append((ctypes.c_uint64 * 256)(*GEAR))
        _lib.append(lib)
    return _lib[0]


def cut(data: bytes, params: tuple[int, int, int] = DATA_CUT) -> list[int]:
    """The end offset of each chunk of ``data`` (content-defined; see the module doc)."""
    lo, mask, hi = params
    lib = _kernel()
    if lib is not None:
        cap = len(data) // lo + 2
        ends = (ctypes.c_uint32 * cap)()
        n = lib.tp_cdc_cut(data, len(data), _gear_c[0], lo, mask, hi, ends, cap)
        return list(ends[:n])
    return _cut_py(data, lo, mask, hi)


def _cut_py(data: bytes, lo: int, mask: int, hi: int) -> list[int]:
    """The same cuts as ``tp_cdc_cut``, in Python (no compiler, ``TORPOR_NATIVE=0``)."""
    ends: list[int] = []
    n, start, gear = len(data), 0, GEAR
    while start < n:
        if n - start <= lo:
            end = n
        else:
            limit = min(n, start + hi)
            i = start + lo
            h = 0
            for k in range(max(start, i - 64), i):
                h = ((h << 1) + gear[data[k]]) & _MASK64
            end = limit
            while i < limit:
                h = ((h << 1) + gear[data[i]]) & _MASK64
                i += 1
                if not h & mask:
                    end = i
                    break
        ends.append(end)
        start = end
    return ends


def digest(data: bytes | memoryview) -> bytes:
    """A chunk's name: the SHA-256 of its content."""
    return hashlib.sha256(data).digest()


_local = threading.local()


def _cctx() -> zstandard.ZstdCompressor:
    c: zstandard.ZstdCompressor | None = getattr(_local, "c", None)
    if c is None:
        c = _local.c = zstandard.ZstdCompressor(level=3, write_content_size=True, write_checksum=False)
    return c


def _dctx() -> zstandard.ZstdDecompressor:
    d: zstandard.ZstdDecompressor | None = getattr(_local, "d", None)
    if d is None:
        d = _local.d = zstandard.ZstdDecompressor()
    return d


def store_chunk(content: bytes | memoryview) -> bytes:
    """A chunk's content as stored: compressed when that saves bytes."""
    packed = _cctx().compress(content)
    if len(packed) + 16 < len(content):
        return bytes((_CODEC_ZSTD,)) + packed
    return bytes((_CODEC_RAW,)) + bytes(content)


def load_chunk(name: bytes, stored: bytes) -> bytes:
    """The content of a stored chunk, once it matches its name; RecordCorrupt otherwise."""
    hit = _verified.get(name)
    if hit is not None and hit[0] == stored:
        return hit[1]
    try:
        if stored[:1] == bytes((_CODEC_RAW,)):
            content = stored[1:]
        elif stored[:1] == bytes((_CODEC_ZSTD,)):
            content = _dctx().decompress(stored[1:])
        else:
            raise ValueError(f"unknown codec {stored[:1].hex() or 'none'}")
    except (zstandard.ZstdError, ValueError) as exc:
        raise _corrupt(name, f"does not decode ({exc})") from exc
    if hashlib.sha256(content).digest() != name:
        raise _corrupt(name, "does not match its digest")
    _remember(name, stored, content)
    return content


class _Verified:
    """Chunks this process has checked against their names: digest -> (stored, content).

    Why: a resume of an agent holding a conversation reads over a thousand chunks, and
    decompressing and hashing each one was most of its time (``torpor bench
    conversation --profile``). A chunk is named by its content, so content once checked
    stays right forever; only chunks that passed the check enter. The stored bytes are
    kept too and a hit requires the bytes read from the store *now* to equal them: the
    lookup still happens, so a chunk missing from or changed in the store is still
    detected and named (a read of those bytes then goes the full way and fails), and a
    store check still vouches for what is on disk. Bounded by ``limit`` bytes (stored +
    content), oldest entries dropped first.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self.entries: dict[bytes, tuple[bytes, bytes]] = {}
        self.get = self.entries.get
        self._lock = threading.Lock()

    def add(self, name: bytes, stored: bytes, content: bytes) -> None:
        cost = len(stored) + len(content) + 2 * DIGEST_SIZE
        if cost > self.limit:
            return
        with self._lock:  # lookups stay lock-free: a dict get is atomic
            old = self.entries.pop(name, None)
            if old is not None:
                self.size -= len(old[0]) + len(old[1]) + 2 * DIGEST_SIZE
            self.entries[name] = (stored, content)
            self.size += cost
            while self.size > self.limit:
                first = next(iter(self.entries))
                s, c = self.entries.pop(first)
                self.size -= len(s) + len(c) + 2 * DIGEST_SIZE

    def clear(self) -> None:
        with self._lock:
            self.entries.clear()
            self.size = 0


#: Bytes the cache of verified chunks may hold (stored + content); ``set_cache_limit``.
CACHE_LIMIT = 64 * 1024 * 1024
_verified = _Verified(CACHE_LIMIT)
_remember = _verified.add


def set_cache_limit(limit: int) -> None:
    """Bound (in bytes) the process cache of verified chunks; 0 turns it off. Clears it."""
    _verified.clear()
    _verified.limit = max(0, limit)


def clear_cache() -> None:
    """Forget every verified chunk (a benchmark's cold resume; a test)."""
    _verified.clear()


def _corrupt(name: bytes, problem: str) -> RecordCorrupt:
    label = f"chunk {name.hex()}"
    return RecordCorrupt(f"{label} {problem} (changed or damaged on disk)", database="chunks", key=label)


def _put_pieces(data: bytes, params: tuple[int, int, int], put: ChunkPut) -> bytes:
    """Store ``data``'s chunks (``put`` skips those already held); its index.

    The pieces are handed over as views of ``data`` (no copy): most are already held,
    and the store copies the few it writes when it compresses them."""
    view = memoryview(data)
    sha256 = hashlib.sha256
    names = []
    start = 0
    for end in cut(data, params):
        piece = view[start:end]
        name = sha256(piece).digest()
        put(name, piece)
        names.append(name)
        start = end
    return b"".join(names)


def write_tree(data: bytes, put: ChunkPut) -> bytes:
    """Store ``data`` as chunks through ``put``; the short reference that reads it back."""
    index = _put_pieces(data, DATA_CUT, put)
    levels = 1
    while len(index) > INLINE_INDEX:
        index = _put_pieces(index, INDEX_CUT, put)
        levels += 1
    return bytes((levels,)) + _uvarint(len(data)) + _uvarint(len(index)) + index


def _parse_ref(ref: bytes) -> tuple[int, int, bytes]:
    if not ref or not 1 <= ref[0] <= _MAX_LEVELS:
        raise ValueError("not a chunk reference (bad level count)")
    total, pos = _get_uvarint(ref, 1)
    n, pos = _get_uvarint(ref, pos)
    index = ref[pos : pos + n]
    if len(index) != n or n % DIGEST_SIZE or pos + n != len(ref):
        raise ValueError("chunk reference is cut short or has trailing bytes")
    return ref[0], total, index


def _names(index: bytes) -> Iterator[bytes]:
    for i in range(0, len(index), DIGEST_SIZE):
        yield index[i : i + DIGEST_SIZE]


def read_tree(ref: bytes, get: Callable[[bytes], bytes | None]) -> bytes:
    """The bytes a reference names, every chunk checked; RecordCorrupt names a chunk that is
    missing or changed, ValueError means the reference itself is malformed.

    Each distinct name of a level is looked up, checked and decompressed once per read:
    memory holds many equal pages (an agent's 5 MB state at 400 turns is 1,252 references
    to 247 distinct chunks), and a name met again is the content read and checked a moment
    ago, from the same transaction. With the native kernels the per-reference work
    (finding the distinct names, copying each reference's content into place) is C.
    """
    out = read_pieces(ref, get)
    return out if isinstance(out, bytes) else out.gather()


def read_pieces(ref: bytes, get: Callable[[bytes], bytes | None]) -> bytes | Pieces:
    """``read_tree``'s bytes, as :class:`~snapshots.delta.Pieces` (the data chunks, not
    copied together) when the native kernels are there, else as bytes."""
    levels, total, index = _parse_ref(ref)
    native = _kernel() is not None and _kernels() is not None and _new_bytes is not None
    for _ in range(levels - 1):
        index = _level_native(index, get).gather() if native else _level_py(index, get)
        if len(index) % DIGEST_SIZE:
            raise ValueError("an index chunk's length is not a whole number of digests")
    out = _level_native(index, get) if native else _level_py(index, get)
    if len(out) != total:
        raise ValueError(f"the chunks hold {len(out)} bytes, the reference says {total}")
    return out


def _checked(name: bytes, get: Callable[[bytes], bytes | None]) -> bytes:
    """A chunk's content from the store, checked against its name (or the cache of chunks
    whose very stored bytes were checked before); RecordCorrupt names it otherwise."""
    stored = get(name)
    if stored is None:
        label = f"chunk {name.hex()}"
        raise RecordCorrupt(f"{label} is missing from the store", database="chunks", key=label)
    hit = _verified.get(name)
    if hit is not None and hit[0] == stored:  # these very bytes were checked before
        return hit[1]
    try:
        content = _dctx().decompress(stored[1:]) if stored[:1] == _ZSTD_MARK else None
    except zstandard.ZstdError:
        content = None
    if content is None or hashlib.sha256(content).digest() != name:
        return load_chunk(name, stored)  # a raw chunk, or the error that names this one
    _remember(name, stored, content)
    return content


def _level_py(index: bytes, get: Callable[[bytes], bytes | None]) -> bytes:
    """One level of a tree: the concatenated contents of the chunks ``index`` names."""
    seen: dict[bytes, bytes] = {}
    parts = []
    for i in range(0, len(index), DIGEST_SIZE):
        name = index[i : i + DIGEST_SIZE]
        content = seen.get(name)
        if content is None:
            content = seen[name] = _checked(name, get)
        parts.append(content)
    return b"".join(parts)


_SEED = int.from_bytes(os.urandom(8), "little")  # tp_unique_names' hash key


def _level_native(index: bytes, get: Callable[[bytes], bytes | None]) -> Pieces:
    """``_level_py`` with the per-reference work in C: Python checks each distinct chunk."""
    n = len(index) // DIGEST_SIZE
    ids, firsts = (ctypes.c_uint32 * n)(), (ctypes.c_uint32 * n)()
    k = _lib[0].tp_unique_names(index, n, _SEED, ids, firsts)
    if k > n:  # (size_t)-1: no memory for the scratch table
        raise MemoryError("no memory to read a chunk tree")
    return Pieces(ids, [_checked(index[f * DIGEST_SIZE : (f + 1) * DIGEST_SIZE], get) for f in firsts[:k]])


def tree_digests(ref: bytes, get: Callable[[bytes], bytes | None]) -> Iterator[bytes]:
    """Every chunk name a reference uses (index chunks read to find the rest); a missing or
    changed index chunk raises RecordCorrupt."""
    levels, _, index = _parse_ref(ref)
    for level in range(levels, 0, -1):
        yield from _names(index)
        if level > 1:
            parts = []
            for name in _names(index):
                stored = get(name)
                if stored is None:
                    label = f"chunk {name.hex()}"
                    raise RecordCorrupt(f"{label} is missing from the store", database="chunks", key=label)
                parts.append(load_chunk(name, stored))
            index = b"".join(parts)


def _uvarint(v: int) -> bytes:
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def _get_uvarint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("varint cut short or too long")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
