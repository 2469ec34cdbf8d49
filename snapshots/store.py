"""The agent store interface: what a host needs from durable storage, and nothing more.

Why Protocols: a single host keeps its agents in an embedded LMDB file
(``snapshots.lmdb_store.LmdbStore``); a fleet of hosts will keep them in NATS JetStream.
The host codes against these classes only, so that swapping the backend is one
constructor call. The store knows nothing of Wasmtime or of the snapshot format: values
are JSON-able dicts and opaque bytes.

Why transaction *functions*: a write may have to be run again (the LMDB map grew, a
replicated backend lost a race), so the primary write API takes a function of a
``WriteTxn`` and may call it more than once. Such a function must only read and write
through the transaction it is given, and must not have other side effects.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

from .summary import AgentSummary

__all__ = [
    "BLOB_BUCKETS",
    "INPUTS_BUCKET",
    "LOGS_BUCKET",
    "REGISTRY_BUCKET",
    "SEALED_BUCKETS",
    "TIMERS_BUCKET",
    "AgentStore",
    "CheckpointInfo",
    "Outcome",
    "ReadTxn",
    "SyncWhen",
    "WriteTxn",
]

T = TypeVar("T")

#: Named buckets for opaque blobs (agent bundles, audit records, approvals, host
#: metadata, agents' inputs, the registry of named bundle versions). Adding a bucket is
#: adding its name here.
BLOB_BUCKETS: tuple[str, ...] = ("bundles", "audit", "approvals", "meta", "identity", "revocations", "audit_heads",
                                 "inputs", "operator_tokens", "server", "registry", "timers", "logs")
#: The bucket holding each agent's input, by agent id: written once at spawn, apart from
#: the agent record that every commit rewrites; ``delete_agent(purge=True)`` removes it.
INPUTS_BUCKET = "inputs"
#: The wake index (``host.runtime.timers``): one entry per agent sleeping until a time,
#: keyed by that time, so the due ones are a prefix scan, not a walk over every record.
TIMERS_BUCKET = "timers"
#: Each agent's guest log lines (``host.runtime.logs``): a head and bounded batches, written
#: in the commit of the step that logged them.
LOGS_BUCKET = "logs"
#: The bucket of the registry (``host.runtime.registry``): names, their versions and tags,
#: per tenant. Its values choose which bundle a run by name starts, so they are sealed.
REGISTRY_BUCKET = "registry"
#: The buckets whose values are read back into agents (their bundles, their inputs, the
#: registry entries that choose a run's bundle): the
#: store seals each value with a digest and checks it at every read (``snapshots.sealed``),
#: as it does for journal entries and kv values. A value that does not match raises
#: RecordCorrupt. The other buckets are the host's own records, checked by their readers
#: (the audit log is a signed hash chain).
SEALED_BUCKETS = frozenset({"bundles", INPUTS_BUCKET, REGISTRY_BUCKET})
#: The mark of an agent record that is in the store but does not decode: reads give a
#: stand-in with this key set, ``status`` "corrupt" and an ``error`` naming the problem,
#: so that one damaged record never stops a listing; writes of a stand-in are refused,
#: so that the damaged bytes stay for an operator to look at.
UNREADABLE = "unreadable"
CORRUPT_STATUS = "corrupt"


def unreadable_record(agent_id: str, problem: str) -> dict[str, Any]:
    """The stand-in for an agent record that does not decode (see :data:`UNREADABLE`)."""
    return {"agent_id": agent_id, "status": CORRUPT_STATUS, UNREADABLE: True,
            "error": {"code": "record_corrupt", "message": f"the agent record of {agent_id} does not decode: {problem}"}}


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    """One stored checkpoint of an agent, without its bytes."""

    seq: int
    size: int
    created_at: float


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of one transaction function run in a batch: a value or an error."""

    value: Any = None
    error: BaseException | None = None

    def unwrap(self) -> Any:
        """The value, or the error raised."""
        if self.error is not None:
            raise self.error
        return self.value


