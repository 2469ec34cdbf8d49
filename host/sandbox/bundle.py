"""Bundles: one file holding an agent's module and its policy (and, rarely, Python).

A bundle is a zip archive (inspectable with any unzip) with a ``manifest.json``
that lists every member with its SHA-256 and size. The bundle's digest is the
SHA-256 of the canonical manifest, so it covers every byte that matters: it is
the agent's version. Loading verifies each member against the manifest, so a
truncated or altered bundle is refused, never run.

A bundle is untrusted, so its archive is read the careful way: every member is
a plain file with a safe, unique name (other unzips disagree on duplicates and
follow ``..`` and symlinks), sizes are checked against the manifest and the
host's caps from the zip directory before anything is inflated, and inflating
stops one byte past the declared size. The agent's name is its policy's.

A bundle may carry Python modules (``tools/NAME.py``, packed only when asked for). They
would run in the host process, so the host refuses such a bundle unless its operator
trusts that bundle by digest (:mod:`host.tools.sources`); tools are the operator's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import stat
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from host.errors import BundleError, ModuleError
from host.sandbox import abi, guest_json, toolchain, validate, wasm_binary
from host.sandbox.validate import HOST_LIMITS, HostLimits
from policies import Policy, parse_policy

BUNDLE_FORMAT = "torpor-bundle/1"
MODULE_MEMBER = "agent.wasm"
POLICY_MEMBER = "policy.toml"
TOOLS_DIR = "tools/"
MANIFEST_MEMBER = "manifest.json"
MAX_BUNDLE_BYTES = 256 << 20
# Caps on what members may declare, checked before anything is inflated (the module's
# is HostLimits.max_module_bytes).
MAX_MEMBERS = 1024
MAX_MANIFEST_BYTES = 1 << 20
INPUT_SCHEMA_FILE = "input.schema.json"  # beside an agent: the JSON Schema of its input
MAX_POLICY_BYTES = 1 << 20
MAX_TOOL_BYTES = 4 << 20
_INFLATE_CHUNK = 64 << 10
_EOCD_SIG = b"PK\x05\x06"
_ZIP64_LOCATOR_SIG = b"PK\x06\x07"
_EOCD_SIZE = 22
MAX_DIRECTORY_BYTES = 1 << 20  # the zip central directory (pack writes ~60 bytes a member)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A verified bundle, in memory."""

    digest: str
    name: str
    module: bytes
    module_digest: str
    policy_text: str
    policy: Policy
    python: dict[str, str] = field(default_factory=dict)  # module name -> Python source (host code!)
    manifest: dict[str, Any] = field(default_factory=dict)
    raw: bytes = b""

    @property
    def abi_version(self) -> int:
        return int(self.manifest.get("abi_version", abi.ABI_VERSION))

    @property
    def python_digests(self) -> dict[str, str]:
        """Each Python member (``tools/NAME.py``) and its sha256, as verified at load."""
        files = self.manifest.get("files", {})
        return {f"{TOOLS_DIR}{m}.py": str(files[f"{TOOLS_DIR}{m}.py"]["sha256"]) for m in sorted(self.python)}

    @property
    def input_schema(self) -> dict[str, Any] | None:
        """The JSON Schema the agent's input must match, as built into the manifest (or None)."""
        schema = self.manifest.get("input_schema")
        return schema if isinstance(schema, dict) else None

    @property
    def mcp_commands(self) -> dict[str, list[str]]:
        """``mcp.NAME`` -> the command line (or URL) each MCP server whose policy says itself how
        to start it (the deprecated form) would start on a host whose operator config lacks it."""
        return {f"mcp.{n}": [srv.url] if srv.url is not None else [str(srv.command), *srv.args]
                for n, srv in sorted(self.policy.mcp.items()) if srv.self_started}

    @property
    def host_code(self) -> dict[str, str]:
        """Everything of the bundle that would run in or start from the host process, and its
        sha256: its Python members, and the processes its policy's MCP servers would start
        (command, arguments, environment template and directory: all of it chooses what runs)
        or the remote servers the host would connect to with the agent's credentials (URL and
        header templates: where the host goes and what it sends).  A server the policy only
        names is none of it: the host's operator config says how to start or reach it."""
        code = self.python_digests
        for n, srv in sorted(self.policy.mcp.items()):
            if not srv.self_started:
                continue
            spec: dict[str, Any] = {"command": srv.command, "args": list(srv.args), "env": srv.env, "cwd": srv.cwd}
            if srv.url is not None:
                spec = {"url": srv.url, "headers": srv.headers}
            code[f"mcp.{n}"] = sha256_hex(_canonical(spec))
        return code


