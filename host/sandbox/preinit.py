"""Pre-initialisation: a module's state after an init export, written back as its pristine image.

The idea of Wizer, done with what Torpor already has: instantiate a module once at build
time, call an export that does the expensive set-up (for the JS runtime: create the
QuickJS runtime and context, evaluate the ``torpor`` module, compile the agent), then
write the resulting linear memory and mutable globals back into the module as its data
segments, initial memory size and global initialisers. Every instance made from the
result starts where the init left off, so a spawn neither parses nor compiles, and the
host's memory deltas are taken against that image (a checkpoint holds only what the
agent changed since).

Only what a Torpor guest can hold is rewritten: one defined memory, globals of the four
number types with constant initialisers, active data segments. The init runs in its own
Wasmtime store under a fuel budget and a memory cap, with imports that answer nothing
(no input, no tools): it is the author's code, run by the builder, and must not be able
to take the build with it.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from host.errors import ModuleError
from host.sandbox.wasm_binary import Reader, _leb_encode

_SEC_GLOBAL, _SEC_EXPORT, _SEC_MEMORY, _SEC_DATA, _SEC_DATACOUNT = 6, 7, 5, 11, 12
_KIND_GLOBAL = 3
_I32, _I64, _F32, _F64 = 0x7F, 0x7E, 0x7D, 0x7C

#: Zero runs shorter than this stay inside a data segment. Why 2 KiB: every segment is
#: one more copy when Wasmtime instantiates the module, which is every spawn and every
#: resume; the JS runtime's image cut at 64-byte gaps was 400 segments, at 2 KiB 16, and
#: in alternated runs of `torpor bench js`'s loop that took spawn from 209 to 151 µs and
#: resume from 290 to 259 µs (bench/RESULTS.md). Below a page, so a whole zero page is
#: never written (a page nothing writes stays unmapped and is skipped by every capture).
_MIN_GAP = 2048
_MAX_SEGMENTS = 4_000


@dataclass(frozen=True)
class Image:
    """What an instance held after its init: memory bytes and global values by index."""

    memory: bytes
    globals: dict[int, int | float]


def _sleb_encode(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        done = (value == 0 and not byte & 0x40) or (value == -1 and byte & 0x40)
        out.append(byte if done else byte | 0x80)
        if done:
            return bytes(out)


def _vec(items: list[bytes]) -> bytes:
    return _leb_encode(len(items)) + b"".join(items)


def _sections(wasm: bytes) -> list[tuple[int, bytes]]:
    r = Reader(wasm, 8)
    out: list[tuple[int, bytes]] = []
    while r.left:
        sid = r.byte()
        size = r.u32()
        if size > r.left:
            raise r.fail("section runs past the end of the module")
        out.append((sid, wasm[r.pos:r.pos + size]))
        r.pos += size
    return out


def _const_expr(r: Reader) -> None:
    """Skip one constant expression (number constants and global.get), through its ``end``."""
    while True:
        op = r.byte()
        if op == 0x0B:
            return
        if op in (0x41, 0x23):  # i32.const, global.get
            r.sleb(32) if op == 0x41 else r.u32()
        elif op == 0x42:
            r.sleb(64)
        elif op == 0x43:
            r.pos += 4
        elif op == 0x44:
            r.pos += 8
        elif op in (0x6A, 0x6B, 0x6C, 0x7C, 0x7D, 0x7E):  # extended-const arithmetic
            continue
        else:
            raise r.fail(f"unsupported instruction 0x{op:02x} in a constant expression")


def _const_of(vt: int, value: int | float) -> bytes:
    if vt == _I32:
        v = int(value) & 0xFFFFFFFF
        return b"\x41" + _sleb_encode(v - (1 << 32) if v >= 1 << 31 else v) + b"\x0b"
    if vt == _I64:
        v = int(value) & 0xFFFFFFFFFFFFFFFF
        return b"\x42" + _sleb_encode(v - (1 << 64) if v >= 1 << 63 else v) + b"\x0b"
    if vt == _F32:
        return b"\x43" + struct.pack("<f", float(value)) + b"\x0b"
    if vt == _F64:
        return b"\x44" + struct.pack("<d", float(value)) + b"\x0b"
    raise ModuleError(f"a global of type 0x{vt:02x} cannot be pre-initialised")


def _rewrite_globals(payload: bytes, values: dict[int, int | float], first_defined: int) -> bytes:
    r = Reader(payload)
    out: list[bytes] = []
    for i in range(r.u32()):
        start = r.pos
        vt = r.byte()
        mutable = r.byte()
        head = payload[start:r.pos]
        expr_start = r.pos
        _const_expr(r)
        index = first_defined + i
        if mutable and index in values:
            out.append(head + _const_of(vt, values[index]))
        else:
            out.append(head + payload[expr_start:r.pos])
    return _vec(out)


def _rewrite_memory(payload: bytes, pages: int) -> bytes:
    r = Reader(payload)
    if r.u32() != 1:
        raise ModuleError("pre-initialisation needs exactly one defined memory")
    flags = r.byte()
    r.u32()  # the old minimum
    tail = payload[r.pos:]
    return _vec([bytes([flags]) + _leb_encode(pages) + tail])


def _drop_exports(payload: bytes, names: frozenset[str]) -> bytes:
    r = Reader(payload)
    out: list[bytes] = []
    for _ in range(r.u32()):
        start = r.pos
        n = r.u32()
        name = payload[r.pos:r.pos + n].decode("utf-8", "replace")
        r.pos += n
        r.byte()
        r.u32()
        if name not in names:
            out.append(payload[start:r.pos])
    return _vec(out)


_NONZERO = re.compile(rb"[^\x00]")


def data_segments(memory: bytes) -> list[tuple[int, bytes]]:
    """The non-zero runs of ``memory`` as (offset, bytes), zero gaps shorter than a
    threshold kept inside a run, the threshold doubled until there are few enough."""
    gap = _MIN_GAP
    while True:
        zeros = b"\0" * gap
        runs: list[tuple[int, int]] = []
        pos = 0
        while (m := _NONZERO.search(memory, pos)) is not None:
            start = m.start()
            z = memory.find(zeros, start)
            end = len(memory) if z < 0 else z
            while end > start and memory[end - 1] == 0:
                end -= 1
            runs.append((start, end))
            pos = end
        if len(runs) <= _MAX_SEGMENTS:
            return [(s, memory[s:e]) for s, e in runs]
        gap *= 2


def global_exports(wasm: bytes) -> dict[str, int]:
    """Exported globals by name: their index in the module's global index space."""
    out: dict[str, int] = {}
    for sid, payload in _sections(wasm):
        if sid != _SEC_EXPORT:
            continue
        r = Reader(payload)
        for _ in range(r.u32()):
            n = r.u32()
            name = payload[r.pos:r.pos + n].decode("utf-8", "replace")
            r.pos += n
            kind = r.byte()
            index = r.u32()
            if kind == _KIND_GLOBAL:
                out[name] = index
    return out


