"""Linear-memory deltas against a module's pristine image.

Why deltas: a hibernated agent differs from its freshly instantiated module in a few
pages (stack, a little heap, some globals in .bss). Copying and compressing the whole
linear memory costs about 0.4 ms per MiB; finding the changed chunks without copying
the untouched ones keeps the suspend path inside its budget and the record tiny.

How: the hot loops (the changed-chunk scan, gathering the chunks, XOR against the
image, writing chunks back) are C kernels in ``delta_kernels.c``, built on first use by
``native_build`` and called through ctypes, a few calls per capture or restore. Without
them (no compiler, ``TORPOR_NATIVE=0``) the same answers come from Python: a galloping
scan over libc ``memcmp`` bound through ctypes (comparing ``memoryview`` objects in
CPython walks them byte by byte, about 370 µs per MiB; ``memcmp`` compares in place at
memory bandwidth, about 37 µs per MiB here), and failing that a copy-based scan.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar, cast

from . import native_build
from .errors import SnapshotCorrupt, SnapshotMismatch

if TYPE_CHECKING:
    from typing import TypeAlias

    from typing_extensions import Buffer

    #: A module's pristine image: its bytes (any buffer), or prepared once (PristineImage).
    Pristine: TypeAlias = "Buffer | PristineImage"

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MemoryAt",
    "MemoryDelta",
    "PristineImage",
    "apply_delta",
    "diff_memory",
    "full_copy",
    "touched_pages",
    "xor_into",
    "xor_needed",
    "xor_with_pristine",
]

DEFAULT_CHUNK_SIZE = 4096

# The scan gallops: it compares a window of memory at once, doubles the window (up to
# _MAX_WINDOW) while memory matches and shrinks it by _SHRINK when it does not, down to a
# single chunk. Equal memory is thus read about once, in few large memcmp calls, and a
# changed chunk costs a handful of small ones. Measured with timeit on a 1 MiB memory
# (best of 7, µs per diff, this 2-core machine) against the other designs tried:
#   layout                  galloping  two-level 64K/fanout 4  recursive fanout 8
#   2 chunks changed early      64            72                      100
#   2 chunks changed late       73            73                      128
#   8 chunks scattered         108           139                      245
#   nothing changed             37            47                       34
_MAX_WINDOW = 256 * 1024
_SHRINK = 4


def _load_memcmp() -> Callable[[int, int, int], int] | None:
    """Bind libc ``memcmp`` taking raw addresses, or None where there is no libc.

    Bound through ``PyDLL``, which keeps the GIL during the call: a memcmp of at most
    256 KiB takes microseconds, and a plain ``CDLL`` function releases and re-takes the
    GIL on every call, which in a host with busy threads (wasm workers, the group
    committer) made each diff wait for the GIL some twenty times (measured in the
    runtime: 317 µs per diff instead of 30).
    """
    try:
        libc = ctypes.cdll.msvcrt if sys.platform == "win32" else ctypes.PyDLL(None)
        fn = libc.memcmp
    except (OSError, AttributeError):  # pragma: no cover - platform without libc
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_size_t, ctypes.c_size_t, ctypes.c_size_t]
    return fn


_memcmp = _load_memcmp()

T = TypeVar("T")

_KERNELS_SOURCE = Path(__file__).with_name("delta_kernels.c")
_kernels_lib: list[Any] = []


def _kernels() -> Any:
    """The native delta kernels (delta_kernels.c), or None: then the Python paths run."""
    if _kernels_lib:
        return _kernels_lib[0]
    lib = native_build.load("delta_kernels", _KERNELS_SOURCE)
    if lib is not None:
        sz, p, u8p = ctypes.c_size_t, ctypes.c_void_p, ctypes.c_char_p
        for name, res, args in (
            ("tp_changed_chunks", sz, [p, sz, p, sz, sz, ctypes.c_int, sz, ctypes.c_int, p]),
            ("tp_changed_among", sz, [p, sz, p, sz, sz, p, sz, p]),
            ("tp_gather_xor", ctypes.c_int, [p, sz, p, sz, sz, p, sz, u8p, sz, u8p]),
            ("tp_gather", None, [p, sz, sz, u8p, sz, p]),
            ("tp_scatter", None, [p, sz, sz, u8p, sz, p]),  # src: bytes, or an address (_Tail)
            ("tp_check_indices", sz, [u8p, sz, sz]),
            ("tp_xor_masked", None, [p, sz, p, sz, sz, u8p, sz, u8p, sz]),
            ("tp_encode_payload", ctypes.c_longlong,
             [p, sz, p, sz, ctypes.c_double, u8p, sz, u8p, sz, p, sz, p, sz, sz, sz, u8p, sz]),
            ("tp_read_gaps", ctypes.c_longlong, [u8p, sz, sz, sz, p]),
            ("tp_parse_head", ctypes.c_longlong, [u8p, sz, p, sz, p, p, sz]),
            ("tp_unxor_in_place", None, [p, sz, p, sz, sz, u8p, sz, u8p, sz]),
            ("tp_uvarints", ctypes.c_longlong, [u8p, sz, sz, sz, p]),
            ("tp_pieces_size", sz, [p, sz, p]),
            ("tp_pieces_gather", ctypes.c_int, [p, p, sz, p, p, sz, sz]),
            ("tp_pieces_scatter", ctypes.c_int, [p, sz, sz, u8p, sz, p, sz, p, p, sz]),
        ):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
    _kernels_lib.append(lib)
    return lib
# ctypes.memmove releases the GIL around each call (see _load_memcmp); the same
# function through PYFUNCTYPE keeps it.
_memmove = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t)(
    ctypes.cast(ctypes.memmove, ctypes.c_void_p).value or 0
)


class Pieces:
    """Bytes held as ``n`` references to ``k`` distinct parts, not copied together.

    What a level of a chunk tree is when read back (``snapshots.chunks``): reference
    ``i`` is part ``ids[i]``. A checkpoint's payload kept this way lets a restore copy
    its memory chunks from the parts straight into the instance's memory
    (``tp_pieces_scatter``), one copy of 4.4 MB instead of two at 400 turns of a
    conversation; :meth:`gather` copies out the bytes someone wants as bytes. Needs the
    native kernels (whoever builds one checks that they are there).
    """

    __slots__ = ("_keep", "ids", "lens", "nids", "ptrs", "size")

    def __init__(self, ids: ctypes.Array[ctypes.c_uint32], parts: list[bytes]) -> None:
        """``parts``: the distinct parts (bytes, kept alive here); ``ids``: a part per reference."""
        self._keep = parts
        self.ids = ids
        self.nids = len(ids)
        self.ptrs = (ctypes.c_char_p * len(parts))(*parts)  # the parts' own bytes, not copies
        self.lens = (ctypes.c_size_t * len(parts))(*map(len, parts))
        self.size: int = _kernels().tp_pieces_size(ids, self.nids, self.lens)

    def __len__(self) -> int:
        return self.size

    def gather(self, start: int = 0, end: int | None = None) -> bytes:
        """The bytes ``[start, end)`` of the stream (clamped to it), copied into one bytes."""
        end = self.size if end is None else min(end, self.size)
        start = min(start, end)
        assert _new_bytes is not None
        out = _new_bytes(None, end - start)  # uninitialised: filled before anyone sees it
        if _kernels().tp_pieces_gather(out, self.ids, self.nids, self.ptrs, self.lens, start, end):
            raise ValueError("the pieces hold fewer bytes than they say")  # pragma: no cover - sized at build
        return out


class _Tail:
    """A decoded payload's chunk bytes, ``payload[start:]``, left where they are.

    Why: at 400 turns of ``torpor bench conversation`` the memory section is 4.4 MB of a
    5.2 MB payload, and slicing it out was 0.34 ms of a 2 ms resume, for bytes a restore
    only copies once more, into the instance's memory. The kernels read it by address
    (:meth:`address`), or from the payload's pieces (a :class:`Pieces` payload, never
    copied together); ``bytes()`` copies it out for whoever wants the bytes.
    """

    __slots__ = ("_addr", "payload", "start")

    def __init__(self, payload: bytes | Pieces, start: int) -> None:
        self.payload = payload
        self.start = start
        self._addr = 0

    def __len__(self) -> int:
        return len(self.payload) - self.start

    def __bytes__(self) -> bytes:
        if isinstance(self.payload, Pieces):
            return self.payload.gather(self.start)
        return self.payload[self.start :]

    def view(self) -> memoryview:
        if isinstance(self.payload, Pieces):
            return memoryview(bytes(self))
        return memoryview(self.payload)[self.start :]

    def address(self) -> int:
        """Where the bytes start, in a bytes payload; valid while this object lives. (Never
        changes what it holds: a delta is shared between threads.)"""
        if not self._addr:
            assert isinstance(self.payload, bytes)
            base = ctypes.cast(ctypes.c_char_p(self.payload), ctypes.c_void_p).value or 0
            self._addr = base + self.start  # two threads store the same value
        return self._addr


def _src(stored: bytes | _Tail) -> bytes | int:
    """What a kernel's ``void *`` source parameter takes for a delta's stored bytes (the
    caller holds the result for the call: pieces are copied together into it)."""
    if isinstance(stored, _Tail):
        return bytes(stored) if isinstance(stored.payload, Pieces) else stored.address()
    return stored


class MemoryDelta:
    """The chunks of a linear memory that differ from the module's pristine image.

    ``memory_size`` is the size of the memory that was diffed (in bytes; a restore must
    grow the fresh instance's memory to exactly this size before applying),
    ``chunk_size`` the granularity, and ``chunks`` the ascending
    ``(chunk_index, current_bytes)`` pairs. Every chunk is ``chunk_size`` bytes long
    except a final chunk cut short by the end of memory.

    Stored packed: the indices as one array of native uint32 (``index_bytes``) and the
    chunks' bytes concatenated in index order (``data``), which is what the native
    kernels read and write and what the snapshot format stores, so a suspension never
    builds one Python object per chunk. Immutable, so that a Snapshot holding it can be
    shared between threads.
    """

    __slots__ = ("_index", "_stored", "chunk_size", "memory_size")

    memory_size: int
    chunk_size: int
    _index: bytes
    # (bytes, None): the chunks' bytes. (bytes, image): the chunks as the snapshot format
    # stores them, XOR'd with the pristine ``image`` over its non-zero chunks; a restore
    # writes them to memory un-XOR-ing on the way (apply_delta), one copy instead of
    # three, and ``data`` computes the plain bytes only when asked. One attribute, so
    # that a thread reading it never sees a half-updated pair. The bytes may be a _Tail
    # of the decoded payload (``packed(start=)``): not copied out of it.
    _stored: tuple[bytes | _Tail, Pristine | None]

    def __init__(
        self, memory_size: int, chunk_size: int, chunks: Iterable[tuple[int, bytes]] = ()
    ) -> None:
        pairs = tuple(chunks)
        _set(self, memory_size, chunk_size, array("I", (i for i, _ in pairs)).tobytes(),
             b"".join(bytes(d) for _, d in pairs))
        _validate_indices(self)
        for index, data in pairs:
            expected = min(chunk_size, memory_size - index * chunk_size)
            if len(data) != expected:
                raise ValueError(f"chunk {index} holds {len(data)} bytes, expected {expected}")

    @classmethod
    def packed(cls, memory_size: int, chunk_size: int, index_bytes: bytes, data: bytes | Pieces, *,
               xor_with: Pristine | None = None, start: int | None = None) -> MemoryDelta:
        """A delta from its packed form (native uint32 indices, concatenated chunks); validated.

        ``xor_with``: ``data`` is stored as the snapshot format stores it, XOR'd with this
        pristine image over its non-zero chunks (see ``_stored``). ``start``: the chunks
        are ``data[start:]`` (``data`` is bytes or :class:`Pieces`), kept there rather
        than copied out.
        """
        self = cls.__new__(cls)
        stored: bytes | _Tail
        if start is None:
            stored = data.gather() if isinstance(data, Pieces) else bytes(data)
        else:
            stored = _Tail(data if isinstance(data, Pieces) else bytes(data), start)
        _set(self, memory_size, chunk_size, bytes(index_bytes), stored)
        _validate_indices(self)
        n = len(self._index) // 4
        expected = _packed_size(memoryview(self._index).cast("I"), n, chunk_size, memory_size)
        if len(stored) != expected:
            raise ValueError(f"the chunks hold {len(stored)} bytes, expected {expected} for {n} chunks")
        if xor_with is not None and xor_needed(chunk_size, self._index, xor_with):
            object.__setattr__(self, "_stored", (self._stored[0], xor_with))
        return self

    @classmethod
    def _trusted(cls, memory_size: int, chunk_size: int, index_bytes: bytes, data: bytes) -> MemoryDelta:
        """Built by code that guarantees the invariants (the kernels, a validated twin)."""
        self = cls.__new__(cls)
        _set(self, memory_size, chunk_size, index_bytes, data)
        return self

    @property
    def index_bytes(self) -> bytes:
        """The chunk indices, ascending, as native-endian uint32 (4 bytes each)."""
        return self._index

    @property
    def data(self) -> bytes:
        """The changed chunks' bytes, concatenated in index order."""
        stored, ref = self._stored
        if ref is None:
            if isinstance(stored, _Tail):
                stored = bytes(stored)
                object.__setattr__(self, "_stored", (stored, None))
            return stored
        buf = bytearray(stored.view() if isinstance(stored, _Tail) else stored)
        xor_into(buf, 0, self.memory_size, self.chunk_size, self._index, ref)
        raw = bytes(buf)
        object.__setattr__(self, "_stored", (raw, None))
        return raw

    @property
    def indices(self) -> tuple[int, ...]:
        return tuple(memoryview(self._index).cast("I")) if self._index else ()

    @property
    def chunks(self) -> tuple[tuple[int, bytes], ...]:
        out = []
        pos = 0
        data = self.data
        for i in self.indices:
            n = min(self.chunk_size, self.memory_size - i * self.chunk_size)
            out.append((i, data[pos : pos + n]))
            pos += n
        return tuple(out)

    @property
    def changed_bytes(self) -> int:
        """Total size of the changed chunks (what a raw encoding would have to store)."""
        return len(self._stored[0])

    def offsets(self) -> Iterator[tuple[int, bytes]]:
        """The changed chunks as ``(byte_offset, bytes)`` pairs."""
        for index, data in self.chunks:
            yield index * self.chunk_size, data

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"MemoryDelta is immutable (cannot set {name!r})")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MemoryDelta):
            return NotImplemented
        return (self.memory_size, self.chunk_size, self._index, self.data) == (
            other.memory_size, other.chunk_size, other._index, other.data)

    def __hash__(self) -> int:
        return hash((self.memory_size, self.chunk_size, self._index, self.data))

    def __repr__(self) -> str:
        return (f"MemoryDelta(memory_size={self.memory_size}, chunk_size={self.chunk_size}, "
                f"indices={list(self.indices)}, changed_bytes={self.changed_bytes})")