class ReadTxn(Protocol):
    """A consistent read-only view of the store (a snapshot in time; never blocks writers).

    Iterators are valid only while the transaction is open.
    """

    def get_agent(self, agent_id: str) -> dict[str, Any] | None:
        """The agent record (it includes ``"agent_id"``), or None; a stand-in if it does not
        decode (see :data:`UNREADABLE`)."""
        ...

    def iter_agents(self) -> Iterator[dict[str, Any]]:
        """Every agent record, in ascending agent_id order (by UTF-8 bytes); a record that
        does not decode is a stand-in (see :data:`UNREADABLE`), never an exception."""
        ...

    def iter_agent_summaries(self) -> Iterator[AgentSummary]:
        """What a listing shows of every agent (``snapshots.summary``), in the order of
        :meth:`iter_agents`, without decoding the agent records: ``torpor ps`` on 10,000
        agents reads 10,000 small summaries instead of 10 MB of records. A summary is
        as of the agent's last commit: a record damaged on disk since then shows as
        "corrupt" once a writer has found it (:meth:`WriteTxn.mark_unreadable`);
        ``store check`` finds it at once."""
        ...

    def get_checkpoint(self, agent_id: str, seq: int) -> bytes | None:
        """The bytes of checkpoint ``seq`` of the agent, or None."""
        ...

    def latest_checkpoint(self, agent_id: str) -> int | None:
        """The highest checkpoint seq stored for the agent, or None."""
        ...

    def list_checkpoints(self, agent_id: str) -> list[CheckpointInfo]:
        """The agent's checkpoints in ascending seq order."""
        ...

    def get_journal(self, agent_id: str, call_seq: int) -> dict[str, Any] | None:
        """The journal entry of the agent's tool call ``call_seq``, or None; RecordCorrupt if
        it does not match its digest or does not decode."""
        ...

    def iter_journal(self, agent_id: str) -> Iterator[tuple[int, dict[str, Any]]]:
        """The agent's journal entries as (call_seq, entry) in ascending call_seq order;
        RecordCorrupt at an entry that does not match its digest or does not decode."""
        ...

    def get_chunk(self, name: bytes) -> bytes | None:
        """A content chunk as stored (``snapshots.chunks``: codec byte, then its bytes), by the
        SHA-256 of its content, or None. Unchecked here: ``chunks.load_chunk`` checks it."""
        ...

    def stored_bytes(self) -> dict[str, Any]:
        """Bytes stored per agent and kind, and the chunk store's totals (``torpor store stats``)."""
        ...

    def kv_get(self, namespace: str, key: str) -> bytes | None:
        """A value of the small key-value space (counters, rate-limit state), or None;
        RecordCorrupt if it does not match its digest."""
        ...

    def kv_keys(self, namespace: str, prefix: str = "") -> list[str]:
        """The keys of ``namespace`` that start with ``prefix``, sorted."""
        ...

    def get_blob(self, bucket: str, key: str) -> bytes | None:
        """A blob of one of the ``BLOB_BUCKETS``, or None; RecordCorrupt if the bucket is
        sealed (:data:`SEALED_BUCKETS`) and the blob does not match its digest."""
        ...

    def iter_blobs(self, bucket: str, prefix: str = "") -> Iterator[tuple[str, bytes]]:
        """The (key, blob) pairs of a bucket whose key starts with ``prefix``, sorted."""
        ...


