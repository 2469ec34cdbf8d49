"""The embedded agent store: one LMDB environment behind the ``AgentStore`` protocol.

Why LMDB: readers are MVCC snapshots that never block the single writer, several host
processes can open the same directory safely (LMDB's own lock file), a commit is one
``fdatasync`` at the default durability (once ``transact`` returns, a SIGKILL or a power
cut does not lose it), and a record costs a few bytes over its key and value.

Durability: what a returned commit survives, chosen per process with
``LmdbStore.open(durability=...)``, else ``$TORPOR_DURABILITY``, else ``sync``. Two
processes on one store may use different levels: the level belongs to a process's
handle (LMDB's MDB_NOSYNC flag), not to the files.

``sync`` (the default)
    Once a commit returns it is on stable storage: it survives the host process being
    killed, a kernel crash and a power loss (on a disk that honours flushes). How: the
    environment is opened MDB_NOSYNC like ``process``, and each commit is followed by
    one explicit ``mdb_env_sync(force=1)`` (an ``fdatasync`` of the data file, its pages
    and its meta page) before it returns. LMDB's own synchronous commit costs two device
    flushes instead: an ``fdatasync`` of the pages, then the meta page written through
    an ``O_DSYNC`` descriptor (measured about 1.1 ms each on the benchmark machine's disk,
    issue 15). One sync covers every commit before it, so concurrent writers share it:
    ``GroupCommitter`` batches them into one transaction and one sync.

    Per commit (``transact``, ``transact_batch``: ``sync``, see ``snapshots.store.SyncWhen``),
    a caller that acknowledges nothing to anyone before a later durable commit may ask
    for less than ``"now"``: ``"soon"`` returns unsynced and a background thread syncs at
    once while the caller goes on (a transactional tool's effect and answer, which only
    the guest sees before the agent's next durable commit); ``"later"`` is left for the
    next ``"now"`` commit, ``settle`` or ``close`` to sync (a run's spawn when its caller
    waits for its end: the run costs one sync, not two). A write transaction
    begins only once every commit but the last is synced: LMDB keeps the trees of the
    last two commits intact (a transaction reuses only pages freed two commits back), so
    the tree the on-disk meta page names is never overwritten. So a power loss costs at
    most the last two commits made short of ``"now"``, which nobody outside was told of; a
    SIGKILL costs nothing (the page cache outlives the process). The rule counts every
    process's commits, not only this one's: other processes (a CLI command beside a
    server, a second host) commit to the same store under LMDB's writer lock, which a
    transaction holds once it has begun, so a transaction that is not sure the commit two
    before it is synced (another process's, whose syncs this one does not see) syncs
    first, under that lock (:meth:`LmdbStore._begin_write`).

    A durable commit is synced by the committing thread before it returns, and write
    transactions of this process are serialised with that sync (as LMDB's own
    synchronous commit holds its writer lock through its ``fdatasync``). What the single sync gives up against
    LMDB's two: the ordering of the meta page after the pages *within* one commit's
    ``fdatasync``. A power loss during that sync (about a millisecond, before the commit
    is acknowledged) may leave the new meta page on the disk with some of its pages
    missing; a commit already acknowledged is never at risk. The tree the *older* meta
    page names is intact then (no transaction reuses its pages before the next commit
    is synced), so the store is recoverable without loss: a ``sync``-level writer leaves
    an unflushed marker while it has the store open, as ``process`` does, so that after
    a machine restart the next ``open`` raises StoreSuspect; ``torpor store check`` then
    reads every record, and if the newest tree fails it rolls the store back to the
    older meta page (``snapshots.meta_pages``), which loses only the commit whose sync
    the power cut (never acknowledged), and re-checks.

    Guaranteed at ``sync``: every acknowledged (``"now"``) commit survives a process
    kill, a kernel crash and a power loss; after a power loss the store is either intact
    or refused until ``torpor store check`` rolls back the one commit whose sync was cut
    off (never acknowledged). Not guaranteed: if the commit before that one was made
    short of ``"now"`` and not yet synced, its own tree may be torn too (the older meta
    page may be its), and LMDB keeps no third snapshot to go back to: the check then
    reports both trees damaged, changes nothing, and the store must be restored from a
    copy. A caller that needs the rollback to succeed makes its commits ``"now"``.

``process``
    LMDB's MDB_NOSYNC (py-lmdb ``sync=False``, without MDB_WRITEMAP): a commit returns
    once LMDB has written its pages, then its meta page, into the kernel's page cache
    (``pwrite``), with no ``fdatasync``.

    Guaranteed: everything ``sync`` guarantees against the *host process* failing
    (SIGKILL, the OOM killer, a segfault, an unhandled exception). The kernel owns
    the written pages and writes them back whether or not the process lives, and any
    other process that opens the store reads them at once (there is one page cache
    per file). So Torpor's crash-consistency promise (SIGKILL at any moment,
    ``torpor resume --all`` finishes every agent, no recorded tool call runs again)
    holds at this level too; tests/test_crash_resume.py runs it at both. A background
    thread calls ``mdb_env_sync(force=1)`` (one ``fdatasync``) every
    ``flush_interval_s`` (default 1 s) if anything was committed since the last
    flush, and ``close`` flushes once more; every commit that returned before a
    successful flush started is on stable storage once it ends (``last_flush``,
    ``unflushed_commits``). A failed flush is raised by the next commit.

    Not guaranteed: a **kernel crash or power loss** may lose the commits since the
    last completed flush (up to one interval plus one flush), and it may leave the
    store **corrupt**, not merely old. LMDB's documentation of MDB_NOSYNC says a
    system crash "can corrupt the database or lose the last transactions"; it keeps
    atomicity and consistency only "if the filesystem preserves write order", which
    ext4 and XFS do not promise for data pages. (LMDB also reuses pages freed by
    commits, so the kernel's writeback may overwrite pages of the tree that the
    on-disk meta page still points to.) So a ``process``-level writer leaves a marker
    in the store while it has it open (``snapshots.unflushed``): after a machine
    restart the next ``open`` raises StoreSuspect until ``check`` (``torpor store
    check``) has read every record; restore from a copy if it finds problems. And an
    agent whose journal lost a tool call's record may run that call again.

    Analogies: Redis ``appendfsync everysec`` (write every command to the AOF, fsync
    it once a second on a background thread: a process crash loses nothing, "a
    disaster" up to a second) and NATS JetStream's ``sync_interval`` (acknowledge,
    fsync in the background, by default every 2 minutes: without replication an OS
    failure may lose acknowledged messages). PostgreSQL ``synchronous_commit = off``
    has the same latency and the same kind of loss window (the WAL writer flushes
    within three ``wal_writer_delay`` periods), but its WAL keeps the database
    consistent after an OS crash. LMDB has no WAL, so between flushes an OS crash
    can cost consistency too, as PostgreSQL's ``fsync = off`` can. (libmdbx's
    MDBX_SAFE_NOSYNC keeps the last synced tree intact, which would close that gap.)

    Use it where the host process is what fails (the common case, and the one the
    crash-consistency promise is about) and a power loss is covered otherwise
    (replicas, a battery-backed disk cache, re-running from inputs); use ``sync``
    where one machine's power loss must not cost an acknowledged tool call that must
    not run twice.

Layout (one named database each; keys sort as bytes, so iteration is in order):

=============  ==========================================  ================================
database       key                                         value
=============  ==========================================  ================================
agents         agent_id (UTF-8)                            JSON of the record minus agent_id
checkpoints    agent_id + 0x00 + seq (u64 big-endian)       created_at (f64 LE) + blob
                                                           (snapshot format 3: a chunk reference)
journal        agent_id + 0x00 + call_seq (u64 big-endian)  sealed JSON entry, or sealed
                                                           0xFE "TPC" + chunk reference
chunks         SHA-256 of the content (32 bytes)           codec byte + content (zstd or as is)
kv             namespace + 0x00 + key (UTF-8)              sealed bytes (counters: decimal ASCII)
<bucket>       key (UTF-8)                                 bytes, one database per bucket
                                                           (sealed in ``SEALED_BUCKETS``)
_torpor        b"format"                                   store format version, ASCII
_torpor        b"sealed"                                   present: created sealing every value
=============  ==========================================  ================================

Chunks (``snapshots.chunks``, store format 4): a checkpoint of snapshot format 3 names the
content-defined pieces of its payload, and a journal entry of at least
``JOURNAL_CHUNK_ABOVE`` bytes (a conversation in its arguments) is kept as the pieces of
its JSON; each piece is stored once, whichever checkpoints, entries and agents name it,
so a turn of a long conversation adds about its new message. A piece is checked against
its digest whenever it is read. Nothing counts references: ``compact`` (``torpor store
compact``) walks every reference in one write transaction and deletes the pieces none
names (after retention pruned checkpoints, an agent was purged, an intent was replaced
by its answer), and refuses if a reference cannot be read. ``stats`` gives the bytes per
agent and kind. A store of an older format opens as it is (its values need no conversion) and
is marked format 4 at the first writable open, so that an older release refuses it
rather than misreads a chunk reference.

Sealed values (``snapshots.sealed``) carry a digest over their database, key and bytes,
checked at every read: a value changed on disk raises RecordCorrupt naming the record,
never reaches an agent. Values written before seals existed carry none and are read as
they are, except in a store created sealing every value.

Agent ids and namespaces may not contain NUL, so ``agent + 0x00`` is an exact prefix
and agent "a" sorts (with all its checkpoints) before agent "ab". A hibernated small
agent costs its agent record plus one checkpoint node: about 9 + 8 bytes of key and
created_at and LMDB's 8-byte node header over the snapshot itself, then B-tree pages
that random inserts leave about 70% full: measured, about 1,030 bytes per agent for a
490-byte snapshot and a small agent record (bench/bench_snapshot_codec.py). Values over
about 2,000 bytes go to overflow pages (whole 4 KiB pages), so keep snapshots small.

Why the map grows by itself: LMDB needs a fixed map size up front. Starting small and
doubling on ``MapFullError`` (capped by free disk space) keeps small stores small.
Growing requires that no transaction of this process is open, so every transaction
passes through a gate that a grow waits on (``_Gate``); another process's growth shows
up as ``MapResizedError`` and is adopted the same way.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import resource
import shutil
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

import lmdb

from . import fastjson, sealed, unflushed
from .errors import (
    FULL_ERRNOS,
    CheckpointExists,
    NotFound,
    RecordCorrupt,
    SnapshotError,
    StoreConfigError,
    StoreCorrupt,
    StoreError,
    StoreFlushError,
    StoreFull,
    StoreSuspect,
    StoreUnavailable,
)
from .store import (
    BLOB_BUCKETS,
    INPUTS_BUCKET,
    SEALED_BUCKETS,
    UNREADABLE,
    AgentStore,
    CheckpointInfo,
    Outcome,
    ReadTxn,
    SyncWhen,
    WriteTxn,
    unreadable_record,
)
from .summary import AgentSummary, decode_summary, encode_summary, summary_of
from .synced_mark import SyncedMark

__all__ = [
    "DEFAULT_DURABILITY",
    "DEFAULT_FLUSH_INTERVAL_S",
    "DEFAULT_MAP_SIZE",
    "DURABILITY_ENV",
    "DURABILITY_LEVELS",
    "STORE_FORMAT",
    "Durability",
    "LmdbStore",
    "StoreCheckReport",
    "StoreProblem",
    "resolve_durability",
]

if TYPE_CHECKING:
    import logging

T = TypeVar("T")


def _log() -> logging.Logger:
    """The store's logger, for the rare warning: logging is imported then, not at start."""
    import logging

    return logging.getLogger("torpor.store")


