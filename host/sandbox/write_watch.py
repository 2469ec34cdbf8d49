"""Which pages of a linear memory were written since a point: Linux's userfaultfd
write-protection in asynchronous mode, read back with the ``PAGEMAP_SCAN`` ioctl.

Why: in the ``dense`` layout a linear memory is plain anonymous memory (the memory
pool's, or Wasmtime's) into which instantiation copies the module's data image, so every
page of the image is present and written as far as the page tables can tell. A capture
then had to compare all of them with the image: for a Python agent (a 14 MiB memory,
~2,100 image pages) about 1 ms per suspension, to find the ~100 pages that differ.

How: a process-wide userfaultfd (``UFFD_USER_MODE_ONLY``, so no privilege is needed)
with ``UFFD_FEATURE_WP_ASYNC``: a memory is registered for write-protection and all of
its pages protected right after instantiation (:func:`track`); the kernel resolves the
first write to a protected page by itself (no fault handler thread, no signal), clearing
the page's protection. ``PAGEMAP_SCAN`` with ``PM_SCAN_WP_MATCHING`` then returns the
pages written since and protects them again in the same step (:func:`written_pages`), for
this memory's range only: other agents' memories in the process are untouched. Anything
the kernel cannot tell is reported as written (a page never protected, a range the scan
did not reach), so the caller compares more, never less.

The caller (``Execution.capture``) compares the written pages plus the pages that
differed from the image at the previous capture; every other page equalled the image
then and was not written since. Only memories of at least :data:`MIN_BYTES` are tracked:
registering splits the memory's mapping from its neighbours (the pool carves small
memories from shared arenas, where dense's one-mapping-for-many matters more than a
scan of a few hundred KiB). Without userfaultfd (seccomp, an old kernel, not Linux)
every capture compares as before.

On unless ``TORPOR_WRITE_WATCH=0`` (session 10). Session 9 measured it off: a Python
agent's capture fell from ~1,030 to ~270 µs, but registering and protecting 14 MiB
(~110 µs), lifting the protection at release (~75 µs), a write fault per page the agent
writes (~120 µs an await) and a slower instantiation into the registered mapping (+~490 µs:
the kernel no longer backs it with huge pages, by the look of it) ate the gain, because
each instance captured once. Since instances are recycled from one agent to the next
(host/sandbox/recycle.py), the registration outlives the agent and a reset protects the
pages again: no instantiation, no registration per agent. Python agents on ``dense``, same
loaded run: suspend 1,146 → 510 µs, round trips 657 → 1,031/s, for spawn 237 → 356 µs and
resume 376 → 461 µs (the write faults): bench/RESULTS.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import threading
from typing import Any

__all__ = ["ENV_ENABLED", "MIN_BYTES", "PAGE", "Tracked", "available", "enabled_by_env", "track", "untrack", "written_pages"]

ENV_ENABLED = "TORPOR_WRITE_WATCH"
#: Smallest memory tracked (the memory pool maps buffers above 8 MiB on their own).
MIN_BYTES = 8 << 20

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_PAGE = PAGE
_SYS_USERFAULTFD = {"x86_64": 323, "aarch64": 282}.get(platform.machine())
_UFFD_USER_MODE_ONLY = 1
_UFFD_API = 0xAA
_UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
_UFFD_FEATURE_WP_ASYNC = 1 << 15
_UFFDIO_REGISTER_MODE_WP = 1 << 1
_UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0
_PM_SCAN_WP_MATCHING = 1 << 0
_PM_SCAN_CHECK_WPASYNC = 1 << 1
_PAGE_IS_WRITTEN = 1 << 1
_MAX_REGIONS = 1024


def _iowr(kind: int, nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (kind << 8) | nr


class _Api(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _Register(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("ioctls", ctypes.c_uint64)]


class _WriteProtect(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64), ("mode", ctypes.c_uint64)]


class _ScanArg(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages", "category_inverted",
        "category_mask", "category_anyof_mask", "return_mask")]


class _Region(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64), ("categories", ctypes.c_uint64)]


_UFFDIO_API = _iowr(0xAA, 0x3F, ctypes.sizeof(_Api))
_UFFDIO_REGISTER = _iowr(0xAA, 0x00, ctypes.sizeof(_Register))
_UFFDIO_WRITEPROTECT = _iowr(0xAA, 0x06, ctypes.sizeof(_WriteProtect))
_PAGEMAP_SCAN = _iowr(ord("f"), 16, ctypes.sizeof(_ScanArg))

_lock = threading.Lock()
_state: dict[str, Any] = {}  # "uffd": fd or -1, "libc"; reset in a forked child
_scratch = threading.local()


def _forget() -> None:
    """A forked child's userfaultfd belongs to its parent's memory: open another when asked."""
    fd = _state.get("uffd", -1)
    _state.clear()
    if isinstance(fd, int) and fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget)


def enabled_by_env() -> bool:
    """Whether write tracking is on: unless ``$TORPOR_WRITE_WATCH`` is 0/off/false/no."""
    return os.environ.get(ENV_ENABLED, "1").strip().lower() not in {"0", "off", "false", "no"}


def _open() -> int:
    """The process's userfaultfd with asynchronous write-protection, or -1."""
    if _SYS_USERFAULTFD is None or not enabled_by_env():
        return -1
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        libc.ioctl.restype = ctypes.c_int
    except OSError:
        return -1
    fd = int(libc.syscall(_SYS_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK | _UFFD_USER_MODE_ONLY))
    if fd < 0:
        return -1
    want = _UFFD_FEATURE_WP_ASYNC | _UFFD_FEATURE_WP_UNPOPULATED
    api = _Api(_UFFD_API, want, 0)
    if libc.ioctl(fd, ctypes.c_ulong(_UFFDIO_API), ctypes.byref(api)) != 0 or api.features & want != want:
        os.close(fd)
        return -1
    _state["libc"] = libc
    return fd


