"""The ``torpor`` command line: a thin layer over :class:`host.runtime.Host`.

Every command takes ``--json`` for scripts. Errors are typed exceptions turned
into one readable line (``torpor: error[code]: message``) and a non-zero exit
code; with ``--json`` the error is a JSON object on stdout instead.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from host.errors import ConfigError, TorporError
from host.sandbox import bundle as bundle_mod
from snapshots.lmdb_store import DURABILITY_LEVELS

EXIT_OK = 0
EXIT_FAILED = 1  # the command ran, the agent failed or was terminated
EXIT_ERROR = 2  # the command itself could not do its work
EXIT_INTERNAL = 3  # a bug in Torpor
EXIT_PARKED = 4  # the agent waits on a person (approval, or an in-doubt call to settle)


def _emit(args: argparse.Namespace, data: Any, human: Callable[[], None]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, indent=None, default=str))
    else:
        human()


def _host(args: argparse.Namespace) -> Any:
    """The host on the store the command names. Only `run` may create a store: for every
    other command a missing directory is a mistyped --store, not an empty store."""
    from host.paths import default_store_dir
    from host.runtime import Host
    from host.trust.credentials import VaultBroker

    store = Path(args.store) if args.store is not None else default_store_dir()
    if args.command != "run" and not (store / "db").is_dir():
        raise ConfigError(f"no Torpor store at {store} (check --store or $TORPOR_STORE; `torpor run` creates one)")
    return Host(store, broker=VaultBroker.for_store(store), durability=getattr(args, "durability", None))


def _parse_input(text: str | None) -> Any:
    if text is None:
        return {}
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"--input {text}: cannot read file ({exc.strerror})") from exc
    from host.sandbox import guest_json  # the same bounds as JSON from a guest: it goes to one

    try:
        return guest_json.parse(text)
    except guest_json.PoisonValue as exc:
        raise ConfigError(f"--input is not valid JSON: {exc}") from exc


# -- build / pack / inspect-bundle ---------------------------------------------------
def cmd_build(args: argparse.Namespace) -> int:
    raw = bundle_mod.build_dir(args.dir)
    return _write_bundle(args, raw)


def cmd_pack(args: argparse.Namespace) -> int:
    try:
        module = Path(args.module).read_bytes()
        policy_text = Path(args.policy).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {exc.filename}: {exc.strerror}") from exc
    tools = {Path(p).stem: Path(p).read_text(encoding="utf-8") for p in args.tool or []}
    raw = bundle_mod.pack(module, policy_text, tools=tools, policy_source=args.policy)
    return _write_bundle(args, raw)


def _write_bundle(args: argparse.Namespace, raw: bytes) -> int:
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
    _emit(args, data, lambda: print(f"built {out} ({b.name}, {len(raw)} bytes, digest {b.digest[:16]})"))
    return EXIT_OK


def cmd_inspect_bundle(args: argparse.Namespace) -> int:
    import wasmtime

    b = bundle_mod.load(args.bundle)
    module = wasmtime.Module(wasmtime.Engine(), b.module)
    imports = [f"{i.module}.{i.name}" for i in module.imports]
    exports = [e.name for e in module.exports]
    data = {
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

    _emit(args, data, human)
    return EXIT_OK


# -- run / resume / ps / inspect / fork --------------------------------------------------
def _print_result(res: Any) -> None:
    status = res.status
    print(f"agent {res.agent_id}: {status}")
    if res.output is not None:
        print(json.dumps(res.output, indent=2))
    if res.error:
        print(f"error[{res.error['code']}]: {res.error['message']}")
    if res.pending and status not in ("completed", "failed"):
        print(f"waiting on {res.pending.get('tool')} (call {res.pending.get('seq')})")
    print(f"fuel {res.fuel_used}, tool calls {res.tool_calls}, suspensions {res.suspensions}, "
          f"checkpoints {res.checkpoints}, snapshot bytes {res.snapshot_bytes}")


def _drive(args: argparse.Namespace, action: Callable[[Any], Awaitable[Any]]) -> int:
    """Open the host, drive one agent with ``action(host)``, print the result, map it to an exit code."""
    from host.runtime import run_sync

    host = _host(args)
    try:
        res = run_sync(lambda: action(host))
    finally:
        host.close()
    _emit(args, res.to_dict(), lambda: _print_result(res))
    return _result_exit(res)


def _result_exit(res: Any) -> int:
    if res.status == "completed":
        return EXIT_OK
    if res.status in ("waiting_approval", "in_doubt"):
        return EXIT_PARKED
    return EXIT_FAILED


def cmd_run(args: argparse.Namespace) -> int:
    from host.runtime import run_sync

    if args.fuel is not None and args.fuel < 0:
        raise ConfigError("--fuel must be a non-negative integer")
    b = bundle_mod.load(args.bundle)
    payload = _parse_input(args.input)
    host = _host(args)
    try:
        res = run_sync(lambda: host.run(b, payload, fuel=args.fuel, on_behalf_of=args.on_behalf_of))
    finally:
        host.close()
    if not args.json:
        for line in res.logs:
            print(f"[{line['level']}] {line['message']}", file=sys.stderr)
    _emit(args, res.to_dict(), lambda: _print_result(res))
    return _result_exit(res)


def cmd_resume(args: argparse.Namespace) -> int:
    from host.runtime import run_sync

    host = _host(args)
    try:
        if args.all:
            results = run_sync(host.resume_all)
        elif args.agent:
            results = [run_sync(lambda: host.resume(args.agent))]
        else:
            raise ConfigError("name an agent to resume, or pass --all")
    finally:
        host.close()
    data = [r.to_dict() for r in results]

    def human() -> None:
        if not results:
            print("nothing to resume")
        for r in results:
            _print_result(r)

    _emit(args, data if args.all else data[0], human)
    return max((_result_exit(r) for r in results), default=EXIT_OK)


def cmd_ps(args: argparse.Namespace) -> int:
    host = _host(args)
    try:
        agents = host.list_agents()
    finally:
        host.close()
    rows = [{
        "agent_id": a["agent_id"], "name": a.get("name"), "status": a.get("status"),
        "fuel_used": a.get("usage", {}).get("fuel_used", 0), "tool_calls": a.get("usage", {}).get("tool_calls", 0),
        "checkpoints": a.get("checkpoints", 0), "last_checkpoint_bytes": a.get("last_checkpoint_bytes", 0),
        "tokens": a.get("usage", {}).get("tokens", 0), "stalled": bool(a.get("stalled")),
        "created_at": a.get("created_at"),
    } for a in agents if not args.status or a.get("status") == args.status]

    def human() -> None:
        print(f"{'AGENT':26}  {'NAME':14}  {'STATUS':16}  {'FUEL':>12}  {'CALLS':>6}  {'TOKENS':>7}  {'CKPT':>5}  {'LAST':>6}")
        for r in rows:
            status = r["status"] + (" (stalled)" if r["stalled"] else "")
            print(f"{r['agent_id']:26}  {str(r['name'])[:14]:14}  {status:16}  {r['fuel_used']:>12}  "
                  f"{r['tool_calls']:>6}  {r['tokens']:>7}  {r['checkpoints']:>5}  {r['last_checkpoint_bytes']:>6}")

    _emit(args, rows, human)
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    host = _host(args)
    try:
        info = host.inspect(args.agent)
    finally:
        host.close()

    def human() -> None:
        print(f"agent    {info['agent_id']} ({info.get('name')}, bundle {str(info.get('bundle_digest'))[:16]})")
        print(f"status   {info.get('status')}")
        if info.get("principal"):
            print(f"for      {info['principal']}")
        if info.get("parent"):
            print(f"forked   from {info['parent']['agent_id']} at checkpoint {info['parent']['checkpoint']}")
        if info.get("output") is not None:
            print("output   " + json.dumps(info["output"]))
        if info.get("error"):
            print(f"error    [{info['error']['code']}] {info['error']['message']}")
        if info.get("pending") and info.get("status") not in ("completed", "failed", "terminated"):
            print(f"pending  {info['pending']['tool']} {json.dumps(info['pending'].get('args'))} (call {info['pending']['seq']})")
        u = info.get("usage", {})
        print(f"usage    fuel {u.get('fuel_used', 0)}, tool calls {u.get('tool_calls', 0)}, suspensions "
              f"{u.get('suspensions', 0)}, hibernations {u.get('hibernations', 0)}, tokens {u.get('tokens', 0)}")
        cps = info["checkpoint_list"]
        print(f"checkpoints ({len(cps)}):")
        shown = cps if len(cps) <= 12 else [*cps[:5], None, *cps[-5:]]
        for c in shown:
            if c is None:
                print("  ...")
                continue
            ts = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c["created_at"]))
            print(f"  #{c['seq']:<5} {c['size']:>7} bytes  {ts}")

    _emit(args, info, human)
    return EXIT_OK


def cmd_fork(args: argparse.Namespace) -> int:
    host = _host(args)
    try:
        new_id = host.fork(args.agent, args.checkpoint)
    finally:
        host.close()
    _emit(args, {"agent_id": new_id, "parent": args.agent, "checkpoint": args.checkpoint},
          lambda: print(f"forked {args.agent}@{args.checkpoint} as {new_id}; run `torpor resume {new_id}`"))
    return EXIT_OK


# -- approvals --------------------------------------------------------------------
def cmd_approvals(args: argparse.Namespace) -> int:
    host = _host(args)
    try:
        pending = host.approvals()
    finally:
        host.close()

    def human() -> None:
        if not pending:
            print("no pending approvals")
        for p in pending:
            call = p.get("call", {})
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(p.get("requested_at", 0)))
            print(f"{p['agent_id']}  {p.get('name')}  {when}")
            print(f"  call   {call.get('tool')} {json.dumps(call.get('args'))}")
            print(f"  reason {p.get('reason')}  (rule {p.get('rule')})")

    _emit(args, pending, human)
    return EXIT_OK


def cmd_approve(args: argparse.Namespace) -> int:
    return _drive(args, lambda host: host.approve(args.agent, note=args.note, by=args.by))


def cmd_deny(args: argparse.Namespace) -> int:
    return _drive(args, lambda host: host.deny(args.agent, reason=args.reason, by=args.by))


def cmd_resolve(args: argparse.Namespace) -> int:
    result = _parse_input(args.result) if args.result is not None else None
    return _drive(args, lambda host: host.resolve(args.agent, retry=args.retry, result=result, fail=args.fail, by=args.by))


# -- store --------------------------------------------------------------------
def _check_store(db: Path) -> dict[str, Any]:
    """``LmdbStore.check`` of the store in ``db``, as a dict with readable lines added.

    Run in a forked child where there is fork: on some corrupt pages LMDB does not
    return an error but fails an assertion and aborts the whole process, so in a child
    the abort becomes a finding ("the store is corrupt") instead of the checker's death.
    """
    from snapshots.errors import StoreCorrupt, StoreError
    from snapshots.lmdb_store import LmdbStore

    def run() -> dict[str, Any]:
        import lmdb

        corrupt = (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.InvalidError)
        try:
            store = LmdbStore.open(db, readonly=True, create=False, accept_suspect=True)
        except StoreCorrupt as exc:  # refused at open (a data file cut short): a finding
            return _corrupt_report(db, str(exc))
        except (lmdb.Error, StoreError) as exc:
            if not isinstance(exc, corrupt) and not isinstance(exc.__cause__, corrupt):
                raise
            return _corrupt_report(db, f"LMDB cannot open the store: {exc.__cause__ or exc}")
        with store:
            report = store.check()
        return {**report.to_dict(), "problem_lines": [str(p) for p in report.problems],
                "suspect_lines": [s.describe() for s in report.suspect]}

    if not hasattr(os, "fork"):  # pragma: no cover - not POSIX
        return run()
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into the CLI
        code = 0
        try:
            os.close(rfd)
            try:
                payload = {"ok_run": True, "data": run()}
            except BaseException as exc:  # every failure goes back to the parent
                payload = {"ok_run": False, "error": type(exc).__name__, "code": _error_code(exc), "message": str(exc)}
            raw = json.dumps(payload).encode()
            view = memoryview(raw)
            while view:
                view = view[os.write(wfd, view):]
        except BaseException:  # the pipe broke: the parent sees no report
            code = 3
        finally:
            os._exit(code)
    os.close(wfd)
    chunks = []
    with os.fdopen(rfd, "rb") as pipe:
        while chunk := pipe.read(65536):
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) or not chunks:
        import signal

        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
        what = f"signal {signal.Signals(sig).name}" if sig else f"exit status {os.waitstatus_to_exitcode(status)}"
        return _corrupt_report(db, f"LMDB stopped the checking process ({what}) while reading the store: "
                                   "its pages are corrupt beyond what LMDB reports as an error")
    payload = json.loads(b"".join(chunks))
    if not payload["ok_run"]:
        raise TorporError(payload["message"], code=payload["code"])
    data: dict[str, Any] = payload["data"]
    return data


def _corrupt_report(db: Path, message: str) -> dict[str, Any]:
    """The report of a store that could not be walked at all: one problem, nothing counted."""
    return {"store": str(db), "ok": False, "counts": {}, "suspect": [], "suspect_lines": [],
            "problems": [{"database": "", "key": "", "agent_id": None, "seq": None, "message": message}],
            "problem_lines": [message]}


def cmd_store_check(args: argparse.Namespace) -> int:
    """Read every record of the store (refused as suspect or not) and report what is wrong."""
    from host.paths import default_store_dir

    root = Path(args.store) if args.store is not None else default_store_dir()
    # A Torpor store keeps its LMDB environment in db/; an LmdbStore's own directory
    # (the path a StoreSuspect message names) is accepted as well.
    db = root if (root / "data.mdb").is_file() and not (root / "db").is_dir() else root / "db"
    if not (db / "data.mdb").is_file():
        raise ConfigError(f"no Torpor store at {root} (check --store or $TORPOR_STORE; `torpor run` creates one)")
    report = _check_store(db)
    ok = bool(report["ok"])
    cleared: list[str] = []
    if args.accept and ok:
        cleared = _clear_suspect(db, {s["file"] for s in report["suspect"]})
    lines = {k: report.pop(k) for k in ("problem_lines", "suspect_lines")}
    data = {**report, "accepted": bool(args.accept and ok), "cleared": cleared}

    def human() -> None:
        counts: dict[str, int] = report["counts"]
        total = sum(counts.values())
        print(f"store {db}: {total} records read, " + ", ".join(f"{n} {k}" for k, n in counts.items()))
        for line in lines["problem_lines"]:
            print(f"problem: {line}")
        if lines["suspect_lines"]:
            print(f"suspect markers ({len(lines['suspect_lines'])}): a writer at durability process may have been "
                  "cut off by a machine restart")
            for line in lines["suspect_lines"]:
                print(f"  {line}")
        else:
            print("no suspect markers")
        if ok:
            print("ok: every record was read, every checkpoint's checksum and every stored value's digest verified")
            if lines["suspect_lines"] and not args.accept:
                print("rerun with --accept to clear the markers, so that the store opens again")
        else:
            print(f"{len(lines['problem_lines'])} problem(s) found: restore the store from a copy")
        if args.accept:
            if not ok:
                print("not accepted: the check found problems, so the markers stay")
            elif cleared:
                print(f"accepted: cleared {len(cleared)} marker(s)")
            else:
                print("accepted: no markers to clear")

    _emit(args, data, human)
    return EXIT_OK if ok else EXIT_FAILED


def _clear_suspect(db: Path, names: set[str]) -> list[str]:
    """Remove the suspect markers a clean check listed (by file name; none that appeared since)."""
    from snapshots import unflushed
    from snapshots.lmdb_store import LmdbStore, StoreCheckReport

    boot = unflushed.boot_id()
    if boot is None or not names:
        return []
    with LmdbStore.open(db, readonly=True, create=False, accept_suspect=True) as store:
        found = tuple(s for s in unflushed.scan(db, boot).suspect if s.path.name in names)
        return store.clear_suspect(StoreCheckReport(str(store.path), {}, (), found))


# -- policy -----------------------------------------------------------------
def cmd_doctor(args: argparse.Namespace) -> int:
    """What this installation gives Torpor: versions, the engine layout, whether the native
    helpers are built (and why not), the default store and durability level."""
    from importlib import metadata

    from host.paths import default_store_dir
    from host.sandbox import memory_pool
    from host.sandbox.engine import EngineConfig
    from snapshots import delta, native_build
    from snapshots.lmdb_store import resolve_durability

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    cfg = EngineConfig.for_profile()
    delta._kernels()  # build or load now, so that its status is known
    kernels = native_build.status().get("delta_kernels", "not loaded")
    cap: int | None = None
    if cfg.uses_memory_pool():
        pool = memory_pool.status()
        cap = memory_pool.default_max_free() if cfg.memory_pool_max_free is None else cfg.memory_pool_max_free
    elif cfg.profile == "dense" and not memory_pool.enabled_by_env():
        pool = f"off (${memory_pool.ENV_ENABLED}=0)"
    else:
        pool = f"not used by the {cfg.profile!r} engine profile"
    data: dict[str, Any] = {
        "torpor": version("torpor"), "python": sys.version.split()[0], "wasmtime": version("wasmtime"),
        "ziglang": version("ziglang"), "engine_profile": cfg.profile,
        "native": {"delta_kernels": kernels, "memory_pool": pool}, "memory_pool_max_free": cap,
        "native_cache": str(native_build.cache_dir()),
        "durability": resolve_durability(None), "store": str(default_store_dir()),
    }
    data["fast_paths"] = kernels.startswith("native") and (
        pool.startswith("native") or not cfg.uses_memory_pool())

    def human() -> None:
        print(f"torpor {data['torpor']}  (python {data['python']}, wasmtime {data['wasmtime']}, "
              f"ziglang {data['ziglang']})")
        print(f"engine profile   {cfg.profile}  ($TORPOR_ENGINE)")
        print(f"delta kernels    {kernels}")
        print(f"memory pool      {pool}")
        if cap is not None:
            print(f"                 keeps up to {cap / (1 << 20):g} MiB ready for reuse (${memory_pool.ENV_MAX_FREE})")
        print(f"native cache     {data['native_cache']}  ($TORPOR_NATIVE_CACHE)")
        print(f"durability       {data['durability']}  ($TORPOR_DURABILITY)")
        print(f"default store    {data['store']}  ($TORPOR_STORE)")
        if not data["fast_paths"]:
            print("note: a native helper is not in use; Torpor runs correctly but its hot paths are slower")

    _emit(args, data, human)
    return EXIT_OK


def cmd_policy_check(args: argparse.Namespace) -> int:
    import policies

    pol = policies.load_policy(args.file)
    data = {"file": args.file, "ok": True, "agent": pol.agent.name, "tools": sorted(pol.grants)}
    data["digest"] = pol.digest
    _emit(args, data, lambda: print(f"{args.file}: ok\n{pol.summary()}"))
    return EXIT_OK


def cmd_policy_explain(args: argparse.Namespace) -> int:
    import policies

    pol = policies.load_policy(args.file)
    req_args = _parse_input(args.args)
    req = policies.ToolRequest(agent_id="explain", tool=args.tool, args=req_args, call_seq=1, agent_name=pol.agent.name)
    exp = policies.explain(pol, req, policies.Usage(), time.time())
    _emit(args, exp.to_dict(), lambda: print(str(exp)))
    return EXIT_OK


# -- parser -----------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="torpor",
        description="Run AI agents as sandboxed, hibernating WebAssembly instances.",
        epilog="exit codes: 0 completed/ok, 1 the agent failed or was terminated, 2 the command could not "
               "do its work, 3 internal error, 4 the agent waits on a person (approval, in-doubt call)",
    )
    p.add_argument("--version", action="version", version="torpor 0.1.0")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], help: str, store: bool = False,
            writes: bool = False) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.add_argument("--json", action="store_true", help="print one JSON document")
        if store:
            sp.add_argument("--store", default=None, help="store directory (default: $TORPOR_STORE or the user data dir)")
        if writes:
            sp.add_argument("--durability", choices=DURABILITY_LEVELS, default=None,
                            help="how commits reach the disk: sync (each one before the agent goes on; survives "
                                 "a power loss) or process (into the OS page cache, flushed every second and at exit; "
                                 "survives this process being killed, not a power loss); default $TORPOR_DURABILITY, "
                                 "else sync")
        sp.set_defaults(fn=fn)
        return sp

    agent_help = "the agent id (see `torpor ps`)"
    by_help = "who decides, kept in the audit log (default: $USER)"
    sp = add("build", cmd_build, "compile an agent directory (C sources + policy.toml) into a bundle")
    sp.add_argument("dir", help="the agent directory: *.c sources, policy.toml, optional host-tool *.py")
    sp.add_argument("-o", "--output", required=True, help="the bundle file to write")
    sp = add("pack", cmd_pack, "pack a wasm module built elsewhere with a policy into a bundle")
    sp.add_argument("module", help="a core wasm module importing only from `torpor` (guest ABI v1)")
    sp.add_argument("--policy", required=True, help="the policy.toml to pack with it")
    sp.add_argument("--tool", action="append", help="a host-side Python tool module to include (repeatable)")
    sp.add_argument("-o", "--output", required=True, help="the bundle file to write")
    sp = add("inspect-bundle", cmd_inspect_bundle, "show a bundle's digest, ABI, imports, exports and policy")
    sp.add_argument("bundle", help="a .torpor bundle file")

    sp = add("run", cmd_run, "run an agent bundle to completion (or until it waits on a human)", store=True, writes=True)
    sp.add_argument("bundle", help="a .torpor bundle file")
    sp.add_argument("--input", help="JSON input, or @FILE")
    sp.add_argument("--fuel", type=int, help="fuel budget for this run (overrides the policy)")
    sp.add_argument("--on-behalf-of", help="the principal the agent acts for")
    sp = add("resume", cmd_resume, "resume a suspended agent from its latest checkpoint", store=True, writes=True)
    sp.add_argument("agent", nargs="?", help=agent_help)
    sp.add_argument("--all", action="store_true", help="resume every unfinished agent")
    sp = add("ps", cmd_ps, "list agents", store=True)
    sp.add_argument("--status", help="only agents with this status")
    sp = add("inspect", cmd_inspect, "show an agent: status, output, checkpoints, pending call, usage", store=True)
    sp.add_argument("agent", help=agent_help)
    sp = add("fork", cmd_fork, "start a new agent from an earlier checkpoint of another", store=True, writes=True)
    sp.add_argument("agent", help=agent_help)
    sp.add_argument("--checkpoint", type=int, required=True, help="the checkpoint number (see `torpor inspect`)")

    sp = add("approvals", cmd_approvals, "list tool calls waiting for a human decision", store=True)
    sp = add("approve", cmd_approve, "approve the call an agent waits on, and resume it", store=True, writes=True)
    sp.add_argument("agent", help=agent_help)
    sp.add_argument("--note", help="a note kept in the audit log")
    sp.add_argument("--by", default=os.environ.get("USER"), help=by_help)
    sp = add("deny", cmd_deny, "deny the call an agent waits on; the agent sees a denial and continues", store=True, writes=True)
    sp.add_argument("agent", help=agent_help)
    sp.add_argument("--reason", required=True, help="why; the agent sees it in the denial")
    sp.add_argument("--by", default=os.environ.get("USER"), help=by_help)

    sp = add("resolve", cmd_resolve, "settle an in_doubt agent: re-run its call, supply its result, or fail it", store=True, writes=True)
    sp.add_argument("agent", help=agent_help)
    how = sp.add_mutually_exclusive_group(required=True)
    how.add_argument("--retry", action="store_true", help="run the call again (it did not take effect)")
    how.add_argument("--result", help="the call's result as JSON, or @FILE (it did take effect)")
    how.add_argument("--fail", metavar="REASON", help="fail the agent")
    sp.add_argument("--by", default=os.environ.get("USER"), help=by_help)

    add("doctor", cmd_doctor, "show versions, the engine profile, whether the native helpers are in use, "
                              "and the default store and durability")

    store_help = "check the agent store"
    st = sub.add_parser("store", help=store_help, description=store_help)
    ssub = st.add_subparsers(dest="store_command", metavar="SUBCOMMAND")
    check_help = ("read every record of the store and verify every checkpoint's checksum (exit 1 if "
                  "anything is wrong); it opens a store refused as suspect after a machine restart")
    sp = ssub.add_parser("check", help=check_help, description=check_help)
    sp.add_argument("--store", default=None, help="store directory (default: $TORPOR_STORE or the user data dir); "
                                                  "its db/ directory is accepted too")
    sp.add_argument("--accept", action="store_true", help="if the check finds no problems, clear the markers that "
                                                          "make the store suspect, so that it opens again")
    sp.add_argument("--json", action="store_true", help="print one JSON document")
    sp.set_defaults(fn=cmd_store_check)

    pol = sub.add_parser("policy", help="check and explain policy files", description="check and explain policy files")
    psub = pol.add_subparsers(dest="policy_command", metavar="SUBCOMMAND")
    sp = psub.add_parser("check", help="validate a policy file", description="validate a policy file")
    sp.add_argument("file", help="a policy.toml")
    sp.add_argument("--json", action="store_true", help="print one JSON document")
    sp.set_defaults(fn=cmd_policy_check)
    explain_help = "show the decision for a tool call and every rule behind it"
    sp = psub.add_parser("explain", help=explain_help, description=explain_help)
    sp.add_argument("file", help="a policy.toml")
    sp.add_argument("--tool", required=True, help="the tool name")
    sp.add_argument("--args", default="{}", help="JSON arguments")
    sp.add_argument("--json", action="store_true", help="print one JSON document")
    sp.set_defaults(fn=cmd_policy_explain)
    from bench.cli import add_parser as add_bench_parser
    from host.cli.trust import add_parsers as add_trust_parsers

    add_bench_parser(sub)  # `torpor bench ...`
    add_trust_parsers(sub)  # secrets, audit, replay, identity
    return p


def _error_code(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    if isinstance(code, str):
        return code
    from policies import PolicyError
    from snapshots.errors import SnapshotError, StoreFull, StoreUnavailable

    for cls, name in ((PolicyError, "invalid_policy"), (SnapshotError, "snapshot_corrupt"),
                      (StoreFull, "store_full"), (StoreUnavailable, "store_unavailable")):
        if isinstance(exc, cls):
            return name
    return "store_error"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``torpor`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    fn = getattr(args, "fn", None)
    if fn is None:
        parser.print_help()
        return EXIT_ERROR
    from host.sandbox import interrupts
    from policies import PolicyError
    from snapshots.errors import SnapshotError, StoreError

    try:
        with interrupts.handle_signals(then_ignore=True):  # Ctrl-C and SIGTERM end the work at a safe point
            return int(fn(args))
    except KeyboardInterrupt as exc:
        return _interrupted(getattr(exc, "signum", signal.SIGINT))
    except (TorporError, PolicyError, SnapshotError, StoreError) as exc:
        if interrupts.requested():  # what an interrupted guest or toolchain left behind
            return _interrupted(interrupts.requested())
        code = _error_code(exc)
        if getattr(args, "json", False):
            print(json.dumps({"status": "error", "error": {"code": code, "message": str(exc)}}))
        else:
            print(f"torpor: error[{code}]: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:  # `torpor audit show X | head`: the reader left, which is fine
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:  # a host bug: still one line, and the traceback on request
        if interrupts.requested():
            return _interrupted(interrupts.requested())
        if os.environ.get("TORPOR_DEBUG"):
            raise
        msg = f"internal error ({type(exc).__name__}: {exc}); rerun with TORPOR_DEBUG=1 for a traceback"
        if getattr(args, "json", False):
            print(json.dumps({"status": "error", "error": {"code": "internal", "message": msg}}))
        else:
            print(f"torpor: error[internal]: {msg}", file=sys.stderr)
        return EXIT_INTERNAL


def _interrupted(signum: int) -> int:
    print("torpor: interrupted" + ("" if signum == signal.SIGINT else f" (signal {signum})"), file=sys.stderr)
    return 128 + signum


if __name__ == "__main__":  # pragma: no cover - `python -m host.cli.app`
    sys.exit(main())