def pack(module: bytes, policy_text: str, *, python: dict[str, str] | None = None,
         policy_source: str = POLICY_MEMBER, input_schema: dict[str, Any] | None = None) -> bytes:
    """Build bundle bytes from a prepared or raw module, a policy and, if given, Python
    modules (name -> source) for the bundle to carry.

    The module gets the host's transforms if it lacks them, and the policy is
    parsed (and so checked) before anything is written. Python in a bundle is host code:
    a host runs such a bundle only for an operator who trusts it by digest.
    """
    wasm_binary.check_header(module)
    # Before Binaryen reads it (the bundle is validated again at load). A raw module may
    # carry debug sections Binaryen drops, so only the bundle's own cap bounds its size here.
    validate.check_module(module, dataclasses.replace(HOST_LIMITS, max_module_bytes=MAX_BUNDLE_BYTES))
    prepared = toolchain.prepare_module(module)
    policy = parse_policy(policy_text, source=policy_source)
    version = toolchain.abi_version_of(prepared)
    members: dict[str, bytes] = {MODULE_MEMBER: prepared, POLICY_MEMBER: policy_text.encode()}
    for mod_name, source in sorted((python or {}).items()):
        if not mod_name.isidentifier():
            raise BundleError(f"Python module name {mod_name!r} is not a Python identifier")
        members[f"{TOOLS_DIR}{mod_name}.py"] = source.encode()
    manifest = {
        "format": BUNDLE_FORMAT,
        "name": policy.agent.name,
        "abi_version": version,
        "module_sha256": sha256_hex(prepared),
        "files": {name: {"sha256": sha256_hex(data), "size": len(data)} for name, data in members.items()},
    }
    if input_schema is not None and policy.agent.input_schema is not None:
        raise BundleError(f"{policy_source}: [agent] input_schema and {INPUT_SCHEMA_FILE} both give the input "
                          "schema; keep one")
    schema = input_schema if input_schema is not None else policy.agent.input_schema
    if schema is not None:
        check_input_schema(schema, policy_source if input_schema is None else INPUT_SCHEMA_FILE)
        manifest["input_schema"] = schema
    buf = io.BytesIO()
    # Fixed timestamps and order: the same inputs give byte-identical bundles.
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in [(MANIFEST_MEMBER, _canonical(manifest)), *members.items()]:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    return buf.getvalue()


def check_input_schema(schema: Any, source: str) -> None:
    """An agent's input schema is a JSON Schema (``BundleError`` saying what is wrong otherwise)."""
    import jsonschema.exceptions

    from host import json_schema

    if not isinstance(schema, dict):
        raise BundleError(f"{source}: the input schema must be a JSON object, not {type(schema).__name__}")
    try:
        json_schema.check_schema(schema)
    except jsonschema.exceptions.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(top)"
        raise BundleError(f"{source}: the input schema is not a valid JSON Schema at {where}: {exc.message}") from None