def _uffd() -> int:
    fd = _state.get("uffd")
    if fd is None:
        with _lock:
            fd = _state.get("uffd")
            if fd is None:
                fd = _state["uffd"] = _open()
    return int(fd)


def available() -> bool:
    """Whether write tracking works in this process (and a pagemap to read it back)."""
    from snapshots.delta import _pagemap

    return _uffd() >= 0 and _pagemap() is not None


class Tracked:
    """One memory's tracking: its range when protected, and the pages that differed from
    the image at the last capture (the caller's; empty right after instantiation)."""

    __slots__ = ("base", "differed", "size")

    def __init__(self, base: int, size: int) -> None:
        self.base = base
        self.size = size
        self.differed: tuple[int, ...] = ()


def track(base: int, size: int) -> Tracked | None:
    """Register ``[base, base + size)`` (a linear memory, page-aligned) for write-protection
    and protect every page of it now, or None when it is not tracked (too small, not
    aligned, or no userfaultfd here): the caller then compares as without tracking."""
    if size < MIN_BYTES or base % _PAGE or size % _PAGE:
        return None
    fd = _uffd()
    if fd < 0:
        return None
    libc = _state["libc"]
    reg = _Register(base, size, _UFFDIO_REGISTER_MODE_WP, 0)
    if libc.ioctl(fd, ctypes.c_ulong(_UFFDIO_REGISTER), ctypes.byref(reg)) != 0:
        return None
    wp = _WriteProtect(base, size, _UFFDIO_WRITEPROTECT_MODE_WP)
    if libc.ioctl(fd, ctypes.c_ulong(_UFFDIO_WRITEPROTECT), ctypes.byref(wp)) != 0:
        return None
    return Tracked(base, size)


def untrack(t: Tracked) -> None:
    """Lift the protection from ``t``'s range (the instance is dropped): whoever gets the
    memory next (the pool scrubbing it, an instantiation copying an image in) must not
    take a write fault on every page."""
    fd = _state.get("uffd", -1)
    libc = _state.get("libc")
    if not isinstance(fd, int) or fd < 0 or libc is None:
        return
    wp = _WriteProtect(t.base, t.size, 0)
    libc.ioctl(fd, ctypes.c_ulong(_UFFDIO_WRITEPROTECT), ctypes.byref(wp))


def written_pages(t: Tracked) -> list[int] | None:
    """Indices (from ``t.base``) of the pages of ``t``'s range written since it was last
    protected, protecting them again; None when the kernel cannot say (then compare all)."""
    from snapshots.delta import _pagemap

    pm = _pagemap()
    libc = _state.get("libc")
    if pm is None or libc is None:
        return None
    regions = getattr(_scratch, "regions", None)
    if regions is None:
        regions = _scratch.regions = (_Region * _MAX_REGIONS)()
    out: list[int] = []
    start, end = t.base, t.base + t.size
    while start < end:
        arg = _ScanArg(ctypes.sizeof(_ScanArg), _PM_SCAN_WP_MATCHING | _PM_SCAN_CHECK_WPASYNC, start, end, 0,
                       ctypes.addressof(regions), _MAX_REGIONS, 0, 0, _PAGE_IS_WRITTEN, 0, _PAGE_IS_WRITTEN)
        n = libc.ioctl(pm, ctypes.c_ulong(_PAGEMAP_SCAN), ctypes.byref(arg))
        if n < 0 or arg.walk_end <= start:
            return None
        for r in regions[:n]:
            out.extend(range((r.start - t.base) // _PAGE, (r.end - t.base + _PAGE - 1) // _PAGE))
        start = arg.walk_end  # the vector filled up: the rest of the range in the next round
    return out
