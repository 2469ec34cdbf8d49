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
    """Bundle a module compiled elsewhere with a policy (and, if asked, Python modules)."""
    from host.sandbox import bundle as bundle_mod

    try:
        module = Path(args.module).read_bytes()
        policy_text = Path(args.policy).read_text(encoding="utf-8")
        python = {Path(p).stem: Path(p).read_text(encoding="utf-8") for p in args.python or []}
    except OSError as exc:
        raise ConfigError(f"cannot read {exc.filename}: {exc.strerror}") from exc
    raw = bundle_mod.pack(module, policy_text, python=python, policy_source=args.policy)
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
    # A server whose start the policy spells out ties the bundle to this machine (deprecated).
    tied = sorted(f"mcp.{n}" for n, s in b.policy.mcp.items() if s.self_started)
    data = {"bundle": str(out), "digest": b.digest, "name": b.name, "size": len(raw), "module_size": len(b.module),
            "host_code": b.host_code, "mcp_servers": sorted(b.policy.mcp), "not_portable": tied}

    def human() -> None:
        print(f"built {out} ({b.name}, {len(raw)} bytes, digest {b.digest[:16]})")
        if b.policy.mcp:
            print(f"it needs the MCP servers {', '.join(sorted(b.policy.mcp))} from the operator config of the host "
                  "it runs on ([mcp.servers.NAME] of torpor.toml)")
        if tied:
            print(f"note: the policy says itself how to start {', '.join(tied)} (command or url): deprecated, the "
                  "bundle is tied to this machine; move it to the operator config ([mcp.servers.NAME])")
        if b.host_code:
            print(f"it carries host code ({', '.join(b.host_code)}): a host runs it only with "
                  f"--trust-bundle-code {b.digest}")

    emit(args, data, human)
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
        "host_code": [
            *({"name": m, "kind": "python", "sha256": d, "size": len(b.python[m[len("tools/"):-3]].encode())}
              for m, d in b.python_digests.items()),
            *({"name": m, "kind": "mcp_server", "sha256": b.host_code[m], "command": cmd}
              for m, cmd in b.mcp_commands.items()),
        ],
        "runs_with": f"--trust-bundle-code {b.digest}" if b.host_code else None,
        # the servers a host's operator config must name ([mcp.servers.NAME] of torpor.toml)
        "mcp_servers": sorted(b.policy.mcp),
        "handlers": dict(b.policy.handler_refs),
        "validators": list(b.policy.custom_validator_refs),
        "policy": b.policy_text,
    }

    def human() -> None:
        print(f"bundle   {args.bundle}\nname     {b.name}\ndigest   {b.digest}\nabi      v{b.abi_version}")
        print(f"module   {len(b.module)} bytes, sha256 {b.module_digest[:16]}")
        print("imports  " + ", ".join(imports))
        print("exports  " + ", ".join(exports))
        for ref_name, ref in [*b.policy.handler_refs.items(), *(("validator", r) for r in
                                                                  b.policy.custom_validator_refs)]:
            print(f"handler  {ref_name} -> {ref} (an operator tool, or the bundle's Python if trusted)")
        for server in sorted(b.policy.mcp):
            print(f"mcp      {server} (started or reached as the host's operator config says: [mcp.servers.{server}])")
        if b.host_code:
            print(f"host code  {len(b.host_code)} piece(s) that would run with the host's privileges:")
            for member, digest in b.python_digests.items():
                print(f"  {member}  sha256 {digest}  (Python, run inside the host process)")
            for server, cmd in b.mcp_commands.items():
                print(f"  {server}  sha256 {b.host_code[server]}  (an MCP server the host would start: "
                      f"{' '.join(cmd)})")
            print(f"           refused unless you trust this bundle: --trust-bundle-code {b.digest}")
        else:
            print("host code  none (no Python, no MCP server commands)")
        print("policy:\n" + "\n".join("  " + line for line in b.policy_text.splitlines()))

    emit(args, data, human)
    return EXIT_OK


def add_parsers(sub: Any) -> None:
    """Register ``build``, ``pack`` and ``inspect-bundle``."""
    sp = add_command(sub, "build", cmd_build,
                     "compile an agent directory (C, Zig or JavaScript sources + policy.toml) into a bundle")
    sp.add_argument("dir", help="the agent directory: *.c sources, agent.zig (or main.zig), or agent.js (or agent.ts), "
                                "and policy.toml (Python files there are not packed: tools are the operator's, see "
                                "--tools-dir on `run`)")
    sp.add_argument("-o", "--output", required=True, help="the bundle file to write")
    sp = add_command(sub, "pack", cmd_pack, "pack a wasm module built elsewhere with a policy into a bundle")
    sp.add_argument("module", help="a core wasm module importing only from `torpor` (guest ABI v1)")
    sp.add_argument("--policy", required=True, help="the policy.toml to pack with it")
    sp.add_argument("--python", "--tool", action="append", metavar="FILE",
                    help="a Python module for the bundle to carry (repeatable); it is host code: a host runs the "
                         "bundle only with --trust-bundle-code DIGEST")
    sp.add_argument("-o", "--output", required=True, help="the bundle file to write")
    sp = add_command(sub, "inspect-bundle", cmd_inspect_bundle, "show a bundle's digest, ABI, imports, exports, "
                     "policy, and any host code it carries (Python, MCP server commands) with its digests")
    sp.add_argument("bundle", help="a .torpor bundle file")
