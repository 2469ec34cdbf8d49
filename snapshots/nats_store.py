"""The fleet store: the agent store as a replicated NATS JetStream log, applied to a local LMDB copy.

Why a log of transactions: ``AgentStore`` promises serializable transactions over
agent records, checkpoints, journals, kv counters and blobs, with reads of anything inside
a write. JetStream gives a replicated, totally ordered stream (Raft across the cluster's
nodes) and a conditional publish: ``Nats-Expected-Last-Sequence`` stores a message only if
the stream's last sequence is the one named. That is all a replicated state machine
needs, and it is the cluster's consensus doing the ordering, not a home-made one:

- every host keeps a copy of the state in a local ``LmdbStore`` (``cache_dir``), and the
  stream sequence its copy has applied, in the same LMDB transaction as the state;
- a transaction runs against the local copy, inside an LMDB write transaction, through a
  ``snapshots.oplog.RecordingTxn``; its successful writes become one log entry, published
  on condition that nothing it depends on changed since this host's copy was last brought
  up to date (below). If the publish is accepted, the entry is the commit: the local
  transaction commits too when the entry landed right after the copy's last sequence (its
  state is then exactly the log's), else it is dropped and the applier writes the entry
  in log order. If it is refused, another host committed first: the local copy is brought
  up to date from the log and the function runs again (the ``transact`` contract allows it);
- an applier thread follows the stream with an ordered consumer and replays every entry
  it has not applied yet (``oplog.apply_ops``), so reads on every host see every commit,
  typically within milliseconds.

Conditions per agent: the stream's subjects are ``<stream>.a.<partition>``, one per agent
(``oplog`` says which keys are whose), and ``<stream>.g``. An entry has one message on the
subject of every agent it touched. A transaction that read only its agents' keys is
conditioned on each of their subjects' last sequences (``Nats-Expected-Last-Subject-Sequence``,
one per message of an atomic batch): hosts driving different agents, and a group commit of
many agents, commit side by side without racing. One that read anything global (a lease,
the registry, a walk over every agent) is conditioned on the whole stream's last sequence
(``Nats-Expected-Last-Sequence``), so it sees every commit before it; its messages on its
agents' subjects move their sequences on, so an agent's next step on a view older than it
is refused too. A host that lost an agent to another (the take-over claim is such a global
transaction on that agent) therefore cannot commit a step of it: its condition on the
agent's subject fails, and its function, run again on the new state, sees that it no longer
owns the agent. Blind writes of global keys (a lease renewal) read nothing and carry no
condition.

Shared keys and walks: a key that is no one agent's (a lease, a registry entry, a signed
head) is on the subject ``<stream>.k.<bucket>.<key>`` (tokens, a digest when the name is not
one), so a walk over a bucket of such keys (``oplog.walk_of``: a registry prefix for a push,
the host chains' heads for a seal) is conditioned on the wildcard ``<stream>.k.<bucket>.*``
(``Nats-Expected-Last-Subject-Sequence-Subject``): it races only the writes to that bucket,
not every commit of the fleet. The seal's walk over every agent record is read at its view
and not conditioned at all (``oplog``, "snapshot_walk": why that is serializable here). A
walk over a bucket of agents' keys (every agent's audit chain, the whole wake index) is still
conditioned on the whole stream: no write transaction of the host makes one (the timers'
sweep reads the index outside its transaction and conditions its deletions per agent); one
that did could commit only in a moment when no host commits anything between its view and
its publish, and gives up with ``StoreUnavailable`` after 40 lost races. A group commit runs
such a function apart from the others.

A step's checkpoint, journal entries, audit records and agent record are one log entry:
one message, or an atomic batch (NATS 2.12+) when it touches several agents or exceeds the
server's payload limit, stored together or not at all.

Durability: an acknowledged commit is on a quorum of the stream's replicas
(``replicas``, 3 in the tests), in their page caches; the servers fsync every
``sync_interval`` (2 minutes by default; ``sync_interval: always`` fsyncs each write). So
it survives the death of any minority of nodes and of every host, not a power cut of all
the nodes at once unless the cluster runs with ``sync_interval: always``. The local copy
is a cache: it can be deleted and is rebuilt from the log.

Reads (``read``) are of the local copy: consistent snapshots, possibly a few
milliseconds behind another host's latest commit (``sync`` waits until the copy has
everything the stream held when it was called). Writes are never based on a stale view.

Compaction: the log would grow with every commit. Every copy says how far it has applied
(a KV bucket ``<stream>_pos``, entries that expire when a host stops saying so); every
``compact_every`` entries one copy (the live one whose name sorts first) takes a consistent
copy of its LMDB state at its applied sequence, stores it in the object store
(``<stream>_snap``, replicated like the stream, chunked and digest-checked by it), and purges
the log up to the lowest position of any live copy (never past the snapshot). A host that
opens a copy the log no longer reaches (a new host, or one that was away past the positions'
expiry) starts from the snapshot and follows the log from there; a running copy that finds
the log purged past it stops with an error rather than skip what it missed.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import logging
import queue
import random
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import lmdb

from .errors import StoreConfigError, StoreCorrupt, StoreError, StoreSuspect, StoreUnavailable
from .lmdb_store import LmdbStore, _LmdbTxn
from .nats_bridge import LogMessage, NatsBridge, WrongLastSequence
from .oplog import WALK, RecordingTxn, apply_ops, bucket_of, decode_ops, encode_ops
from .store import AgentStore, Outcome, ReadTxn, SyncWhen, WriteTxn
from .work_queue import DURABLE as WORK_DURABLE
from .work_queue import WorkQueue

__all__ = ["DEFAULT_STREAM", "NatsStore", "parse_nats_url"]

T = TypeVar("T")
DEFAULT_STREAM = "TORPOR"
#: Snapshot and purge the log every so many entries (``NatsStore.open``).
DEFAULT_COMPACT_EVERY = 20_000
#: How often a copy says where it is (and looks whether a compaction is due).
_REPORT_S = 1.0
#: Keys in the local copy's ``_torpor`` table: the last stream sequence applied, and the
#: stream this copy is a copy of (its name and creation time).
_APPLIED_KEY = b"nats.applied"
_STREAM_KEY = b"nats.stream"
#: ... and, per agent subject token, the stream sequence of its last message applied.
_SUBJECT_KEY = b"nats.subj."
_EXPECT_SUBJECT = "Nats-Expected-Last-Subject-Sequence"
#: Headers of a log entry: its id, and "i/n" for an entry in parts (an atomic batch).
_TXN_HEADER = "Torpor-Txn"
_PART_HEADER = "Torpor-Part"
#: How many lost races in a row before a transaction gives up; one that walked shared keys
#: (conditioned on the whole stream, which every commit of the fleet moves) gives up sooner.
_MAX_RACES = 200
_MAX_WALK_RACES = 40
#: How many applied entry ids are remembered (an unanswered publish is recognised among them).
_SEEN_KEPT = 10_000
#: At most this many delivered messages are applied in one local transaction.
_APPLY_BATCH = 512
#: Room left under the server's max_payload for headers.
_PART_HEADROOM = 64 * 1024


_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _token(partition: str) -> str:
    """A subject token for a partition: the agent id as it is, else a digest of it (a shared
    token costs two agents a condition on each other, never correctness)."""
    if _TOKEN.fullmatch(partition):
        return partition
    return "h" + hashlib.sha256(partition.encode()).hexdigest()[:32]


class _Behind(Exception):
    """The entry landed after others this copy has not applied: drop the local transaction
    and let the applier write the entry in log order."""

    def __init__(self, seq: int) -> None:
        super().__init__(seq)
        self.seq = seq


class _Split(Exception):
    """A batch mixes walks of shared keys with other functions: commit them apart."""

    def __init__(self, walks: list[int]) -> None:
        super().__init__(walks)
        self.walks = walks


Message = tuple[str, bytes, dict[str, str]]


def _log() -> logging.Logger:
    return logging.getLogger("torpor.store.nats")


def parse_nats_url(url: str) -> list[str]:
    """``nats://h1:p1,h2:p2`` or ``nats://h1:p1,nats://h2:p2`` as the list of server URLs."""
    if not url.startswith("nats://"):
        raise StoreConfigError(f"a NATS store is named by nats://host:port[,host:port...], got {url!r}")
    servers = []
    for part in url.split(","):
        part = part.strip()
        if not part:
            continue
        if "://" not in part:
            part = "nats://" + part
        host_port = part.split("://", 1)[1]
        host, _, port = host_port.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise StoreConfigError(f"{part!r} in {url!r} is not nats://host:port")
        servers.append(part)
    return servers