def _set(d: MemoryDelta, memory_size: int, chunk_size: int, index: bytes, data: bytes | _Tail) -> None:
    object.__setattr__(d, "memory_size", memory_size)
    object.__setattr__(d, "chunk_size", chunk_size)
    object.__setattr__(d, "_index", index)
    object.__setattr__(d, "_stored", (data, None))


def _validate_indices(d: MemoryDelta) -> None:
    """Sizes sane; indices strictly ascending and inside the memory."""
    chunk_size, memory_size = d.chunk_size, d.memory_size
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if memory_size < 0:
        raise ValueError(f"memory_size must be >= 0, got {memory_size}")
    if len(d._index) % 4:
        raise ValueError("index_bytes must hold whole uint32 indices")
    nchunks = -(-memory_size // chunk_size)
    n = len(d._index) // 4
    if n == 0:
        return
    idx = memoryview(d._index).cast("I")
    lib = _kernels()
    if lib is not None:
        bad = lib.tp_check_indices(d._index, n, nchunks)
    else:
        bad = 0
        last = -1
        for pos, index in enumerate(idx):
            if index <= last or index >= nchunks:
                bad = pos + 1
                break
            last = index
    if bad:
        index = idx[bad - 1]
        if bad > 1 and index <= idx[bad - 2]:
            raise ValueError(f"chunk indices must be strictly ascending, got {index} after {idx[bad - 2]}")
        raise ValueError(
            f"chunk {index} lies outside a memory of {memory_size} bytes "
            f"({nchunks} chunks of {chunk_size})"
        )


class MemoryAt(NamedTuple):
    """A memory by address and size (a Wasmtime linear memory), diffed or written in place
    without wrapping it in a buffer object first. The caller keeps it mapped for the call."""

    addr: int
    size: int


class PristineImage:
    """A module's pristine linear memory, prepared once for every capture, encode and restore.

    Whatever takes a ``pristine`` image takes one of these as well as its bytes. Given
    bytes, each call finds their address and looks up what is derived from them (the
    non-zero-chunk mask, the zstd dictionary) in a process-wide cache: a few µs a
    call, a dozen calls a suspension. A host keeps one of these per loaded module.
    """

    __slots__ = ("_derived", "_keep", "addr", "data", "size")

    def __init__(self, data: Buffer) -> None:
        self.data: bytes = data if isinstance(data, bytes) else bytes(memoryview(data))
        ptr = ctypes.c_char_p(self.data)
        self._keep = ptr  # the address below stays valid while self.data lives
        self.addr: int = ctypes.cast(ptr, ctypes.c_void_p).value or 0
        self.size: int = len(self.data)
        self._derived: dict[str, Any] = {}

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return self.data

    def __repr__(self) -> str:
        return f"PristineImage({self.size} bytes)"

    def derived(self, what: str, build: Callable[[bytes], T]) -> T:
        """``build(self.data)``, computed once per ``what``."""
        try:
            value: T = self._derived[what]
        except KeyError:
            # Two threads may both build; the first value stored is the one kept.
            value = self._derived.setdefault(what, build(self.data))
        return value


class _Region:
    """A raw address and length for a buffer, keeping its owner alive while in use."""

    __slots__ = ("addr", "keep", "size")

    def __init__(self, addr: int, size: int, keep: object) -> None:
        self.addr = addr
        self.size = size
        self.keep = keep


def _region(buf: Buffer | MemoryAt | PristineImage, *, writable: bool = False) -> _Region:
    """Find the address of a buffer without copying it when at all possible.

    ctypes arrays (how the host maps Wasmtime's linear memory) and ``bytes`` give their
    address directly; other writable buffers through ``from_buffer``. A read-only
    buffer that is not ``bytes`` is copied once (rare: the host never hands one over).
    """
    if isinstance(buf, MemoryAt):
        return _Region(buf.addr, buf.size, None)
    if isinstance(buf, PristineImage):
        if writable:
            raise ValueError("a PristineImage is read-only; pass a writable buffer")
        return _Region(buf.addr, buf.size, buf)
    if isinstance(buf, ctypes.Array):
        return _Region(ctypes.addressof(buf), ctypes.sizeof(buf), buf)
    if isinstance(buf, bytes) and not writable:
        ptr = ctypes.c_char_p(buf)
        addr = ctypes.cast(ptr, ctypes.c_void_p).value
        return _Region(addr or 0, len(buf), (buf, ptr))
    view = memoryview(buf)
    if not view.c_contiguous:
        raise ValueError("memory buffers must be C-contiguous")
    size = view.nbytes
    if view.readonly:
        if writable:
            raise ValueError("the target memory buffer is read-only; pass a writable buffer")
        return _region(view.tobytes())
    if size == 0:
        return _Region(0, 0, view)
    arr = (ctypes.c_char * size).from_buffer(view)
    return _Region(ctypes.addressof(arr), size, (view, arr))


_zero_page: ctypes.Array[ctypes.c_char] | None = None


def _zeros_addr(size: int) -> int:
    """Address of a static all-zero buffer of at least ``size`` bytes (the largest window)."""
    global _zero_page
    if _zero_page is None or ctypes.sizeof(_zero_page) < size:
        _zero_page = ctypes.create_string_buffer(size)
    return ctypes.addressof(_zero_page)


def _gallop(
    memcmp: Callable[[int, int, int], int],
    caddr: int,
    refaddr: int,
    ref_moves: bool,
    start: int,
    end: int,
    chunk_size: int,
    out: list[int],
) -> None:
    """Append to ``out`` the chunks of [start, end) that differ from the reference.

    ``start`` is chunk-aligned. The reference is ``refaddr + offset`` when ``ref_moves``
    (the pristine image) or the fixed zero buffer at ``refaddr`` otherwise (memory past
    the pristine image, which a fresh instance grown as far holds as zeros).
    """
    pos = start
    window = chunk_size
    max_window = _MAX_WINDOW if chunk_size < _MAX_WINDOW else chunk_size
    append = out.append
    while pos < end:
        if window > end - pos:
            window = end - pos
        ref = refaddr + pos if ref_moves else refaddr
        if memcmp(caddr + pos, ref, window) == 0:
            pos += window
            if window < max_window:
                window *= 2
        elif window <= chunk_size:
            append(pos // chunk_size)
            pos += chunk_size
            window = chunk_size
        else:
            window = max(chunk_size, (window // _SHRINK) // chunk_size * chunk_size)


def _changed_chunks_memcmp(
    memcmp: Callable[[int, int, int], int],
    pristine: _Region,
    current: _Region,
    chunk_size: int,
    lo: int = 0,
    hi: int | None = None,
) -> list[int]:
    """Indices of the chunks of ``current[lo:hi]`` that differ from ``pristine`` (zero past
    its end); ``lo`` is chunk-aligned."""
    n = current.size if hi is None else hi
    plen = pristine.size
    out: list[int] = []
    aligned = plen - plen % chunk_size
    if lo < aligned:
        _gallop(memcmp, current.addr, pristine.addr, True, lo, min(aligned, n), chunk_size, out)
    if aligned < plen and lo <= aligned < n:
        # The one chunk holding the end of the pristine image: compare its two halves.
        end = min(aligned + chunk_size, current.size)
        tail = end - plen
        if memcmp(current.addr + aligned, pristine.addr + aligned, plen - aligned) != 0 or (
            tail > 0 and ctypes.string_at(current.addr + plen, tail) != bytes(tail)
        ):
            out.append(aligned // chunk_size)
        aligned = end
    start = max(lo, aligned)
    if start < n:
        zeros = _zeros_addr(max(_MAX_WINDOW, chunk_size))
        _gallop(memcmp, current.addr, zeros, False, start, n, chunk_size, out)
    return out


# Pages the process never touched need not be read at all. Reading them is what costs:
# memcmp over a freshly instantiated 128 KiB memory faults in ~25 untouched pages (about
# 60 µs of the ~85 µs a fresh agent's diff took), and a 1 MiB agent ~230. Linux's
# /proc/self/pagemap says, 8 bytes per page, whether a page is present (bit 63) or
# swapped (bit 62); a page that is neither has never been written (or was dropped), so
# it reads as what its mapping is backed by: zeros for anonymous memory, the module's
# data image for Wasmtime's copy-on-write image mapping. That is the pristine image
# only for memory laid out the way Wasmtime lays out a fresh instance, so callers opt
# in (``untouched_is_pristine``); everything else is compared in full.
#
# A present page can be skipped too when it is a page of the backing file (bit 61,
# "file page or shared anonymous") of a MAP_PRIVATE mapping: in Wasmtime's mapping of
# its image memfd, a page the guest only read is the file's own page, and its first
# write replaces it with an anonymous copy. A 12.6 MiB Python image has ~850 pages
# present after a few awaits, of which ~150 were written: the capture compares those
# only (issue 26, item 4). Only for private mappings (``private_mapping``): a written
# page of a MAP_SHARED mapping stays a file page. Every linear memory here is private
# (validate.py refuses shared memories; Wasmtime and the memory pool map them private).
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_pagemap_fd: int | None = None
_pagemap_file_bit = False  # whether bit 61 was seen to tell a read page of a private file mapping from a written one
_pagemap_lock = threading.Lock()
_PM_PRESENT = 1 << 63
_PM_SWAPPED = 1 << 62
_PM_FILE = 1 << 61
_PM_PRESENT_OR_SWAPPED = _PM_PRESENT | _PM_SWAPPED


def _pagemap() -> int | None:
    """An open /proc/self/pagemap that tells the truth, or None.

    Truth is checked once: a page just written must read as present. A sandbox that
    emulates the file with zeros would otherwise make a capture skip changed chunks,
    which would silently lose agent state; then every chunk is compared instead.
    """
    global _pagemap_fd, _pagemap_file_bit
    if _pagemap_fd is None:
        with _pagemap_lock:
            if _pagemap_fd is None:
                fd = _open_truthful_pagemap()
                _pagemap_file_bit = fd >= 0 and _file_bit_truthful(fd)
                _pagemap_fd = fd
    return None if _pagemap_fd < 0 else _pagemap_fd


def _entry(fd: int, addr: int) -> int:
    raw = os.pread(fd, 8, 8 * (addr // _PAGE))
    return int.from_bytes(raw, sys.byteorder) if len(raw) == 8 else -1


def _open_truthful_pagemap() -> int:
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return -1
    ok = False
    try:
        import mmap

        probe = mmap.mmap(-1, _PAGE)
        try:
            probe[0] = 1
            ref = ctypes.c_char.from_buffer(probe)
            addr = ctypes.addressof(ref)
            del ref  # release the export before the mapping is closed
            e = _entry(fd, addr)
            ok = e >= 0 and bool(e & _PM_PRESENT_OR_SWAPPED)
        finally:
            probe.close()
    except (OSError, ValueError, BufferError):
        ok = False
    if not ok:
        os.close(fd)
        return -1
    return fd


def _file_bit_truthful(fd: int) -> bool:
    """Whether the kernel marks a read page of a private file mapping as a file page and
    the same page, once written, as not one: only then may a capture skip file pages."""
    if not hasattr(os, "memfd_create"):
        return False
    try:
        import mmap

        mfd = os.memfd_create("torpor-pagemap-probe", getattr(os, "MFD_CLOEXEC", 0))
        try:
            os.write(mfd, b"\x01" * _PAGE)
            m = mmap.mmap(mfd, _PAGE, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(mfd)
        try:
            ref = ctypes.c_char.from_buffer(m)
            addr = ctypes.addressof(ref)
            del ref
            if m[0] != 1:
                return False
            read = _entry(fd, addr)
            m[0] = 2
            written = _entry(fd, addr)
        finally:
            m.close()
    except (OSError, ValueError, BufferError):
        return False
    return (read >= 0 and bool(read & _PM_PRESENT) and bool(read & _PM_FILE)
            and written >= 0 and bool(written & _PM_PRESENT) and not written & _PM_FILE)


def _maybe_written(e: int, skip_file: bool) -> bool:
    """The Python twin of delta_kernels.c's maybe_written."""
    if e & _PM_SWAPPED:
        return True
    if not e & _PM_PRESENT:
        return False
    return not (skip_file and e & _PM_FILE)


def _forget_pagemap() -> None:
    """A forked child's inherited descriptor describes its parent's memory: reopen."""
    global _pagemap_fd
    if _pagemap_fd is not None and _pagemap_fd >= 0:
        with contextlib.suppress(OSError):
            os.close(_pagemap_fd)
    _pagemap_fd = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pagemap)


def _touched_chunks(reg: _Region, chunk_size: int, private_mapping: bool = False) -> list[int] | None:
    """Indices of the chunks of ``reg`` with at least one page that may have been written
    (:func:`_maybe_written`; file pages are skipped only in a ``private_mapping``), or
    None when the kernel cannot tell (no pagemap), in which case every chunk is a candidate."""
    fd = _pagemap()
    if fd is None or reg.size == 0:
        return None
    skip_file = private_mapping and _pagemap_file_bit
    first = reg.addr // _PAGE
    last = (reg.addr + reg.size - 1) // _PAGE
    try:
        raw = os.pread(fd, 8 * (last - first + 1), 8 * first)
    except OSError:
        return None
    if len(raw) != 8 * (last - first + 1):
        return None
    entries = memoryview(raw).cast("Q")
    out: list[int] = []
    base = reg.addr
    nchunks = -(-reg.size // chunk_size)
    if chunk_size == _PAGE and base % _PAGE == 0:
        for i, e in enumerate(entries):
            if _maybe_written(e, skip_file):
                out.append(i)
        return out
    for c in range(nchunks):
        lo = (base + c * chunk_size) // _PAGE - first
        hi = (base + min((c + 1) * chunk_size, reg.size) - 1) // _PAGE - first
        if any(_maybe_written(entries[p], skip_file) for p in range(lo, hi + 1)):
            out.append(c)
    return out


def touched_pages(addr: int, size: int) -> list[int] | None:
    """Indices of the pages of ``[addr, addr + size)`` the kernel reports present or
    swapped, or None when it cannot tell."""
    return _touched_chunks(_region(MemoryAt(addr, size)), _PAGE)


def _changed_among(
    memcmp: Callable[[int, int, int], int],
    pristine: _Region,
    current: _Region,
    chunk_size: int,
    candidates: list[int],
) -> list[int]:
    """Which of the ``candidates`` chunks differ from the pristine image (zeros past it).

    Consecutive candidates are scanned as one run with the galloping scan, so memory
    that is all present (grown by a copy) costs what a full scan costs, not more.
    """
    out: list[int] = []
    n = current.size
    i = 0
    while i < len(candidates):
        j = i
        while j + 1 < len(candidates) and candidates[j + 1] == candidates[j] + 1:
            j += 1
        lo = candidates[i] * chunk_size
        hi = min((candidates[j] + 1) * chunk_size, n)
        out += _changed_chunks_memcmp(memcmp, pristine, current, chunk_size, lo, hi)
        i = j + 1
    return out


def _changed_chunks_copy(pristine: bytes, current: bytes, chunk_size: int) -> list[int]:
    """Copy-based fallback of ``_changed_chunks_memcmp`` for platforms without memcmp."""
    out: list[int] = []
    for start in range(0, len(current), chunk_size):
        ref = pristine[start : start + chunk_size]
        chunk = current[start : start + chunk_size]
        if len(ref) < len(chunk):
            ref += bytes(len(chunk) - len(ref))
        if chunk != ref:
            out.append(start // chunk_size)
    return out


def diff_memory(
    pristine: Pristine,
    current: Buffer | MemoryAt,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    *,
    untouched_is_pristine: bool = False,
    private_mapping: bool = False,
    candidates: Sequence[int] | None = None,
) -> MemoryDelta:
    """Return the chunks of ``current`` that differ from the module's ``pristine`` image.

    ``current`` is read in place (a ctypes array over Wasmtime's memory, or any buffer)
    and may be larger than ``pristine`` when the agent grew its memory; the excess is
    compared against zeros, which is what a fresh instance grown to the same size holds.
    Only the changed chunks are copied out.

    ``untouched_is_pristine``: ``current`` is a linear memory mapped the way Wasmtime
    maps a fresh instance (anonymous zero pages, the data image copy-on-write), so a
    page the kernel reports as never touched equals the pristine image and is skipped
    without being read (see ``_touched_chunks``). Same answer, a fraction of the time.
    ``private_mapping`` (with it): ``current`` is mapped MAP_PRIVATE, as every linear
    memory is, so a page of its backing file that the guest only read (Wasmtime's
    copy-on-write image) is skipped too.

    ``candidates``: ascending chunk indices outside of which the caller knows ``current``
    equals the pristine image (write tracking, host/sandbox/write_watch.py): only they
    are compared. The other options are then ignored.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    preg = _region(pristine)
    creg = _region(current)
    if preg.size > creg.size:
        raise SnapshotMismatch(
            f"current memory is {creg.size} bytes but the pristine image is {preg.size} bytes: "
            "a linear memory never shrinks, so this pristine image is not from this agent's module"
        )
    lib = _kernels()
    if lib is not None:
        return _diff_native(lib, pristine, preg, creg, chunk_size, untouched_is_pristine,
                            untouched_is_pristine and private_mapping, candidates)
    if _memcmp is not None:
        if candidates is not None:
            touched: list[int] | None = list(candidates)
        else:
            touched = _touched_chunks(creg, chunk_size, private_mapping) if untouched_is_pristine else None
        if touched is not None:
            indices = _changed_among(_memcmp, preg, creg, chunk_size, touched)
        else:
            indices = _changed_chunks_memcmp(_memcmp, preg, creg, chunk_size)
        chunks = tuple(
            (
                i,
                ctypes.string_at(
                    creg.addr + i * chunk_size, min(chunk_size, creg.size - i * chunk_size)
                ),
            )
            for i in indices
        )
    else:  # pragma: no cover - exercised through monkeypatching in tests
        cur = ctypes.string_at(creg.addr, creg.size) if creg.size else b""
        pri = ctypes.string_at(preg.addr, preg.size) if preg.size else b""
        indices = _changed_chunks_copy(pri, cur, chunk_size)
        chunks = tuple((i, cur[i * chunk_size : (i + 1) * chunk_size]) for i in indices)
    return MemoryDelta(creg.size, chunk_size, chunks)


def _packed_size(index: Any, n: int, chunk_size: int, memory_size: int) -> int:
    """Bytes of ``n`` chunks whose last index is ``index[n - 1]`` (the memory's end may cut it)."""
    if n == 0:
        return 0
    last: int = index[n - 1]
    return n * chunk_size - max(0, (last + 1) * chunk_size - memory_size)


_scratch = threading.local()


def _index_scratch(nchunks: int) -> ctypes.Array[ctypes.c_uint32]:
    """A per-thread array with room for ``nchunks`` indices, reused across captures."""
    buf: ctypes.Array[ctypes.c_uint32] | None = getattr(_scratch, "idx", None)
    if buf is None or len(buf) < nchunks:
        buf = _scratch.idx = (ctypes.c_uint32 * max(nchunks, 1024))()
    return buf


# A bytes object of a given size, uninitialised: the kernels fill it before anyone else
# sees it. Gathering straight into the delta's bytes skips a zero-fill and a copy, and
# fresh memory from the allocator is warm in cache where a long-lived scratch buffer,
# untouched since the previous capture, is not (measured: 13 µs more for 53 KiB).
def _bytes_maker() -> Callable[[None, int], bytes] | None:
    try:
        fn = ctypes.pythonapi.PyBytes_FromStringAndSize
    except AttributeError:  # pragma: no cover - not CPython: gather into a buffer and copy
        return None
    fn.restype = ctypes.py_object
    fn.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]
    return cast("Callable[[None, int], bytes]", fn)


_new_bytes = _bytes_maker()


def _diff_native(lib: Any, pristine: Pristine, preg: _Region, creg: _Region, chunk_size: int,
                 untouched: bool, private_mapping: bool, candidates: Sequence[int] | None = None) -> MemoryDelta:
    """Scan, then gather with the chunks over non-zero pristine bytes XOR'd.

    The delta then holds its chunks as the snapshot format stores them (``_stored``
    with the image), so encoding copies them as they are and ``data`` un-XORs only if
    someone asks for the plain bytes.
    """
    nchunks = -(-creg.size // chunk_size)
    fd = _pagemap() if untouched else None
    idx = _index_scratch(nchunks)
    if candidates is not None:
        cand = (ctypes.c_uint32 * max(len(candidates), 1))(*candidates)
        n = lib.tp_changed_among(creg.addr, creg.size, preg.addr, preg.size, chunk_size, cand, len(candidates), idx)
    else:
        n = lib.tp_changed_chunks(creg.addr, creg.size, preg.addr, preg.size, chunk_size,
                                  -1 if fd is None else fd, _PAGE, int(private_mapping and _pagemap_file_bit), idx)
    if n == 0:
        return MemoryDelta._trusted(creg.size, chunk_size, b"", b"")
    # Stored XOR'd only against an image that cannot change under the delta.
    mask = (_nonzero_pristine_mask(pristine, chunk_size)
            if preg.size and isinstance(pristine, (bytes, PristineImage)) else b"")
    total = _packed_size(idx, n, chunk_size, creg.size)  # > 0: every chunk has a byte
    out = _new_bytes(None, total) if _new_bytes is not None else ctypes.create_string_buffer(total)
    xored = lib.tp_gather_xor(creg.addr, creg.size, preg.addr, preg.size, chunk_size, idx, n,
                              mask, len(mask), out)
    data = out if isinstance(out, bytes) else out.raw
    # Built by the kernels from a real memory: the invariants hold by construction.
    delta = MemoryDelta._trusted(creg.size, chunk_size, ctypes.string_at(idx, 4 * n), data)
    if xored:
        object.__setattr__(delta, "_stored", (data, pristine))
    return delta


def same_image(a: Pristine | None, b: Pristine | None) -> bool:
    """Whether ``a`` and ``b`` are the same immutable pristine image (bytes or prepared)."""
    if a is None or b is None:
        return False
    if a is b:
        return True
    da = a.data if isinstance(a, PristineImage) else a
    db = b.data if isinstance(b, PristineImage) else b
    return da is db and isinstance(da, bytes)


def xor_with_pristine(delta: MemoryDelta, data: bytes, pristine: Pristine) -> bytes:
    """``data`` laid out as ``delta.data`` (same indices), each chunk XOR'd with the
    pristine image under it (zeros past its end, where XOR changes nothing).

    The snapshot format stores chunks this way (its flag bit 0): a chunk that shares a
    page with data segments then compresses to the bytes that really changed. XOR is
    its own inverse, so the same call decodes.
    """
    out = bytearray(data)
    xor_into(out, 0, delta.memory_size, delta.chunk_size, delta.index_bytes, pristine)
    return bytes(out)


def xor_into(buf: bytearray, start: int, memory_size: int, chunk_size: int, index_bytes: bytes,
             pristine: Pristine) -> bool:
    """XOR, in place, the chunks laid out in ``buf[start:]`` (packed, as ``MemoryDelta.data``
    with these indices) with the pristine image under each; False if nothing changed.

    Only chunks over non-zero pristine bytes are touched (XOR with zeros is the
    identity): in a C guest that is the page or two of data segments, while most
    changed chunks (stack, heap) lie over zeros. The caller has checked that the
    indices lie inside ``memory_size`` and that ``buf[start:]`` holds their bytes.
    """
    mask = _xor_mask(chunk_size, index_bytes, pristine)
    if mask is None:
        return False
    n = len(index_bytes) // 4
    indices = memoryview(index_bytes).cast("I")
    preg = _region(pristine)
    lib = _kernels()
    if lib is not None:
        addr = ctypes.addressof(ctypes.c_char.from_buffer(buf, start))
        lib.tp_xor_masked(addr, memory_size, preg.addr, preg.size, chunk_size, index_bytes, n, mask, len(mask))
        return True
    pos = start
    for i in indices:
        off = i * chunk_size
        length = min(chunk_size, memory_size - off)
        if i < len(mask) and mask[i]:
            m = max(0, min(length, preg.size - off))
            ref = ctypes.string_at(preg.addr + off, m)
            x = int.from_bytes(buf[pos : pos + m], "little") ^ int.from_bytes(ref, "little")
            buf[pos : pos + m] = x.to_bytes(m, "little")
        pos += length
    return True


def xor_needed(chunk_size: int, index_bytes: bytes, pristine: Pristine) -> bool:
    """Whether any of these chunks lies over non-zero pristine bytes (see :func:`xor_into`)."""
    return _xor_mask(chunk_size, index_bytes, pristine) is not None


def _xor_mask(chunk_size: int, index_bytes: bytes, pristine: Pristine) -> bytes | None:
    """The image's non-zero-chunk mask if any of these chunks lies under it, else None."""
    if not index_bytes:
        return None
    mask, nonzero = _nonzero_chunks(pristine, chunk_size)
    if nonzero.isdisjoint(memoryview(index_bytes).cast("I")):  # one C-level pass
        return None
    return mask


# Values derived from a pristine image, by image and what was derived. Bytes are
# immutable, so the object is its content; the cache keeps it alive so that its id
# stays unique. Any other buffer is read and derived from anew each time.
_derived: dict[tuple[int, str], tuple[object, Any]] = {}
_derived_lock = threading.Lock()


def derived_from_image(pristine: Pristine, what: str, build: Callable[[bytes], T]) -> T:
    """``build(image bytes)``, computed once per (pristine image, ``what``)."""
    if isinstance(pristine, PristineImage):
        return pristine.derived(what, build)
    key = (id(pristine), what)
    if isinstance(pristine, bytes):
        hit = _derived.get(key)
        if hit is not None and hit[0] is pristine:
            value: T = hit[1]
            return value
        data = pristine
    else:
        reg = _region(pristine)
        data = ctypes.string_at(reg.addr, reg.size) if reg.size else b""
    value = build(data)
    if isinstance(pristine, bytes):
        with _derived_lock:
            if len(_derived) >= 512:
                _derived.clear()
            _derived[key] = (pristine, value)
    return value


def _nonzero_pristine_mask(pristine: Pristine, chunk_size: int) -> bytes:
    """One byte per chunk of the image: 1 where the chunk holds a non-zero byte."""
    return _nonzero_chunks(pristine, chunk_size)[0]


def _nonzero_chunks(pristine: Pristine, chunk_size: int) -> tuple[bytes, frozenset[int]]:
    """The image's non-zero-chunk mask, and the set of those chunks, derived once."""

    def build(data: bytes) -> tuple[bytes, frozenset[int]]:
        zero = bytes(chunk_size)
        mask = bytes(
            data[i * chunk_size : (i + 1) * chunk_size] != zero[: len(data) - i * chunk_size]
            for i in range(-(-len(data) // chunk_size))
        )
        return mask, frozenset(i for i, nz in enumerate(mask) if nz)

    return derived_from_image(pristine, f"nonzero-chunks/{chunk_size}", build)


def apply_delta(delta: MemoryDelta, target: Buffer | MemoryAt) -> None:
    """Write the changed chunks of ``delta`` into ``target``.

    ``target`` must already hold the module's pristine image (a freshly instantiated
    module's memory) grown to exactly ``delta.memory_size`` bytes: a memory of another
    size would make ``memory.size`` answer differently after the restore.
    """
    reg = _region(target, writable=True)
    if reg.size != delta.memory_size:
        raise SnapshotMismatch(
            f"target memory is {reg.size} bytes but the snapshot was taken of a "
            f"{delta.memory_size}-byte memory: grow the fresh instance's memory to "
            f"{delta.memory_size} bytes before applying"
        )
    n = len(delta.index_bytes) // 4
    if n == 0:
        return
    lib = _kernels()
    if lib is not None:
        # MemoryDelta guarantees every chunk lies inside memory_size == reg.size.
        stored, ref = delta._stored
        if isinstance(stored, _Tail) and isinstance(stored.payload, Pieces):
            pc = stored.payload  # from the parts straight into memory: one copy
            if lib.tp_pieces_scatter(reg.addr, reg.size, delta.chunk_size, delta.index_bytes, n, pc.ids, pc.nids,
                                     pc.ptrs, pc.lens, stored.start):
                raise SnapshotCorrupt("the checkpoint's pieces hold fewer bytes than its chunks")  # pragma: no cover
        else:
            lib.tp_scatter(reg.addr, reg.size, delta.chunk_size, delta.index_bytes, n, _src(stored))
        if ref is not None:  # un-XOR in place, in memory (see MemoryDelta._stored)
            mask = _nonzero_pristine_mask(ref, delta.chunk_size)
            preg = _region(ref)
            lib.tp_unxor_in_place(reg.addr, reg.size, preg.addr, preg.size, delta.chunk_size,
                                  delta.index_bytes, n, mask, len(mask))
        return
    for offset, data in delta.offsets():
        if offset + len(data) > reg.size:  # guarded by MemoryDelta, kept as a last line
            raise SnapshotCorrupt(f"chunk at offset {offset} does not fit a {reg.size}-byte memory")
        _memmove(reg.addr + offset, data, len(data))


def full_copy(current: Buffer) -> bytes:
    """Copy the whole memory: the naive baseline the benchmarks compare deltas with."""
    reg = _region(current)
    return ctypes.string_at(reg.addr, reg.size) if reg.size else b""
