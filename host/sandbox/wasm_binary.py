"""Just enough of the wasm binary format to read custom sections.

Wasmtime's Python API does not expose custom sections, and the ABI version
lives in one (``torpor.abi``), so we walk the section headers ourselves: the
magic, the version, then ``id, size`` pairs. Anything malformed raises
:class:`~host.errors.ModuleError` rather than an IndexError.
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
