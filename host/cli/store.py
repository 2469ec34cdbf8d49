"""``torpor store check``, ``store stats``, ``store compact`` and ``torpor doctor``: is the
store sound, what does it hold, reclaiming what nothing uses, and what does this
installation give Torpor.

``store check`` reads the store itself (never through a host): it must work on a
store that every other command refuses as suspect.

Rolling back a torn last commit: when the store is suspect (a writer had it open when the
machine restarted) and the check of its newest tree fails, ``store check`` makes the
previous snapshot current (``snapshots.meta_pages``: LMDB keeps the tree of the commit
before the last intact), checks again, and keeps the rollback only if that check passes;
otherwise it puts the newest meta page back and changes nothing. By default only when
every suspect marker is a ``sync``-level writer's: there the dropped commit's sync was cut
off, so it was never acknowledged, and the older tree is intact by construction. With
``--repair`` also for a ``process``-level writer (the rollback may then drop commits
acknowledged since its last flush, and the older tree is only known intact because the
check passed) or an unreadable marker. A store that is not suspect is never rolled back.

For a suspect store the check also walks LMDB's own structure (``meta_pages.verify_structure``:
every page of the tree and of the free list, which no record read touches but the next
write would), since nothing writes it meanwhile; a live store's check reads records only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from host.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    JSON_HELP,
    STORE_HELP,
    add_command,
    emit,
    error_code,
    open_store,
    operator_config,
    store_dir,
)
from host.errors import ConfigError, TorporError

TITLE = "store: check, measure and compact the store; the installation"


def _check_store(db: Path) -> dict[str, Any]:
    """``LmdbStore.check`` of the store in ``db``, as a dict with readable lines added.

    Run in a forked child where there is fork: on some corrupt pages LMDB does not
    return an error but fails an assertion and aborts the whole process, so in a child
    the abort becomes a finding ("the store is corrupt") instead of the checker's death.
    """
    from snapshots import meta_pages
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
        data = {**report.to_dict(), "problem_lines": [str(p) for p in report.problems],
                "suspect_lines": [s.describe() for s in report.suspect]}
        if report.suspect:  # nobody writes it: its pages can be walked too (the free list)
            for message in meta_pages.verify_structure(db) or ():
                data["problems"].append({"database": "lmdb", "key": "", "agent_id": None, "seq": None,
                                         "message": message})
                data["problem_lines"].append(f"lmdb: {message}")
            data["ok"] = not data["problems"]
        return data

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
                payload = {"ok_run": False, "error": type(exc).__name__, "code": error_code(exc), "message": str(exc)}
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
    """The report of a store that could not be walked at all: one problem, nothing counted
    (and its suspect markers, which say whether a rollback may help)."""
    from snapshots import unflushed

    boot = unflushed.boot_id()
    try:
        suspect = unflushed.scan(db, boot).suspect if boot is not None else ()
    except OSError:
        suspect = ()
    return {"store": str(db), "ok": False, "counts": {}, "suspect": [s.to_dict() for s in suspect],
            "suspect_lines": [s.describe() for s in suspect],
            "problems": [{"database": "", "key": "", "agent_id": None, "seq": None, "message": message}],
            "problem_lines": [message]}


def cmd_store_check(args: argparse.Namespace) -> int:
    """Read every record of the store (refused as suspect or not) and report what is wrong."""
    root = store_dir(args)
    # A Torpor store keeps its LMDB environment in db/; an LmdbStore's own directory
    # (the path a StoreSuspect message names) is accepted as well.
    db = root if (root / "data.mdb").is_file() and not (root / "db").is_dir() else root / "db"
    if not (db / "data.mdb").is_file():
        raise ConfigError(f"no Torpor store at {root} (check --store or $TORPOR_STORE; `torpor run` creates one)")
    report = _check_store(db)
    rollback: dict[str, Any] | None = None
    if not report["ok"] and report["suspect"] and (args.repair or _all_sync(report["suspect"])):
        report, rollback = _roll_back(db, report)
    ok = bool(report["ok"])
    cleared: list[str] = []
    if args.accept and ok:
        cleared = _clear_suspect(db, {s["file"] for s in report["suspect"]})
    lines = {k: report.pop(k) for k in ("problem_lines", "suspect_lines")}
    data = {**report, "accepted": bool(args.accept and ok), "cleared": cleared, "rollback": rollback}

    def human() -> None:
        counts: dict[str, int] = report["counts"]
        total = sum(counts.values())
        if rollback is not None:
            print(rollback["message"])
        print(f"store {db}: {total} records read, " + ", ".join(f"{n} {k}" for k, n in counts.items()))
        for line in lines["problem_lines"]:
            print(f"problem: {line}")
        if lines["suspect_lines"]:
            print(f"suspect markers ({len(lines['suspect_lines'])}): a writer may have been "
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

    emit(args, data, human)
    return EXIT_OK if ok else EXIT_FAILED


def _all_sync(suspect: list[dict[str, Any]]) -> bool:
    """Whether every suspect marker is a readable one of a ``sync``-level writer."""
    return all(s.get("marker", {}).get("durability") == "sync" for s in suspect)


def _roll_back(db: Path, first: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Roll the store in ``db`` back to its previous snapshot and check it again.

    Returns the report to show and what happened: the second check's report if it passed
    (the rollback stays), else ``first`` with the meta page put back (nothing changed).
    """
    from snapshots import meta_pages
    from snapshots.errors import StoreError

    sync = _all_sync(first["suspect"])
    try:
        done = meta_pages.roll_back(db)
    except StoreError as exc:
        return first, {"rolled_back": False, "message": f"could not roll back to the previous snapshot: {exc}"}
    second = _check_store(db)
    info: dict[str, Any] = {"dropped_txn": done.dropped_txn, "current_txn": done.current_txn}
    if second["ok"]:
        why = "never acknowledged" if sync else "not flushed before the restart"
        return second, {**info, "rolled_back": True,
                        "message": f"rolled back the last commit (txn {done.dropped_txn}, {why}): the store is "
                                   f"at txn {done.current_txn}, whose every record was read and verified"}
    meta_pages.undo(done)
    found = "; ".join(second["problem_lines"][:3])
    return first, {**info, "rolled_back": False,
                   "message": f"the previous snapshot (txn {done.current_txn}) fails the check too ({found}): "
                              f"nothing was changed, the store is at txn {done.dropped_txn} as it was"}


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