def input_problem(schema: dict[str, Any], value: Any) -> str | None:
    """The first way ``value`` does not match an agent's input schema, naming the field; None if it matches.

    The schema is the bundle's (untrusted): its patterns run under a time budget
    (:mod:`host.json_schema`), so a pattern that backtracks is a problem named, not a wedge."""
    from host import json_schema

    try:
        found = json_schema.errors(json_schema.validator(schema), value)
        errors = sorted(found, key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    except Exception as exc:  # a $ref the schema cannot resolve (never fetched), a pattern too slow
        return f"the input schema cannot be applied: {exc}"
    if not errors:
        return None
    e = errors[0]
    where = ".".join(str(p) for p in e.absolute_path)
    return f"{where}: {e.message}" if where else e.message


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def load_bytes(raw: bytes, *, source: str = "<bundle>", limits: HostLimits = HOST_LIMITS) -> Bundle:
    """Verify and load bundle bytes; raise :class:`BundleError` on any inconsistency.

    A bundle is untrusted: its archive is checked from the zip directory (names,
    kinds, duplicates, sizes against the manifest and the host's caps) before any
    member is inflated, each member inflates under a hard cap of its declared size,
    and the module is validated (:mod:`host.sandbox.validate`) against the ABI, the
    host's limits and the policy's memory budget before anything compiles it.
    """
    if len(raw) > MAX_BUNDLE_BYTES:
        raise BundleError(f"{source}: bundle is larger than {MAX_BUNDLE_BYTES >> 20} MiB")
    _check_directory_size(raw, source)
    try:
        zf = zipfile.ZipFile(io.BytesIO(raw))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError, NotImplementedError,
            struct.error) as exc:
        raise BundleError(f"{source}: not a Torpor bundle (not a zip archive: {exc})") from exc
    with zf:
        entries = _entries(zf, source)
        manifest_info = entries.get(MANIFEST_MEMBER)
        if manifest_info is None:
            raise BundleError(f"{source}: not a Torpor bundle (no {MANIFEST_MEMBER})")
        if manifest_info.file_size > MAX_MANIFEST_BYTES:
            raise BundleError(f"{source}: bundle member {MANIFEST_MEMBER} is {manifest_info.file_size} bytes; "
                              f"a manifest is at most {MAX_MANIFEST_BYTES >> 10} KiB")
        manifest_raw = _inflate(raw, manifest_info, manifest_info.file_size, source)
        try:  # the bounded parser: a manifest nested 100k deep or holding NaN is refused, not a RecursionError
            manifest = guest_json.parse(manifest_raw)
        except guest_json.PoisonValue as exc:
            raise BundleError(f"{source}: corrupted bundle manifest ({exc})") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
            found = manifest.get("format") if isinstance(manifest, dict) else None
            raise BundleError(f"{source}: unsupported bundle format {found!r}; this host reads {BUNDLE_FORMAT}")
        files = manifest.get("files")
        if not isinstance(files, dict) or MODULE_MEMBER not in files or POLICY_MEMBER not in files:
            raise BundleError(f"{source}: bundle manifest lacks {MODULE_MEMBER} or {POLICY_MEMBER}")
        declared = _declared_sizes(files, source, limits)
        for name in entries:
            if name != MANIFEST_MEMBER and name not in declared:
                raise BundleError(f"{source}: bundle member {name} is not listed in the manifest")
        members: dict[str, bytes] = {}
        for name, size in declared.items():
            info = entries.get(name)
            if info is None:
                raise BundleError(f"{source}: bundle member {name} is missing")
            if info.file_size != size:
                raise BundleError(
                    f"{source}: bundle member {name} is {info.file_size} bytes in the archive but {size} in the "
                    "manifest: it does not match its manifest entry (size and digest; corrupted or altered)"
                )
            data = _inflate(raw, info, size, source)
            if sha256_hex(data) != files[name].get("sha256"):
                raise BundleError(f"{source}: bundle member {name} does not match its digest (corrupted or altered)")
            members[name] = data
    module = members[MODULE_MEMBER]
    try:
        wasm_binary.check_header(module)
        version = toolchain.abi_version_of(module)
    except ModuleError as exc:
        raise BundleError(f"{source}: {exc}") from exc
    if version is None:
        raise BundleError(f"{source}: the bundled module has no {abi.ABI_SECTION} section; repack it with `torpor pack`")
    if version not in abi.SUPPORTED_ABI_VERSIONS:
        toolchain.raise_abi_version(version)
    if manifest.get("abi_version", version) != version:
        raise BundleError(f"{source}: the manifest says ABI v{manifest.get('abi_version')!r} but the module "
                          f"carries v{version} (corrupted or altered)")
    try:
        policy_text = members[POLICY_MEMBER].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BundleError(f"{source}: policy.toml is not UTF-8") from exc
    policy = parse_policy(policy_text, source=f"{source}:{POLICY_MEMBER}")
    # The agent's name is its policy's: a manifest that says otherwise is refused, never shown.
    if "name" in manifest and manifest["name"] != policy.agent.name:
        raise BundleError(f"{source}: the manifest names the agent {str(manifest['name'])[:64]!r} but its policy "
                          f"names it {policy.agent.name!r}; an agent's name comes from its policy")
    shape = validate.check_module(module, limits)
    shape.check_memory(validate.memory_limit(policy), policy_name=policy.agent.name)
    python = {}
    for name, data in members.items():
        if name.startswith(TOOLS_DIR):
            try:
                python[name[len(TOOLS_DIR) : -3]] = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BundleError(f"{source}: bundle member {name} is not UTF-8") from exc
    if "input_schema" in manifest:
        check_input_schema(manifest["input_schema"], f"{source}: manifest")
    return Bundle(
        digest=sha256_hex(_canonical(manifest)),
        name=policy.agent.name,
        module=module,
        module_digest=sha256_hex(module),
        policy_text=policy_text,
        policy=policy,
        python=python,
        manifest=manifest,
        raw=raw,
    )


