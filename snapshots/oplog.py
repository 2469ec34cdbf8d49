"""A write transaction as a list of operations: recorded while it runs, replayed elsewhere.

Why: the fleet store (``snapshots.nats_store``) keeps the store's state as a replicated log
of committed transactions, and every host applies that log to a local copy. A
transaction function runs once, on the host that commits it, against that host's copy;
what reaches the log is not the function (it may read anything and do anything) but the
store methods it called that changed something, with their arguments. Replaying those
calls, in log order, against another copy of the same state gives the same state: every
write method of ``WriteTxn`` is deterministic given the state and its arguments (sealing
is a digest, chunk names are content digests, times are arguments).

A call that raised is not recorded: its effect, if any, was rolled back with the
function's (nested) transaction, or the function caught the error, in which case the
method did not change the state in any way another copy would need to see.

What a transaction depends on: the fleet store commits a transaction on condition that
nothing it read changed since (``snapshots.nats_store``). Conditions per agent let hosts
driving different agents commit side by side, so the recorder also notes the *partition*
of every key a transaction read and wrote (:func:`partition_of_kv`,
:func:`partition_of_blob`): an agent's id for the keys that are that agent's alone (its
record, checkpoints, journal, its private kv namespace, its audit chain, logs, input,
approval, identity and wake entry), the key itself for any other single key (a host's
lease, the host's signing key), or :data:`GLOBAL` for a walk over keys that are not one
agent's (every agent, a bucket, the registry). A transaction is conditioned on each
partition it read, and its writes go to each partition it wrote. A walk over a bucket (or
kv namespace) of shared keys, none of them one agent's (the registry, the signed heads, the
fleet's leases), is the partition :func:`walk_of` that bucket: it is conditioned on every key
of that bucket at once (``snapshots.nats_store`` puts a bucket's keys under one subject
prefix and conditions the walk on the wildcard), so a registry push or a seal commits beside
the fleet's steps instead of racing every commit. One that walked a bucket of agents' keys
(every agent's audit chain, the wake index) is :data:`GLOBAL`, conditioned on the whole log.

Walks of the agent records themselves (``iter_agents``, ``iter_agent_summaries``) in a write
transaction are read at the transaction's view and not conditioned (:attr:`RecordingTxn.
snapshot_walk`): snapshot isolation for that walk. That is serializable for this host's
layout, and only because of it: the one writer that walks every agent is the audit-head
seal (``host.trust.audit.seal_head``), which writes only keys of the heads bucket, and no
transaction that writes an agent record reads those. Serialized at its view, the seal
signs heads that every chain had then (chains only grow, and the next seal covers what
came after); conditioned on every agent, it could commit only in a lull of the whole fleet.

Which keys are whose is the host's layout, named
here: a key labelled wrongly costs concurrency (two agents' commits conditioned on each
other), never correctness, since every transaction reading a key is conditioned on, and
every one writing it publishes to, the same label.

The wire form is one frame: a 4-byte big-endian header length, a JSON header
``{"v": 1, "ops": [[name, [args], {kwargs}], ...], "sizes": [...]}`` and then the byte
strings the arguments named, concatenated in order. Byte strings are never put in the
JSON (a checkpoint is megabytes: no base64).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from .errors import StoreCorrupt
from .store import CheckpointInfo, WriteTxn
from .summary import AgentSummary

__all__ = ["GLOBAL", "WALK", "WRITE_METHODS", "RecordingTxn", "apply_ops", "bucket_of", "decode_ops", "encode_ops",
           "partition_of_blob", "partition_of_kv", "walk_of"]

#: The ``WriteTxn`` methods that change the state; only these are recorded and replayed.
WRITE_METHODS = frozenset({
    "put_agent", "mark_unreadable", "delete_agent", "put_checkpoint", "prune_checkpoints",
    "put_journal", "reclaim_chunks", "kv_set", "kv_delete", "kv_incr", "put_blob", "delete_blob",
})
_VERSION = 1
_LEN = struct.Struct(">I")

Op = tuple[str, tuple[Any, ...], dict[str, Any]]

#: The partition of a walk over keys that are not one agent's alone.
GLOBAL = ""
#: The prefix of the partition of a walk over one bucket of shared keys (:func:`walk_of`).
WALK = "walk:"
#: Blob buckets keyed by an agent's id, and those keyed ``<agent id>/...`` (its chain, its log).
_BY_AGENT_ID = frozenset({"inputs", "approvals", "identity"})
_BY_AGENT_PREFIX = frozenset({"audit", "logs"})
#: The kv namespace of limits shared beyond one agent (``host.runtime.budgets``): its
#: ``run:<id>/...`` and ``agent:<id>:...`` keys are that agent's, the rest (tenant, policy) global.
_LIMITS_NAMESPACE = "torpor:limits"
#: Writes that read nothing (no answer or error depends on what was there).
_BLIND = frozenset({"kv_set", "put_blob", "put_agent"})


#: Blob buckets some of whose keys are agents' (a walk over them is GLOBAL).
_AGENT_KEYED_BUCKETS = _BY_AGENT_ID | _BY_AGENT_PREFIX | {"revocations", "timers"}


def walk_of(bucket: str) -> str:
    """The partition of a walk over ``bucket`` (``kv:<namespace>`` or ``blob:<bucket>``), a
    bucket of shared keys only: its keys' partitions are ``<bucket>/<key>`` (:func:`bucket_of`)."""
    return WALK + bucket


