"""A deterministic subset of WASI preview 1, for guests built with a WASI libc.

Torpor links no WASI unless the policy grants named functions (``[wasi]
allow``), and what it links touches nothing outside the agent: there are no
files, no environment, no arguments, and stdout/stderr go to the agent's log.
The clock and the random source are *deterministic* — both derive from the
fuel the agent has consumed — so replay reproduces a run exactly; real time
comes from the ``clock.now`` tool, which is journaled. A granted function this
host does not provide answers ``ENOSYS``.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from typing import Any

import wasmtime

from host.errors import ModuleError
from host.sandbox.execution import ABORT_EXIT, GuestAbort, ImportFault, current, define_import

MODULE = "wasi_snapshot_preview1"

ESUCCESS, EBADF, EFAULT, EINVAL, ENOSYS, ESPIPE = 0, 8, 21, 28, 52, 70
MAX_IOV = 1024
MAX_WRITE = 64 << 10


def _consumed_fuel() -> int:
    ex = current()
    return ex.limits.fuel - int(ex._store.get_fuel())


def _put(ptr: int, data: bytes) -> int:
    try:
        current().write(ptr, len(data), data)
    except ImportFault:
        return EFAULT
    return ESUCCESS


def _zero_pair(a: int, b: int) -> int:
    return _put(a, b"\0\0\0\0") or _put(b, b"\0\0\0\0")


def _iovecs(iovs: int, count: int) -> list[tuple[int, int]]:
    if not 0 <= count <= MAX_IOV:
        raise ImportFault(EINVAL, "too many iovecs")
    raw = current().read(iovs, 8 * count, 8 * MAX_IOV)
    return [struct.unpack_from("<II", raw, 8 * i) for i in range(count)]


def fd_write(fd: int, iovs: int, count: int, nwritten: int) -> int:
    if fd not in (1, 2):
        return EBADF
    ex = current()
    # At most MAX_WRITE bytes per call in all (a short write, as POSIX allows): iovecs
    # may all point at the same page, and gathering each would turn one small memory
    # into gigabytes of host buffers.
    chunks: list[bytes] = []
    room = MAX_WRITE
    try:
        for p, n in _iovecs(iovs, count):
            if room <= 0:
                break
            chunk = ex.read(p, min(n, room), MAX_WRITE)
            chunks.append(chunk)
            room -= len(chunk)
    except ImportFault as f:
        return EFAULT if f.errno < 0 else f.errno
    data = b"".join(chunks)
    if ex.log_sink is not None and data.strip():
        ex.log_sink(1 if fd == 1 else 2, data.decode("utf-8", "replace").rstrip("\n"))
    return _put(nwritten, struct.pack("<I", len(data)))


def fd_read(fd: int, iovs: int, count: int, nread: int) -> int:
    return _put(nread, b"\0\0\0\0") if fd == 0 else EBADF  # stdin is empty


def fd_close(fd: int) -> int:
    return ESUCCESS if fd in (0, 1, 2) else EBADF


def fd_fdstat_get(fd: int, ptr: int) -> int:
    if fd not in (0, 1, 2):
        return EBADF
    return _put(ptr, bytes([2]) + bytes(23))  # a character device, no flags, no rights


def fd_seek(fd: int, offset: int, whence: int, newoffset: int) -> int:
    return ESPIPE if fd in (0, 1, 2) else EBADF


def fd_prestat_get(fd: int, ptr: int) -> int:
    return EBADF  # no preopened directories: how a libc learns there are none


def fd_prestat_dir_name(fd: int, ptr: int, length: int) -> int:
    return EBADF


def clock_res_get(clock_id: int, ptr: int) -> int:
    return _put(ptr, struct.pack("<Q", 1))


def clock_time_get(clock_id: int, precision: int, ptr: int) -> int:
    # Nanoseconds of a logical clock: one per unit of fuel consumed. Monotonic, and
    # the same at the same point of any replay.
    return _put(ptr, struct.pack("<Q", _consumed_fuel()))


def random_get(ptr: int, length: int) -> int:
    if length < 0 or length > MAX_WRITE:
        return EINVAL
    ex = current()
    seed = hashlib.sha256(ex.loaded.digest.encode() + ex.input + struct.pack("<Q", _consumed_fuel())).digest()
    out = bytearray()
    counter = 0
    while len(out) < length:
        out += hashlib.sha256(seed + struct.pack("<I", counter)).digest()
        counter += 1
    return _put(ptr, bytes(out[:length]))


def proc_exit(code: int) -> None:
    raise GuestAbort(ABORT_EXIT, str(code))


def sched_yield() -> int:
    return ESUCCESS


I32, I64 = wasmtime.ValType.i32(), wasmtime.ValType.i64()

PROVIDED: dict[str, tuple[list[wasmtime.ValType], list[wasmtime.ValType], Callable[..., Any]]] = {
    "args_sizes_get": ([I32, I32], [I32], _zero_pair),
    "args_get": ([I32, I32], [I32], lambda a, b: ESUCCESS),
    "environ_sizes_get": ([I32, I32], [I32], _zero_pair),
    "environ_get": ([I32, I32], [I32], lambda a, b: ESUCCESS),
    "fd_write": ([I32, I32, I32, I32], [I32], fd_write),
    "fd_read": ([I32, I32, I32, I32], [I32], fd_read),
    "fd_close": ([I32], [I32], fd_close),
    "fd_fdstat_get": ([I32, I32], [I32], fd_fdstat_get),
    "fd_seek": ([I32, I64, I32, I32], [I32], fd_seek),
    "fd_prestat_get": ([I32, I32], [I32], fd_prestat_get),
    "fd_prestat_dir_name": ([I32, I32, I32], [I32], fd_prestat_dir_name),
    "clock_res_get": ([I32, I32], [I32], clock_res_get),
    "clock_time_get": ([I32, I64, I32], [I32], clock_time_get),
    "random_get": ([I32, I32], [I32], random_get),
    "proc_exit": ([I32], [], proc_exit),
    "sched_yield": ([], [I32], sched_yield),
}


def define(linker: wasmtime.Linker, module: wasmtime.Module, allow: frozenset[str]) -> None:
    """Define the granted WASI functions the module imports (and only those)."""
    for imp in module.imports:
        if imp.module != MODULE or imp.name not in allow:
            continue
        ty = imp.type
        if not isinstance(ty, wasmtime.FuncType):
            continue
        provided = PROVIDED.get(imp.name or "")
        if provided is not None:
            params, results, fn = provided
        else:
            params, results, fn = list(ty.params), list(ty.results), _nosys(len(ty.results))
        kinds = [str(p) for p in params] + [str(r) for r in results]
        if len(results) > 1 or any(k not in ("i32", "i64", "f32", "f64") for k in kinds):
            raise ModuleError(f"the module imports `{MODULE}.{imp.name}` as ({', '.join(kinds)}), a signature no "
                              "WASI preview 1 function has")
        # Through the host's own trampoline, as the torpor imports: an exception (proc_exit's
        # GuestAbort) comes out of the call on this thread, never another agent's.
        define_import(linker, MODULE, imp.name or "", [str(p) for p in params],
                      str(results[0]) if results else None, fn)


def _nosys(nresults: int) -> Callable[..., Any]:
    def stub(*args: Any) -> Any:
        return ENOSYS if nresults else None

    return stub