def _check_directory_size(raw: bytes, source: str) -> None:
    """Refuse an archive whose central directory is too large, before zipfile reads it.

    Why: :class:`zipfile.ZipFile` builds an object per directory entry as it opens
    the archive, so a 256 MiB archive of empty entries would cost gigabytes.
    Read from the end-of-central-directory record the way zipfile finds it.
    """
    pos = len(raw) - _EOCD_SIZE
    if pos < 0:
        return  # too short to be a zip: zipfile says so
    if raw[pos : pos + 4] != _EOCD_SIG or raw[pos + 20 : pos + 22] != b"\0\0":
        pos = raw.rfind(_EOCD_SIG, max(0, len(raw) - _EOCD_SIZE - 0xFFFF))
        if pos < 0 or pos + _EOCD_SIZE > len(raw):
            return  # no end record: zipfile reports it
    _sig, _disk, _cd_disk, _n_here, n_total, cd_size, _cd_offset, _clen = struct.unpack_from("<4sHHHHIIH", raw, pos)
    if n_total == 0xFFFF or cd_size == 0xFFFFFFFF or raw.find(_ZIP64_LOCATOR_SIG, max(0, pos - 20), pos) >= 0:
        raise BundleError(f"{source}: the archive is a zip64 archive; a bundle has a few small members")
    if n_total > MAX_MEMBERS or cd_size > MAX_DIRECTORY_BYTES:
        raise BundleError(f"{source}: the archive lists {n_total} members in {cd_size} bytes of directory; "
                          f"a bundle has at most {MAX_MEMBERS} members and {MAX_DIRECTORY_BYTES >> 10} KiB of directory")


def _entries(zf: zipfile.ZipFile, source: str) -> dict[str, zipfile.ZipInfo]:
    """The archive's members by name, each a plain file with a safe, unique name."""
    infos = zf.infolist()
    if len(infos) > MAX_MEMBERS:
        raise BundleError(f"{source}: the archive lists {len(infos)} members; a bundle has at most {MAX_MEMBERS}")
    out: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        name = info.orig_filename  # as stored: zipfile rewrites backslashes in .filename on Windows
        _check_name(name, source)
        if name in out:
            raise BundleError(f"{source}: bundle member {name} appears twice in the archive (zip tools disagree "
                              "on which one counts)")
        ftype = stat.S_IFMT(info.external_attr >> 16)  # 0: no Unix mode recorded (as pack writes)
        if info.is_dir() or ftype not in (0, stat.S_IFREG):
            kind = ("a symlink" if ftype == stat.S_IFLNK else
                    "a directory" if info.is_dir() or ftype == stat.S_IFDIR else "not a regular file")
            raise BundleError(f"{source}: bundle member {name} is {kind}; a bundle holds regular files only")
        if info.flag_bits & 0x1:
            raise BundleError(f"{source}: bundle member {name} is encrypted")
        out[name] = info
    return out


def _check_name(name: str, source: str) -> None:
    """Refuse member names that could mean a path outside the bundle to any unzip."""
    if not name or "\0" in name or "\\" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise BundleError(f"{source}: bundle member {name!r} has an absolute or unsafe name")
    if any(part in ("", ".", "..") for part in name.rstrip("/").split("/")):
        raise BundleError(f"{source}: bundle member {name!r} has a path that leaves or bends the bundle ('..', '.', '//')")