def apply(wasm: bytes, image: Image, *, drop_exports: frozenset[str] = frozenset()) -> bytes:
    """``wasm`` with ``image`` as its initial state, and ``drop_exports`` removed.

    Refuses a module whose data segments are not all active (``memory.init`` would name
    segments this rewrite renumbers) or that imports a memory.
    """
    sections = _sections(wasm)
    imported_globals = 0
    for sid, payload in sections:
        if sid == 2:
            r = Reader(payload)
            for _ in range(r.u32()):
                for _ in range(2):
                    skip = r.u32()  # (not `r.pos += r.u32()`: that adds to the old position)
                    r.pos += skip
                kind = r.byte()
                if kind == 0:
                    r.u32()
                elif kind == 1:
                    r.byte()
                    flags = r.byte()
                    r.u32()
                    if flags & 1:
                        r.u32()
                elif kind == 2:
                    raise ModuleError("pre-initialisation needs a module that defines its memory")
                elif kind == _KIND_GLOBAL:
                    r.byte()
                    r.byte()
                    imported_globals += 1
        if sid == _SEC_DATA:
            r = Reader(payload)
            for _ in range(r.u32()):
                flags = r.u32()
                if flags == 1:
                    raise ModuleError("pre-initialisation cannot keep passive data segments")
                if flags == 2:
                    r.u32()
                _const_expr(r)
                skip = r.u32()
                r.pos += skip
    pages = len(image.memory) // 65536
    segs = data_segments(image.memory)
    data = _vec([b"\x00" + b"\x41" + _sleb_encode(off if off < 1 << 31 else off - (1 << 32)) + b"\x0b"
                 + _leb_encode(len(chunk)) + chunk for off, chunk in segs])
    out = bytearray(wasm[:8])
    wrote_data = False
    for sid, payload in sections:
        if sid == 0:
            r = Reader(payload)
            n = r.u32()
            if payload[r.pos:r.pos + n] == b"name":
                continue  # names of data segments that no longer exist
        if sid == _SEC_MEMORY:
            payload = _rewrite_memory(payload, pages)
        elif sid == _SEC_GLOBAL:
            payload = _rewrite_globals(payload, image.globals, imported_globals)
        elif sid == _SEC_EXPORT and drop_exports:
            payload = _drop_exports(payload, drop_exports)
        elif sid == _SEC_DATACOUNT:
            payload = _leb_encode(len(segs))
        elif sid == _SEC_DATA:
            payload, wrote_data = data, True
        out += bytes([sid]) + _leb_encode(len(payload)) + payload
    if not wrote_data:
        raise ModuleError("pre-initialisation needs a module with a data section")
    return bytes(out)