def _kib(n: int) -> str:
    return f"{n / 1024:,.1f} KiB"


def cmd_store_stats(args: argparse.Namespace) -> int:
    """Bytes stored per agent and per kind, and the chunk store's totals."""
    with open_store(args, readonly=True) as store:
        data = store.stats()
    kinds = ("checkpoints", "checkpoints_chunks", "journal", "journal_chunks", "audit", "input", "total")

    def human() -> None:
        print("agent" + "".join(f"  {k:>18}" for k in kinds))
        for agent, row in sorted(data["agents"].items()):
            print(agent + "".join(f"  {_kib(row.get(k, 0)):>18}" for k in kinds))
        c = data["chunks"]
        print(f"chunks: {c['count']:,} holding {_kib(c['bytes'])}; {c['unreferenced']:,} unreferenced "
              f"({_kib(c['unreferenced_bytes'])}: `torpor store compact` reclaims them)")
        st = data["store"]
        print(f"store {st['path']}: data file {_kib(st['file_bytes'])}, in use {_kib(st['used_bytes'])} "
              f"(format {st['format']})")
        print("a chunk shared by several agents counts in each one's *_chunks column")

    emit(args, data, human)
    return EXIT_OK


def cmd_store_compact(args: argparse.Namespace) -> int:
    """Delete the content chunks no checkpoint and no journal entry names any more."""
    with open_store(args, readonly=False) as store:
        data = store.compact()

    def human() -> None:
        print(f"deleted {data['chunks_deleted']:,} unreferenced chunk(s), {_kib(data['bytes_freed'])}; "
              f"{data['chunks_kept']:,} kept (the data file keeps its size: LMDB reuses the pages)")

    emit(args, data, human)
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    """What this installation gives Torpor: versions, the engine layout, whether the native
    helpers are built (and why not), the default store and durability level."""
    from importlib import metadata

    from host.cli.common import is_fleet, open_fleet_store
    from host.paths import default_store_dir
    from host.sandbox import memory_pool
    from host.sandbox.engine import EngineConfig
    from host.tools import sources
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
        "operator_tools": {"tools_path": [str(d) for d in sources.dirs_from_env()],
                           "entry_points": sources.entry_point_tools()},
    }
    data["fast_paths"] = kernels.startswith("native") and (
        pool.startswith("native") or not cfg.uses_memory_pool())
    from host.tools import mcp_config

    try:  # a broken operator config is a finding here, not the end of the report
        data["operator_config"] = mcp_config.survey(operator_config(args))
    except ConfigError as exc:
        data["operator_config"] = {"file": str(getattr(args, "config", None) or mcp_config.default_path()),
                                   "error": str(exc)}

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
        tools = data["operator_tools"]
        print(f"tools path       {os.pathsep.join(tools['tools_path']) or '(none)'}  (${sources.TOOLS_PATH_ENV}; "
              "--tools-dir adds more)")
        eps = tools["entry_points"]
        print(f"entry points     {len(eps)} tools in `{sources.ENTRY_POINT_GROUP}`"
              + "".join(f"\n                 {n} = {v}" for n, v in sorted(eps.items())))
        op = data["operator_config"]
        print(f"operator config  {op['file'] or str(mcp_config.default_path()) + ' (not there: nothing configured)'}"
              f"  (--config, ${mcp_config.CONFIG_ENV})")
        if "error" in op:
            print(f"                 error: {op['error']}")
        for name, srv in op.get("servers", {}).items():
            print(f"  mcp.{name:<12} {srv['how']}" + (f"\n                 problem: {srv['problem']}"
                                                      if srv["problem"] else ""))
        for name, root in op.get("roots", {}).items():
            print(f"  root {name:<11} {root['path']}" + ("" if root["exists"] else "  (not a directory)"))
        if not data["fast_paths"]:
            print("note: a native helper is not in use; Torpor runs correctly but its hot paths are slower")

    fleet: dict[str, Any] | None = None
    if is_fleet(args):  # the cluster behind --store nats://...: reachable, and the stream's replicas
        store = open_fleet_store(args)
        try:
            fleet = store.cluster()
        finally:
            store.close()
        data["fleet"] = fleet

    def human_all() -> None:
        human()
        if fleet is not None:
            followers = ", ".join(f"{f['name']} ({'current' if f['current'] else 'behind'}, lag {f['lag']})"
                                  for f in fleet["followers"]) or "none"
            print(f"fleet store      nats-server {fleet['server_version']} at {fleet['server']}; stream "
                  f"{fleet['stream']}: {fleet['messages']} messages, R{fleet['replicas_configured']}, leader "
                  f"{fleet['leader']}, followers {followers}")

    found = None
    if getattr(args, "bundle", None):  # can this host run it: every MCP server it names provided here?
        from host.cli.policy import policy_of

        if "error" in data["operator_config"]:
            raise ConfigError(data["operator_config"]["error"])
        found = mcp_config.check(policy_of(args.bundle), operator_config(args))
        data["bundle"] = {"file": args.bundle, "ok": not found.errors, "errors": found.errors, "notes": found.notes}

    def human_checked() -> None:
        human_all()
        if found is not None:
            print(f"{args.bundle}: " + ("every MCP server it names is configured here" if not found.errors
                                        else "cannot run here"))
            for line in (*found.errors, *(f"note: {n}" for n in found.notes)):
                print(f"  {line}")

    emit(args, data, human_checked)
    return EXIT_OK if found is None or not found.errors else EXIT_FAILED