def _declared_sizes(files: dict[str, Any], source: str, limits: HostLimits) -> dict[str, int]:
    """Each manifest entry's size, checked against the caps before anything is inflated."""
    if len(files) > MAX_MEMBERS:
        raise BundleError(f"{source}: the manifest lists {len(files)} members; a bundle has at most {MAX_MEMBERS}")
    out: dict[str, int] = {}
    total = 0
    for name, meta in files.items():
        _check_name(name, source)
        if name == MODULE_MEMBER:
            cap = limits.max_module_bytes
        elif name == POLICY_MEMBER:
            cap = MAX_POLICY_BYTES
        elif name.startswith(TOOLS_DIR) and name.endswith(".py") and name[len(TOOLS_DIR) : -3].isidentifier():
            cap = MAX_TOOL_BYTES
        else:
            raise BundleError(f"{source}: bundle member {name} is none of {MODULE_MEMBER}, {POLICY_MEMBER} or "
                              f"{TOOLS_DIR}NAME.py")
        size = meta.get("size") if isinstance(meta, dict) else None
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BundleError(f"{source}: the manifest gives bundle member {name} no size")
        if size > cap:
            raise BundleError(f"{source}: bundle member {name} declares {size} bytes; this host accepts at most "
                              f"{cap} for it")
        total += size
        out[name] = size
    if total > MAX_BUNDLE_BYTES:
        raise BundleError(f"{source}: the bundle's members declare {total} bytes in all; at most {MAX_BUNDLE_BYTES}")
    return out


def _inflate(raw: bytes, info: zipfile.ZipInfo, size: int, source: str) -> bytes:
    """The member's bytes, inflated from the archive under a hard cap of ``size``.

    Why not ``ZipFile.read``: a member's stream may inflate far past what its
    headers say; we stop one byte past the declared size and refuse, and never
    hold more than ``size + 1`` bytes of it.
    """
    name = info.orig_filename
    off = info.header_offset
    if off < 0 or off + 30 > len(raw) or raw[off : off + 4] != b"PK\x03\x04":
        raise BundleError(f"{source}: bundle member {name} is corrupted (no local header)")
    flags, method, name_len, extra_len = struct.unpack_from("<2xHH16xHH", raw, off + 4)
    local_name = raw[off + 30 : off + 30 + name_len].decode("utf-8" if flags & 0x800 else "cp437", "replace")
    if local_name != name or method != info.compress_type or flags & 0x1:
        raise BundleError(f"{source}: bundle member {name} has a local header that disagrees with the directory")
    start = off + 30 + name_len + extra_len
    end = start + info.compress_size
    if end > len(raw):
        raise BundleError(f"{source}: bundle member {name} is truncated")
    comp = memoryview(raw)[start:end]
    if method == zipfile.ZIP_STORED:
        if len(comp) != size:
            raise BundleError(f"{source}: bundle member {name} holds {len(comp)} bytes, not the {size} it declares")
        data = bytes(comp)
    elif method == zipfile.ZIP_DEFLATED:
        data = _inflate_capped(comp, size, name, source)
    else:
        raise BundleError(f"{source}: bundle member {name} uses compression method {method}; bundles use deflate")
    if zlib.crc32(data) != info.CRC:
        raise BundleError(f"{source}: bundle member {name} is corrupted (CRC mismatch)")
    return data


def _inflate_capped(comp: memoryview, size: int, name: str, source: str) -> bytes:
    d = zlib.decompressobj(-15)
    out = bytearray()
    pos = 0
    try:
        while not d.eof:
            if d.unconsumed_tail:
                buf: bytes | memoryview = d.unconsumed_tail
            else:
                buf = comp[pos : pos + _INFLATE_CHUNK]
                pos += len(buf)
            piece = d.decompress(buf, size + 1 - len(out))
            out += piece
            if len(out) > size:
                raise BundleError(f"{source}: bundle member {name} inflates past the {size} bytes it declares "
                                  "(refused at the cap: a zip bomb, or an altered archive)")
            if not buf and not piece:
                break
    except zlib.error as exc:
        raise BundleError(f"{source}: bundle member {name} is corrupted ({exc})") from exc
    if not d.eof or len(out) != size:
        raise BundleError(f"{source}: bundle member {name} inflates to {len(out)} bytes, not the {size} it declares")
    return bytes(out)


