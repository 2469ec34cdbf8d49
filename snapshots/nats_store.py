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
  on condition that the stream's last sequence is the copy's: nothing committed anywhere
  since this host's copy was last brought up to date. If the publish is accepted, the
  local transaction commits too (its state is exactly the log's at that sequence). If it
  is refused, another host committed first: the local copy is brought up to date from
  the log and the function runs again (the ``transact`` contract allows it);
- an applier thread follows the stream with an ordered consumer and replays every entry
  it has not applied yet (``oplog.apply_ops``), so reads on every host see every commit,
  typically within milliseconds.

A step's checkpoint, journal entries, audit records and agent record are one log entry:
one message, or, above the server's payload limit, an atomic batch of parts (NATS 2.12+),
stored together or not at all, under the same condition. The condition on the whole
stream's last sequence is stronger than one on the agent's own: a host that lost an agent
to another (``torpor`` fencing) cannot commit on a view that predates the take-over, and
its function, run again on the new state, sees that it no longer owns the agent.

Durability: an acknowledged commit is on a quorum of the stream's replicas
(``replicas``, 3 in the tests), in their page caches; the servers fsync every
``sync_interval`` (2 minutes by default; ``sync_interval: always`` fsyncs each write). So
it survives the death of any minority of nodes and of every host, not a power cut of all
the nodes at once unless the cluster runs with ``sync_interval: always``. The local copy
is a cache: it can be deleted and is rebuilt from the log.

Reads (``read``) are of the local copy: consistent snapshots, possibly a few
milliseconds behind another host's latest commit (``sync`` waits until the copy has
everything the stream held when it was called). Writes are never based on a stale view.