def add_parsers(sub: Any) -> None:
    """Register ``store check`` and ``doctor``."""
    store_help = "check the agent store, show what it holds, reclaim unreferenced chunks"
    st = sub.add_parser("store", help=store_help, description=store_help)
    ssub = st.add_subparsers(dest="store_command", metavar="SUBCOMMAND")
    check_help = ("read every record of the store and verify every checkpoint's checksum (exit 1 if "
                  "anything is wrong); it opens a store refused as suspect after a machine restart, and rolls "
                  "such a store's torn last commit back to the one before it")
    sp = ssub.add_parser("check", help=check_help, description=check_help)
    sp.add_argument("--store", default=None, help=STORE_HELP + "; its db/ directory is accepted too")
    sp.add_argument("--accept", action="store_true", help="if the check finds no problems, clear the markers that "
                                                          "make the store suspect, so that it opens again")
    sp.add_argument("--repair", action="store_true",
                    help="if the store is suspect and its newest commit fails the check, roll it back to the "
                         "previous snapshot even when a process-level writer (or an unreadable marker) made it "
                         "suspect; for a sync-level writer's torn commit this is the default")
    sp.add_argument("--json", action="store_true", help=JSON_HELP)
    sp.set_defaults(fn=cmd_store_check)
    for name, fn, help_ in (
        ("stats", cmd_store_stats, "bytes stored per agent and per kind (checkpoints, journal, the content chunks "
                                   "each names, audit, input) and the chunk store's totals"),
        ("compact", cmd_store_compact, "delete the content chunks that no checkpoint and no journal entry names "
                                       "(after retention, purges and rewritten entries)"),
    ):
        sp = ssub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--store", default=None, help=STORE_HELP)
        sp.add_argument("--json", action="store_true", help=JSON_HELP)
        sp.set_defaults(fn=fn)
    sp = add_command(sub, "doctor", cmd_doctor, "show versions, the engine profile, whether the native helpers are in "
                                                "use, the default store and durability, and the operator config (its MCP servers, what "
                                                "would stop each starting, its roots); with --store nats://... "
                                                "the fleet's cluster and its stream")
    sp.add_argument("--store", default=None, metavar="nats://HOST:PORT[,...]",
                    help="a fleet store to check: connect, and show the stream's leader and replicas")
    from host.cli.server import _fleet_options

    sp.add_argument("--bundle", default=None, metavar="FILE",
                    help="also hold this bundle's (or policy file's) MCP servers against the operator config: "
                         "exit 1 when one is not configured here")
    _fleet_options(sp)