def load(path: str | Path) -> Bundle:
    """Read and verify a bundle file."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError as exc:
        raise BundleError(f"{p}: no such bundle file") from exc
    except OSError as exc:
        raise BundleError(f"{p}: cannot read bundle ({exc.strerror})") from exc
    return load_bytes(raw, source=str(p))


def agent_language(d: Path) -> str:
    """Which toolchain builds the agent directory ``d``, by the files in it: ``"js"`` for an
    ``agent.js`` or ``agent.ts``, ``"python"`` for an ``agent.py``, ``"zig"`` for an
    ``agent.zig`` (or ``main.zig``), ``"c"`` for C sources. The one place a new guest
    language is dispatched. Zig and C sources at once are refused, and so is an agent.py
    beside another language's entry: which one the bundle would run must not depend on a
    rule the author has to look up."""
    has_py = (d / "agent.py").is_file()
    if (d / "agent.js").is_file() or (d / "agent.ts").is_file():
        if has_py:
            raise BundleError(f"{d}: both agent.py and agent.js/agent.ts: one directory holds one agent")
        return "js"
    if has_py:
        if any(d.glob("*.c")) or any((d / n).is_file() for n in toolchain.ZIG_ENTRY_FILES):
            raise BundleError(f"{d}: both agent.py and C or Zig sources: one directory holds one agent")
        return "python"
    zig = next((n for n in toolchain.ZIG_ENTRY_FILES if (d / n).is_file()), None)
    has_c = any(d.glob("*.c"))
    if zig is not None and has_c:
        raise BundleError(f"{d}: both C sources and {zig}: one directory holds one agent")
    if zig is not None:
        return "zig"
    if has_c:
        return "c"
    raise BundleError(f"{d}: no agent sources (*.c, or {' or '.join(toolchain.ZIG_ENTRY_FILES)}), "
                      "nor agent.js, agent.ts or agent.py")


def build_dir(agent_dir: str | Path) -> bytes:
    """Compile an agent directory (C sources, a Zig agent, agent.js or agent.py, + policy.toml) into bundle bytes.

    Python files in the directory are not packed as tools: tools are the operator's (see
    :mod:`host.tools.sources`); :func:`pack` packs Python only when given it. A Python
    agent's own modules (``agent.py`` and what it vendors, not ``*_tools.py``) are compiled
    into its module's image instead.
    """
    d = Path(agent_dir)
    if not d.is_dir():
        raise BundleError(f"{d}: not a directory")
    policy_path = d / POLICY_MEMBER
    if not policy_path.is_file():
        raise BundleError(f"{d}: no {POLICY_MEMBER} (every agent needs a policy)")
    language = agent_language(d)
    policy_text = policy_path.read_text(encoding="utf-8")
    parse_policy(policy_text, source=str(policy_path))  # fail on a bad policy before compiling
    if language == "js":
        from host.sandbox import js_runtime  # only JS builds pay for it

        raw = js_runtime.build_agent(d)
    elif language == "python":
        from host.sandbox import py_runtime  # only Python builds pay for it

        raw = py_runtime.build_agent(d)
    elif language == "zig":
        raw = toolchain.compile_zig(next(d / n for n in toolchain.ZIG_ENTRY_FILES if (d / n).is_file()))
    else:
        raw = toolchain.compile_c(sorted(d.glob("*.c")), include_dirs=[d])
    return pack(raw, policy_text, policy_source=str(policy_path), input_schema=read_input_schema(d))


def read_input_schema(agent_dir: Path) -> dict[str, Any] | None:
    """``input.schema.json`` beside an agent, parsed (None when there is none)."""
    path = agent_dir / INPUT_SCHEMA_FILE
    if not path.is_file():
        return None
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BundleError(f"{path}: not a JSON file: {exc}") from None
    check_input_schema(schema, str(path))
    return dict(schema)
