"""Markers that reveal a store written without syncs was cut off by a machine restart.

Why: at ``durability="process"`` commits reach the disk only when the background
flusher or ``close`` syncs them. A killed host process loses nothing (the kernel holds
the pages), but a power loss or a kernel crash may lose the last commits and may leave
the LMDB file corrupt, and nothing in the file says so. At ``durability="sync"`` every
acknowledged commit is on disk, but a power loss *during* a commit's one sync may leave
its meta page on disk without some of its pages (the older meta page's tree is intact:
``snapshots.meta_pages`` rolls back to it). So each process that writes a store, at
either level, first puts a marker file in ``<store>/unflushed/``, durable before its
first unsynced commit, and removes it once ``close`` flushed everything. A marker
that names another boot of the machine (``/proc/sys/kernel/random/boot_id``) means the
machine restarted while its writer still had unsynced commits: the next open refuses
the store until it has been checked (``torpor store check``).

A marker of this boot whose process is gone means the process died but the page cache
did not: nothing is at risk, and a writable open removes it. A process is named by its
pid and its start time (field 22 of ``/proc/<pid>/stat``), so that a reused pid is not
mistaken for the writer. A boot id cannot tell a clean shutdown from a power loss: a
reboot after a writer died without ``close`` is flagged too. Without a boot id (no
``/proc``) there are no markers and no checks.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "BOOT_ID_PATH",
    "MARKER_DIR",
    "Marker",
    "Scan",
    "Suspect",
    "boot_id",
    "pid_namespace",
    "process_start",
    "remove_marker",
    "remove_markers",
    "scan",
    "suspect_message",
    "write_marker",
]

#: Where Linux publishes a random id that changes at every boot.
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
#: The directory inside a store that holds the markers.
MARKER_DIR = "unflushed"

_BOOT = re.compile(r"[0-9a-f]+(?:-[0-9a-f]+)*")
_NAME = re.compile(r"(?P<boot>[0-9a-f]+(?:-[0-9a-f]+)*)_(?P<pid>[0-9]+)_(?P<start>[0-9]+)\.json")
_TMP_PREFIX = "."
_TMP_SUFFIX = ".tmp"


def boot_id() -> str | None:
    """The kernel's id of the current boot, or None where unavailable (the feature is off)."""
    try:
        raw = BOOT_ID_PATH.read_text(encoding="ascii").strip().lower()
    except (OSError, UnicodeDecodeError):
        return None
    return raw if _BOOT.fullmatch(raw) else None


