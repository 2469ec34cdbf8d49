"""Just enough of the wasm binary format to read custom sections and section contents.

Wasmtime's Python API does not expose custom sections, and the ABI version
lives in one (``torpor.abi``), so we walk the section headers ourselves: the
magic, the version, then ``id, size`` pairs. :class:`Reader` is the bounded
cursor :mod:`host.sandbox.validate` reads every section with, before Wasmtime
sees a byte. Anything malformed raises :class:`~host.errors.ModuleError`
rather than an IndexError.
"""

from __future__ import annotations

from host.errors import ModuleError

WASM_MAGIC = b"\0asm"
WASM_VERSION = b"\x01\0\0\0"


def _leb_u32(data: bytes, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= len(data):
            raise ModuleError("truncated wasm module (LEB128 runs past the end)")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 28:
            raise ModuleError("malformed wasm module (LEB128 too long)")


def check_header(data: bytes) -> None:
    """Raise ModuleError unless ``data`` starts like a core wasm module."""
    if len(data) < 8 or data[:4] != WASM_MAGIC:
        raise ModuleError("not a WebAssembly module (missing the \\0asm magic)")
    if data[4:8] != WASM_VERSION:
        raise ModuleError(
            f"unsupported wasm binary version {data[4:8].hex()} "
            "(Torpor runs core modules, version 1; components are not supported)"
        )


def custom_sections(data: bytes) -> dict[str, bytes]:
    """Map each custom section's name to its payload (the last one wins on duplicates)."""
    check_header(data)
    out: dict[str, bytes] = {}
    pos = 8
    while pos < len(data):
        section_id = data[pos]
        size, body = _leb_u32(data, pos + 1)
        end = body + size
        if end > len(data):
            raise ModuleError("truncated wasm module (a section runs past the end)")
        if section_id == 0:
            name_len, name_pos = _leb_u32(data, body)
            if name_pos + name_len > end:
                raise ModuleError("malformed custom section name")
            name = data[name_pos : name_pos + name_len].decode("utf-8", "replace")
            out[name] = data[name_pos + name_len : end]
        pos = end
    return out


def add_custom_section(data: bytes, name: str, payload: bytes) -> bytes:
    """Append a custom section (valid anywhere after the header)."""
    check_header(data)
    raw_name = name.encode()
    body = _leb_encode(len(raw_name)) + raw_name + payload
    return data + b"\0" + _leb_encode(len(body)) + body


def _leb_encode(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


class Reader:
    """A bounded cursor over ``data[pos:end]``: every read is checked against ``end``.

    Why our own: the validator must read untrusted sections (counts, limits, names)
    without trusting any length in them, and fail with the byte offset it stopped at.
    """

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def fail(self, what: str) -> ModuleError:
        """The error for a malformed module at the current offset."""
        return ModuleError(f"malformed wasm module: {what} (at byte {self.pos})")

    @property
    def left(self) -> int:
        return self.end - self.pos

    def byte(self) -> int:
        if self.pos >= self.end:
            raise self.fail("unexpected end of section")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def u32(self) -> int:
        """An unsigned LEB128 of at most 5 bytes and 32 bits (the spec's ``u32``)."""
        result = shift = 0
        for _ in range(5):
            b = self.byte()
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                if result > 0xFFFFFFFF:
                    raise self.fail("integer too large for u32")
                return result
            shift += 7
        raise self.fail("LEB128 integer too long")

    def sleb(self, bits: int) -> int:
        """A signed LEB128 of at most ``ceil(bits / 7)`` bytes."""
        result = shift = 0
        for _ in range((bits + 6) // 7):
            b = self.byte()
            result |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                if b & 0x40:
                    result -= 1 << shift
                return result
        raise self.fail("LEB128 integer too long")

    def take(self, n: int) -> bytes:
        if n < 0 or n > self.left:
            raise self.fail(f"{n} bytes run past the end of the section")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def skip(self, n: int) -> None:
        if n < 0 or n > self.left:
            raise self.fail(f"{n} bytes run past the end of the section")
        self.pos += n

    def name(self) -> str:
        raw = self.take(self.u32())
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail("a name is not UTF-8") from exc

    def count(self, what: str, limit: int, min_entry_bytes: int = 1) -> int:
        """A vector's length, refused before any entry is read if it exceeds ``limit``
        or could not fit in what is left of the section."""
        n = self.u32()
        if n > limit:
            raise ModuleError(f"the module declares {n} {what}; this host accepts at most {limit}")
        if n * min_entry_bytes > self.left:
            raise self.fail(f"{n} {what} cannot fit in the {self.left} bytes left of the section")
        return n