def bucket_of(partition: str) -> tuple[str, str] | None:
    """(bucket, key) of a shared key's partition (``kv:<ns>/<key>``, ``blob:<bucket>/<key>``);
    None for an agent's partition, a walk, :data:`GLOBAL`."""
    if not partition.startswith(("kv:", "blob:")):
        return None
    bucket, _, key = partition.partition("/")
    return bucket, key


def _shared_kv(namespace: str) -> bool:
    """Whether every key of ``namespace`` is a shared key (none is one agent's). A name with a
    '/' is not walked by bucket (its keys' partitions would not name it alone): GLOBAL."""
    return not namespace.startswith("agent:") and namespace != _LIMITS_NAMESPACE and "/" not in namespace


def partition_of_kv(namespace: str, key: str, *, prefix: bool = False) -> str:
    """The partition of kv ``namespace``/``key`` (of every key under it when ``prefix``)."""
    if namespace.startswith("agent:") and len(namespace) > 6:
        return namespace[6:]  # an agent's private namespace (``host.tools.builtin.kv_namespace``)
    if namespace == _LIMITS_NAMESPACE:
        for head, end in (("run:", "/"), ("agent:", ":")):
            if key.startswith(head):
                agent, sep, _ = key[len(head):].partition(end)
                if agent and (sep or not prefix):
                    return agent
    if prefix:
        return walk_of(f"kv:{namespace}") if _shared_kv(namespace) else GLOBAL
    return f"kv:{namespace}/{key}"


def partition_of_blob(bucket: str, key: str, *, prefix: bool = False) -> str:
    """The partition of blob ``bucket``/``key`` (of every key under it when ``prefix``)."""
    if bucket in _BY_AGENT_ID and not prefix:
        return key
    if bucket in _BY_AGENT_PREFIX:
        agent, sep, _ = key.partition("/")
        if agent and (sep or not prefix):  # a prefix "<id>/..." covers that agent's keys only
            return agent
    if bucket == "revocations" and key.startswith("agent/") and not prefix:
        return key[6:]
    if bucket == "timers" and not prefix:  # ``<time>/<agent id>`` (``host.runtime.timers.wake_key``)
        return key.rpartition("/")[2]
    if prefix:
        return walk_of(f"blob:{bucket}") if bucket not in _AGENT_KEYED_BUCKETS and "/" not in bucket else GLOBAL
    return f"blob:{bucket}/{key}"