def process_start(pid: int) -> int | None:
    """The start time of live process ``pid`` (clock ticks after boot), or None if it is gone.

    A zombie (killed, not yet reaped) counts as gone: it makes no more commits.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] in ("Z", "X"):
            return None
        return int(fields[19])  # field 22: fields[0] is field 3
    except (OSError, ValueError, IndexError):
        return None


def pid_namespace() -> str | None:
    """This process's pid namespace (``pid:[inode]``), or None where unavailable.

    A marker from another pid namespace names a pid this process cannot look up.
    """
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


@dataclass(frozen=True, slots=True)
class Marker:
    """One writing process, as its marker file describes it."""

    path: Path
    boot: str
    pid: int
    start: int
    host: str
    opened_at: float
    durability: str
    pidns: str | None = None

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.opened_at))
        return f"process {self.pid} on host {self.host!r} (opened it {when})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.path.name, "boot": self.boot, "pid": self.pid, "start": self.start,
            "host": self.host, "opened_at": self.opened_at, "durability": self.durability,
        }


@dataclass(frozen=True, slots=True)
class Suspect:
    """A marker that makes the store suspect: from an earlier boot, or unreadable.

    ``marker`` is None when the file could not be read as a marker; ``reason`` says why.
    """

    path: Path
    marker: Marker | None
    reason: str

    def describe(self) -> str:
        if self.marker is None:
            return f"marker file {self.path.name} is malformed ({self.reason})"
        return f"{self.marker.describe()}, marker file {self.path.name}"

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"file": self.path.name, "reason": self.reason}
        if self.marker is not None:
            data["marker"] = self.marker.to_dict()
        return data


@dataclass(frozen=True, slots=True)
class Scan:
    """What ``scan`` found: suspect markers, stale files to remove, and live writers."""

    suspect: tuple[Suspect, ...] = ()
    stale: tuple[Path, ...] = ()
    live: tuple[Marker, ...] = ()


def _name(boot: str, pid: int, start: int) -> str:
    return f"{boot}_{pid}_{start}.json"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_marker(
    store_dir: Path,
    durability: str,
    *,
    boot: str,
    pid: int | None = None,
    start: int | None = None,
    opened_at: float | None = None,
) -> Path:
    """Put this process's marker in ``store_dir``, durably, and return its path.

    Durable before it returns: the body is written under a temporary name and fsynced,
    renamed into place (a scan never sees half a marker), then the directory is
    fsynced (and the store directory, if the marker directory was just created). A
    temporary file left by a crash means no unsynced commit followed it, so scans
    treat it as stale. ``pid``, ``start`` and ``opened_at`` default to this process
    and now (tests pass others to stand for another process or boot). Raises OSError.
    """
    if not _BOOT.fullmatch(boot):
        raise ValueError(f"boot id must be lowercase hex groups separated by '-', got {boot!r}")
    pid = os.getpid() if pid is None else pid
    if start is None:
        start = process_start(pid)
        if start is None:
            raise OSError(f"cannot read the start time of process {pid} from /proc/{pid}/stat")
    directory = store_dir / MARKER_DIR
    if not directory.is_dir():
        directory.mkdir(exist_ok=True)
        _fsync_dir(store_dir)
    name = _name(boot, pid, start)
    body = {
        "boot": boot, "pid": pid, "start": start, "host": _hostname(),
        "opened_at": time.time() if opened_at is None else opened_at,
        "durability": durability, "pidns": pid_namespace(),
    }
    final = directory / name
    tmp = directory / f"{_TMP_PREFIX}{name}{_TMP_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(json.dumps(body, separators=(",", ":")).encode())
        while view:  # a short write (a disk filling up) must not leave half a marker
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    _fsync_dir(directory)
    return final


def remove_marker(path: Path) -> None:
    """Remove one marker (a missing one is fine) and fsync its directory. Raises OSError."""
    remove_markers([path])


def remove_markers(paths: list[Path] | tuple[Path, ...]) -> None:
    """Remove markers (missing ones are fine), then fsync each directory once. Raises OSError."""
    dirs: set[Path] = set()
    for path in paths:
        path.unlink(missing_ok=True)
        dirs.add(path.parent)
    for d in dirs:
        _fsync_dir(d)


def _parse(path: Path, raw: bytes) -> Marker:
    """The marker in ``raw``; ValueError naming what is wrong with it."""
    m = _NAME.fullmatch(path.name)
    if m is None:
        raise ValueError("its name is not <boot id>_<pid>_<start>.json")
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise ValueError("not a JSON object")
    types: dict[str, Any] = {
        "boot": str, "pid": int, "start": int, "host": str, "opened_at": (int, float), "durability": str,
    }
    for field, kind in types.items():
        value = body.get(field)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ValueError(f"field {field!r} is missing or has the wrong type")
    if (body["boot"], body["pid"], body["start"]) != (m["boot"], int(m["pid"]), int(m["start"])):
        raise ValueError("its body names another boot or process than its file name")
    pidns = body.get("pidns")
    return Marker(
        path, body["boot"], body["pid"], body["start"], body["host"], float(body["opened_at"]),
        body["durability"], pidns if isinstance(pidns, str) else None,
    )


def scan(store_dir: Path, boot: str) -> Scan:
    """Sort the markers in ``store_dir`` by what they mean, given the current ``boot`` id.

    Suspect: a marker of another boot (its writer never closed the store before the
    machine restarted), and any file that is not a readable marker. Stale: a marker of
    this boot whose process is gone (pid dead, or reused by a process that started at
    another time), and temporary files of writers that are gone. Live: writers that
    still run, or that this process cannot look up (another pid namespace); left alone.
    Raises OSError if the marker directory exists but cannot be listed.
    """
    directory = store_dir / MARKER_DIR
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return Scan()
    ours = pid_namespace()
    suspect: list[Suspect] = []
    stale: list[Path] = []
    live: list[Marker] = []

    def running(pid: int, start: int, pidns: str | None) -> bool:
        if pidns is not None and ours is not None and pidns != ours:
            return True  # not ours to judge
        return process_start(pid) == start

    for name in names:
        path = directory / name
        if name.startswith(_TMP_PREFIX) and name.endswith(_TMP_SUFFIX):
            m = _NAME.fullmatch(name[len(_TMP_PREFIX) : -len(_TMP_SUFFIX)])
            # Never renamed into place: no commit followed it. Remove once its writer is gone.
            if m is not None and (m["boot"] != boot or not running(int(m["pid"]), int(m["start"]), None)):
                stale.append(path)
            continue
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            continue  # removed by its writer's close since the listing
        except OSError as exc:
            suspect.append(Suspect(path, None, f"cannot be read: {exc.strerror or exc}"))
            continue
        try:
            marker = _parse(path, raw)
        except ValueError as exc:
            suspect.append(Suspect(path, None, str(exc)))
            continue
        if marker.boot != boot:
            suspect.append(Suspect(path, marker, "written during an earlier boot"))
        elif running(marker.pid, marker.start, marker.pidns):
            live.append(marker)
        else:
            stale.append(path)
    return Scan(tuple(suspect), tuple(stale), tuple(live))


def suspect_message(store_dir: Path, suspects: tuple[Suspect, ...] | list[Suspect]) -> str:
    """The one-paragraph refusal of a store with suspect markers: what happened, what to do."""
    writers = [s for s in suspects if s.marker is not None]
    bad = [s for s in suspects if s.marker is None]
    parts = []
    if writers:
        who = "; ".join(s.marker.describe() for s in writers if s.marker is not None)
        files = ", ".join(s.path.name for s in writers)
        levels = sorted({s.marker.durability for s in writers if s.marker is not None})
        if levels == ["sync"]:
            risk = ("which may have cut off a commit's sync and left the newest commit, never "
                    "acknowledged, unreadable (acknowledged commits are on disk).")
        else:
            risk = ("which may have lost that writer's last commits (up to its flush interval) "
                    "or corrupted the store.")
        parts.append(
            f"store {store_dir} may have lost commits or be corrupt: {who} wrote it at "
            f"durability {' and '.join(levels)} during an earlier boot of this machine and never closed it "
            f"cleanly (marker {files} in {store_dir / MARKER_DIR}). The machine restarted since (a power loss, a "
            f"kernel crash, or a reboot without the host's clean exit), {risk}"
        )
    if bad:
        files = "; ".join(s.describe() for s in bad)
        lead = "Also" if writers else f"store {store_dir} may be unsafe:"
        parts.append(
            f"{lead} {files} in {store_dir / MARKER_DIR}; it may stand for a writer "
            "cut off by a machine restart."
        )
    parts.append(
        f"Run `torpor store check --store {store_dir}` (it reads every record and verifies "
        "every checkpoint's checksum; if the newest commit of a sync-level writer is torn it "
        "rolls it back) and restore the store from a copy if it finds "
        f"problems; `torpor store check --store {store_dir} --accept` clears the "
        f"marker{'s' if len(suspects) > 1 else ''} once the check passes."
    )
    return " ".join(parts)


def _hostname() -> str:
    """This machine's name, for people reading a marker (socket is imported only to write one)."""
    import socket

    return socket.gethostname()
