"""LMDB's two meta pages, read from a closed store, and the rollback to the older one.

Why: at ``durability="sync"`` a commit is one ``fdatasync`` of the data file, pages and
meta page together (``snapshots.lmdb_store``), so a power loss during that sync may leave
the new meta page on disk pointing at pages that never made it, and LMDB trusts the newer
meta page: the whole store reads as corrupt. The older meta page's tree is intact (a write
transaction begins only once every commit but the last is synced, and LMDB reuses only
pages freed two commits back), and the newer commit was never acknowledged, so making
the older meta page current loses nothing anyone was told of. LMDB does this itself at
open with ``MDB_PREVSNAPSHOT``, but py-lmdb (3.0, LMDB 0.9.36) does not expose that flag,
so this module does it on the file of a *closed* environment.

The layout (LMDB 0.9, 64-bit, native byte order; ``mdb.c``): pages 0 and 1 of
``data.mdb`` are meta pages. Each starts with the page header (``mp_pgno`` u64, ``mp_pad``
u16, ``mp_flags`` u16 with ``P_META`` 0x08, ``lower``/``upper`` u16: 16 bytes), then
``MDB_meta``: ``mm_magic`` u32 0xBEEFC0DE, ``mm_version`` u32 (1), ``mm_address`` (a
pointer), ``mm_mapsize`` u64, two ``MDB_db`` of 48 bytes (the free list's, whose ``md_pad``
is the page size; then the main database's: ``md_pad`` u32, ``md_flags`` u16,
``md_depth`` u16, branch, leaf and overflow page counts, ``md_entries``, ``md_root``, u64
each), ``mm_last_pg`` u64, ``mm_txnid`` u64. LMDB reads the one with the higher
``mm_txnid`` (``mdb_env_pick_meta``); a commit of txn N writes page N & 1.

The rollback copies the older page over the newer, with the page number in its header
set to the newer page's own (``write_meta``), and fsyncs: both pages then name the older
commit, LMDB opens it, and its next commit (that txn again) overwrites the copy, leaving
the original older page as the previous snapshot. The replaced page is returned
(``Rollback.replaced``) so that a caller whose check of the older tree fails can put it
back (``undo``) and change nothing. Only for a closed store: the caller must hold LMDB's
lock file exclusively (``exclusive``), or another process could be reading the pages.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import StoreCorrupt, StoreError, StoreUnavailable

__all__ = [
    "MAGIC",
    "Meta",
    "Rollback",
    "exclusive",
    "newer_older",
    "read_metas",
    "roll_back",
    "undo",
    "verify_structure",
    "write_meta",
]

#: ``MDB_MAGIC``: the first field of every meta page's MDB_meta.
MAGIC = 0xBEEFC0DE
#: ``MDB_DATA_VERSION`` of LMDB 0.9 (a 1.0 file differs and is refused).
DATA_VERSION = 1
P_META = 0x08
_PAGEHDR = struct.Struct("<QHHHH")  # mp_pgno, mp_pad, mp_flags, lower, upper: PAGEHDRSZ 16
_DB = struct.Struct("<IHHQQQQQ")  # md_pad, md_flags, md_depth, branch, leaf, overflow, entries, root
_META_HEAD = struct.Struct("<IIQQ")  # mm_magic, mm_version, mm_address, mm_mapsize
_META_TAIL = struct.Struct("<QQ")  # mm_last_pg, mm_txnid
_META_AT = _PAGEHDR.size
_META_SIZE = _META_HEAD.size + 2 * _DB.size + _META_TAIL.size  # 136 bytes
_MIN_PSIZE = 512


@dataclass(frozen=True, slots=True)
class Meta:
    """One meta page as stored: where it is, the commit it names, and its raw bytes."""

    index: int  # 0 or 1: its place in the file
    pgno: int  # the page number its header states (LMDB writes its own index)
    psize: int
    mapsize: int
    last_pg: int
    txnid: int
    main_root: int
    main_entries: int
    free_root: int  # the root page of LMDB's free list (P_INVALID when empty)
    raw: bytes  # the whole page, psize bytes

    def to_dict(self) -> dict[str, int]:
        return {"index": self.index, "txnid": self.txnid, "last_pg": self.last_pg, "main_root": self.main_root,
                "main_entries": self.main_entries, "psize": self.psize}


@dataclass(frozen=True, slots=True)
class Rollback:
    """What ``roll_back`` did: the commit dropped, the one now current, and the page it replaced."""

    path: Path
    dropped_txn: int
    current_txn: int
    replaced: Meta  # the newer meta page as it was, for ``undo``


def _parse(page: bytes, index: int, where: Path) -> Meta:
    if len(page) < _META_AT + _META_SIZE:
        raise StoreCorrupt(f"{where}: meta page {index} is cut short ({len(page)} bytes); restore the store from a copy")
    pgno, _pad, flags, _lower, _upper = _PAGEHDR.unpack_from(page, 0)
    magic, version, _address, mapsize = _META_HEAD.unpack_from(page, _META_AT)
    free = _DB.unpack_from(page, _META_AT + _META_HEAD.size)
    main = _DB.unpack_from(page, _META_AT + _META_HEAD.size + _DB.size)
    last_pg, txnid = _META_TAIL.unpack_from(page, _META_AT + _META_HEAD.size + 2 * _DB.size)
    if not flags & P_META or magic != MAGIC:
        raise StoreCorrupt(f"{where}: page {index} is not an LMDB meta page (flags {flags:#x}, magic {magic:#x}); "
                           "restore the store from a copy")
    if version != DATA_VERSION:
        raise StoreCorrupt(f"{where}: meta page {index} is LMDB data version {version}, not {DATA_VERSION}")
    psize = free[0]
    return Meta(index, pgno, psize, mapsize, last_pg, txnid, main[7], main[6], free[7], bytes(page))


def read_metas(data_file: Path) -> tuple[Meta, Meta]:
    """Both meta pages of ``data_file`` (a closed store's ``data.mdb``), page 0 first.

    Raises StoreCorrupt when either is not a meta page of LMDB 0.9 (or the page sizes they
    state disagree or are implausible), StoreUnavailable when the file cannot be read.
    """
    try:
        with open(data_file, "rb") as f:
            head = f.read(_META_AT + _META_SIZE)
            first = _parse(head, 0, data_file)
            psize = first.psize
            if psize < _MIN_PSIZE or psize & (psize - 1) or psize > 1 << 16:
                raise StoreCorrupt(f"{data_file}: meta page 0 states an implausible page size {psize}")
            f.seek(0)
            pages = f.read(2 * psize)
    except OSError as exc:
        raise StoreUnavailable(f"cannot read the meta pages of {data_file}: {exc.strerror or exc}") from exc
    if len(pages) < 2 * psize:
        raise StoreCorrupt(f"{data_file}: the file ends inside its meta pages ({len(pages)} bytes)")
    m0, m1 = _parse(pages[:psize], 0, data_file), _parse(pages[psize:], 1, data_file)
    if m1.psize != psize:
        raise StoreCorrupt(f"{data_file}: the meta pages disagree on the page size ({psize} and {m1.psize})")
    return m0, m1


def newer_older(metas: tuple[Meta, Meta]) -> tuple[Meta, Meta]:
    """(the meta page LMDB opens, the previous snapshot), as ``mdb_env_pick_meta`` picks."""
    m0, m1 = metas
    return (m1, m0) if m0.txnid < m1.txnid else (m0, m1)


def write_meta(data_file: Path, meta: Meta, index: int) -> None:
    """Write ``meta``'s page at page ``index`` of ``data_file`` (its header's page number
    set to ``index``), then fsync the file. Raises StoreUnavailable on an I/O error."""
    page = bytearray(meta.raw)
    struct.pack_into("<Q", page, 0, index)
    try:
        fd = os.open(data_file, os.O_WRONLY)
        try:
            view = memoryview(bytes(page))
            off = index * meta.psize
            while view:
                n = os.pwrite(fd, view, off)
                view, off = view[n:], off + n
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise StoreUnavailable(f"cannot write meta page {index} of {data_file}: {exc.strerror or exc}") from exc


@contextlib.contextmanager
def exclusive(store_dir: Path) -> Iterator[None]:
    """Hold LMDB's lock file of ``store_dir`` as its first opener would, or raise StoreError.

    LMDB 0.9 takes a write lock (``fcntl``) on byte 0 of ``lock.mdb`` to know it is alone,
    and every process with the environment open holds a read lock there: so the lock is
    ours only while no process has the store open. Released on exit (before the store is
    opened again: this process's own open would wait on it).
    """
    lock = store_dir / "lock.mdb"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StoreUnavailable(f"cannot open {lock}: {exc.strerror or exc}") from exc
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
        except OSError as exc:
            raise StoreError(f"store {store_dir} is open in another process; close it first") from exc
        try:
            yield
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN, 1, 0)
    finally:
        os.close(fd)


def roll_back(store_dir: Path) -> Rollback:
    """Make the older meta page of the closed store in ``store_dir`` current.

    Copies it over the newer one and fsyncs (see the module docstring). Refuses, changing
    nothing, when the store is open in another process (StoreError), when both pages
    already name the same commit (StoreError: there is no earlier snapshot to go to), or
    when the older page needs more pages than the file holds (StoreCorrupt).
    """
    data_file = store_dir / "data.mdb"
    with exclusive(store_dir):
        newer, older = newer_older(read_metas(data_file))
        if newer.txnid == older.txnid:
            raise StoreError(f"store {store_dir}: both meta pages name commit {newer.txnid}; there is no earlier "
                             "snapshot to roll back to (it was rolled back already)")
        try:
            size = data_file.stat().st_size
        except OSError as exc:
            raise StoreUnavailable(f"cannot read the size of {data_file}: {exc.strerror or exc}") from exc
        if (older.last_pg + 1) * older.psize > size:
            raise StoreCorrupt(f"store {store_dir}: the previous snapshot (txn {older.txnid}) needs "
                               f"{older.last_pg + 1} pages, the file holds {size // older.psize}")
        write_meta(data_file, older, newer.index)
    return Rollback(store_dir, newer.txnid, older.txnid, newer)


def undo(rollback: Rollback) -> None:
    """Put back the meta page ``roll_back`` replaced: the store is as it was before it."""
    with exclusive(rollback.path):
        write_meta(rollback.path / "data.mdb", rollback.replaced, rollback.replaced.index)


def verify_structure(store_dir: Path) -> list[str] | None:
    """Problems py-lmdb's offline verifier (``lmdb.verify``, py-lmdb 3.0 and later) finds in
    the tree the newest meta page names, or None where that verifier is not installed.

    Why beside reading every record: a torn commit may have lost pages that no record
    read touches, the free list's above all, and LMDB reads those only at the next write
    (which then fails with MDB_CORRUPTED on every commit). Only for a store no process
    writes (a suspect one): the verifier reads the file, not a transaction. The two
    findings a rollback leaves until the next commit (both pages naming one txn, so one
    of them has the other's parity) are not problems and are left out.
    """
    try:
        from lmdb import verify  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        return None
    try:
        found = [str(f) for f in verify.verify(str(store_dir))]  # type: ignore[no-untyped-call,unused-ignore]
    except verify.VerifyError as exc:
        return [f"LMDB's structure cannot be verified: {exc}"]
    except OSError as exc:
        raise StoreUnavailable(f"cannot read {store_dir / 'data.mdb'}: {exc.strerror or exc}") from exc
    m0, m1 = read_metas(store_dir / "data.mdb")
    if m0.txnid == m1.txnid:
        found = [f for f in found if "parity violation" not in f and "share nonzero txnid" not in f]
    return found