The log grows with every commit; snapshotting it (a new host starting from a copy rather
than from sequence 1) is not done yet.
"""

from __future__ import annotations

import collections
import logging
import queue
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import lmdb

from .errors import StoreConfigError, StoreCorrupt, StoreError, StoreUnavailable
from .lmdb_store import LmdbStore, _LmdbTxn
from .nats_bridge import LogMessage, NatsBridge, WrongLastSequence
from .oplog import RecordingTxn, apply_ops, decode_ops, encode_ops
from .store import AgentStore, Outcome, ReadTxn, SyncWhen, WriteTxn

__all__ = ["DEFAULT_STREAM", "NatsStore", "parse_nats_url"]

T = TypeVar("T")
DEFAULT_STREAM = "TORPOR"
#: Keys in the local copy's ``_torpor`` table: the last stream sequence applied, and the
#: stream this copy is a copy of (its name and creation time).
_APPLIED_KEY = b"nats.applied"
_STREAM_KEY = b"nats.stream"
#: Headers of a log entry: its id, and "i/n" for an entry in parts (an atomic batch).
_TXN_HEADER = "Torpor-Txn"
_PART_HEADER = "Torpor-Part"
#: How many lost races in a row before a transaction gives up.
_MAX_RACES = 200
#: How many applied entry ids are remembered (an unanswered publish is recognised among them).
_SEEN_KEPT = 10_000
#: Room left under the server's max_payload for headers.
_PART_HEADROOM = 64 * 1024


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

    def __init__(self, bridge: NatsBridge, local: LmdbStore, stream: str, replicas: int) -> None:
        self._bridge = bridge
        self._local = local
        self.stream = stream
        self.subject = f"{stream}.txn"
        self.replicas = replicas
        self._max_part = max(64 * 1024, int(bridge._nc.max_payload) - _PART_HEADROOM)
        self._applied_cond = threading.Condition()
        self._applied_seq = self._read_applied()
        self._queue: queue.SimpleQueue[LogMessage | None] = queue.SimpleQueue()
        self._parts: list[LogMessage] = []
        self._apply_error: BaseException | None = None
        #: The ids of the entries applied lately (by the applier), to recognise one's own.
        self._seen_txns: set[str] = set()
        self._seen_order: collections.deque[str] = collections.deque()
        self._closed = False
        self.races = 0  # conditional publishes refused (another host committed first)
        self.commits = 0
        self._applier = threading.Thread(target=self._apply_loop, name="torpor-nats-apply", daemon=True)
        self._applier.start()
        bridge.follow(self.subject, self._applied_seq + 1, self._queue.put)

    @classmethod
    def open(cls, url: str | Sequence[str], cache_dir: str | Path, *, stream: str = DEFAULT_STREAM,
             replicas: int = 3, timeout: float = 10.0) -> NatsStore:
        """Connect, create the stream if needed (``replicas`` copies), open the local copy in ``cache_dir``."""
        servers = parse_nats_url(url) if isinstance(url, str) else list(url)
        if not servers:
            raise StoreConfigError("a NATS store needs at least one server URL")
        if not 1 <= replicas <= 5:
            raise StoreConfigError(f"replicas is 1 to 5 (JetStream's limit), got {replicas}")
        if not stream.replace("_", "").replace("-", "").isalnum():
            raise StoreConfigError(f"a stream name is letters, digits, '-' and '_', got {stream!r}")
        bridge = NatsBridge(servers, timeout=timeout)
        try:
            identity = f"{stream}@{bridge.ensure_stream(stream, f'{stream}.txn', replicas)}"
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            local = LmdbStore.open(Path(cache_dir))
        except BaseException:
            bridge.close()
            raise
        try:
            cls._adopt(local, identity, Path(cache_dir))
            return cls(bridge, local, stream, replicas)
        except BaseException:
            local.close()
            bridge.close()
            raise

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
            try:
                self._take(msg)
            except Exception as exc:  # the copy cannot go on: make every waiter say so
                _log().error("the local copy of %s stopped at %d: %s", self.stream, self._applied_seq, exc)
                with self._applied_cond:
                    self._apply_error = exc
                    self._applied_cond.notify_all()
                return

    def _take(self, msg: LogMessage) -> None:
        """One delivered message: a whole entry, or a part of one (kept until the last part)."""
        if msg.seq <= self._applied_seq:
            self._parts.clear()
            return
        part = msg.headers.get(_PART_HEADER)
        if part is not None:
            i, _, n = part.partition("/")
            if self._parts and self._parts[0].headers.get(_TXN_HEADER) != msg.headers.get(_TXN_HEADER):
                self._parts.clear()
            self._parts.append(msg)
            if i != n:
                return
            parts, self._parts = self._parts, []
            if len(parts) != int(n):
                raise StoreCorrupt(f"entry {msg.headers.get(_TXN_HEADER)} at {msg.seq} has {len(parts)} of {n} parts")
            self._apply(parts[0].seq, msg.seq, b"".join(p.data for p in parts), msg.headers.get(_TXN_HEADER))
        else:
            self._apply(msg.seq, msg.seq, msg.data, msg.headers.get(_TXN_HEADER))

    def _seen(self, txn_id: str | None) -> None:
        if txn_id is None:
            return
        self._seen_txns.add(txn_id)
        self._seen_order.append(txn_id)
        if len(self._seen_order) > _SEEN_KEPT:
            self._seen_txns.discard(self._seen_order.popleft())

    def _apply(self, first: int, last: int, frame: bytes, txn_id: str | None) -> None:
        if first > self._applied_seq + 1:
            self._fill(first)
        ops = decode_ops(frame)

        def on_error(op: Any, exc: Exception) -> None:
            _log().warning("entry %d of %s: %s(...) failed on this copy: %s", last, self.stream, op[0], exc)

        def body(txn: lmdb.Transaction) -> bool:
            if self._applied_in(txn) >= last:
                return False  # committed here by this host's own transaction
            apply_ops(_LmdbTxn(txn, self._local._dbs, self._local._strict), ops, on_error)
            self._set_applied(txn, last)
            return True

        self._local._with_write_txn(body)
        self._seen(txn_id)
        self._advance(last)

    def _fill(self, upto: int) -> None:
        """Fetch and apply the entries before ``upto`` the consumer did not deliver (a gap)."""
        seq = self._applied_seq + 1
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
                    self._apply(parts[0].seq, m.seq, b"".join(p.data for p in parts), m.headers.get(_TXN_HEADER))
                    parts = []
            else:
                self._apply(m.seq, m.seq, m.data, m.headers.get(_TXN_HEADER))

    # --------------------------------------------------------------- commits

    def _publish(self, frame: bytes, expected: int, txn_id: str) -> int:
        if len(frame) <= self._max_part:
            return self._bridge.publish(self.subject, frame, expected_last_seq=expected,
                                        headers={_TXN_HEADER: txn_id})
        parts = [frame[i:i + self._max_part] for i in range(0, len(frame), self._max_part)]
        headers = [{_TXN_HEADER: txn_id, _PART_HEADER: f"{i}/{len(parts)}"} for i in range(1, len(parts) + 1)]
        return self._bridge.publish_batch(self.subject, parts, expected_last_seq=expected, headers=headers)

    def _commit(self, run: Callable[[lmdb.Transaction], tuple[T, list[Any]]]) -> T:
        """Run ``run`` on the local copy and publish its writes conditionally; again after a lost race."""
        self._check_open()
        for attempt in range(_MAX_RACES):
            txn_id = uuid.uuid4().hex
            ran: list[Any] = []  # the function's result, once it ran and its entry was sent
            published: list[int] = []

            def body(txn: lmdb.Transaction, ran: list[Any] = ran, published: list[int] = published,
                     txn_id: str = txn_id) -> Any:
                if ran:
                    raise _Published  # the local map grew after the entry was sent: never send it twice
                applied = self._applied_in(txn)
                result, ops = run(txn)
                if not ops:
                    return result
                ran.append(result)
                seq = self._publish(encode_ops(ops), applied, txn_id)
                published.append(seq)
                self._set_applied(txn, seq)
                return result

            try:
                result = self._local._with_write_txn(body)
            except WrongLastSequence as exc:
                self.races += 1
                # The refusal names the stream's last sequence: wait for the copy to get there
                # (no round trip to ask), after a short random pause so that hosts racing for
                # the next sequence do not keep colliding.
                time.sleep(random.uniform(0, 0.002 * min(attempt + 1, 8)))
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
            if published:
                self._advance(published[0])
                self.commits += 1
            return result  # type: ignore[no-any-return]
        raise StoreUnavailable(f"a transaction lost the race for stream {self.stream} {_MAX_RACES} times "
                               "in a row; the fleet is writing faster than this host can catch up")

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
        with self._local.write() as w:
            raw: lmdb.Transaction = w._txn  # type: ignore[attr-defined]
            recorder = RecordingTxn(w)
            yield recorder
            if recorder.ops:
                try:
                    seq = self._publish(encode_ops(recorder.ops), self._applied_in(raw), uuid.uuid4().hex)
                except WrongLastSequence as exc:
                    self.races += 1
                    raise StoreError("another host committed first; run the transaction again "
                                     "(NatsStore.transact does this by itself)") from exc
                self._set_applied(raw, seq)
        if recorder.ops:
            self._advance(seq)
            self.commits += 1

    def transact(self, fn: Callable[[WriteTxn], T], *, sync: SyncWhen = "now") -> T:
        """Run ``fn`` and commit it to the log; run again after another host's commit came first.

        ``sync`` changes nothing here: every commit is on a quorum of replicas when it returns
        (see the module docstring for what that survives)."""
        def run(txn: lmdb.Transaction) -> tuple[T, list[Any]]:
            recorder = RecordingTxn(self._txn(txn))
            return fn(recorder), recorder.ops

        return self._commit(run)

    def transact_batch(self, fns: Sequence[Callable[[WriteTxn], Any]], *,
                       sync: SyncWhen = "now") -> list[Outcome]:
        """Many functions, one log entry; each in a nested local transaction, isolated from the others."""
        if not fns:
            return []
        def run(txn: lmdb.Transaction) -> tuple[list[Outcome], list[Any]]:
            ops: list[Any] = []

            def record(recorder: Any) -> None:
                ops.extend(recorder.ops)

            return self._local._batch_in(txn, fns, view=RecordingTxn, committed=record), ops

        return self._commit(run)

    def settle(self) -> None:
        """Nothing to do: no commit is ever left short of the cluster's promise."""
        self._check_open()

    def compact(self) -> dict[str, int]:
        """Reclaim unreferenced chunks, on every copy (the reclaim is itself a log entry)."""
        return self.transact(lambda t: t.reclaim_chunks())

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

