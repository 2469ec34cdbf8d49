"""Torpor snapshots: linear-memory deltas, the checkpoint format, and the agent store.

This package stores and encodes, nothing more: it depends on lmdb and zstandard only
(never on wasmtime, anyio, host/ or policies/), so that the snapshot format and the
store can be read by tools and other hosts without a Wasm runtime. Its hot loops are C
(``delta_kernels.c``), compiled on first use by the ``ziglang`` wheel when present
(``native_build``); every one has a pure-Python path with the same results.
"""

from typing import TYPE_CHECKING, Any

# The errors and the store interface load with the package; the codec (zstandard, the
# native kernels), the LMDB store and the committer load on first use, so that a reader
# of one module (``snapshots.lmdb_store`` for ``torpor ps``) pays for that one only.
from .errors import (
    CheckpointExists,
    NotFound,
    RecordCorrupt,
    SnapshotCorrupt,
    SnapshotError,
    SnapshotMismatch,
    SnapshotVersionError,
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
    REGISTRY_BUCKET,
    TIMERS_BUCKET,
    AgentStore,
    CheckpointInfo,
    Outcome,
    ReadTxn,
    WriteTxn,
)

if TYPE_CHECKING:
    from .delta import (
        DEFAULT_CHUNK_SIZE,
        MemoryAt,
        MemoryDelta,
        PristineImage,
        apply_delta,
        diff_memory,
        full_copy,
    )
    from .format import (
        FORMAT_VERSION,
        SUPPORTED_VERSIONS,
        GlobalValue,
        Snapshot,
        SnapshotHeader,
        decode_snapshot,
        encode_snapshot,
        peek_snapshot,
    )
    from .group_commit import GroupCommitter
    from .lmdb_store import DURABILITY_LEVELS, Durability, LmdbStore

_LAZY = {
    "DEFAULT_CHUNK_SIZE": "delta",
    "MemoryAt": "delta",
    "MemoryDelta": "delta",
    "PristineImage": "delta",
    "apply_delta": "delta",
    "diff_memory": "delta",
    "full_copy": "delta",
    "FORMAT_VERSION": "format",
    "SUPPORTED_VERSIONS": "format",
    "GlobalValue": "format",
    "Snapshot": "format",
    "SnapshotHeader": "format",
    "decode_snapshot": "format",
    "encode_snapshot": "format",
    "peek_snapshot": "format",
    "GroupCommitter": "group_commit",
    "DURABILITY_LEVELS": "lmdb_store",
    "Durability": "lmdb_store",
    "LmdbStore": "lmdb_store",
}

__all__ = [
    "BLOB_BUCKETS",
    "DEFAULT_CHUNK_SIZE",
    "DURABILITY_LEVELS",
    "FORMAT_VERSION",
    "INPUTS_BUCKET",
    "REGISTRY_BUCKET",
    "SUPPORTED_VERSIONS",
    "TIMERS_BUCKET",
    "AgentStore",
    "CheckpointExists",
    "CheckpointInfo",
    "Durability",
    "GlobalValue",
    "GroupCommitter",
    "LmdbStore",
    "MemoryAt",
    "MemoryDelta",
    "NotFound",
    "Outcome",
    "PristineImage",
    "ReadTxn",
    "RecordCorrupt",
    "Snapshot",
    "SnapshotCorrupt",
    "SnapshotError",
    "SnapshotHeader",
    "SnapshotMismatch",
    "SnapshotVersionError",
    "StoreConfigError",
    "StoreCorrupt",
    "StoreError",
    "StoreFlushError",
    "StoreFull",
    "StoreSuspect",
    "StoreUnavailable",
    "WriteTxn",
    "apply_delta",
    "decode_snapshot",
    "diff_memory",
    "encode_snapshot",
    "full_copy",
    "peek_snapshot",
]


def __getattr__(name: str) -> Any:
    """Load the module that defines ``name`` the first time it is used."""
    where = _LAZY.get(name)
    if where == "delta":
        from . import delta as module
    elif where == "format":
        from . import format as module  # type: ignore[no-redef]
    elif where == "group_commit":
        from . import group_commit as module  # type: ignore[no-redef]
    elif where == "lmdb_store":
        from . import lmdb_store as module  # type: ignore[no-redef]
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(module, name)
    globals()[name] = value  # once: later lookups do not come back here
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
