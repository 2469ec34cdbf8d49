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

__all__ = ["WRITE_METHODS", "RecordingTxn", "apply_ops", "decode_ops", "encode_ops"]

#: The ``WriteTxn`` methods that change the state; only these are recorded and replayed.
WRITE_METHODS = frozenset({
    "put_agent", "mark_unreadable", "delete_agent", "put_checkpoint", "prune_checkpoints",
    "put_journal", "reclaim_chunks", "kv_set", "kv_delete", "kv_incr", "put_blob", "delete_blob",
})
_VERSION = 1
_LEN = struct.Struct(">I")

Op = tuple[str, tuple[Any, ...], dict[str, Any]]


class RecordingTxn:
    """A ``WriteTxn`` that forwards every call to ``inner`` and records the writes that succeed."""

    __slots__ = ("_inner", "ops")

    def __init__(self, inner: WriteTxn) -> None:
        self._inner = inner
        self.ops: list[Op] = []

    def _write(self, name: str, *args: Any, **kwargs: Any) -> Any:
        result = getattr(self._inner, name)(*args, **kwargs)
        self.ops.append((name, args, kwargs))  # only once it succeeded
        return result

    # ------------------------------------------------------------------- reads

    def get_agent(self, agent_id: str) -> dict[str, Any] | None:
        return self._inner.get_agent(agent_id)

    def iter_agents(self) -> Iterator[dict[str, Any]]:
        return self._inner.iter_agents()

    def iter_agent_summaries(self) -> Iterator[AgentSummary]:
        return self._inner.iter_agent_summaries()

    def get_checkpoint(self, agent_id: str, seq: int) -> bytes | None:
        return self._inner.get_checkpoint(agent_id, seq)

    def latest_checkpoint(self, agent_id: str) -> int | None:
        return self._inner.latest_checkpoint(agent_id)

    def list_checkpoints(self, agent_id: str) -> list[CheckpointInfo]:
        return self._inner.list_checkpoints(agent_id)

    def get_journal(self, agent_id: str, call_seq: int) -> dict[str, Any] | None:
        return self._inner.get_journal(agent_id, call_seq)

    def iter_journal(self, agent_id: str) -> Iterator[tuple[int, dict[str, Any]]]:
        return self._inner.iter_journal(agent_id)

    def get_chunk(self, name: bytes) -> bytes | None:
        return self._inner.get_chunk(name)

    def stored_bytes(self) -> dict[str, Any]:
        return self._inner.stored_bytes()

    def kv_get(self, namespace: str, key: str) -> bytes | None:
        return self._inner.kv_get(namespace, key)

    def kv_keys(self, namespace: str, prefix: str = "") -> list[str]:
        return self._inner.kv_keys(namespace, prefix)

    def get_blob(self, bucket: str, key: str) -> bytes | None:
        return self._inner.get_blob(bucket, key)

    def iter_blobs(self, bucket: str, prefix: str = "") -> Iterator[tuple[str, bytes]]:
        return self._inner.iter_blobs(bucket, prefix)

    # ------------------------------------------------------------------ writes

    def put_agent(self, record: dict[str, Any]) -> None:
        self._write("put_agent", record)

    def mark_unreadable(self, agent_id: str, problem: str) -> None:
        self._write("mark_unreadable", agent_id, problem)

    def delete_agent(self, agent_id: str, *, purge: bool = False, missing_ok: bool = False) -> None:
        self._write("delete_agent", agent_id, purge=purge, missing_ok=missing_ok)

    def put_checkpoint(self, agent_id: str, seq: int, blob: bytes, created_at: float,
                       chunks: Mapping[bytes, bytes | memoryview] | None = None) -> None:
        self._write("put_checkpoint", agent_id, seq, blob, created_at, chunks=chunks)

    def prune_checkpoints(self, agent_id: str, keep_from: int) -> int:
        return int(self._write("prune_checkpoints", agent_id, keep_from))

    def put_journal(self, agent_id: str, call_seq: int, entry: dict[str, Any]) -> None:
        self._write("put_journal", agent_id, call_seq, entry)

    def reclaim_chunks(self) -> dict[str, int]:
        result: dict[str, int] = self._write("reclaim_chunks")
        return result

    def kv_set(self, namespace: str, key: str, value: bytes) -> None:
        self._write("kv_set", namespace, key, value)

    def kv_delete(self, namespace: str, key: str) -> bool:
        return bool(self._write("kv_delete", namespace, key))

    def kv_incr(self, namespace: str, key: str, delta: int = 1) -> int:
        return int(self._write("kv_incr", namespace, key, delta))

    def put_blob(self, bucket: str, key: str, value: bytes) -> None:
        self._write("put_blob", bucket, key, value)

    def delete_blob(self, bucket: str, key: str) -> bool:
        return bool(self._write("delete_blob", bucket, key))


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