class WriteTxn(ReadTxn, Protocol):
    """A read-write transaction: all of its writes land together or not at all."""

    def put_agent(self, record: dict[str, Any]) -> None:
        """Insert or replace an agent record; ``record["agent_id"]`` names it."""
        ...

    def mark_unreadable(self, agent_id: str, problem: str) -> None:
        """The record of ``agent_id`` does not decode: list it as corrupt from now on.

        Its bytes stay as they are (evidence for the operator); only its listing summary
        changes, so that ``torpor ps`` shows what a reader of the record found.
        """
        ...

    def delete_agent(self, agent_id: str, *, purge: bool = False, missing_ok: bool = False) -> None:
        """Remove an agent record; with ``purge`` also its checkpoints, journal and input.

        Raises NotFound when there is no such agent, unless ``missing_ok``.
        """
        ...

    def put_checkpoint(self, agent_id: str, seq: int, blob: bytes, created_at: float,
                       chunks: Mapping[bytes, bytes | memoryview] | None = None) -> None:
        """Store checkpoint ``seq``; raises CheckpointExists if it is already stored.

        ``chunks``: the content chunks a format-3 record names (``format.encode_checkpoint``),
        by digest; the store writes those it does not hold yet, in the same transaction.
        """
        ...

    def prune_checkpoints(self, agent_id: str, keep_from: int) -> int:
        """Delete the agent's checkpoints with seq < ``keep_from``; return how many."""
        ...

    def put_journal(self, agent_id: str, call_seq: int, entry: dict[str, Any]) -> None:
        """Insert or replace the journal entry of tool call ``call_seq``.

        A long entry (a conversation in its arguments) may be kept as content chunks; it
        reads back as the same bytes (``get_journal``), every chunk checked.
        """
        ...

    def reclaim_chunks(self) -> dict[str, int]:
        """Delete the chunks nothing names; how many, and the bytes freed."""
        ...

    def kv_set(self, namespace: str, key: str, value: bytes) -> None:
        """Set a key-value entry."""
        ...

    def kv_delete(self, namespace: str, key: str) -> bool:
        """Delete a key-value entry; return whether it existed."""
        ...

    def kv_incr(self, namespace: str, key: str, delta: int = 1) -> int:
        """Add ``delta`` to a counter stored as decimal ASCII (missing counts as 0)."""
        ...

    def put_blob(self, bucket: str, key: str, value: bytes) -> None:
        """Insert or replace a blob in one of the ``BLOB_BUCKETS``."""
        ...

    def delete_blob(self, bucket: str, key: str) -> bool:
        """Delete a blob; return whether it existed."""
        ...


#: When a commit must be on stable storage, at a level whose commits sync (LMDB at ``sync``):
#: ``"now"``, before it returns (the default); ``"soon"``, a background sync starts at once
#: while the caller goes on; ``"later"``, when the next ``"now"`` commit, ``settle`` or
#: ``close`` syncs. Only ``"now"`` may be acknowledged to anyone when it returns: the others
#: are for commits nobody outside hears of before a later ``"now"`` commit covers them.
SyncWhen = Literal["now", "soon", "later"]


class AgentStore(Protocol):
    """A durable store of agents, checkpoints, journals, counters and blobs."""

    def read(self) -> AbstractContextManager[ReadTxn]:
        """Open a read-only snapshot view; close it promptly (it pins old pages)."""
        ...

    def write(self) -> AbstractContextManager[WriteTxn]:
        """A write transaction as a context manager: commit on success, abort on error.

        Cannot re-run its body, so it may fail where ``transact`` would have retried:
        prefer ``transact``.
        """
        ...

    def transact(self, fn: Callable[[WriteTxn], T], *, sync: SyncWhen = "now") -> T:
        """Run ``fn`` in a write transaction and commit; retried as needed.

        Once it returns the commit survives at least the host process being killed; a
        store may promise more (LMDB at its default ``sync`` level: a power loss too).
        ``sync``: when it must be on stable storage (:data:`SyncWhen`); short of ``"now"``
        the store may leave it short of its level's promise until a later ``"now"`` commit
        (or :meth:`settle`) covers it.
        """
        ...

    def transact_batch(self, fns: Sequence[Callable[[WriteTxn], Any]], *,
                       sync: SyncWhen = "now") -> list[Outcome]:
        """Run many functions in one durable commit, each isolated from the others' errors.

        A function that raises has none of its writes committed and its error in its
        Outcome; the others commit. Errors of the store itself (StoreFull, ...) raise.
        ``sync`` as for :meth:`transact`.
        """
        ...

    def settle(self) -> None:
        """Make every commit so far keep the level's promise (a no-op when they all do):
        what a caller runs before it acknowledges a commit it made with ``sync`` short of ``"now"``."""
        ...

    def compact(self) -> dict[str, int]:
        """Reclaim the chunks nothing names (``torpor store compact``)."""
        ...

    def stats(self) -> dict[str, Any]:
        """Bytes stored per agent and per kind (``torpor store stats``)."""
        ...

    def close(self) -> None:
        """Release the store; transactions must be closed first."""
        ...
