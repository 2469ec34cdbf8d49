"""Bundles: one file holding an agent's module, its policy and its host-side tools.

A bundle is a zip archive (inspectable with any unzip) with a ``manifest.json``
that lists every member with its SHA-256. The bundle's digest is the SHA-256 of
the canonical manifest, so it covers every byte that matters: it is the
agent's version. Loading verifies each member against the manifest, so a
truncated or altered bundle is refused, never run.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from host.errors import BundleError, ModuleError
from host.sandbox import abi, toolchain, validate, wasm_binary
from policies import Policy, parse_policy

BUNDLE_FORMAT = "torpor-bundle/1"
MODULE_MEMBER = "agent.wasm"
POLICY_MEMBER = "policy.toml"
TOOLS_DIR = "tools/"
MAX_BUNDLE_BYTES = 256 << 20


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
    tools: dict[str, str] = field(default_factory=dict)  # module name -> Python source
    manifest: dict[str, Any] = field(default_factory=dict)
    raw: bytes = b""

    @property
    def abi_version(self) -> int:
        return int(self.manifest.get("abi_version", abi.ABI_VERSION))


def pack(module: bytes, policy_text: str, *, tools: dict[str, str] | None = None, policy_source: str = POLICY_MEMBER) -> bytes:
    """Build bundle bytes from a prepared or raw module, a policy and host tool sources.

    The module gets the host's transforms if it lacks them, and the policy is
    parsed (and so checked) before anything is written.
    """
    wasm_binary.check_header(module)
    validate.check_module(module)  # before Binaryen reads it
    prepared = toolchain.prepare_module(module)
    policy = parse_policy(policy_text, source=policy_source)
    version = toolchain.abi_version_of(prepared)
    members: dict[str, bytes] = {MODULE_MEMBER: prepared, POLICY_MEMBER: policy_text.encode()}
    for mod_name, source in sorted((tools or {}).items()):
        if not mod_name.isidentifier():
            raise BundleError(f"host tool module name {mod_name!r} is not a Python identifier")
        members[f"{TOOLS_DIR}{mod_name}.py"] = source.encode()
    manifest = {
        "format": BUNDLE_FORMAT,
        "name": policy.agent.name,
        "abi_version": version,
        "module_sha256": sha256_hex(prepared),
        "files": {name: {"sha256": sha256_hex(data), "size": len(data)} for name, data in members.items()},
    }
    buf = io.BytesIO()
    # Fixed timestamps and order: the same inputs give byte-identical bundles.
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in [("manifest.json", _canonical(manifest)), *members.items()]:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    return buf.getvalue()


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def load_bytes(raw: bytes, *, source: str = "<bundle>") -> Bundle:
    """Verify and load bundle bytes; raise :class:`BundleError` on any inconsistency."""
    if len(raw) > MAX_BUNDLE_BYTES:
        raise BundleError(f"{source}: bundle is larger than {MAX_BUNDLE_BYTES >> 20} MiB")
    try:
        zf = zipfile.ZipFile(io.BytesIO(raw))
    except zipfile.BadZipFile as exc:
        raise BundleError(f"{source}: not a Torpor bundle (not a zip archive: {exc})") from exc
    with zf:
        try:
            manifest_raw = zf.read("manifest.json")
        except KeyError as exc:
            raise BundleError(f"{source}: not a Torpor bundle (no manifest.json)") from exc
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise BundleError(f"{source}: corrupted bundle ({exc})") from exc
        try:
            manifest = json.loads(manifest_raw)
        except ValueError as exc:
            raise BundleError(f"{source}: corrupted bundle manifest ({exc})") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
            found = manifest.get("format") if isinstance(manifest, dict) else None
            raise BundleError(f"{source}: unsupported bundle format {found!r}; this host reads {BUNDLE_FORMAT}")
        files = manifest.get("files")
        if not isinstance(files, dict) or MODULE_MEMBER not in files or POLICY_MEMBER not in files:
            raise BundleError(f"{source}: bundle manifest lacks {MODULE_MEMBER} or {POLICY_MEMBER}")
        members: dict[str, bytes] = {}
        for name, meta in files.items():
            try:
                data = zf.read(name)
            except KeyError as exc:
                raise BundleError(f"{source}: bundle member {name} is missing") from exc
            except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
                raise BundleError(f"{source}: bundle member {name} is corrupted ({exc})") from exc
            if not isinstance(meta, dict) or sha256_hex(data) != meta.get("sha256"):
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
    try:
        policy_text = members[POLICY_MEMBER].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BundleError(f"{source}: policy.toml is not UTF-8") from exc
    policy = parse_policy(policy_text, source=f"{source}:{POLICY_MEMBER}")
    tools = {
        name[len(TOOLS_DIR) : -3]: data.decode("utf-8")
        for name, data in members.items()
        if name.startswith(TOOLS_DIR) and name.endswith(".py")
    }
    return Bundle(
        digest=sha256_hex(_canonical(manifest)),
        name=str(manifest.get("name") or policy.agent.name),
        module=module,
        module_digest=sha256_hex(module),
        policy_text=policy_text,
        policy=policy,
        tools=tools,
        manifest=manifest,
        raw=raw,
    )



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


def build_dir(agent_dir: str | Path) -> bytes:
    """Compile an agent directory (C sources + policy.toml + optional host tools) into bundle bytes."""
    d = Path(agent_dir)
    if not d.is_dir():
        raise BundleError(f"{d}: not a directory")
    policy_path = d / POLICY_MEMBER
    if not policy_path.is_file():
        raise BundleError(f"{d}: no {POLICY_MEMBER} (every agent needs a policy)")
    sources = sorted(d.glob("*.c"))
    if not sources:
        raise BundleError(f"{d}: no C sources (*.c)")
    policy_text = policy_path.read_text(encoding="utf-8")
    parse_policy(policy_text, source=str(policy_path))  # fail on a bad policy before compiling
    raw = toolchain.compile_c(sources, include_dirs=[d])
    tools = {p.stem: p.read_text(encoding="utf-8") for p in sorted(d.glob("*.py"))}
    return pack(raw, policy_text, tools=tools, policy_source=str(policy_path))
