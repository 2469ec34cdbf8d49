"""Typed errors of the snapshot codec and of the agent store.

Why a hierarchy of its own: the host has to tell apart "this checkpoint can never be
restored" (corrupt, foreign, too new) from "the disk or the store directory is in
trouble" (retry elsewhere, page an operator) without parsing messages. Every message
says what was found and what the reader can do about it.
"""

from __future__ import annotations

import errno

__all__ = [
    "FULL_ERRNOS",
    "CheckpointExists",
    "NotFound",
    "RecordCorrupt",
    "SnapshotCorrupt",
    "SnapshotError",
    "SnapshotMismatch",
    "SnapshotVersionError",
    "StoreConfigError",
    "StoreCorrupt",
    "StoreError",
    "StoreFlushError",
    "StoreFull",
    "StoreSuspect",
    "StoreUnavailable",
]


#: The errors of a write that say the disk refused more data: out of space, out of quota,
#: or past the largest file this process may write (RLIMIT_FSIZE, SIGXFSZ ignored).
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class SnapshotError(Exception):
    """Base of every error raised while encoding, decoding or applying a snapshot.

    ``code`` is the host's machine-readable name for it, as for :class:`StoreError`."""

    code = "snapshot_corrupt"


class SnapshotCorrupt(SnapshotError):
    """The bytes are not an intact snapshot record (truncated, bit-flipped, bad magic).

    Raised instead of ever returning a half-decoded Snapshot: a restore from damaged
    bytes would resume the agent in a state it never was in.
    """


class SnapshotMismatch(SnapshotError):
    """An intact snapshot that belongs to another module, ABI version or memory.

    The message names the expected and the found value, so that the operator can tell
    whether the agent's module was upgraded under it (restore with the old module) or the
    checkpoint was handed to the wrong agent.
    """


class SnapshotVersionError(SnapshotError):
    """An intact record written in a snapshot format this code does not know.

    Usually a newer Torpor wrote it; the message lists the versions this one reads.
    """


class StoreError(Exception):
    """Base of every error raised by an agent store.

    ``code`` is the host's machine-readable name for it (the CLI prints ``error[code]``),
    so that every layer that reports an error, not only the CLI, names it the same way.
    """

    code = "store_error"


class StoreUnavailable(StoreError):
    """The store cannot be opened or written at all (missing, read-only, no permission)."""

    code = "store_unavailable"


class StoreFull(StoreError):
    """The disk under the store refused more data.

    The LMDB map grows by itself, so this is raised only when the filesystem itself is
    out of space (or the map cannot grow past free disk space). The transaction that
    hit it was aborted whole: nothing of it is on disk.
    """

    code = "store_full"


class StoreCorrupt(StoreUnavailable):
    """The store's files are not what LMDB wrote: refused at open, before a page is read.

    Raised, for one, when ``data.mdb`` is shorter than its own meta page says (a copy
    cut off, a disk that lost the file's tail): LMDB would map the missing pages and
    the first read of one would kill the process with SIGBUS. Restore the store from
    a copy; ``torpor store check`` reports the same finding.
    """

    code = "store_corrupt"


class RecordCorrupt(StoreError):
    """One stored value does not match the digest written with it, or does not decode.

    Raised when the value is read, never returned as data: a journal answer, an input,
    a bundle or a kv value changed on disk would otherwise reach an agent as if it were
    what was recorded. ``database`` and ``key`` name the record (readable); the message
    says which one ("journal entry 3 of agent X does not match its digest"). The runtime
    parks the agent that needed it as ``corrupt``; a tool reading a kv value gets a
    typed error. Not a StoreUnavailable: the store works, one record does not.
    """

    code = "record_corrupt"

    def __init__(self, message: str, *, database: str = "", key: str = "") -> None:
        super().__init__(message)
        self.database = database
        self.key = key


class StoreConfigError(StoreError, ValueError):
    """A store option has a value the store does not accept (the message lists the valid ones).

    A ``ValueError`` too, like the other argument checks of the store; ``code`` is the
    host's code for bad configuration, so the CLI reports it as ``error[invalid_config]``.
    """

    code = "invalid_config"


class StoreFlushError(StoreUnavailable):
    """A flush of a ``durability="process"`` store to stable storage failed (EIO, disk full).

    Commits made since the last successful flush are in the kernel's page cache but may
    never reach the disk: after a failed ``fdatasync`` Linux may already have dropped
    the pages' dirty state, so a retry that succeeds proves nothing (PostgreSQL's
    "fsyncgate", 2018). The store therefore refuses every later write from this
    process; reads still work. Check the disk, then reopen the store.
    """

    code = "store_flush_failed"


class StoreSuspect(StoreUnavailable):
    """A writer had the store open when the machine restarted.

    Its marker (``snapshots.unflushed``) names an earlier boot: the machine went down
    (a power loss, a kernel crash, or a reboot after the host died without closing the
    store) while commits of it may have been only in the page cache (``process``), or
    while a commit was being synced (``sync``: its newest tree may be torn), so the store
    may have lost them or be corrupt, and nothing in LMDB's files would say so. The store
    is refused until checked: ``torpor store check`` reads every record (and rolls a torn
    last commit back to the previous one), and its ``--accept`` clears the marker once
    the check passes (or restore from a copy).
    """

    code = "store_suspect"


class NotFound(StoreError):
    """A record that the caller required to exist does not."""


class CheckpointExists(StoreError):
    """A checkpoint with this (agent, seq) is already stored; checkpoints are immutable."""