class RecordingTxn:
    """A ``WriteTxn`` that forwards every call to ``inner`` and records the writes that succeed.

    It also notes what the transaction depends on: the partitions it ``read`` (a write whose
    answer or error depends on what was there reads too; a walk over a bucket of shared keys
    is :func:`walk_of` it) and ``wrote``, ``global_read``, whether it walked keys of
    :data:`GLOBAL`, and ``snapshot_walk``, whether it walked the agent records (read at its
    view, not conditioned: see the module docstring)."""

    __slots__ = ("_inner", "global_read", "ops", "read", "snapshot_walk", "wrote")

    def __init__(self, inner: WriteTxn) -> None:
        self._inner = inner
        self.ops: list[Op] = []
        self.read: set[str] = set()
        self.wrote: set[str] = set()
        self.global_read = False
        self.snapshot_walk = False

    def _touch(self, part: str) -> None:
        if part:
            self.read.add(part)
        else:
            self.global_read = True

    def merge(self, other: RecordingTxn) -> None:
        """Add what ``other`` recorded (a batch's functions make one entry)."""
        self.ops.extend(other.ops)
        self.read |= other.read
        self.wrote |= other.wrote
        self.global_read = self.global_read or other.global_read
        self.snapshot_walk = self.snapshot_walk or other.snapshot_walk

    def _write(self, part: str, name: str, *args: Any, **kwargs: Any) -> Any:
        if name not in _BLIND:  # before the call: one that raised may have read
            self._touch(part)
        result = getattr(self._inner, name)(*args, **kwargs)
        self.ops.append((name, args, kwargs))  # only once it succeeded
        if part:
            self.wrote.add(part)
        return result

    # ------------------------------------------------------------------- reads

    def get_agent(self, agent_id: str) -> dict[str, Any] | None:
        self._touch(agent_id)
        return self._inner.get_agent(agent_id)

    def iter_agents(self) -> Iterator[dict[str, Any]]:
        self.snapshot_walk = True  # read at the view, not conditioned (see the module docstring)
        return self._inner.iter_agents()

    def iter_agent_summaries(self) -> Iterator[AgentSummary]:
        self.snapshot_walk = True
        return self._inner.iter_agent_summaries()

    def get_checkpoint(self, agent_id: str, seq: int) -> bytes | None:
        self._touch(agent_id)
        return self._inner.get_checkpoint(agent_id, seq)

    def latest_checkpoint(self, agent_id: str) -> int | None:
        self._touch(agent_id)
        return self._inner.latest_checkpoint(agent_id)

    def list_checkpoints(self, agent_id: str) -> list[CheckpointInfo]:
        self._touch(agent_id)
        return self._inner.list_checkpoints(agent_id)

    def get_journal(self, agent_id: str, call_seq: int) -> dict[str, Any] | None:
        self._touch(agent_id)
        return self._inner.get_journal(agent_id, call_seq)

    def iter_journal(self, agent_id: str) -> Iterator[tuple[int, dict[str, Any]]]:
        self._touch(agent_id)
        return self._inner.iter_journal(agent_id)

    def get_chunk(self, name: bytes) -> bytes | None:
        # Content named by its digest: the same bytes whoever wrote them, so no condition
        # (a chunk is deleted only by ``reclaim_chunks``, a global transaction, when unused).
        return self._inner.get_chunk(name)

    def stored_bytes(self) -> dict[str, Any]:
        self._touch(GLOBAL)
        return self._inner.stored_bytes()

    def kv_get(self, namespace: str, key: str) -> bytes | None:
        self._touch(partition_of_kv(namespace, key))
        return self._inner.kv_get(namespace, key)

    def kv_keys(self, namespace: str, prefix: str = "") -> list[str]:
        self._touch(partition_of_kv(namespace, prefix, prefix=True))
        return self._inner.kv_keys(namespace, prefix)

    def get_blob(self, bucket: str, key: str) -> bytes | None:
        self._touch(partition_of_blob(bucket, key))
        return self._inner.get_blob(bucket, key)

    def iter_blobs(self, bucket: str, prefix: str = "") -> Iterator[tuple[str, bytes]]:
        self._touch(partition_of_blob(bucket, prefix, prefix=True))
        return self._inner.iter_blobs(bucket, prefix)

    # ------------------------------------------------------------------ writes

    def put_agent(self, record: dict[str, Any]) -> None:
        self._write(str(record.get("agent_id", "")) if isinstance(record, dict) else GLOBAL, "put_agent", record)

    def mark_unreadable(self, agent_id: str, problem: str) -> None:
        self._write(agent_id, "mark_unreadable", agent_id, problem)

    def delete_agent(self, agent_id: str, *, purge: bool = False, missing_ok: bool = False) -> None:
        self._write(agent_id, "delete_agent", agent_id, purge=purge, missing_ok=missing_ok)

    def put_checkpoint(self, agent_id: str, seq: int, blob: bytes, created_at: float,
                       chunks: Mapping[bytes, bytes | memoryview] | None = None) -> None:
        self._write(agent_id, "put_checkpoint", agent_id, seq, blob, created_at, chunks=chunks)

    def prune_checkpoints(self, agent_id: str, keep_from: int) -> int:
        return int(self._write(agent_id, "prune_checkpoints", agent_id, keep_from))

    def put_journal(self, agent_id: str, call_seq: int, entry: dict[str, Any]) -> None:
        self._write(agent_id, "put_journal", agent_id, call_seq, entry)

    def reclaim_chunks(self) -> dict[str, int]:
        result: dict[str, int] = self._write(GLOBAL, "reclaim_chunks")
        return result

    def kv_set(self, namespace: str, key: str, value: bytes) -> None:
        self._write(partition_of_kv(namespace, key), "kv_set", namespace, key, value)

    def kv_delete(self, namespace: str, key: str) -> bool:
        return bool(self._write(partition_of_kv(namespace, key), "kv_delete", namespace, key))

    def kv_incr(self, namespace: str, key: str, delta: int = 1) -> int:
        return int(self._write(partition_of_kv(namespace, key), "kv_incr", namespace, key, delta))

    def put_blob(self, bucket: str, key: str, value: bytes) -> None:
        self._write(partition_of_blob(bucket, key), "put_blob", bucket, key, value)

    def delete_blob(self, bucket: str, key: str) -> bool:
        return bool(self._write(partition_of_blob(bucket, key), "delete_blob", bucket, key))


