"""A write overlay on a store transaction, so a failing tool leaves nothing behind.

Transactional tools (``kv.*``, example ERPs) run inside the transaction that
also records their result. If such a tool raises halfway, whatever it wrote
before raising must not commit with the error answer. The overlay buffers the
tool's writes (reads see them, read-your-writes) and :meth:`apply` replays them
on the real transaction only when the tool succeeded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_MISSING = object()


class WriteOverlay:
    """Buffers kv and blob writes over ``txn``; reads fall through to it."""

    def __init__(self, txn: Any) -> None:
        self._txn = txn
        self._kv: dict[tuple[str, str], bytes | None] = {}
        self._blobs: dict[tuple[str, str], bytes | None] = {}
        self._ops: list[Callable[[Any], Any]] = []

    # -- kv ------------------------------------------------------------------
    def kv_get(self, namespace: str, key: str) -> bytes | None:
        value = self._kv.get((namespace, key), _MISSING)
        if value is _MISSING:
            result: bytes | None = self._txn.kv_get(namespace, key)
            return result
        return value  # type: ignore[return-value]

    def kv_set(self, namespace: str, key: str, value: bytes) -> None:
        self._kv[(namespace, key)] = bytes(value)
        self._ops.append(lambda t: t.kv_set(namespace, key, bytes(value)))

    def kv_delete(self, namespace: str, key: str) -> bool:
        existed = self.kv_get(namespace, key) is not None
        self._kv[(namespace, key)] = None
        self._ops.append(lambda t: t.kv_delete(namespace, key))
        return existed

    def kv_incr(self, namespace: str, key: str, delta: int = 1) -> int:
        raw = self.kv_get(namespace, key)
        value = (int(raw) if raw is not None else 0) + delta
        self.kv_set(namespace, key, str(value).encode())
        return value

    def kv_keys(self, namespace: str, prefix: str = "") -> list[str]:
        keys = set(self._txn.kv_keys(namespace, prefix))
        for (ns, key), value in self._kv.items():
            if ns == namespace and key.startswith(prefix):
                if value is None:
                    keys.discard(key)
                else:
                    keys.add(key)
        return sorted(keys)

    # -- blobs -------------------------------------------------------------------
    def get_blob(self, bucket: str, key: str) -> bytes | None:
        value = self._blobs.get((bucket, key), _MISSING)
        if value is _MISSING:
            result: bytes | None = self._txn.get_blob(bucket, key)
            return result
        return value  # type: ignore[return-value]

    def put_blob(self, bucket: str, key: str, value: bytes) -> None:
        self._blobs[(bucket, key)] = bytes(value)
        self._ops.append(lambda t: t.put_blob(bucket, key, bytes(value)))

    def delete_blob(self, bucket: str, key: str) -> bool:
        existed = self.get_blob(bucket, key) is not None
        self._blobs[(bucket, key)] = None
        self._ops.append(lambda t: t.delete_blob(bucket, key))
        return existed

    def __getattr__(self, name: str) -> Any:
        # Anything else (agent records, checkpoints, the journal) is the host's, not a tool's.
        raise AttributeError(f"transactional tools may use kv_* and *_blob only, not {name}")

    def apply(self) -> None:
        """Replay the buffered writes, in order, on the real transaction."""
        for op in self._ops:
            op(self._txn)
        self._ops.clear()
