"""Torpor snapshots: linear-memory deltas, the checkpoint format, and the agent store.

This package stores and encodes, nothing more: it depends on lmdb and zstandard only
(never on wasmtime, anyio, host/ or policies/), so that the snapshot format and the
store can be read by tools and other hosts without a Wasm runtime. Its hot loops are C
(``delta_kernels.c``), compiled on first use by the ``ziglang`` wheel when present
(``native_build``); every one has a pure-Python path with the same results.
"""

from .delta import (
    DEFAULT_CHUNK_SIZE,
    MemoryAt,
    MemoryDelta,
    PristineImage,
    apply_delta,
    diff_memory,
    full_copy,
)
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
from .store import (
    BLOB_BUCKETS,
    INPUTS_BUCKET,
    AgentStore,
    CheckpointInfo,
    Outcome,
    ReadTxn,
    WriteTxn,
)

__all__ = [
    "BLOB_BUCKETS",
    "DEFAULT_CHUNK_SIZE",
    "DURABILITY_LEVELS",
    "FORMAT_VERSION",
    "INPUTS_BUCKET",
    "SUPPORTED_VERSIONS",
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