DEFAULT_MAP_SIZE = 64 * 1024 * 1024
#: 2: journal entries, kv values, bundles and inputs are sealed (``snapshots.sealed``), so
#: a Torpor that reads format 1 only would misread them and must refuse the store. A
#: writable open of a format-1 store upgrades its record (its unsealed values stay valid).
#: 3: every agent record has a listing summary beside it (``snapshots.summary``), written
#: in the same transaction; an older Torpor would write records without one, so it must
#: refuse the store. A writable open of an older store writes the missing summaries.
#: 4: large checkpoints (snapshot format 3) and long journal entries are kept as content
#: chunks in the ``chunks`` table (``snapshots.chunks``); an older Torpor would misread a
#: chunk reference, so it must refuse the store. Older stores need no conversion.
STORE_FORMAT = 4
#: The ``_torpor`` key present in a store that was created sealing every value: there an
#: unsealed value is corrupt, not an older one.
_SEALED_KEY = b"sealed"

#: What a returned commit survives; see the module docstring.
Durability = Literal["sync", "process"]
DURABILITY_LEVELS: tuple[Durability, ...] = ("sync", "process")
DEFAULT_DURABILITY: Durability = "sync"
#: The environment variable that picks the level when the caller does not.
DURABILITY_ENV = "TORPOR_DURABILITY"
#: How often a ``process``-level store flushes to stable storage (Redis' everysec).
DEFAULT_FLUSH_INTERVAL_S = 1.0

_MAX_KEY = 511  # LMDB's compiled-in maximum key size
_SEQ = struct.Struct(">Q")
_CREATED = struct.Struct("<d")
_CORE_DBS = ("agents", "summaries", "checkpoints", "journal", "kv", "chunks", "_torpor")
#: A journal entry whose JSON is at least this long is stored as content chunks.
JOURNAL_CHUNK_ABOVE = 16 * 1024
#: The first bytes of a journal entry's sealed payload that is a chunk reference, not JSON
#: (0xFE never starts UTF-8, so no JSON entry starts with it).
_CHUNKED_ENTRY = b"\xfeTPC"
_MAX_DBS = 32  # headroom for buckets added later without touching open flags
#: Rounds a write transaction at ``sync`` lets go of LMDB's writer lock to sync another
#: process's unsynced commit before it syncs holding it (``LmdbStore._begin_write``).
_SYNC_ROUNDS = 3
_MAX_GROW_ATTEMPTS = 64

# Processes must not open one LMDB environment twice (its locks are per process).
_open_paths: set[str] = set()
_open_paths_lock = threading.Lock()


# Every record's JSON: the standard library's bytes, by orjson where they are the same.
_json = fastjson.compact


def _id_bytes(value: str, what: str) -> bytes:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")
    raw = value.encode()
    if b"\x00" in raw:
        raise ValueError(f"{what} {value!r} contains NUL, which the store reserves as a separator")
    if len(raw) > _MAX_KEY - 9:
        raise ValueError(f"{what} is {len(raw)} bytes in UTF-8; the store allows {_MAX_KEY - 9}")
    return raw


def _seq_key(agent_id: str, seq: int, what: str = "seq") -> bytes:
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < 2**64:
        raise ValueError(f"{what} must be an integer in [0, 2**64), got {seq!r}")
    return _id_bytes(agent_id, "agent_id") + b"\x00" + _SEQ.pack(seq)


def _plain_key(key: str, what: str = "key") -> bytes:
    if not isinstance(key, str):
        raise ValueError(f"{what} must be a string, got {key!r}")
    raw = key.encode()
    if not raw or len(raw) > _MAX_KEY:
        raise ValueError(f"{what} must be 1 to {_MAX_KEY} bytes in UTF-8, got {len(raw)}")
    return raw


def _kv_key(namespace: str, key: str) -> bytes:
    raw = _id_bytes(namespace, "namespace") + b"\x00" + key.encode()
    if len(raw) > _MAX_KEY:
        raise ValueError(
            f"namespace + key is {len(raw)} bytes in UTF-8; the store allows {_MAX_KEY}"
        )
    return raw


def resolve_durability(value: str | None) -> Durability:
    """The durability level ``value`` names, else ``$TORPOR_DURABILITY``, else ``sync``.

    Anything else is refused with the valid values in the message, whether it came
    from a caller or from the environment (a typo must not silently mean "sync").
    """
    source = "durability"
    if value is None:
        env = os.environ.get(DURABILITY_ENV, "").strip()
        if not env:
            return DEFAULT_DURABILITY
        value, source = env, f"${DURABILITY_ENV}"
    if value not in DURABILITY_LEVELS:
        raise StoreConfigError(
            f"{source} must be one of {', '.join(DURABILITY_LEVELS)} ('sync': a commit "
            "returns once on stable storage; 'process': once in the OS page cache, flushed "
            f"in the background), got {value!r}"
        )
    return value


def _check_flush_interval(value: float) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise StoreConfigError(
            f"flush_interval_s must be a positive number of seconds, got {value!r}"
        )
    return float(value)


#: How this C library spells the errors of a full disk (``FULL_ERRNOS``) and of EIO.
_FULL_TEXTS = tuple(os.strerror(e) for e in sorted(FULL_ERRNOS))
_EIO_TEXT = os.strerror(errno.EIO)
#: Room left under which an EIO from a write counts as a full disk (see _is_disk_full).
_NEARLY_FULL = 1 << 20


def _is_disk_full(exc: BaseException, path: Path) -> bool:
    """Whether a failed write or commit of the store in ``path`` means the disk is full.

    py-lmdb gives no errno, only LMDB's message, so the error's text is matched against
    ENOSPC, EDQUOT and EFBIG as this C library spells them. And LMDB reports a *short*
    write (the disk filled up part way through its pages) as EIO ("short write,
    filesystem full?" in mdb.c), so an EIO counts as full when the store's filesystem has
    less than a mebibyte left, or its data file is within a mebibyte of this process's
    file size limit. A write that fails on a disk with room to spare stays an I/O error.
    """
    if not isinstance(exc, (lmdb.Error, OSError)):
        return False
    code = getattr(exc, "errno", None)
    text = str(exc)
    if code in FULL_ERRNOS or any(t in text for t in _FULL_TEXTS):
        return True
    if code != errno.EIO and _EIO_TEXT not in text:
        return False
    try:
        st = os.statvfs(path)
        if st.f_bavail * st.f_frsize < _NEARLY_FULL:
            return True
        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        return soft != resource.RLIM_INFINITY and (path / "data.mdb").stat().st_size + _NEARLY_FULL > soft
    except OSError:
        return False


class _Gate:
    """A readers-writer gate: transactions enter shared, a map resize enters exclusive.

    LMDB's ``mdb_env_set_mapsize`` may only run while this process has no transaction
    open. Waiting resizes block new entries (so a stream of readers cannot starve one),
    except for a thread that is already inside, which would otherwise deadlock.
    """

    def __init__(self) -> None:
        # Entries and exits take the bare lock (a C-level context manager); only waits
        # go through the condition, which shares it. Every transaction passes here.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._active = 0
        self._exclusive_waiting = 0
        self._exclusive = False
        self._local = threading.local()

    def depth(self) -> int:
        depth: int = getattr(self._local, "depth", 0)
        return depth

    def enter(self) -> None:
        local = self._local
        depth: int = getattr(local, "depth", 0)
        with self._lock:
            while self._exclusive or (self._exclusive_waiting and depth == 0):
                self._cond.wait()
            self._active += 1
        local.depth = depth + 1

    def exit(self) -> None:
        local = self._local
        local.depth = getattr(local, "depth", 0) - 1
        with self._lock:
            self._active -= 1
            # Only a waiting resize waits for the count to reach zero; waking nobody
            # is most of the cost of a lone writer's gate on a quiet store.
            if self._active == 0 and self._exclusive_waiting:
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        if self.depth():
            raise StoreError(
                "the LMDB map must be resized but this thread still holds an open transaction "
                "of this store; close read transactions before writing from the same thread"
            )
        with self._cond:
            self._exclusive_waiting += 1
            try:
                while self._exclusive or self._active:
                    self._cond.wait()
            finally:
                self._exclusive_waiting -= 1
                if not self._exclusive_waiting:
                    self._cond.notify_all()  # entries held back for this resize may go on
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


class _Flusher:
    """The background thread of a ``process``-level store: one ``fdatasync`` per interval;
    of a ``sync``-level store: one ``fdatasync`` as soon as a ``sync="soon"`` commit kicks it.

    A daemon thread, so it never keeps the process alive (whatever it has not flushed
    is in the page cache, which outlives the process). It holds the store only through
    a weak reference, so a store dropped without ``close`` is not kept alive by it.
    ``close`` stops it and joins it before the environment is closed, so a flush never
    runs on a closed environment; an Event wakes it at once instead of after a sleep.
    """

    def __init__(self, store: LmdbStore, interval_s: float | None) -> None:
        self._store = weakref.ref(store)
        self._interval = interval_s  # None: only when kicked
        self._stop = threading.Event()
        self._kicked = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"torpor-lmdb-flush:{store.path.name}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        while True:
            self._kicked.wait(self._interval)
            self._kicked.clear()
            if self._stop.is_set():
                return
            store = self._store()
            if store is None or not store._background_flush():
                return
            del store  # do not pin the store while sleeping

    def kick(self) -> None:
        """Flush now (once; kicks while a flush runs make one more)."""
        self._kicked.set()

    def stop(self) -> None:
        self._stop.set()
        self._kicked.set()
        if self._thread is not threading.current_thread():
            self._thread.join()


@dataclass(frozen=True, slots=True)
class StoreProblem:
    """One thing ``LmdbStore.check`` found wrong: where (database, key) and what."""

    database: str
    key: str  # readable: "agent 'a' seq 3", "key 'x'", or "" when no record could be named
    message: str
    agent_id: str | None = None
    seq: int | None = None

    def __str__(self) -> str:
        where = f"{self.database} {self.key}" if self.key else self.database
        return f"{where}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "database": self.database, "key": self.key, "agent_id": self.agent_id,
            "seq": self.seq, "message": self.message,
        }