class _Published(Exception):
    """The body ran again after its entry was published (the local map grew): do not publish twice."""


class NatsStore:
    """``AgentStore`` over a JetStream stream, with a local LMDB copy (see the module docstring)."""

    def __init__(self, bridge: NatsBridge, local: LmdbStore, stream: str, replicas: int, *,
                 compact_every: int = 0, position_ttl: float = 30.0) -> None:
        self._bridge = bridge
        self._local = local
        self.stream = stream
        self.subject = f"{stream}.>"  # every subject of the stream
        self._global_subject = f"{stream}.g"
        self._agent_prefix = f"{stream}.a."
        self._key_prefix = f"{stream}.k."  # shared keys: <stream>.k.<bucket>.<key>
        self._read_subject = f"{stream}.r"  # messages that only carry a condition on what was read
        self.replicas = replicas
        self._max_part = max(64 * 1024, int(bridge._nc.max_payload) - _PART_HEADROOM)
        self._applied_cond = threading.Condition()
        self._applied_seq = self._read_applied()
        #: The stream's first sequence as last seen (what compaction purged is before it).
        self._purged_before = bridge.first_seq(stream)
        self._queue: queue.SimpleQueue[LogMessage | None] = queue.SimpleQueue()
        self._parts: list[LogMessage] = []
        self._apply_error: BaseException | None = None
        #: The ids of the entries applied lately (by the applier), to recognise one's own.
        self._seen_txns: set[str] = set()
        self._seen_order: collections.deque[str] = collections.deque()
        self._closed = False
        self.races = 0  # conditional publishes refused (another host committed first)
        self.commits = 0
        #: Entries sent, by their condition: on their agents' subjects, on the whole stream, none.
        self.conditions: collections.Counter[str] = collections.Counter()
        #: Compaction: this copy's name among the positions, how often, the last snapshot seen.
        self.copy_id = f"{int(time.time() * 1000):013d}-{uuid.uuid4().hex[:8]}"
        self.compact_every = compact_every
        self.position_ttl = position_ttl
        self._positions, self._snapshots = f"{stream}_pos", f"{stream}_snap"
        self._reported = -1
        self._snapshot_seq = 0
        self._stopping = threading.Event()
        # Said before following: a compaction elsewhere must not purge what this copy still needs.
        self._report_position()
        self._applier = threading.Thread(target=self._apply_loop, name="torpor-nats-apply", daemon=True)
        self._applier.start()
        bridge.follow(self.subject, self._applied_seq + 1, self._queue.put)
        self._reporter = threading.Thread(target=self._report_loop, name="torpor-nats-position", daemon=True)
        self._reporter.start()

    @classmethod
    def open(cls, url: str | Sequence[str], cache_dir: str | Path, *, stream: str = DEFAULT_STREAM,
             replicas: int = 3, timeout: float = 10.0, compact_every: int = DEFAULT_COMPACT_EVERY,
             position_ttl: float = 30.0) -> NatsStore:
        """Connect, create the stream if needed (``replicas`` copies), open the local copy in
        ``cache_dir`` (from the latest snapshot if the log no longer reaches it).

        ``compact_every``: snapshot and purge the log every so many entries (0: never by
        itself; ``compact`` does it when asked); ``position_ttl``: how long a copy that stopped
        saying where it is holds the log back."""
        servers = parse_nats_url(url) if isinstance(url, str) else list(url)
        if not servers:
            raise StoreConfigError("a NATS store needs at least one server URL")
        if not 1 <= replicas <= 5:
            raise StoreConfigError(f"replicas is 1 to 5 (JetStream's limit), got {replicas}")
        if not stream.replace("_", "").replace("-", "").isalnum():
            raise StoreConfigError(f"a stream name is letters, digits, '-' and '_', got {stream!r}")
        bridge = NatsBridge(servers, timeout=timeout)
        try:
            identity = f"{stream}@{bridge.ensure_stream(stream, f'{stream}.>', replicas)}"
            local = cls._open_copy(Path(cache_dir))
        except BaseException:
            bridge.close()
            raise
        try:
            cls._adopt(local, identity, Path(cache_dir))
            local = cls._catch_up(bridge, local, stream, replicas, identity, Path(cache_dir))
            return cls(bridge, local, stream, replicas, compact_every=compact_every, position_ttl=position_ttl)
        except BaseException:
            local.close()
            bridge.close()
            raise

    @classmethod
    def _catch_up(cls, bridge: NatsBridge, local: LmdbStore, stream: str, replicas: int, identity: str,
                  cache_dir: Path) -> LmdbStore:
        """The local copy, replaced by the latest snapshot when the log was purged past it."""
        with local.read() as r:
            raw = r._txn.get(_APPLIED_KEY, db=local._dbs["_torpor"])  # type: ignore[attr-defined]
        applied = int(raw) if raw is not None else 0
        first = bridge.first_seq(stream)
        if applied + 1 >= first:
            return local  # the log holds everything after the copy
        names = [n for n in bridge.snapshots(f"{stream}_snap", replicas=replicas) if n.isdigit()]
        if not names or int(names[-1]) + 1 < first:
            raise StoreCorrupt(f"stream {stream} was compacted up to {first - 1}, past this copy ({applied}), "
                               "and no snapshot reaches it")
        data = bridge.get_snapshot(f"{stream}_snap", names[-1], replicas=replicas)
        _log().info("the local copy of %s starts from the snapshot at %d (%d bytes)", stream, int(names[-1]),
                    len(data))
        local.close()
        shutil.rmtree(cache_dir)
        cache_dir.mkdir(parents=True)
        (cache_dir / "data.mdb").write_bytes(data)
        local = cls._open_copy(cache_dir)
        try:
            cls._adopt(local, identity, cache_dir)
        except BaseException:
            local.close()
            raise
        return local

    @staticmethod
    def _open_copy(cache_dir: Path) -> LmdbStore:
        """The local copy, at ``process`` durability: the log is what is durable (a quorum of
        replicas holds every commit before it is acknowledged), the copy is a cache of it, so
        no commit waits for its disk. A copy a machine restart cut off (``StoreSuspect``: it may
        have lost or torn its last commits) is deleted and rebuilt from the log; one damaged on
        disk (``StoreCorrupt``: a file cut short) is moved aside and rebuilt the same way."""
        cache_dir.mkdir(parents=True, exist_ok=True)
        try:
            return LmdbStore.open(cache_dir, durability="process")
        except StoreSuspect as exc:
            _log().warning("the local copy in %s was cut off by a machine restart (%s); rebuilding it "
                           "from the log", cache_dir, exc)
            shutil.rmtree(cache_dir)
            cache_dir.mkdir(parents=True)
            return LmdbStore.open(cache_dir, durability="process")
        except StoreCorrupt as exc:  # cut short or damaged on disk: the log still holds every commit
            aside = cache_dir.with_name(f"{cache_dir.name}.corrupt-{int(time.time())}")
            _log().warning("the local copy in %s is damaged (%s); moved to %s and rebuilt from the log",
                           cache_dir, exc, aside)
            cache_dir.rename(aside)  # kept, not deleted: the directory may not be a copy at all
            cache_dir.mkdir(parents=True)
            return LmdbStore.open(cache_dir, durability="process")

    @staticmethod
    def _adopt(local: LmdbStore, identity: str, cache_dir: Path) -> None:
        """Mark a new local copy as this stream's; refuse a copy of another stream."""
        meta = local._dbs["_torpor"]

        def body(txn: lmdb.Transaction) -> None:
            raw = txn.get(_STREAM_KEY, db=meta)
            found = bytes(raw) if raw is not None else None
            if found is None:
                if txn.get(_APPLIED_KEY, db=meta) is not None or txn.stat(local._dbs["agents"])["entries"]:
                    raise StoreConfigError(f"{cache_dir} holds a store that is not a copy of a NATS stream; "
                                           "give the fleet store a directory of its own")
                txn.put(_STREAM_KEY, identity.encode(), db=meta)
            elif found.decode() != identity:
                raise StoreConfigError(f"{cache_dir} is the local copy of stream {found.decode()!r}, not of "
                                       f"{identity!r} (the stream was re-created?); delete the directory to "
                                       "rebuild the copy from the stream")

        local._with_write_txn(body)

    # ----------------------------------------------------------- applied seq

    def _read_applied(self) -> int:
        with self._local.read() as r:
            raw = r._txn.get(_APPLIED_KEY, db=self._local._dbs["_torpor"])  # type: ignore[attr-defined]
        return int(raw) if raw is not None else 0

    def _applied_in(self, txn: lmdb.Transaction) -> int:
        raw = txn.get(_APPLIED_KEY, db=self._local._dbs["_torpor"])
        return int(raw) if raw is not None else 0

    def _set_applied(self, txn: lmdb.Transaction, seq: int) -> None:
        txn.put(_APPLIED_KEY, str(seq).encode(), db=self._local._dbs["_torpor"])

    def _subject_seq_in(self, txn: lmdb.Transaction, token: str) -> int:
        """The stream sequence of the last message on subject ``token`` the copy applied, as the
        server counts it: 0 once the log was compacted past it (the server then holds no
        message on that subject, and a condition naming the purged one would never hold)."""
        raw = txn.get(_SUBJECT_KEY + token.encode(), db=self._local._dbs["_torpor"])
        seq = int(raw) if raw is not None else 0
        return 0 if seq < self._purged_before else seq

    def _note_subjects(self, txn: lmdb.Transaction, parts: Sequence[tuple[str, int]]) -> None:
        """Record each message's sequence under its agent subject, or under its shared key's
        subject and its bucket's wildcard (in log order: the last wins)."""
        meta = self._local._dbs["_torpor"]
        for subject, seq in parts:
            value = str(seq).encode()
            if subject.startswith(self._agent_prefix):
                txn.put(_SUBJECT_KEY + subject[len(self._agent_prefix):].encode(), value, db=meta)
            elif subject.startswith(self._key_prefix):
                rest = subject[len(self._key_prefix):]
                txn.put(_SUBJECT_KEY + b"k." + rest.encode(), value, db=meta)
                txn.put(_SUBJECT_KEY + b"k." + rest.partition(".")[0].encode(), value, db=meta)

    def _route(self, partition: str) -> tuple[str, str]:
        """The subject of a partition's messages (a walk's: the wildcard of its bucket), and the
        name under which the copy keeps its last sequence."""
        if partition.startswith(WALK):
            bucket = _token(partition[len(WALK):])
            return f"{self._key_prefix}{bucket}.*", f"k.{bucket}"
        shared = bucket_of(partition)
        if shared is not None:
            bucket, key = _token(shared[0]), _token(shared[1])
            return f"{self._key_prefix}{bucket}.{key}", f"k.{bucket}.{key}"
        token = _token(partition)
        return self._agent_prefix + token, token

    def _advance(self, seq: int) -> None:
        with self._applied_cond:
            if seq > self._applied_seq:
                self._applied_seq = seq
            self._applied_cond.notify_all()

    @property
    def applied_seq(self) -> int:
        """The last stream sequence the local copy holds."""
        return self._applied_seq

    def _wait_applied(self, seq: int, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (self._bridge.timeout * 3 if timeout is None else timeout)
        with self._applied_cond:
            while self._applied_seq < seq:
                if self._apply_error is not None:
                    raise StoreError(f"the local copy stopped applying the log: {self._apply_error}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StoreUnavailable(f"the local copy did not reach stream sequence {seq} "
                                           f"(it is at {self._applied_seq}) in time")
                self._applied_cond.wait(min(left, 0.5))

    def sync(self, timeout: float | None = None) -> int:
        """Wait until the local copy holds every commit the stream held when called; that sequence."""
        target = self._bridge.last_seq(self.stream)
        self._wait_applied(target, timeout)
        return target

    # --------------------------------------------------------------- applier

    def _apply_loop(self) -> None:
        while True:
            msg = self._queue.get()
            if msg is None:
                return
            # Whatever else has arrived is applied in the same local transaction: a host
            # following busy peers applies their entries in a few commits, not one each.
            msgs, stop = [msg], False
            while len(msgs) < _APPLY_BATCH:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                msgs.append(more)
            try:
                entries = [e for e in map(self._take, msgs) if e is not None]
                if entries:
                    self._apply(entries)
            except Exception as exc:  # the copy cannot go on: make every waiter say so
                _log().error("the local copy of %s stopped at %d: %s", self.stream, self._applied_seq, exc)
                with self._applied_cond:
                    self._apply_error = exc
                    self._applied_cond.notify_all()
                return
            if stop:
                return

    def _take(self, msg: LogMessage) -> list[LogMessage] | None:
        """One delivered message: a whole entry, or a part of one (kept until the last part,
        which returns them all)."""
        if msg.seq <= self._applied_seq:
            self._parts.clear()
            return None
        part = msg.headers.get(_PART_HEADER)
        if part is None:
            return [msg]
        i, _, n = part.partition("/")
        if self._parts and self._parts[0].headers.get(_TXN_HEADER) != msg.headers.get(_TXN_HEADER):
            self._parts.clear()
        self._parts.append(msg)
        if i != n:
            return None
        parts, self._parts = self._parts, []
        if len(parts) != int(n):
            raise StoreCorrupt(f"entry {msg.headers.get(_TXN_HEADER)} at {msg.seq} has {len(parts)} of {n} parts")
        return parts

    def _seen(self, txn_id: str | None) -> None:
        if txn_id is None:
            return
        self._seen_txns.add(txn_id)
        self._seen_order.append(txn_id)
        if len(self._seen_order) > _SEEN_KEPT:
            self._seen_txns.discard(self._seen_order.popleft())

    def _apply(self, entries: list[list[LogMessage]]) -> None:
        """Apply entries (each its messages, in order) to the local copy, with their sequences:
        each run of consecutive ones in one local transaction."""
        i = 0
        while i < len(entries):
            if entries[i][0].seq > self._applied_seq + 1:
                self._fill(entries[i][0].seq)
            j = i + 1
            while j < len(entries) and entries[j][0].seq == entries[j - 1][-1].seq + 1:
                j += 1
            run = [(e, decode_ops(e[0].data if len(e) == 1 else b"".join(m.data for m in e))) for e in entries[i:j]]

            def body(txn: lmdb.Transaction, run: list[tuple[list[LogMessage], list[Any]]] = run) -> None:
                at = self._applied_in(txn)
                for parts, ops in run:
                    last = parts[-1].seq
                    if last <= at:
                        continue  # committed here by this host's own transaction

                    def on_error(op: Any, exc: Exception, last: int = last) -> None:
                        if isinstance(exc, lmdb.Error):  # the transaction's, not the entry's (a full map
                            raise exc  # grows and the whole run is applied again): never skipped
                        _log().warning("entry %d of %s: %s(...) failed on this copy: %s", last, self.stream,
                                       op[0], exc)

                    apply_ops(_LmdbTxn(txn, self._local._dbs, self._local._strict), ops, on_error)
                    self._note_subjects(txn, [(m.subject, m.seq) for m in parts])
                    at = last
                self._set_applied(txn, at)

            self._local._with_write_txn(body)
            for parts, _ in run:
                self._seen(parts[-1].headers.get(_TXN_HEADER))
            self._advance(entries[j - 1][-1].seq)
            i = j

    def _fill(self, upto: int) -> None:
        """Fetch and apply the entries before ``upto`` the consumer did not deliver (a gap)."""
        seq = self._applied_seq + 1
        if seq < self._bridge.first_seq(self.stream):  # purged: never skip what the copy missed
            raise StoreUnavailable(f"stream {self.stream} was compacted past this copy (at {self._applied_seq}); "
                                   "open the store again to start from the latest snapshot")
        parts: list[LogMessage] = []
        while seq < upto:
            m = self._bridge.get(self.stream, seq)
            seq += 1
            if m is None:  # a sequence with no message (never written): nothing to apply
                continue
            if _PART_HEADER in m.headers:
                parts.append(m)
                i, _, n = m.headers[_PART_HEADER].partition("/")
                if i == n:
                    self._apply([parts])
                    parts = []
            else:
                self._apply([[m]])

    # --------------------------------------------------------------- commits

    def _messages(self, txn: lmdb.Transaction, rec: RecordingTxn, txn_id: str, applied: int) -> list[Message]:
        """The messages of one entry: on each touched agent's subject, with the entry's condition
        (see the module docstring), its frame cut into parts under the payload limit."""
        frame = encode_ops(rec.ops)
        wrote = dict(sorted(self._route(p) for p in rec.wrote))  # subject -> its sequence's name
        plan: list[tuple[str, dict[str, str]]]  # (subject, condition) per message
        if rec.global_read:  # the whole log's last sequence; a message on each partition written
            plan = [(subject, {}) for subject in wrote] or [(self._global_subject, {})]
            plan[0] = (plan[0][0], {"Nats-Expected-Last-Sequence": str(applied)})
            kind = "stream"
        else:  # each partition read unchanged: on its own message if written, else on a read marker
            read = dict(self._route(p) for p in rec.read)
            plan = [(subject, {_EXPECT_SUBJECT: str(self._subject_seq_in(txn, name))} if subject in read else {})
                    for subject, name in wrote.items()]
            plan += [(self._read_subject, {_EXPECT_SUBJECT: str(self._subject_seq_in(txn, name)),
                                           _EXPECT_SUBJECT + "-Subject": subject})
                     for subject, name in sorted(read.items()) if subject not in wrote]
            plan = plan or [(self._global_subject, {})]
            kind = "partitions" if any(c for _, c in plan) else "none"
        self.conditions[kind] += 1
        subjects = [subject for subject, _ in plan]
        conditions = [c for _, c in plan]
        pieces = [frame[i:i + self._max_part] for i in range(0, len(frame), self._max_part)]
        n = max(len(subjects), len(pieces))
        out: list[Message] = []
        for i in range(n):
            headers = {_TXN_HEADER: txn_id, **(conditions[i] if i < len(conditions) else {})}
            if n > 1:
                headers[_PART_HEADER] = f"{i + 1}/{n}"
            out.append((subjects[min(i, len(subjects) - 1)], pieces[i] if i < len(pieces) else b"", headers))
        return out

    def _send(self, messages: list[Message]) -> int:
        """Publish an entry's messages (one, or an atomic batch); the last one's sequence."""
        if len(messages) == 1:
            subject, data, headers = messages[0]
            return self._bridge.publish(subject, data, headers=headers)
        return self._bridge.publish_batch(messages)

    def _commit_own(self, txn: lmdb.Transaction, messages: list[Message], last: int, applied: int) -> None:
        """Commit the entry in the local transaction too, when it landed right after what the
        copy holds; else ``_Behind`` (the applier writes it after the entries before it)."""
        first = last - len(messages) + 1
        if first != applied + 1:
            raise _Behind(last)
        self._set_applied(txn, last)
        self._note_subjects(txn, [(m[0], first + i) for i, m in enumerate(messages)])

    def _commit(self, run: Callable[[lmdb.Transaction], tuple[T, RecordingTxn | None]]) -> T:
        """Run ``run`` on the local copy and publish its writes conditionally; again after a lost race."""
        self._check_open()
        recorded: list[RecordingTxn] = []  # what the last attempt depended on (said when it keeps losing)
        refused = ""
        for attempt in range(_MAX_RACES):
            txn_id = uuid.uuid4().hex
            ran: list[Any] = []  # the function's result, once it ran and its entry was sent

            def body(txn: lmdb.Transaction, ran: list[Any] = ran, txn_id: str = txn_id) -> Any:
                if ran:
                    raise _Published  # the local map grew after the entry was sent: never send it twice
                applied = self._applied_in(txn)
                result, rec = run(txn)
                if rec is None or not rec.ops:
                    return result
                recorded[:] = [rec]
                messages = self._messages(txn, rec, txn_id, applied)
                ran.append(result)
                last = self._send(messages)
                ran.append(last)
                self._commit_own(txn, messages, last, applied)
                return result

            try:
                result = self._local._with_write_txn(body)
            except _Behind as behind:
                self._wait_applied(behind.seq)
                self.commits += 1
                return ran[0]  # type: ignore[no-any-return]
            except WrongLastSequence as exc:
                self.races += 1
                refused = str(exc)
                walk = bool(recorded and recorded[0].global_read)
                if attempt == _MAX_RACES // 10:
                    _log().warning("a transaction lost the race for stream %s %d times (%s; %s)", self.stream,
                                   attempt + 1, self._depends(recorded), refused)
                if walk and attempt + 1 >= _MAX_WALK_RACES:
                    break
                # The refusal names the last sequence it was checked against: wait for the
                # copy to get there (no round trip to ask), after a short random pause so that
                # hosts racing for the same sequence do not keep colliding. A walk conditioned
                # on the whole stream waits longer and longer: each attempt holds this copy's
                # write lock while it runs, and it can only win in a lull of the whole fleet.
                time.sleep(random.uniform(0, min(0.25, 0.002 * 2 ** attempt) if walk else
                                          0.002 * min(attempt + 1, 8)))
                if exc.last_seq == 0 and not walk:
                    # The server holds no message on a subject the condition named: the log was
                    # compacted past it (by another copy, maybe): learn where it starts now.
                    self._purged_before = self._bridge.first_seq(self.stream)
                if exc.last_seq is not None and not exc.ambiguous:
                    self._wait_applied(exc.last_seq)
                else:
                    self.sync()
                if exc.ambiguous and txn_id in self._seen_txns:
                    # An attempt the cluster did not answer was stored after all: it is the commit.
                    self.commits += 1
                    return ran[0]  # type: ignore[no-any-return]
                continue
            except BaseException:
                if not ran:
                    raise
                # The entry may be in the log although the local commit failed: if it is,
                # the applier writes it, and it is this transaction's commit.
                try:
                    self.sync()
                except StoreError:
                    raise
                if txn_id not in self._seen_txns:
                    raise
                self.commits += 1
                return ran[0]  # type: ignore[no-any-return]
            if len(ran) > 1:
                self._advance(int(ran[1]))
                self.commits += 1
            return result  # type: ignore[no-any-return]
        raise StoreUnavailable(f"a transaction lost the race for stream {self.stream} {attempt + 1} times "
                               f"in a row ({self._depends(recorded)}; {refused}); what it depends on "
                               "changes faster than this host can catch up")

    @staticmethod
    def _depends(recorded: list[RecordingTxn]) -> str:
        if not recorded:
            return "nothing recorded"
        rec = recorded[0]
        if rec.global_read:
            return f"it read a walk over shared keys: conditioned on the whole stream; {len(rec.ops)} writes"
        return (f"conditioned on {len(rec.read)} partitions ({', '.join(sorted(rec.read)[:4])}"
                f"{', ...' if len(rec.read) > 4 else ''}); {len(rec.ops)} writes")

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailable(f"the NATS store of stream {self.stream} is closed")
        if self._apply_error is not None:
            raise StoreError(f"the local copy stopped applying the log: {self._apply_error}")

    def _txn(self, txn: lmdb.Transaction) -> _LmdbTxn:
        return _LmdbTxn(txn, self._local._dbs, self._local._strict)

    # ------------------------------------------------------------ AgentStore

    def read(self) -> AbstractContextManager[ReadTxn]:
        """A consistent snapshot of the local copy (see the module docstring on freshness)."""
        self._check_open()
        return self._local.read()

    @contextmanager
    def write(self) -> Iterator[WriteTxn]:
        """A write transaction that cannot be re-run: a lost race is a StoreError (prefer ``transact``)."""
        self._check_open()
        last = 0
        try:
            with self._local.write() as w:
                raw: lmdb.Transaction = w._txn  # type: ignore[attr-defined]
                recorder = RecordingTxn(w)
                yield recorder
                if recorder.ops:
                    applied = self._applied_in(raw)
                    messages = self._messages(raw, recorder, uuid.uuid4().hex, applied)
                    try:
                        last = self._send(messages)
                    except WrongLastSequence as exc:
                        self.races += 1
                        raise StoreError("another host committed first; run the transaction again "
                                         "(NatsStore.transact does this by itself)") from exc
                    self._commit_own(raw, messages, last, applied)
        except _Behind as behind:
            self._wait_applied(behind.seq)
        if last:
            self._advance(last)
            self.commits += 1

    def transact(self, fn: Callable[[WriteTxn], T], *, sync: SyncWhen = "now") -> T:
        """Run ``fn`` and commit it to the log; run again after another host's commit came first.

        ``sync`` changes nothing here: every commit is on a quorum of replicas when it returns
        (see the module docstring for what that survives)."""
        def run(txn: lmdb.Transaction) -> tuple[T, RecordingTxn]:
            recorder = RecordingTxn(self._txn(txn))
            return fn(recorder), recorder

        return self._commit(run)

    def transact_batch(self, fns: Sequence[Callable[[WriteTxn], Any]], *,
                       sync: SyncWhen = "now") -> list[Outcome]:
        """Many functions, one log entry; each in a nested local transaction, isolated from the others.

        The entry depends on what every function that committed touched: a group commit of
        several agents' steps is conditioned on each of those agents' subjects. A function
        that walked shared keys (conditioned on the whole stream, which every commit of the
        fleet moves) is committed on its own, so that it never drags the others into its race."""
        if not fns:
            return []

        def run(txn: lmdb.Transaction) -> tuple[list[Outcome], RecordingTxn]:
            views: list[RecordingTxn] = []

            def view(inner: WriteTxn) -> WriteTxn:
                views.append(RecordingTxn(inner))
                return views[-1]

            outcomes = self._local._batch_in(txn, fns, view=view)
            merged = RecordingTxn(self._txn(txn))
            walks = []
            for i, (v, o) in enumerate(zip(views, outcomes, strict=True)):
                if o.error is None:
                    merged.merge(v)
                    if v.global_read:
                        walks.append(i)
            if walks and len(walks) < len(fns):
                raise _Split(walks)
            return outcomes, merged

        try:
            return self._commit(run)
        except _Split as split:
            out: list[Outcome | None] = [None] * len(fns)
            rest = [i for i in range(len(fns)) if i not in split.walks]
            for i, o in zip(rest, self.transact_batch([fns[i] for i in rest]), strict=True):
                out[i] = o
            for i in split.walks:
                try:
                    out[i] = Outcome(value=self.transact(fns[i]))
                except StoreUnavailable:
                    raise  # the cluster's failure, not the function's
                except Exception as exc:
                    out[i] = Outcome(error=exc)
            return [o for o in out if o is not None]

    def settle(self) -> None:
        """Nothing to do: no commit is ever left short of the cluster's promise."""
        self._check_open()

    def compact(self) -> dict[str, int]:
        """Reclaim unreferenced chunks, on every copy (the reclaim is itself a log entry),
        then snapshot and purge the log (``compact_log``)."""
        out = self.transact(lambda t: t.reclaim_chunks())
        out.update(self.compact_log())
        return out

    # ------------------------------------------------------------- compaction

    def _report_position(self) -> None:
        self._bridge.put_position(self._positions, self.copy_id, self._applied_seq, replicas=self.replicas,
                                  ttl=self.position_ttl)
        self._reported = self._applied_seq

    def _report_loop(self) -> None:
        """Say where this copy is (when it moved, and before the entry expires); compact when due."""
        said = time.monotonic()
        while not self._stopping.wait(_REPORT_S):
            try:
                if self._applied_seq != self._reported or time.monotonic() - said > self.position_ttl / 3:
                    self._report_position()
                    said = time.monotonic()
                if self.compact_every and self._applied_seq - self._snapshot_seq >= self.compact_every:
                    live = self._bridge.positions(self._positions, replicas=self.replicas, ttl=self.position_ttl)
                    if min(live, default=self.copy_id) == self.copy_id:  # one compactor at a time
                        self.compact_log()
                    else:
                        self._snapshot_seq = self._applied_seq  # another copy does it: look again later
            except (StoreError, concurrent.futures.CancelledError) as exc:
                # Closing the store stops the bridge's loop, which cancels a call in flight.
                if self._stopping.is_set():
                    return
                _log().warning("the copy of %s could not report its position or compact the log: %s",
                               self.stream, exc)

    def compact_log(self) -> dict[str, int]:
        """Snapshot the local copy at its applied sequence into the object store, drop older
        snapshots, and purge the log up to the lowest live copy's position (at most the snapshot)."""
        self._check_open()
        with tempfile.TemporaryDirectory(prefix="snap-", dir=self._local.path.parent) as tmp:
            with self._local.read() as r:
                txn: lmdb.Transaction = r._txn  # type: ignore[attr-defined]
                seq = self._applied_in(txn)
                self._local._env.copy(tmp, compact=True, txn=txn)
            data = (Path(tmp) / "data.mdb").read_bytes()
        name = f"{seq:020d}"
        self._bridge.put_snapshot(self._snapshots, name, data, replicas=self.replicas)
        for older in self._bridge.snapshots(self._snapshots, replicas=self.replicas):
            if older < name:
                self._bridge.delete_snapshot(self._snapshots, older, replicas=self.replicas)
        self._report_position()
        live = self._bridge.positions(self._positions, replicas=self.replicas, ttl=self.position_ttl)
        upto = min([seq, *live.values()])
        if upto > 0:
            self._bridge.purge(self.stream, upto + 1)
            self._purged_before = max(self._purged_before, upto + 1)
        self._snapshot_seq = seq
        _log().info("compacted %s: snapshot at %d (%d bytes), entries before %d purged", self.stream, seq,
                    len(data), upto + 1)
        return {"log_snapshot_seq": seq, "log_snapshot_bytes": len(data), "log_purged_before": upto + 1}

    def work_state(self) -> dict[str, int] | None:
        """What the fleet's work queue holds now (``WorkQueue.state``), without creating it:
        None when no host made one yet (``torpor fleet status``)."""
        self._check_open()
        try:
            return self._bridge.work_state(f"{self.stream}_work", WORK_DURABLE)
        except StoreUnavailable as exc:
            if "not found" in str(exc).lower():
                return None
            raise

    def work_queue(self, *, ack_wait: float = 10.0, max_deliver: int = 50) -> WorkQueue:
        """The fleet's work queue beside this stream (``snapshots.work_queue``), on this connection."""
        self._check_open()
        return WorkQueue(self._bridge, self.stream, self.replicas, ack_wait=ack_wait, max_deliver=max_deliver)

    def stats(self) -> dict[str, Any]:
        """Bytes per agent and kind in the local copy, and the log's position."""
        out = self._local.stats()
        out["nats"] = {"stream": self.stream, "replicas": self.replicas, "applied_seq": self._applied_seq}
        return out

    def cluster(self) -> dict[str, Any]:
        """What the cluster says of the stream (its leader, followers and their lag), and the copy's position."""
        return {**self._bridge.stream_state(self.stream), "applied_seq": self._applied_seq}

    @property
    def path(self) -> Path:
        """The local copy's directory."""
        return self._local.path

    def close(self) -> None:
        """Stop following the log, close the connection and the local copy (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        self._reporter.join(10.0)
        self._bridge.close()
        self._queue.put(None)
        self._applier.join(10.0)
        self._local.close()

    def __enter__(self) -> NatsStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _conforms(store: NatsStore) -> AgentStore:
    return store  # mypy checks NatsStore against the protocol here