def _encode_value(value: Any, blobs: list[bytes | memoryview]) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        blobs.append(value if isinstance(value, (bytes, memoryview)) else bytes(value))
        return {"b": len(blobs) - 1}
    if isinstance(value, Mapping):
        if all(isinstance(k, (bytes, bytearray)) for k in value):  # chunks by digest
            return {"m": [[_encode_value(k, blobs), _encode_value(v, blobs)] for k, v in value.items()]}
        return {"j": value}  # an agent record or a journal entry: JSON as it is
    raise TypeError(f"a store write cannot carry a {type(value).__name__} argument")


def _decode_value(value: Any, blobs: list[memoryview]) -> Any:
    if not isinstance(value, dict):
        return value
    if "b" in value:
        return bytes(blobs[value["b"]])
    if "m" in value:
        return {_decode_value(k, blobs): _decode_value(v, blobs) for k, v in value["m"]}
    return value["j"]


def encode_ops(ops: list[Op]) -> bytes:
    """The wire form of a transaction's writes (see the module docstring)."""
    blobs: list[bytes | memoryview] = []
    encoded = [[name, [_encode_value(a, blobs) for a in args], {k: _encode_value(v, blobs) for k, v in kw.items()}]
               for name, args, kw in ops]
    header = json.dumps({"v": _VERSION, "ops": encoded, "sizes": [len(memoryview(b)) for b in blobs]},
                        separators=(",", ":"), ensure_ascii=False).encode()
    return b"".join([_LEN.pack(len(header)), header, *(bytes(b) for b in blobs)])


def decode_ops(frame: bytes | memoryview) -> list[Op]:
    """The operations of a frame; StoreCorrupt if it is not one this version wrote."""
    view = memoryview(frame)
    try:
        (n,) = _LEN.unpack_from(view, 0)
        header = json.loads(bytes(view[4:4 + n]))
        if header.get("v") != _VERSION:
            raise ValueError(f"version {header.get('v')!r}")
        blobs: list[memoryview] = []
        at = 4 + n
        for size in header["sizes"]:
            if at + size > len(view):
                raise ValueError("truncated")
            blobs.append(view[at:at + size])
            at += size
        ops: list[Op] = []
        for name, args, kw in header["ops"]:
            if name not in WRITE_METHODS:
                raise ValueError(f"unknown operation {name!r}")
            ops.append((name, tuple(_decode_value(a, blobs) for a in args),
                        {k: _decode_value(v, blobs) for k, v in kw.items()}))
        return ops
    except (ValueError, KeyError, TypeError, IndexError, struct.error) as exc:
        raise StoreCorrupt(f"a logged transaction does not decode: {exc}") from exc


def apply_ops(txn: WriteTxn, ops: list[Op], on_error: Callable[[Op, Exception], None]) -> None:
    """Replay ``ops`` against ``txn``; an operation that raises is reported and skipped.

    It raised nowhere when it was recorded, so an error here means this copy differs from
    the committer's: the caller logs it; the other operations still apply.
    """
    for op in ops:
        name, args, kw = op
        try:
            getattr(txn, name)(*args, **kw)
        except Exception as exc:  # a copy that drifted: report, keep the rest
            on_error(op, exc)