@dataclass(frozen=True, slots=True)
class StoreCheckReport:
    """What ``LmdbStore.check`` found: records per database, problems, suspect markers.

    ``ok`` means every record could be read and decoded; ``suspect`` lists the markers
    of writers cut off by a machine restart (the reason to check, not a problem).
    """

    path: str
    counts: dict[str, int]
    problems: tuple[StoreProblem, ...] = ()
    suspect: tuple[unflushed.Suspect, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "store": self.path, "ok": self.ok, "counts": dict(self.counts),
            "problems": [p.to_dict() for p in self.problems],
            "suspect": [s.to_dict() for s in self.suspect],
        }


def _agent_record(agent_id: str, raw: bytes) -> dict[str, Any]:
    """An agent record as stored, or its stand-in if the bytes do not decode to an object."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        return unreadable_record(agent_id, f"{type(exc).__name__}: {exc}"[:300])
    if not isinstance(body, dict):
        return unreadable_record(agent_id, f"a JSON {type(body).__name__}, not an object")
    return {"agent_id": agent_id, **body}


def _write_summaries(txn: lmdb.Transaction, agents: Any, summaries: Any) -> None:
    """Write the listing summary of every agent record, and no other (the upgrade of an
    older store, or the repair of one whose summaries went missing)."""
    txn.drop(summaries, delete=False)
    cur = txn.cursor(db=agents)
    try:
        for key, raw in cast("Iterator[tuple[bytes, bytes]]", iter(cur)):
            txn.put(key, encode_summary(_agent_record(_decode_key(key), raw)), db=summaries)
    finally:
        cur.close()


def _decode_key(key: bytes) -> str:
    return key.decode(errors="backslashreplace")


def _split_seq_key(key: bytes) -> tuple[str, int | None]:
    """(agent id, seq) of a checkpoint or journal key; seq None if the key is malformed."""
    agent, sep, rest = key.partition(b"\x00")
    if not sep or len(rest) != _SEQ.size:
        return _decode_key(key), None
    return _decode_key(agent), int(_SEQ.unpack(rest)[0])


def _label(database: str, key: bytes) -> str:
    """A record as a person names it: "journal entry 3 of agent X", "the input of agent X"."""
    if database == "journal":
        agent, seq = _split_seq_key(key)
        return f"journal entry {seq} of agent {agent}" if seq is not None else f"journal key {key!r}"
    if database == "kv":
        ns, _, name = key.partition(b"\x00")
        return f"kv value {_decode_key(name)!r} of namespace {_decode_key(ns)}"
    if database == INPUTS_BUCKET:
        return f"the input of agent {_decode_key(key)}"
    if database == "bundles":
        return f"bundle {_decode_key(key)}"
    return f"{database} record {_decode_key(key)!r}"


def _unseal(database: str, key: bytes, raw: bytes, strict: bool) -> bytes:
    return sealed.unseal(database, key, raw, lambda: _label(database, key), strict=strict)


def _journal_entry(key: bytes, raw: bytes, strict: bool,
                   get_chunk: Callable[[bytes], bytes | None]) -> dict[str, Any]:
    """A journal entry as stored: its digest checked (and its chunks', if it is kept as
    chunks), decoded to an object, or RecordCorrupt."""
    body = _unseal("journal", key, raw, strict)
    if body.startswith(_CHUNKED_ENTRY):
        from . import chunks  # loaded on first use (see _journal_entry)

        label = _label("journal", key)
        try:
            body = chunks.read_tree(body[len(_CHUNKED_ENTRY) :], get_chunk)
        except RecordCorrupt as exc:
            raise RecordCorrupt(f"{label}: {exc}", database="journal", key=label) from exc
        except ValueError as exc:
            raise RecordCorrupt(f"{label} has a malformed chunk reference ({exc})", database="journal",
                                key=label) from exc
    try:
        entry = json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        problem = f"does not decode ({type(exc).__name__}: {exc})"[:300]
    else:
        if isinstance(entry, dict):
            return entry
        problem = f"is a JSON {type(entry).__name__}, not an object"
    label = _label("journal", key)
    raise RecordCorrupt(f"{label} {problem}", database="journal", key=label)


def _json_object(database: str, key: bytes, value: bytes) -> str | None:
    """What is wrong with a value that must be one JSON object (audit records), or None."""
    try:
        body = json.loads(value)
    except (ValueError, RecursionError) as exc:
        return f"{_label(database, key)} does not decode: {exc}"[:300]
    if not isinstance(body, dict):
        return f"{_label(database, key)} is a JSON {type(body).__name__}, not an object"
    return None


#: Buckets of JSON objects that listings decode one by one: ``check`` decodes them too.
_JSON_BUCKETS = frozenset({"audit", "audit_heads", "approvals"})


def _check_record(database: str, key: bytes, value: bytes, strict: bool,
                  get_chunk: Callable[[bytes], bytes | None]) -> StoreProblem | None:
    """The problem with one record, decoded the way the store reads it, or None."""
    from . import chunks  # loaded on first use (see _journal_entry)
    if database in ("checkpoints", "journal"):
        agent, seq = _split_seq_key(key)
        where = f"agent {agent!r} " + ("seq" if database == "checkpoints" else "call_seq")
        if seq is None:
            return StoreProblem(database, f"key {key!r}", "malformed key (not agent id + NUL + "
                                "8-byte sequence number)", agent_id=agent)
        label = f"{where} {seq}"
        if database == "checkpoints":
            if len(value) < _CREATED.size:
                return StoreProblem(database, label, f"value of {len(value)} bytes is shorter "
                                    "than its created_at prefix", agent, seq)
            from .format import chunk_ref  # zstandard and the codec: only a check needs them

            try:
                ref = chunk_ref(value[_CREATED.size :])  # magic, version, checksum
                if ref is not None:  # every chunk it names is there and matches its digest
                    chunks.read_tree(ref, get_chunk)
            except SnapshotError as exc:
                return StoreProblem(database, label, str(exc), agent, seq)
            except (RecordCorrupt, ValueError) as exc:
                return StoreProblem(database, label, f"a chunk of this checkpoint is unusable: {exc}", agent, seq)
            return None
        try:
            _journal_entry(key, value, strict, get_chunk)
        except RecordCorrupt as exc:
            return StoreProblem(database, label, str(exc), agent, seq)
        return None
    if database == "chunks":
        try:
            chunks.load_chunk(key, value)
        except RecordCorrupt as exc:
            return StoreProblem(database, f"chunk {key.hex()}", str(exc))
        return None
    if database == "kv" or database in SEALED_BUCKETS:
        try:
            _unseal(database, key, value, strict)
        except RecordCorrupt as exc:
            agent_id = _decode_key(key) if database == INPUTS_BUCKET else None
            return StoreProblem(database, f"key {_decode_key(key)!r}", str(exc), agent_id)
        return None
    if database in _JSON_BUCKETS:
        problem = _json_object(database, key, value)
        if problem is None:
            return None
        agent_id = _decode_key(key).partition("/")[0] if database == "audit" else None
        return StoreProblem(database, f"key {_decode_key(key)!r}", problem, agent_id)
    if database == "agents":
        try:
            agent = key.decode()
            record = json.loads(value)
        except ValueError as exc:
            return StoreProblem(database, f"agent {_decode_key(key)!r}",
                                f"agent record is not UTF-8 JSON: {exc}", _decode_key(key))
        if not isinstance(record, dict):
            return StoreProblem(database, f"agent {agent!r}", "agent record is not a JSON object",
                                agent)
        return None
    if database == "summaries":
        try:
            decode_summary(_decode_key(key), value)
        except RecordCorrupt as exc:
            return StoreProblem(database, f"agent {_decode_key(key)!r}", f"{exc}; a writable open "
                                "of the store does not repair it, the next commit of the agent does",
                                _decode_key(key))
        return None
    if database == "_torpor" and key == b"format":
        try:
            int(value)
        except ValueError:
            return StoreProblem(database, "key 'format'", f"format record {value[:32]!r} is "
                                "not a number")
    return None


def _check_length(env: lmdb.Environment, p: Path) -> None:
    """Refuse a data file shorter than its meta page says, before LMDB reads a page past its end.

    LMDB maps ``data.mdb`` and trusts the newer of its two meta pages: the tree ends at
    page ``mm_last_pg``. If the file is shorter (a copy cut off, a disk that lost its
    tail), the first read of a missing page is a SIGBUS that kills the process without a
    word. So: (mm_last_pg + 1) * page size must fit in the file, or StoreCorrupt.

    Read through the freshly opened environment rather than by parsing the file before
    the open: ``mdb_env_open`` reads only the two meta pages (with ``pread``) and maps
    the file without touching the rest (a file cut down to its meta pages opens, and
    ``info()`` answers), it picks the meta page as every later reader will, and it holds
    LMDB's lock while a first opener writes the meta pages, so a store that another
    process is creating at this moment is never seen half-written. The file only grows
    while it is open (pages are written before the meta page that counts them), so the
    size read after the meta page is at least what that meta page needs.
    """
    last_pg = int(env.info()["last_pgno"])
    psize = int(env.stat()["psize"])
    need = (last_pg + 1) * psize
    try:
        size = (p / "data.mdb").stat().st_size
    except OSError as exc:
        raise StoreUnavailable(f"cannot read the size of store {p}: {exc.strerror or exc}") from exc
    if size < need:
        raise StoreCorrupt(
            f"store {p} is corrupt: data.mdb is {size} bytes, but its meta page says the data runs "
            f"to page {last_pg} of {psize} bytes ({need} bytes): the file was cut short. Restore "
            "the store from a copy"
        )


class LmdbStore:
    """An ``AgentStore`` in one LMDB environment (a directory with data.mdb and lock.mdb).

    Thread-safe: share one instance per process and per directory. Use
    ``transact``/``transact_batch`` for writes (they survive map growth), ``read`` for
    consistent reads. ``GroupCommitter`` batches many writers into one commit.
    ``durability`` says what a returned commit survives (see the module docstring);
    ``flush()`` forces everything committed so far onto stable storage at either level.
    """

    def __init__(
        self,
        env: lmdb.Environment,
        path: Path,
        dbs: dict[str, Any],
        readonly: bool,
        *,
        durability: Durability = DEFAULT_DURABILITY,
        flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S,
        marker: Path | None = None,
        strict: bool = False,
    ) -> None:
        self._env = env
        self._path = path
        self._dbs = dbs
        self._readonly = readonly
        # Created sealing every value: an unsealed value is corrupt, not an older one.
        self._strict = strict
        self._gate = _Gate()
        self._closed = False
        self._key = str(path.resolve())
        self._durability: Durability = durability
        self._flush_interval = flush_interval_s
        # Serialises flushes with each other and with close(), which closes the env.
        self._flush_lock = threading.Lock()
        self._flush_error: StoreFlushError | None = None  # sticky: see StoreFlushError
        # At "sync", each commit is synced explicitly, inside this lock with its
        # transaction: the next write transaction begins on a durable predecessor.
        self._sync_each = durability == "sync" and not readonly
        self._syncer: _Flusher | None = None  # at "sync": syncs sync="soon" commits (started by the first)
        self._syncer_lock = threading.Lock()
        self._writer: contextlib.AbstractContextManager[Any] = (
            threading.Lock() if self._sync_each else contextlib.nullcontext())
        #: number of successful write commits (tests and benchmarks read it)
        self.commits = 0
        #: number of times this process grew the map, and adopted another process's growth
        self.grows = 0
        self.adopted = 0
        # Bumped whenever this environment's map size changes (grown here, or adopted
        # from another process): a transaction that hit a full map grows it only if
        # nobody did since it began, without asking LMDB for the size on every commit.
        self._map_epoch = 0
        #: successful flushes to stable storage (background, explicit and at close), the
        #: wall-clock time the last one started (every commit that returned before it is
        #: on stable storage), and ``commits`` as it was then
        self.flushes = 0
        self.last_flush: float | None = None
        #: how long the last successful sync took, in seconds (0 before the first)
        self.last_sync_s = 0.0
        self.flushed_commits = 0
        #: syncs a write transaction made because another process's commit was unsynced
        self.interleaved_syncs = 0
        # The newest LMDB transaction id a sync of this process is known to cover, any
        # process's (read before the sync began); 0 at open: another process's commits
        # may be unsynced, so this process's first write transaction syncs them first.
        self._synced_txnid = 0
        # What any process's syncs covered (snapshots.synced_mark), so a transaction after
        # another process's commits syncs only when that process has not.
        self._synced_mark = SyncedMark.open(path) if self._sync_each else None
        # This process's unflushed marker (a writable handle), removed by a clean
        # close in the process that opened the store (never by a forked child).
        self._marker = marker
        self._marker_pid = os.getpid()
        # Told of every sync (``add_sync_listener``), weakly: an event loop's committer.
        self._sync_listeners: list[weakref.WeakMethod[Callable[[int, BaseException | None], None]]] = []
        self._flusher: _Flusher | None = None
        if durability == "process" and not readonly:
            self._flusher = _Flusher(self, flush_interval_s)

    # ----------------------------------------------------------------- opening

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        create: bool = True,
        map_size: int = DEFAULT_MAP_SIZE,
        readonly: bool = False,
        durability: str | None = None,
        flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S,
        accept_suspect: bool = False,
    ) -> LmdbStore:
        """Open (and with ``create``, make) the store in directory ``path``.

        ``durability``: ``"sync"`` or ``"process"`` (default ``$TORPOR_DURABILITY``, else
        ``"sync"``); ``flush_interval_s``: how often a ``process``-level store flushes.
        Both only concern this process's commits (a read-only store makes none).

        First the store's unflushed markers are scanned (``snapshots.unflushed``): a
        writer (at either level) that had it open when the machine restarted makes
        it suspect, and the open raises StoreSuspect unless ``accept_suspect`` (for the
        checker, ``check``); markers of writers that died in this boot are removed by a
        writable open. A writable open (at either level: at ``sync`` a power loss during
        a commit's sync may leave a torn newest tree) then leaves its own marker until a
        clean ``close``.

        Raises StoreConfigError for an unknown level or a bad interval, StoreUnavailable
        when the directory is missing and ``create`` is false, is not writable (unless
        ``readonly``), or holds a store of a newer format, and StoreSuspect (a
        StoreUnavailable) as above.
        """
        level = resolve_durability(durability)
        interval = _check_flush_interval(flush_interval_s)
        p = Path(path)
        if not p.exists():
            if not create or readonly:
                raise StoreUnavailable(
                    f"store directory {p} does not exist; create it with create=True "
                    "or check the path"
                )
            try:
                p.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreUnavailable(
                    f"cannot create store directory {p}: {exc.strerror or exc}"
                ) from exc
        if not p.is_dir():
            raise StoreUnavailable(f"store path {p} exists but is not a directory")
        if not readonly and not os.access(p, os.W_OK | os.X_OK):
            raise StoreUnavailable(
                f"store directory {p} is not writable (read-only filesystem or missing "
                "permission); fix its permissions or open it with readonly=True"
            )
        if readonly and not (p / "data.mdb").exists():
            raise StoreUnavailable(f"{p} holds no store (no data.mdb) to open read-only")
        boot = unflushed.boot_id()  # None: no /proc, so no markers and no checks
        if boot is not None:
            cls._scan_markers(p, boot, readonly, accept_suspect)
        key = str(p.resolve())
        with _open_paths_lock:
            if key in _open_paths:
                raise StoreUnavailable(
                    f"store {p} is already open in this process; share that LmdbStore "
                    "instance (LMDB forbids opening one environment twice per process)"
                )
            _open_paths.add(key)
        marker: Path | None = None
        unsynced = False  # a commit of this open may never reach stable storage
        try:
            if not readonly and boot is not None:
                # Durable before the environment exists, so before its first unsynced
                # commit (_open_dbs may write the format record).
                try:
                    marker = unflushed.write_marker(p, level, boot=boot)
                except OSError as exc:
                    if exc.errno in FULL_ERRNOS:
                        raise StoreFull(f"cannot write the unflushed marker of store {p}: the disk is "
                                        f"full ({exc.strerror}); free disk space") from exc
                    raise StoreUnavailable(
                        f"cannot write the unflushed marker of store {p} in "
                        f"{p / unflushed.MARKER_DIR}: {exc.strerror or exc}"
                    ) from exc
            env = cls._open_env(p, map_size, readonly, level)
            try:
                _check_length(env, p)  # before the first read of a tree page
                dbs, strict = cls._open_dbs(env, p, readonly)
                if not readonly:
                    # Start from a state on stable storage (e.g. the format record just
                    # written), so the first interval's exposure is the interval's own
                    # (and at "sync", so the first commit is the only one unsynced).
                    try:
                        env.sync(True)
                    except lmdb.Error as exc:
                        # A later retry that succeeds would prove nothing (see
                        # StoreFlushError): the marker stays, as after a failed close.
                        unsynced = True
                        raise StoreUnavailable(f"cannot flush store {p}: {exc}") from exc
                return cls(
                    env, p, dbs, readonly, durability=level, flush_interval_s=interval,
                    marker=marker, strict=strict,
                )
            except BaseException:
                if marker is not None and not unsynced:
                    try:  # whatever _open_dbs committed unsynced goes to disk, or the marker stays
                        env.sync(True)
                    except lmdb.Error:
                        unsynced = True
                env.close()
                raise
        except BaseException:
            if marker is not None and not unsynced:
                with contextlib.suppress(OSError):
                    unflushed.remove_marker(marker)
            with _open_paths_lock:
                _open_paths.discard(key)
            raise

    @staticmethod
    def _scan_markers(p: Path, boot: str, readonly: bool, accept_suspect: bool) -> None:
        """Refuse a suspect store (unless accepted); a writable open removes stale markers."""
        try:
            found = unflushed.scan(p, boot)
        except OSError as exc:
            raise StoreUnavailable(
                f"cannot read the unflushed markers of store {p} in "
                f"{p / unflushed.MARKER_DIR}: {exc.strerror or exc}"
            ) from exc
        if found.suspect and not accept_suspect:
            raise StoreSuspect(unflushed.suspect_message(p, found.suspect))
        if found.stale and not readonly:
            # Writers killed in this boot: the page cache outlived them, nothing is at risk.
            try:
                unflushed.remove_markers(found.stale)
            except OSError as exc:
                _log().warning("cannot remove stale unflushed markers of store %s: %s", p, exc)

    @staticmethod
    def _open_env(
        p: Path, map_size: int, readonly: bool, durability: Durability
    ) -> lmdb.Environment:
        if map_size < 64 * 1024:
            raise ValueError(f"map_size must be at least 64 KiB, got {map_size}")
        try:
            # "process" is MDB_NOSYNC without MDB_WRITEMAP: LMDB pwrite()s the pages, then
            # the meta page, into the page cache and skips the fdatasync. LMDB states what
            # integrity NOSYNC keeps only for environments without WRITEMAP.
            # "sync" is MDB_NOSYNC too, and syncs explicitly once per commit (see the
            # module docstring: one device flush a commit instead of LMDB's two).
            return lmdb.open(
                str(p),
                map_size=map_size,
                subdir=True,
                readonly=readonly,
                max_dbs=_MAX_DBS,
                max_readers=256,
                readahead=False,
                sync=False,
                metasync=True,
                writemap=False,
                lock=True,
            )
        except (lmdb.InvalidError, lmdb.CorruptedError) as exc:
            # E.g. a data.mdb cut off inside its two meta pages: "not an LMDB file".
            raise StoreCorrupt(f"store {p} is corrupt: {exc}; restore it from a copy") from exc
        except lmdb.Error as exc:
            raise StoreUnavailable(f"cannot open store {p}: {exc}") from exc
        except OSError as exc:
            raise StoreUnavailable(f"cannot open store {p}: {exc.strerror or exc}") from exc

    @staticmethod
    def _open_dbs(env: lmdb.Environment, p: Path, readonly: bool) -> tuple[dict[str, Any], bool]:
        """The named databases, and whether the store was created sealing every value.

        A writable open creates what is missing: in a new store the format record and the
        ``sealed`` mark; in a store of an older format, the current format record (its
        values stay readable, and an older Torpor must no longer misread the new ones).
        """
        names = (*_CORE_DBS, *BLOB_BUCKETS)
        dbs: dict[str, Any] = {}
        if readonly:
            for name in names:
                # No txn= here: py-lmdb handles opened inside a caller's read-only
                # transaction are unusable once it ends.
                try:
                    dbs[name] = env.open_db(name.encode(), create=False)
                except lmdb.NotFoundError:
                    dbs[name] = None  # written by an older Torpor: reads see it empty
        else:
            for _ in range(_MAX_GROW_ATTEMPTS):
                try:
                    with env.begin(write=True) as txn:
                        for name in names:
                            dbs[name] = env.open_db(name.encode(), txn=txn, create=True)
                        meta_db = dbs["_torpor"]
                        found = txn.get(b"format", db=meta_db)
                        if found is None:
                            txn.put(b"format", str(STORE_FORMAT).encode(), db=meta_db)
                            if all(txn.stat(dbs[n])["entries"] == 0 for n in names if n != "_torpor"):
                                txn.put(_SEALED_KEY, b"1", db=meta_db)  # new: every value sealed
                        elif found.isdigit() and int(found) < STORE_FORMAT:
                            txn.put(b"format", str(STORE_FORMAT).encode(), db=meta_db)
                        if txn.stat(dbs["agents"])["entries"] != txn.stat(dbs["summaries"])["entries"]:
                            _write_summaries(txn, dbs["agents"], dbs["summaries"])  # older, or damaged
                    break
                except lmdb.MapFullError:
                    env.set_mapsize(env.info()["map_size"] * 2)
                except lmdb.Error as exc:
                    if _is_disk_full(exc, p):
                        raise StoreFull(f"disk under store {p} is full: {exc}") from exc
                    raise StoreUnavailable(f"cannot initialise store {p}: {exc}") from exc
        meta = dbs.get("_torpor")
        strict = False
        if meta is not None:
            with env.begin() as txn:
                raw = txn.get(b"format", db=meta)
                strict = txn.get(_SEALED_KEY, db=meta) is not None
            if raw is not None and not raw.isdigit():
                raise StoreCorrupt(f"store {p}: its format record {raw[:32]!r} is not a number; "
                                   "restore the store from a copy")
            if raw is not None and int(raw) > STORE_FORMAT:
                raise StoreUnavailable(
                    f"store {p} has format {int(raw)}, newer than this Torpor's {STORE_FORMAT}; "
                    "open it with the Torpor release that wrote it or a newer one"
                )
        return dbs, strict

    @property
    def path(self) -> Path:
        return self._path

    @property
    def durability(self) -> Durability:
        """What a returned commit of this handle survives: ``"sync"`` or ``"process"``."""
        return self._durability

    @property
    def flush_interval_s(self) -> float:
        """How often a ``process``-level store flushes to stable storage (unused at ``sync``)."""
        return self._flush_interval

    @property
    def unflushed_commits(self) -> int:
        """Commits of this process not yet known to be on stable storage.

        At ``process`` level these are what a power loss or kernel crash right now could
        cost; a SIGKILL of this process costs none of them. At ``sync`` level at most two,
        commits made with ``sync`` short of ``"now"`` that no sync has covered yet.
        """
        return max(0, self.commits - self.flushed_commits)

    @property
    def map_size(self) -> int:
        """The current LMDB map size in bytes (grows on demand)."""
        return int(self._env.info()["map_size"])

    def used_bytes(self) -> int:
        """Bytes held by live B-tree pages of all databases (free pages not counted).

        The density figure: LMDB never overwrites in place, so the data file also holds
        pages freed by recent commits, which later commits reuse.
        """
        txn = self._begin(write=False)
        try:
            stats = [self._env.stat()]  # the main database, which names the others
            stats += [txn.stat(db) for db in self._dbs.values() if db is not None]
        finally:
            txn.abort()
            self._gate.exit()
        pages = sum(
            int(st["branch_pages"]) + int(st["leaf_pages"]) + int(st["overflow_pages"])
            for st in stats
        )
        return pages * int(stats[0]["psize"])

    def compact(self) -> dict[str, int]:
        """Delete the chunks that no checkpoint and no journal entry names any more (those of
        pruned checkpoints, purged agents, rewritten journal entries), in one transaction.

        Refuses (RecordCorrupt, SnapshotError) when a record's references cannot be read,
        rather than guess which chunks are free. LMDB reuses the freed pages; the file
        does not shrink.
        """
        return self.transact(lambda txn: cast(_LmdbTxn, txn).reclaim_chunks())

    def stats(self) -> dict[str, Any]:
        """Bytes stored per agent and per kind (checkpoints, journal, the chunks each names,
        audit, input), the chunk store's totals, and the data file's size."""
        with self.read() as txn:
            out = cast(_LmdbTxn, txn).stored_bytes()
        out["store"] = {"path": str(self._path), "file_bytes": (self._path / "data.mdb").stat().st_size,
                        "used_bytes": self.used_bytes(), "format": STORE_FORMAT}
        return out

    # ------------------------------------------------------------------ checking

    def check(self) -> StoreCheckReport:
        """Read every record of every database and verify what can be verified.

        Each checkpoint's snapshot record must pass ``peek_snapshot`` (magic, version
        and the checksum over the whole record: a flipped bit anywhere fails it); each
        journal entry, kv value, bundle and input must match its digest (``sealed``); each
        agent record, journal entry, audit record, signed head and approval request must
        decode as a JSON object the way its readers read it; every other value is read.
        LMDB errors (MDB_CORRUPTED, MDB_PAGE_NOTFOUND: a tree whose pages a crash
        overwrote) become problems, not exceptions. One read
        transaction, so a consistent view while writers go on (a fresh one after an
        LMDB error, which ends a transaction). Also lists the suspect unflushed markers.
        Reads every page: meant for ``torpor store check``, not for the hot path.
        """
        self._check_open()
        counts: dict[str, int] = {}
        problems: list[StoreProblem] = []
        txn: lmdb.Transaction | None = None
        chunks_db = self._dbs.get("chunks")

        def get_chunk(name: bytes) -> bytes | None:
            if txn is None or chunks_db is None:
                return None
            return cast("bytes | None", txn.get(name, db=chunks_db))
        try:
            for name, db in self._dbs.items():
                counts[name] = 0
                if db is None:
                    continue  # written by an older Torpor: absent, which is not a problem
                last: bytes | None = None
                try:
                    if txn is None:
                        txn = self._begin(write=False)
                    cur = txn.cursor(db=db)
                    try:
                        for key, value in cast("Iterator[tuple[bytes, bytes]]", iter(cur)):
                            last = key
                            counts[name] += 1
                            problem = _check_record(name, key, value, self._strict, get_chunk)
                            if problem is not None:
                                problems.append(problem)
                    finally:
                        cur.close()
                except lmdb.Error as exc:
                    where = f"after key {_decode_key(last)!r}" if last is not None else ""
                    problems.append(StoreProblem(
                        name, where, f"LMDB cannot read this database ({exc}); records past "
                        "this point were not checked"))
                    if txn is not None:
                        txn.abort()
                        self._gate.exit()
                        txn = None
        finally:
            if txn is not None:
                txn.abort()
                self._gate.exit()
        boot = unflushed.boot_id()
        suspect = unflushed.scan(self._path, boot).suspect if boot is not None else ()
        return StoreCheckReport(str(self._path), counts, tuple(problems), suspect)

    def clear_suspect(self, report: StoreCheckReport) -> list[str]:
        """Remove the suspect markers that ``report`` (a ``check`` of this store) found.

        Only after a check that found no problems (StoreError otherwise: restore the
        store from a copy instead). Returns the names of the marker files removed.
        """
        self._check_open()
        if report.path != str(self._path):
            raise ValueError(f"the report is of store {report.path}, not of {self._path}")
        if not report.ok:
            raise StoreError(
                f"store {self._path}: the check found {len(report.problems)} problem(s), so "
                "its suspect markers stay; restore the store from a copy"
            )
        paths = [s.path for s in report.suspect]
        try:
            unflushed.remove_markers(paths)
        except OSError as exc:
            raise StoreUnavailable(
                f"cannot remove the unflushed markers of store {self._path}: "
                f"{exc.strerror or exc}"
            ) from exc
        return [path.name for path in paths]

    # ------------------------------------------------------------------ flushing

    def flush(self) -> None:
        """Put every commit made so far on stable storage (one ``fdatasync``), now.

        At ``process`` level this is what the background flusher does every interval;
        call it where an acknowledgement must survive a power loss (before telling the
        outside world, say). At ``sync`` level commits are already there (but the last one
        or two made with ``sync`` short of ``"now"``), and this only costs a sync. Raises StoreFlushError if
        it, or an earlier flush, failed.
        """
        self._require_writable()
        with self._flushing():
            self._check_open()
            self._sync_locked()

    def settle(self) -> None:
        """Keep the level's promise for every commit so far: at ``sync``, sync those
        left unsynced (``sync`` short of ``"now"``) if any (else nothing, no I/O); at
        ``process``, nothing (the flusher's interval is that level's promise)."""
        self._require_writable()
        if not self._sync_each or self.commits == self.flushed_commits:
            return
        with self._writer:
            if self.commits != self.flushed_commits:
                with self._flushing():
                    self._check_open()
                    self._sync_locked()

    def sync_soon(self) -> None:
        """At ``sync``, have the background syncer sync every commit made so far, if any is
        unsynced, without waiting for it (:meth:`add_sync_listener` says when it is done);
        at ``process``, nothing (the flusher's interval is that level's promise)."""
        if not self._sync_each or self.commits == self.flushed_commits or self._closed:
            return
        self._kick_syncer()

    def _kick_syncer(self) -> None:
        syncer = self._syncer
        if syncer is None:
            with self._syncer_lock:  # started once, whichever thread asks first
                if self._syncer is None:
                    self._syncer = _Flusher(self, None)
                syncer = self._syncer
        syncer.kick()

    def add_sync_listener(self, listener: Callable[[int, BaseException | None], None]) -> None:
        """Call ``listener(flushed_commits, error)`` after every sync of this store, on the
        thread that synced (the background syncer's, mostly), with ``error`` the
        StoreFlushError of a sync that failed. It must be quick and must not touch the
        store: an event loop's committer hands it to its loop (``host.runtime.commits``).
        A bound method, held weakly: a listener that is gone is dropped."""
        self._sync_listeners.append(weakref.WeakMethod(listener))

    def _tell_synced(self, error: BaseException | None) -> None:
        if not self._sync_listeners:
            return
        gone = False
        for ref in list(self._sync_listeners):
            listener = ref()
            if listener is None:
                gone = True
                continue
            try:
                listener(self.flushed_commits, error)
            except Exception as exc:  # a listener's bug must not fail the sync it is told of
                _log().warning("a sync listener failed: %s", exc)
        if gone:
            self._sync_listeners = [r for r in self._sync_listeners if r() is not None]

    def _after_commit(self, sync: SyncWhen) -> None:
        """Count a commit just made (inside ``_writer``); at ``sync``, sync it (``"now"``),
        have the background syncer sync it while the caller goes on (``"soon"``), or
        leave it to the next sync (``"later"``)."""
        self.commits += 1
        if not self._sync_each or sync == "later":
            return
        if sync == "now":
            with self._flushing():
                self._sync_locked()
            return
        self._kick_syncer()

    def _before_write(self) -> None:
        """At ``sync``, inside ``_writer`` before a write transaction begins: every commit
        but the last is on stable storage (else sync, waiting for the background syncer),
        so the new transaction cannot reuse a page of the tree the disk's meta page names."""
        if self._sync_each and self.commits - self.flushed_commits > 1:
            with self._flushing():
                if self.commits - self.flushed_commits > 1:
                    self._sync_locked()

    @contextmanager
    def _flushing(self) -> Iterator[None]:
        """Enter the gate shared, then take the flush lock: always in this order.

        The gate because ``mdb_env_sync`` reads the meta page through the memory map,
        which a map resize replaces; the lock serialises flushes with each other and
        with ``close``. Taking the lock first could deadlock: a flusher holding it and
        waiting at the gate behind a pending resize, while the resize waits for a
        thread that holds a transaction and waits for the lock.
        """
        self._gate.enter()
        try:
            with self._flush_lock:
                yield
        finally:
            self._gate.exit()

    def _raise_flush_error(self) -> None:
        err = self._flush_error
        if err is not None:
            raise StoreFlushError(str(err)) from err.__cause__

    def _sync_locked(self) -> None:
        """One forced sync, inside ``_flushing()`` on an environment not yet closed.

        ``force=True`` matters: without it LMDB skips the sync of a MDB_NOSYNC
        environment. py-lmdb releases the GIL for the ``fdatasync``.
        """
        self._raise_flush_error()
        seen, started, t0 = self.commits, time.time(), time.perf_counter()
        txnid = int(self._env.info()["last_txnid"]) if self._sync_each else 0
        try:
            self._env.sync(True)
        except lmdb.Error as exc:
            self._flush_error = self._flush_failure(exc)
            self._tell_synced(self._flush_error)
            raise self._flush_error from exc
        self.flushes += 1
        self.last_flush = started
        self.last_sync_s = time.perf_counter() - t0
        self.flushed_commits = max(self.flushed_commits, seen)
        self._synced_txnid = max(self._synced_txnid, txnid)
        if self._synced_mark is not None:
            self._synced_mark.covered(txnid)
        self._tell_synced(None)

    def _flush_failure(self, exc: lmdb.Error) -> StoreFlushError:
        at = self.last_flush
        since = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)) if at is not None else "open"
        )
        full = " (the disk is full)" if _is_disk_full(exc, self._path) else ""
        err = StoreFlushError(
            f"flushing store {self._path} to stable storage failed: {exc}{full}. The "
            f"{max(0, self.commits - self.flushed_commits)} commit(s) of this process since "
            f"the last successful flush ({since}) are in the OS page cache but may never "
            "reach the disk, and a retried fsync cannot prove otherwise, so this process "
            "makes no more commits to the store; reads still work. Check the disk and the "
            "kernel log, then reopen the store"
        )
        err.__cause__ = exc
        return err

    def _background_flush(self) -> bool:
        """One round of the flusher: sync if anything was committed since the last one.

        Returns False when the flusher should stop (the store is closed, or a flush
        failed: the error is kept and raised by the next commit, not lost in a thread).
        """
        if self.commits == self.flushed_commits and not self._closed:
            return True  # nothing new: an idle store costs no I/O
        with self._flushing():
            if self._closed or self._flush_error is not None:
                return False
            try:
                self._sync_locked()
            except StoreFlushError as exc:
                # Raised again by the next commit; logged now for whoever watches stderr.
                _log().error("%s", exc)
                return False
            return True

    def close(self) -> None:
        """Flush (at ``process`` level) and close the environment. Idempotent.

        Open transactions must be finished first. At ``process`` level the background
        flusher is stopped and one last flush runs; if it fails, or an earlier flush
        did, the environment is still closed and StoreFlushError is raised, so that a
        caller exiting cleanly learns that its last commits may not be on disk.
        """
        if self._closed:
            return
        self._closed = True  # refuses new transactions and stops the flusher's rounds
        for thread in (self._flusher, self._syncer):
            if thread is not None:
                thread.stop()
        error: StoreFlushError | None = None
        with self._flushing():
            try:
                if self._flusher is not None or self._sync_each:
                    if self._flush_error is not None:
                        error = self._flush_error
                    elif self.commits != self.flushed_commits:
                        try:
                            self._sync_locked()
                        except StoreFlushError as exc:
                            error = exc
            finally:
                self._env.close()
                if self._synced_mark is not None:
                    self._synced_mark.close()
                with _open_paths_lock:
                    _open_paths.discard(self._key)
        marker = self._marker
        if (
            marker is not None
            and error is None
            and self._flush_error is None
            and os.getpid() == self._marker_pid  # a forked child leaves its parent's marker
        ):
            # Everything this process committed is on stable storage: nothing left at risk.
            self._marker = None
            try:
                unflushed.remove_marker(marker)
            except OSError as exc:
                _log().warning("cannot remove the unflushed marker %s: %s", marker, exc)
        if error is not None:
            raise StoreFlushError(str(error)) from error.__cause__

    def __enter__(self) -> LmdbStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"store {self._path} is closed")

    # ------------------------------------------------------------ transactions

    def _begin(self, write: bool, parent: lmdb.Transaction | None = None) -> lmdb.Transaction:
        """Enter the gate and begin a transaction, adopting another process's map growth."""
        self._check_open()
        while True:
            self._gate.enter()
            try:
                return self._env.begin(write=write, parent=parent)
            except lmdb.MapResizedError:
                self._gate.exit()
                self._adopt_map_size()
            except lmdb.ReadonlyError as exc:
                self._gate.exit()
                raise StoreUnavailable(f"store {self._path} was opened read-only") from exc
            except BaseException:
                self._gate.exit()
                raise

    def _begin_write(self) -> lmdb.Transaction:
        """Begin a write transaction (the gate entered, LMDB's writer lock held) whose pages
        cannot overwrite the tree the disk's meta page names, whichever process committed last.

        ``_before_write`` keeps this process's own commits at most one unsynced before the
        lock is taken; here, under the lock, the commit two before this transaction must be
        known synced too, which only another process's commit (or, at open, one made before
        this process's first sync) can leave in doubt. What other processes' syncs covered is
        read from their shared record (``snapshots.synced_mark``); if the commit is still in
        doubt, the transaction (nothing written yet) is let go, so the other processes commit
        on while this one syncs, and begun again; after a few rounds lost to them, it syncs
        holding the lock."""
        for attempt in range(_SYNC_ROUNDS + 1):
            txn = self._begin(write=True)
            if not self._sync_each or self._known_synced(txn.id() - 2):
                return txn
            if attempt == _SYNC_ROUNDS:
                break
            txn.abort()
            self._gate.exit()
            with self._flushing():
                self._check_open()
                self._sync_locked()
                self.interleaved_syncs += 1
        try:
            with self._flush_lock:  # the gate is already entered (shared), as _flushing() would
                if not self._known_synced(txn.id() - 2):
                    self._sync_locked()
                    self.interleaved_syncs += 1
        except BaseException:
            txn.abort()
            self._gate.exit()
            raise
        return txn

    def _known_synced(self, txnid: int) -> bool:
        """Whether transaction ``txnid`` is known to be on stable storage, by this process's
        syncs or by another's (the shared mark, unless it names more than this data file
        holds: an older copy restored in place)."""
        if txnid <= self._synced_txnid:
            return True
        mark = self._synced_mark
        if mark is not None:
            shared = mark.read()
            if shared <= txnid + 1:  # txnid + 1: the newest this data file holds (being begun: + 2)
                self._synced_txnid = max(self._synced_txnid, shared)
        return txnid <= self._synced_txnid

    def _adopt_map_size(self) -> None:
        with self._gate.exclusive():
            self._env.set_mapsize(0)
            self.adopted += 1
            self._map_epoch += 1

    def _grow(self, seen_epoch: int) -> None:
        """Double the map (capped by free disk) unless another thread already grew it."""
        with self._gate.exclusive():
            if self._map_epoch != seen_epoch:
                return
            current = int(self._env.info()["map_size"])
            try:
                free = shutil.disk_usage(self._path).free
                used = (self._path / "data.mdb").stat().st_size
            except OSError as exc:
                raise StoreUnavailable(f"cannot inspect store {self._path}: {exc}") from exc
            target = min(current * 2, used + free)
            if target < current + 64 * 1024:  # less than a few pages to gain: give up now
                raise StoreFull(
                    f"store {self._path} is full: its map is {current} bytes and the disk has "
                    f"{free} bytes free; free disk space or move the store to a larger disk"
                )
            self._env.set_mapsize(target)
            self.grows += 1
            self._map_epoch += 1

    @contextmanager
    def read(self) -> Iterator[ReadTxn]:
        """A consistent read-only view. Keep it short: it pins pages and delays map growth."""
        txn = self._begin(write=False)
        try:
            yield _LmdbTxn(txn, self._dbs, self._strict)
        finally:
            txn.abort()
            self._gate.exit()

    @contextmanager
    def write(self) -> Iterator[WriteTxn]:
        """A write transaction for simple cases; commits on success, aborts on error.

        If the map fills up the map is grown and StoreError is raised: the body cannot
        be re-run from here. ``transact`` re-runs it instead.
        """
        with self._writer, self._write_locked() as txn:
            yield txn

    @contextmanager
    def _write_locked(self) -> Iterator[WriteTxn]:
        self._require_writable()
        self._before_write()
        seen = self._map_epoch
        txn = self._begin_write()
        try:
            yield _LmdbTxn(txn, self._dbs, self._strict)
            txn.commit()
        except lmdb.MapFullError as exc:
            txn.abort()
            self._gate.exit()
            self._grow(seen)
            raise StoreError(
                f"store {self._path} ran out of map space; it has been grown, run the "
                "transaction again (LmdbStore.transact does this by itself)"
            ) from exc
        except lmdb.Error as exc:
            txn.abort()
            self._gate.exit()
            raise self._translate(exc) from exc
        except BaseException:
            txn.abort()
            self._gate.exit()
            raise
        self._gate.exit()
        self._after_commit("now")

    def _require_writable(self) -> None:
        self._check_open()
        if self._readonly:
            raise StoreUnavailable(f"store {self._path} was opened read-only")
        self._raise_flush_error()

    def _translate(self, exc: BaseException) -> StoreError:
        if _is_disk_full(exc, self._path):
            how = " (a short write: the disk filled up part way)" if _EIO_TEXT in str(exc) else ""
            return StoreFull(
                f"disk under store {self._path} is full ({exc}{how}); the transaction was "
                "rolled back whole. Free disk space (or raise the file size limit) or move "
                "the store to a larger disk"
            )
        return StoreError(f"store {self._path}: {exc}")

    def transact(self, fn: Callable[[WriteTxn], T], *, sync: SyncWhen = "now") -> T:
        """Run ``fn`` in one write transaction, commit and return its result.

        Once it returns the commit survives what the store's ``durability`` promises
        (``sync`` short of ``"now"``: once a later ``"now"`` commit or ``settle`` returns).

        ``fn`` is run again from scratch if the map had to grow, so it must only act
        through the transaction it is given. If it raises, nothing is written.
        """
        self._require_writable()
        return self._with_write_txn(lambda txn: fn(_LmdbTxn(txn, self._dbs, self._strict)), sync)

    def _with_write_txn(self, body: Callable[[lmdb.Transaction], T], sync: SyncWhen = "now") -> T:
        """Run ``body`` in a write transaction and commit; on a full map, grow and run it again."""
        with self._writer:
            return self._write_txn_locked(body, sync)

    def _write_txn_locked(self, body: Callable[[lmdb.Transaction], T], sync: SyncWhen) -> T:
        self._before_write()
        for _ in range(_MAX_GROW_ATTEMPTS):
            seen = self._map_epoch
            txn = self._begin_write()
            try:
                result = body(txn)
                txn.commit()
            except lmdb.MapFullError:
                txn.abort()
                self._gate.exit()
                self._grow(seen)
                continue
            except lmdb.Error as exc:
                txn.abort()
                self._gate.exit()
                raise self._translate(exc) from exc
            except BaseException:
                txn.abort()
                self._gate.exit()
                raise
            self._gate.exit()
            self._after_commit(sync)
            return result
        raise StoreFull(
            f"store {self._path}: the map kept filling up after {_MAX_GROW_ATTEMPTS} grows"
        )

    def transact_batch(self, fns: Sequence[Callable[[WriteTxn], Any]], *,
                       sync: SyncWhen = "now") -> list[Outcome]:
        """Run all ``fns`` in one write transaction and one commit (one sync at ``sync``;
        ``sync``: see ``transact``).

        Each function runs in its own nested LMDB transaction: if it raises, only its
        own writes are rolled back and its error is returned in its Outcome, while the
        others commit. (Nesting costs about 5 µs a function here, far less than the
        fsync it shares.) If the map fills up, the whole batch is run again after the
        map grew, so the functions must only act through their transaction.
        """
        self._require_writable()
        if not fns:
            return []
        if len(fns) == 1:
            # Alone, a function needs no nested transaction to be isolated: if it
            # raises, the whole transaction is its own and is aborted.
            fn = fns[0]
            try:
                return [Outcome(value=self._with_write_txn(lambda txn: fn(_LmdbTxn(txn, self._dbs, self._strict)),
                                                           sync))]
            except StoreError as exc:
                cause = exc.__cause__
                if isinstance(exc, StoreFull) or (cause is not None and _is_disk_full(cause, self._path)):
                    raise  # the store failed, not the function
                return [Outcome(error=exc)]
            except Exception as exc:
                return [Outcome(error=exc)]

        return self._with_write_txn(lambda txn: self._batch_in(txn, fns), sync)

    def _batch_in(self, txn: lmdb.Transaction, fns: Sequence[Callable[[WriteTxn], Any]],
                  view: Callable[[WriteTxn], WriteTxn] | None = None,
                  committed: Callable[[WriteTxn], None] | None = None) -> list[Outcome]:
        """Each function in its own transaction nested in ``txn``: one that raises is rolled
        back alone and its error becomes its outcome; a full map or disk fails them all.
        ``view`` wraps what each function is given and ``committed`` sees it once its
        nested transaction committed (the fleet store records the writes there)."""
        outcomes: list[Outcome] = []
        for fn in fns:
            child = self._env.begin(write=True, parent=txn)
            given: WriteTxn = _LmdbTxn(child, self._dbs, self._strict)
            if view is not None:
                given = view(given)
            try:
                value = fn(given)
                child.commit()
            except lmdb.MapFullError:
                child.abort()
                raise
            except lmdb.Error as exc:
                child.abort()
                if _is_disk_full(exc, self._path):
                    raise
                outcomes.append(Outcome(error=self._translate(exc)))
            except Exception as exc:
                child.abort()
                outcomes.append(Outcome(error=exc))
            else:
                outcomes.append(Outcome(value=value))
                if committed is not None:
                    committed(given)
        return outcomes


