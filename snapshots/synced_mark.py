"""The newest LMDB transaction known to be on stable storage, shared by every process
that writes one store at ``sync``.

Why: a write transaction may begin only once the commit two before it is synced (LMDB
reuses pages freed two commits back, so writing over an unsynced predecessor could tear
the tree the disk's meta page names; ``snapshots.lmdb_store``). Each process knows what
its own syncs covered, but not another's: without a shared record, a transaction after
another process's commit would sync again, under LMDB's writer lock, although that
process's background syncer had just done so (two hosts on a store made more than half
their syncs that way). So each process, after a successful sync, writes here the newest
transaction id that sync covered, and reads it before syncing on its own account.

The record is a 16-byte file beside ``data.mdb``: the data file's inode and the id, in
a shared memory map, read and written under ``flock`` (so no reader sees half a write). It
may only ever say less than the truth, never more: it is written after the ``fdatasync``
returns and only ever raised; and an id recorded for another data file (the store restored
from a copy, a new inode) is not believed.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
from pathlib import Path

__all__ = ["SyncedMark"]

_FORMAT = struct.Struct("<QQ")  # the data file's inode, the newest synced transaction id
FILE_NAME = "synced.mark"


class SyncedMark:
    """The shared record of one store directory; :meth:`open` returns None where it cannot
    be kept (a read-only directory, a file of the wrong size), and then each process
    relies on its own syncs alone."""

    def __init__(self, fd: int, mm: mmap.mmap, inode: int) -> None:
        self._fd = fd
        self._mm = mm
        self._inode = inode

    @classmethod
    def open(cls, directory: Path) -> SyncedMark | None:
        try:
            inode = os.stat(directory / "data.mdb").st_ino
            fd = os.open(directory / FILE_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # two processes creating it at once: one sizes it
            size = os.fstat(fd).st_size
            if size == 0:
                os.ftruncate(fd, _FORMAT.size)
            elif size != _FORMAT.size:
                raise ValueError(f"{FILE_NAME} is {size} bytes")
            fcntl.flock(fd, fcntl.LOCK_UN)
            return cls(fd, mmap.mmap(fd, _FORMAT.size), inode)
        except (OSError, ValueError):
            os.close(fd)
            return None

    def read(self) -> int:
        """The newest transaction id some process synced, or 0 (none recorded for this data file)."""
        fcntl.flock(self._fd, fcntl.LOCK_SH)
        try:
            inode, txnid = _FORMAT.unpack_from(self._mm)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        return int(txnid) if inode == self._inode else 0

    def covered(self, txnid: int) -> None:
        """Record that a sync which has returned covered every transaction up to ``txnid``."""
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            inode, known = _FORMAT.unpack_from(self._mm)
            if inode != self._inode or txnid > known:
                _FORMAT.pack_into(self._mm, 0, self._inode, txnid)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        self._mm.close()
        os.close(self._fd)
