"""The ``torpor`` host imports of guest ABI v1, defined on a Wasmtime linker.

Every pointer and length a guest passes is checked against its linear memory
before use (see :meth:`Execution.read`); a bad one earns an error code, never a
host exception. The functions find their agent through a thread-local set by
:class:`~host.sandbox.execution.Execution` around each call into wasm, because one
linker (and one ``InstancePre``) serves every agent of a module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import wasmtime

from host.sandbox import abi, guest_json
from host.sandbox.execution import (
    GuestAbort,
    ImportFault,
    PendingCall,
    current,
    define_import,
    error_response,
)

LOG_LEVELS = ("debug", "info", "warn", "error")
JSON_WHITESPACE = b" \t\n\r"  # RFC 8259's whitespace


def _fault(ex_errno: int, message: str) -> int:
    ex = current()
    name = next((k for k, v in abi.ERROR_CODES.items() if v == ex_errno), "fault")
    ex.response = error_response(name, message)
    ex.response_status = ex_errno
    return ex_errno


def input_len() -> int:
    return len(current().input)


def input_read(ptr: int, cap: int) -> int:
    ex = current()
    try:
        return ex.write(ptr, cap, ex.input)
    except ImportFault as f:
        return f.errno


def output_write(ptr: int, length: int) -> int:
    ex = current()
    try:
        data = ex.read(ptr, length, abi.MAX_OUTPUT)
    except ImportFault as f:
        return f.errno
    try:
        guest_json.parse(data)
    except guest_json.PoisonValue:
        return abi.E_INVALID_JSON
    ex.output = data
    return 0


def log(level: int, ptr: int, length: int) -> int:
    ex = current()
    if not 0 <= level < len(LOG_LEVELS):
        return abi.E_INVALID_ARGS
    try:
        data = ex.read(ptr, length, abi.MAX_LOG)
    except ImportFault as f:
        return f.errno
    if ex.log_sink is not None:
        ex.log_sink(level, data.decode("utf-8", "replace"))
    return 0


def response_len() -> int:
    return len(current().response)


def response_read(ptr: int, cap: int) -> int:
    ex = current()
    try:
        return ex.write(ptr, cap, ex.response)
    except ImportFault as f:
        return f.errno


def abort(kind: int, ptr: int, length: int) -> None:
    ex = current()
    try:
        msg = ex.read(ptr, min(max(length, 0), 4096), 4096).decode("utf-8", "replace")
    except ImportFault:
        msg = ""
    # ABI.md 4.8: any kind but OOM counts as a panic. Normalised here, so that no guest
    # kind can pass for one of the host's own (WASI proc_exit's ABORT_EXIT, a status).
    kind = abi.ABORT_OOM if kind == abi.ABORT_OOM else abi.ABORT_PANIC
    what = "out of memory" if kind == abi.ABORT_OOM else "agent aborted"
    raise GuestAbort(kind, f"{what}: {msg}" if msg else what)


def tool_call(name_ptr: int, name_len: int, args_ptr: int, args_len: int) -> int:
    ex = current()
    if ex.mode == 2:  # REWINDING: this is the same call, now answered
        return ex.finish_rewind()
    try:
        name_raw, args_raw = ex.read_many((name_ptr, name_len, abi.MAX_TOOL_NAME), (args_ptr, args_len, abi.MAX_ARGS))
    except ImportFault as f:
        return _fault(f.errno, f"tool_call: {f}")
    try:
        name = name_raw.decode("utf-8")
    except UnicodeDecodeError:
        return _fault(abi.E_UNKNOWN_TOOL, "tool_call: the tool name is not UTF-8")
    try:
        # Empty or JSON whitespace only means {} (ABI.md 4.5); bytes.strip() would also
        # take \v and \f, which are not JSON and must be invalid_json like any other byte.
        args = guest_json.parse(args_raw) if args_raw.strip(JSON_WHITESPACE) else {}
    except guest_json.PoisonValue as exc:
        return _fault(abi.E_INVALID_JSON, f"tool_call: the arguments to {name!r} are not JSON ({exc})")
    ex.call_fuel = ex.fuel_now()  # the call's fuel, at its entry, however it is answered
    ex.call_seq += 1
    call = PendingCall(ex.call_seq, name, args)
    status = ex.answer_inline(call)  # answered now, no unwind, when the runtime can
    if status is not None:
        return status
    ex.begin_unwind(call)
    return 0


def define(linker: wasmtime.Linker, *, tools: bool) -> None:
    """Define the ABI's imports; ``tool_call`` only when the policy grants a tool.

    Through :func:`~host.sandbox.execution.define_import`, which skips wasmtime-py's
    per-value conversions (a tool round trip calls four imports).
    """
    m = abi.IMPORT_MODULE
    fns: dict[str, Callable[..., Any]] = {"input_len": input_len, "input_read": input_read, "output_write": output_write, "log": log,
           "response_len": response_len, "response_read": response_read, "abort": abort}
    if tools:
        fns[abi.TOOL_IMPORT] = tool_call
    for name, fn in fns.items():
        define_import(linker, m, name, *abi.IMPORT_SIGNATURES[name], fn)