class _LmdbTxn:
    """Both ``ReadTxn`` and ``WriteTxn`` over one LMDB transaction (writes fail on a read one).

    Journal entries, kv values and the blobs of ``SEALED_BUCKETS`` are sealed here on
    every write and checked here on every read (``snapshots.sealed``), so no caller can
    forget either. ``strict``: the store was created sealing every value.
    """

    __slots__ = ("_agents", "_chunks", "_ckpt", "_dbs", "_journal", "_kv", "_strict", "_summaries", "_txn")

    def __init__(self, txn: lmdb.Transaction, dbs: dict[str, Any], strict: bool) -> None:
        self._txn = txn
        self._dbs = dbs
        self._agents = dbs["agents"]
        self._summaries = dbs["summaries"]
        self._ckpt = dbs["checkpoints"]
        self._journal = dbs["journal"]
        self._kv = dbs["kv"]
        self._chunks = dbs.get("chunks")
        self._strict = strict

    # ------------------------------------------------------------------ helpers

    def _get(self, key: bytes, db: Any) -> bytes | None:
        # Transactions are opened with buffers=False, so values are bytes, not memoryviews.
        return cast("bytes | None", self._txn.get(key, db=db))

    def _bucket(self, bucket: str) -> Any:
        if bucket not in BLOB_BUCKETS:
            raise ValueError(
                f"unknown blob bucket {bucket!r}; the buckets are {', '.join(BLOB_BUCKETS)}"
            )
        return self._dbs[bucket]

    def _iter_prefix(self, db: Any, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        if db is None:
            return
        cur = self._txn.cursor(db=db)
        try:
            if not cur.set_range(prefix):
                return
            for key, value in cast("Iterator[tuple[bytes, bytes]]", iter(cur)):
                if not key.startswith(prefix):
                    return
                yield key, value
        finally:
            cur.close()

    # -------------------------------------------------------------------- reads

    def get_agent(self, agent_id: str) -> dict[str, Any] | None:
        if self._agents is None:
            return None
        raw = self._get(_id_bytes(agent_id, "agent_id"), db=self._agents)
        if raw is None:
            return None
        return _agent_record(agent_id, raw)

    def iter_agents(self) -> Iterator[dict[str, Any]]:
        for key, raw in self._iter_prefix(self._agents, b""):
            yield _agent_record(key.decode("utf-8", "replace"), raw)

    def iter_agent_summaries(self) -> Iterator[AgentSummary]:
        agents, summaries = self._agents, self._summaries
        if agents is None:
            return
        if summaries is None or self._txn.stat(summaries)["entries"] != self._txn.stat(agents)["entries"]:
            # A store of an older format opened read-only, or summaries that went missing:
            # derive each from its record (slower, never wrong).
            for record in self.iter_agents():
                yield summary_of(record)
            return
        cur = self._txn.cursor(db=summaries)
        try:  # the whole database, one generator: this is ps's loop
            for key, raw in cast("Iterator[tuple[bytes, bytes]]", iter(cur)):
                agent_id = key.decode("utf-8", "replace")
                try:
                    yield decode_summary(agent_id, raw)
                except RecordCorrupt:  # derived data: read it again from the record
                    yield summary_of(self.get_agent(agent_id) or unreadable_record(agent_id, "no agent record"))
        finally:
            cur.close()

    def get_checkpoint(self, agent_id: str, seq: int) -> bytes | None:
        if self._ckpt is None:
            return None
        raw = self._get(_seq_key(agent_id, seq), db=self._ckpt)
        return None if raw is None else raw[_CREATED.size :]

    def latest_checkpoint(self, agent_id: str) -> int | None:
        if self._ckpt is None:
            return None
        prefix = _id_bytes(agent_id, "agent_id") + b"\x00"
        cur = self._txn.cursor(db=self._ckpt)
        try:
            # Position on the first key past this agent's (0x00 separator -> 0x01), step back.
            found = cur.prev() if cur.set_range(prefix[:-1] + b"\x01") else cur.last()
            if not found:
                return None
            key = cast(bytes, cur.key())
            if not key.startswith(prefix) or len(key) != len(prefix) + 8:
                return None
            return int(_SEQ.unpack_from(key, len(prefix))[0])
        finally:
            cur.close()

    def list_checkpoints(self, agent_id: str) -> list[CheckpointInfo]:
        prefix = _id_bytes(agent_id, "agent_id") + b"\x00"
        out = []
        for key, raw in self._iter_prefix(self._ckpt, prefix):
            (seq,) = _SEQ.unpack_from(key, len(prefix))
            (created_at,) = _CREATED.unpack_from(raw)
            out.append(CheckpointInfo(seq, len(raw) - _CREATED.size, created_at))
        return out

    def get_journal(self, agent_id: str, call_seq: int) -> dict[str, Any] | None:
        if self._journal is None:
            return None
        key = _seq_key(agent_id, call_seq, "call_seq")
        raw = self._get(key, db=self._journal)
        return None if raw is None else _journal_entry(key, raw, self._strict, self.get_chunk)

    def iter_journal(self, agent_id: str) -> Iterator[tuple[int, dict[str, Any]]]:
        prefix = _id_bytes(agent_id, "agent_id") + b"\x00"
        for key, raw in self._iter_prefix(self._journal, prefix):
            yield _SEQ.unpack_from(key, len(prefix))[0], _journal_entry(key, raw, self._strict, self.get_chunk)

    def get_chunk(self, name: bytes) -> bytes | None:
        if self._chunks is None:
            return None
        # The hot call of a resume (once per chunk): straight to LMDB, no helper between.
        return cast("bytes | None", self._txn.get(name, db=self._chunks))

    def kv_get(self, namespace: str, key: str) -> bytes | None:
        if self._kv is None:
            return None
        k = _kv_key(namespace, key)
        raw = self._get(k, db=self._kv)
        return None if raw is None else _unseal("kv", k, raw, self._strict)

    def kv_keys(self, namespace: str, prefix: str = "") -> list[str]:
        ns = _id_bytes(namespace, "namespace") + b"\x00"
        return [k[len(ns) :].decode() for k, _ in self._iter_prefix(self._kv, ns + prefix.encode())]

    def get_blob(self, bucket: str, key: str) -> bytes | None:
        db = self._bucket(bucket)
        if db is None:
            return None
        k = _plain_key(key)
        raw = self._get(k, db=db)
        if raw is None or bucket not in SEALED_BUCKETS:
            return raw
        return _unseal(bucket, k, raw, self._strict)

    def iter_blobs(self, bucket: str, prefix: str = "") -> Iterator[tuple[str, bytes]]:
        check = bucket in SEALED_BUCKETS
        for key, value in self._iter_prefix(self._bucket(bucket), prefix.encode()):
            yield key.decode(), (_unseal(bucket, key, value, self._strict) if check else value)

    # ------------------------------------------------------------------- writes

    def put_agent(self, record: dict[str, Any]) -> None:
        if not isinstance(record, dict) or "agent_id" not in record:
            raise ValueError("an agent record is a dict with an 'agent_id' key")
        if record.get(UNREADABLE):
            raise ValueError(f"the record of {record['agent_id']} is a stand-in for one that does not decode; "
                             "it is not written over the damaged one")
        key = _id_bytes(record["agent_id"], "agent_id")
        body = dict(record)  # the key holds the id; a copy and a del keep the order for less than a filter
        del body["agent_id"]
        self._txn.put(key, _json(body), db=self._agents)
        self._txn.put(key, encode_summary(record), db=self._summaries)

    def mark_unreadable(self, agent_id: str, problem: str) -> None:
        key = _id_bytes(agent_id, "agent_id")
        record = unreadable_record(agent_id, problem)
        raw = self._get(key, db=self._summaries)
        try:  # keep what the listing knew of it (name, usage, checkpoints): only the status changes
            known = decode_summary(agent_id, raw) if raw is not None else None
        except RecordCorrupt:
            known = None
        if known is not None:
            record = {**record, "name": known.name, "checkpoints": known.checkpoints,
                      "last_checkpoint_bytes": known.last_checkpoint_bytes, "created_at": known.created_at,
                      "usage": {"fuel_used": known.fuel_used, "tool_calls": known.tool_calls, "tokens": known.tokens}}
        self._txn.put(key, encode_summary(record), db=self._summaries)

    def delete_agent(self, agent_id: str, *, purge: bool = False, missing_ok: bool = False) -> None:
        existed = self._txn.delete(_id_bytes(agent_id, "agent_id"), db=self._agents)
        self._txn.delete(_id_bytes(agent_id, "agent_id"), db=self._summaries)
        if not existed and not missing_ok:
            raise NotFound(f"no agent {agent_id!r} in the store")
        if purge:
            prefix = _id_bytes(agent_id, "agent_id") + b"\x00"
            for db in (self._ckpt, self._journal):
                self._delete_prefix(db, prefix)
            inputs = self._dbs.get(INPUTS_BUCKET)
            if inputs is not None:
                self._txn.delete(_plain_key(agent_id), db=inputs)

    def _delete_prefix(self, db: Any, prefix: bytes, below: bytes | None = None) -> int:
        cur = self._txn.cursor(db=db)
        count = 0
        try:
            if not cur.set_range(prefix):
                return 0
            while True:
                key = cast(bytes, cur.key())
                if not key.startswith(prefix) or (below is not None and key >= below):
                    break
                count += 1
                if not cur.delete():  # moves to the next record; False at the end
                    break
        finally:
            cur.close()
        return count

    def put_checkpoint(self, agent_id: str, seq: int, blob: bytes, created_at: float,
                       chunks: Mapping[bytes, bytes | memoryview] | None = None) -> None:
        if seq < 1:
            raise ValueError(f"checkpoint seq counts from 1, got {seq}")
        if chunks:
            from . import chunks as codec  # loaded on first use (see _journal_entry)

            get, db, put = self._txn.get, self._chunks, self._txn.put
            for name, content in chunks.items():  # a large checkpoint names hundreds: kept inline
                if len(name) != codec.DIGEST_SIZE:
                    raise ValueError(f"a chunk is named by its {codec.DIGEST_SIZE}-byte digest, got {len(name)} bytes")
                if get(name, db=db) is None:
                    put(name, codec.store_chunk(content), db=db)
        value = _CREATED.pack(created_at) + bytes(blob)
        key = _seq_key(agent_id, seq)
        if not self._put_append(key, value, self._ckpt):
            raise CheckpointExists(
                f"checkpoint {seq} of agent {agent_id!r} is already stored and checkpoints are "
                "immutable; write the next seq (latest_checkpoint() + 1)"
            )

    def prune_checkpoints(self, agent_id: str, keep_from: int) -> int:
        prefix = _id_bytes(agent_id, "agent_id") + b"\x00"
        return self._delete_prefix(self._ckpt, prefix, below=_seq_key(agent_id, max(0, keep_from)))

    def _put_chunk(self, name: bytes, content: bytes | memoryview) -> None:
        """Store a chunk unless it is already held (same name, same content)."""
        from . import chunks  # loaded on first use (see _journal_entry)
        if len(name) != chunks.DIGEST_SIZE:
            raise ValueError(f"a chunk is named by its {chunks.DIGEST_SIZE}-byte digest, got {len(name)} bytes")
        if self._txn.get(name, db=self._chunks) is None:
            self._txn.put(name, chunks.store_chunk(content), db=self._chunks)

    def put_journal(self, agent_id: str, call_seq: int, entry: dict[str, Any]) -> None:
        key = _seq_key(agent_id, call_seq, "call_seq")
        body = _json(entry)
        if len(body) >= JOURNAL_CHUNK_ABOVE:  # a long entry (a conversation): the chunks it shares
            from . import chunks  # loaded on first use (see _journal_entry); not per short entry

            body = _CHUNKED_ENTRY + chunks.write_tree(body, self._put_chunk)
        value = sealed.seal("journal", key, body)
        if not self._put_append(key, value, self._journal):
            self._txn.put(key, value, db=self._journal)  # an update of an existing call

    def _put_append(self, key: bytes, value: bytes, db: Any) -> bool:
        """Insert a new key, appending when it sorts last (False if it already exists).

        Checkpoint and journal keys mostly arrive in key order (the newest agent's
        next seq). MDB_APPEND then fills leaf pages to ~96% instead of the ~75% a
        middle split leaves, which is a quarter off a hibernated agent's bytes on
        disk. Out of order, LMDB refuses the append without writing, and the normal
        insert runs.
        """
        if self._txn.put(key, value, db=db, append=True, overwrite=False):
            return True
        return bool(self._txn.put(key, value, db=db, overwrite=False))

    def kv_set(self, namespace: str, key: str, value: bytes) -> None:
        k = _kv_key(namespace, key)
        self._txn.put(k, sealed.seal("kv", k, bytes(value)), db=self._kv)

    def kv_delete(self, namespace: str, key: str) -> bool:
        return bool(self._txn.delete(_kv_key(namespace, key), db=self._kv))

    def kv_incr(self, namespace: str, key: str, delta: int = 1) -> int:
        k = _kv_key(namespace, key)
        raw = self.kv_get(namespace, key)
        try:
            current = 0 if raw is None else int(raw)
        except ValueError as exc:
            raise StoreError(
                f"kv {namespace}/{key} holds {raw!r}, not a decimal integer counter"
            ) from exc
        value = current + delta
        self._txn.put(k, sealed.seal("kv", k, str(value).encode()), db=self._kv)
        return value

    def put_blob(self, bucket: str, key: str, value: bytes) -> None:
        k = _plain_key(key)
        data = bytes(value)
        if bucket in SEALED_BUCKETS:
            data = sealed.seal(bucket, k, data)
        self._txn.put(k, data, db=self._bucket(bucket))

    def delete_blob(self, bucket: str, key: str) -> bool:
        return bool(self._txn.delete(_plain_key(key), db=self._bucket(bucket)))

    # ------------------------------------------------------------ chunk accounting

    def _refs_by_agent(self) -> dict[str, dict[str, set[bytes]]]:
        """For each agent, the chunk names its checkpoints and its journal use.

        Raises RecordCorrupt (or SnapshotError) when a record's references cannot be
        read: reclaiming must never guess which chunks are free.
        """
        from . import chunks  # loaded on first use (see _journal_entry)
        from .format import chunk_ref  # the codec: only accounting needs it here

        out: dict[str, dict[str, set[bytes]]] = {}
        for key, raw in self._iter_prefix(self._ckpt, b""):
            ref = chunk_ref(raw[_CREATED.size :])
            if ref is not None:
                agent, _ = _split_seq_key(key)
                out.setdefault(agent, {}).setdefault("checkpoints", set()).update(
                    chunks.tree_digests(ref, self.get_chunk))
        for key, raw in self._iter_prefix(self._journal, b""):
            body = _unseal("journal", key, raw, self._strict)
            if body.startswith(_CHUNKED_ENTRY):
                agent, _ = _split_seq_key(key)
                out.setdefault(agent, {}).setdefault("journal", set()).update(
                    chunks.tree_digests(body[len(_CHUNKED_ENTRY) :], self.get_chunk))
        return out

    def reclaim_chunks(self) -> dict[str, int]:
        used: set[bytes] = set()
        for kinds in self._refs_by_agent().values():
            for names in kinds.values():
                used |= names
        freed = kept = 0
        if self._chunks is None:
            return {"chunks_deleted": 0, "bytes_freed": 0, "chunks_kept": 0}
        unused: list[bytes] = []
        for name, value in self._iter_prefix(self._chunks, b""):
            if name in used:
                kept += 1
            else:
                unused.append(name)
                freed += len(name) + len(value)
        for name in unused:  # deleted after the walk: a cursor's delete at the end of a database is ambiguous
            self._txn.delete(name, db=self._chunks)
        count = len(unused)
        return {"chunks_deleted": count, "bytes_freed": freed, "chunks_kept": kept}

    def stored_bytes(self) -> dict[str, Any]:
        per: dict[str, dict[str, int]] = {}

        def add(agent: str, kind: str, n: int) -> None:
            row = per.setdefault(agent, {})
            row[kind] = row.get(kind, 0) + n

        for db, kind in ((self._ckpt, "checkpoints"), (self._journal, "journal")):
            for key, raw in self._iter_prefix(db, b""):
                add(_split_seq_key(key)[0], kind, len(key) + len(raw))
        for key, raw in self._iter_prefix(self._dbs.get("audit"), b""):
            add(_decode_key(key).partition("/")[0], "audit", len(key) + len(raw))
        for key, raw in self._iter_prefix(self._dbs.get(INPUTS_BUCKET), b""):
            add(_decode_key(key), "input", len(key) + len(raw))
        sizes: dict[bytes, int] = {}
        for name, raw in self._iter_prefix(self._chunks, b""):
            sizes[name] = len(name) + len(raw)
        users: dict[bytes, int] = {}
        refs = self._refs_by_agent()
        for agent, kinds in refs.items():
            mine = set().union(*kinds.values())
            for name in mine:
                users[name] = users.get(name, 0) + 1
            for kind, names in kinds.items():
                add(agent, f"{kind}_chunks", sum(sizes.get(n, 0) for n in names))
        for agent, kinds in refs.items():
            add(agent, "shared_chunks", sum(sizes.get(n, 0) for n in set().union(*kinds.values())
                                            if users.get(n, 0) > 1))
        for row in per.values():
            row["total"] = sum(v for k, v in row.items() if k != "shared_chunks")
        return {
            "agents": per,
            "chunks": {"count": len(sizes), "bytes": sum(sizes.values()),
                       "unreferenced": sum(1 for n in sizes if n not in users),
                       "unreferenced_bytes": sum(v for n, v in sizes.items() if n not in users)},
        }


def _conforms(store: LmdbStore) -> AgentStore:
    """Never called: makes mypy prove that LmdbStore implements the AgentStore protocol."""
    return store
