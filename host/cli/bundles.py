"""``torpor build``, ``torpor pack`` and ``torpor inspect-bundle``: making and reading bundles.

No store is involved: a bundle is a file. The toolchain and Wasmtime are imported by
the commands that use them, not when the CLI starts.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from host.cli.common import EXIT_OK, add_command, emit
from host.errors import ConfigError

TITLE = "bundles: make and examine agent bundles"


def cmd_build(args: argparse.Namespace) -> int:
    """Compile an agent directory and write its bundle."""
    from host.sandbox import bundle as bundle_mod

    return _write_bundle(args, bundle_mod.build_dir(args.dir))


def cmd_pack(args: argparse.Namespace) -> int:
    """Bundle a module compiled elsewhere with a policy (and host-side tools)."""
    from host.sandbox import bundle as bundle_mod

    try:
        module = Path(args.module).read_bytes()
        policy_text = Path(args.policy).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {exc.filename}: {exc.strerror}") from exc
    tools = {Path(p).stem: Path(p).read_text(encoding="utf-8") for p in args.tool or []}
    raw = bundle_mod.pack(module, policy_text, tools=tools, policy_source=args.policy)
    return _write_bundle(args, raw)


def _write_bundle(args: argparse.Namespace, raw: bytes) -> int:
    """Verify ``raw`` loads as a bundle, then write it atomically (a reader never sees half a file)."""
    from host.sandbox import bundle as bundle_mod

    b = bundle_mod.load_bytes(raw, source=args.output)
    out = Path(args.output)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_bytes(raw)
        tmp.replace(out)
    except OSError as exc:
        raise ConfigError(f"cannot write {out}: {exc.strerror}") from exc
    data = {"bundle": str(out), "digest": b.digest, "name": b.name, "size": len(raw), "module_size": len(b.module)}
    emit(args, data, lambda: print(f"built {out} ({b.name}, {len(raw)} bytes, digest {b.digest[:16]})"))
    return EXIT_OK


def cmd_inspect_bundle(args: argparse.Namespace) -> int:
    """A bundle's identity, ABI, imports, exports and policy, without running it."""
    import wasmtime

    from host.sandbox import bundle as bundle_mod

    b = bundle_mod.load(args.bundle)
    module = wasmtime.Module(wasmtime.Engine(), b.module)
    imports = [f"{i.module}.{i.name}" for i in module.imports]
    exports = [e.name for e in module.exports]
    data: dict[str, Any] = {
        "digest": b.digest,
        "name": b.name,
        "abi_version": b.abi_version,
        "module_sha256": b.module_digest,
        "module_size": len(b.module),
        "imports": imports,
        "exports": exports,
        "host_tools": sorted(b.tools),
        "policy": b.policy_text,
    }

    def human() -> None:
        print(f"bundle   {args.bundle}\nname     {b.name}\ndigest   {b.digest}\nabi      v{b.abi_version}")
        print(f"module   {len(b.module)} bytes, sha256 {b.module_digest[:16]}")
        print("imports  " + ", ".join(imports))
        print("exports  " + ", ".join(exports))
        if b.tools:
            print("tools    " + ", ".join(sorted(b.tools)) + " (host-side Python)")
        print("policy:\n" + "\n".join("  " + line for line in b.policy_text.splitlines()))

    emit(args, data, human)
    return EXIT_OK


def add_parsers(sub: Any) -> None:
    """Register ``build``, ``pack`` and ``inspect-bundle``."""
    sp = add_command(sub, "build", cmd_build, "compile an agent directory (C sources + policy.toml) into a bundle")
    sp.add_argument("dir", help="the agent directory: *.c sources, policy.toml, optional host-tool *.py")
    sp.add_argument("-o", "--output", required=True, help="the bundle file to write")
    sp = add_command(sub, "pack", cmd_pack, "pack a wasm module built elsewhere with a policy into a bundle")
    sp.add_argument("module", help="a core wasm module importing only from `torpor` (guest ABI v1)")
    sp.add_argument("--policy", required=True, help="the policy.toml to pack with it")
    sp.add_argument("--tool", action="append", help="a host-side Python tool module to include (repeatable)")
    sp.add_argument("-o", "--output", required=True, help="the bundle file to write")
    sp = add_command(sub, "inspect-bundle", cmd_inspect_bundle, "show a bundle's digest, ABI, imports, exports and policy")
    sp.add_argument("bundle", help="a .torpor bundle file")
