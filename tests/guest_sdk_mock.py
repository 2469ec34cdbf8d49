"""A tiny reference implementation of the `torpor` guest imports (ABI v1) for SDK tests.

Not the real host: no Asyncify, no snapshots, no policy. Tool calls are answered
synchronously from a dict of Python callables. It follows guest_sdk/ABI.md for
bounds checks, limits and error codes, so the SDK and the test guests can be
exercised before (and independently of) host/.

Also holds the compile helpers the guest SDK tests share.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import wasmtime

from host.sandbox import binaryen as host_binaryen
from host.sandbox.toolchain import COMPILE_FLAGS

REPO = Path(__file__).resolve().parents[1]
SDK_C = REPO / "guest_sdk" / "c"

# The command `torpor build` uses (see guest_sdk/ABI.md, "Building").
CC_FLAGS = list(COMPILE_FLAGS)


def compile_guest(sources: Sequence[Path], out: Path, extra: Sequence[str] = ()) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "ziglang",
        "cc",
        *CC_FLAGS,
        "-I",
        str(SDK_C),
        "-Wall",
        "-Wextra",
        "-Werror",
        *extra,
        "-o",
        str(out),
        str(SDK_C / "torpor.c"),
        *map(str, sources),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"compile failed: {' '.join(cmd)}\n{r.stdout}\n{r.stderr}")
    return out


def compile_many(
    jobs: dict[str, tuple[Sequence[Path], Sequence[str]]], outdir: Path
) -> dict[str, Path]:
    """Compile several guests in parallel; answers name -> wasm path."""
    outdir.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as ex:
        futs = {
            name: ex.submit(compile_guest, srcs, outdir / f"{name}.wasm", extra)
            for name, (srcs, extra) in jobs.items()
        }
        return {name: f.result() for name, f in futs.items()}


# --- ABI v1 constants ---------------------------------------------------------

E_FAULT, E_INVALID_JSON, E_TOO_LARGE, E_UNKNOWN_TOOL, E_INVALID_ARGS = -1, -2, -3, -4, -5
E_TOOL_FAILED, E_DENIED, E_RESULT_TOO_LARGE, E_RATE_LIMITED, E_TIMEOUT = -6, -7, -8, -9, -10
E_UNAVAILABLE = -11
CODE_NAMES = {
    -1: "fault",
    -2: "invalid_json",
    -3: "too_large",
    -4: "unknown_tool",
    -5: "invalid_args",
    -6: "tool_failed",
    -7: "denied",
    -8: "result_too_large",
    -9: "rate_limited",
    -10: "timeout",
    -11: "unavailable",
}
MAX_TOOL_NAME = 128
MAX_ARGS = MAX_RESPONSE = MAX_OUTPUT = 1 << 20
MAX_LOG = 1 << 16


class ToolError(Exception):
    """Raised by a mock tool to answer with a structured error."""

    def __init__(
        self,
        code: int,
        message: str,
        rule: str | None = None,
        retryable: bool = False,
        details: Any = None,
    ):
        super().__init__(message)
        self.code, self.message, self.rule, self.retryable = code, message, rule, retryable
        self.details = details


class GuestAbort(Exception):
    def __init__(self, kind: int, message: str):
        super().__init__(message)
        self.kind, self.message = kind, message


def _reject_constant(name: str) -> Any:
    raise ValueError(f"not JSON: {name}")


def strict_json(data: bytes) -> Any:
    """RFC 8259 JSON from UTF-8 bytes (no NaN/Infinity); raises ValueError."""
    return json.loads(data.decode("utf-8"), parse_constant=_reject_constant)


@dataclass
class RunResult:
    status: str  # completed | failed
    rc: int | None = None
    output: Any = None
    output_raw: bytes | None = None
    error_code: str | None = None
    error_message: str = ""
    logs: list[tuple[int, str]] = field(default_factory=list)
    tool_calls: list[tuple[str, bytes, int]] = field(default_factory=list)


Tool = Callable[[dict[str, Any]], Any]
# tools dicts map granted tool names to callables; None = granted but not registered


class MockHost:
    """Runs torpor_main of a module once; imports follow ABI v1 (minus suspension)."""

    def __init__(self, engine: wasmtime.Engine | None = None):
        if engine is None:
            cfg = wasmtime.Config()
            cfg.consume_fuel = True
            engine = wasmtime.Engine(cfg)
        self.engine = engine
        self._modules: dict[str, wasmtime.Module] = {}

    def module(self, path: Path) -> wasmtime.Module:
        key = str(path)
        if key not in self._modules:
            self._modules[key] = wasmtime.Module.from_file(self.engine, key)
        return self._modules[key]

    def instantiate(
        self,
        path: Path,
        input_json: str | bytes = b"{}",
        tools: dict[str, Tool | None] | None = None,
        fuel: int = 10**10,
        memory_limit: int | None = None,
    ) -> GuestSession:
        return GuestSession(self, self.module(path), input_json, tools or {}, fuel, memory_limit)

    def run(self, path: Path, input_json: str | bytes = b"{}", **kw: Any) -> RunResult:
        return self.instantiate(path, input_json, **kw).run_main()


class GuestSession:
    def __init__(
        self,
        host: MockHost,
        module: wasmtime.Module,
        input_json: str | bytes,
        tools: dict[str, Tool | None],
        fuel: int,
        memory_limit: int | None,
    ):
        self.input = input_json.encode() if isinstance(input_json, str) else input_json
        self.tools = tools
        self.result = RunResult(status="running")
        self.response: bytes = b""
        self.store = wasmtime.Store(host.engine)
        self.store.set_fuel(fuel)
        if memory_limit is not None:
            self.store.set_limits(memory_size=memory_limit)
        linker = wasmtime.Linker(host.engine)
        i32 = wasmtime.ValType.i32()

        def define(name: str, params: int, results: int, fn: Callable[..., Any]) -> None:
            ty = wasmtime.FuncType([i32] * params, [i32] * results)
            linker.define_func("torpor", name, ty, fn, access_caller=True)

        define("input_len", 0, 1, self._input_len)
        define("input_read", 2, 1, self._input_read)
        define("output_write", 2, 1, self._output_write)
        define("log", 3, 1, self._log)
        define("tool_call", 4, 1, self._tool_call)
        define("response_len", 0, 1, self._response_len)
        define("response_read", 2, 1, self._response_read)
        define("abort", 3, 0, self._abort)
        self.instance = linker.instantiate(self.store, module)
        exports = self.instance.exports(self.store)
        mem = exports["memory"]
        assert isinstance(mem, wasmtime.Memory)
        self.memory = mem
        self.exports = exports

    # -- memory helpers (for tests that call exported helpers directly) --------

    def call(self, name: str, *args: Any) -> Any:
        return self.exports[name](self.store, *args)

    def read(self, ptr: int, n: int) -> bytes:
        return bytes(self.memory.read(self.store, ptr, ptr + n))

    def read_cstr(self, ptr: int) -> bytes:
        out = bytearray()
        while True:
            chunk = self.memory.read(self.store, ptr, ptr + 256)
            z = chunk.find(0)
            if z >= 0:
                return bytes(out + chunk[:z])
            out += chunk
            ptr += 256

    def write(self, ptr: int, data: bytes) -> None:
        if data:
            self.memory.write(self.store, data, ptr)

    # -- imports -----------------------------------------------------------------

    def _range(self, caller: wasmtime.Caller, ptr: int, n: int) -> bool:
        size = self.memory.data_len(caller)
        return ptr >= 0 and n >= 0 and ptr + n <= size

    def _input_len(self, caller: wasmtime.Caller) -> int:
        return len(self.input)

    def _input_read(self, caller: wasmtime.Caller, ptr: int, cap: int) -> int:
        if not self._range(caller, ptr, cap):
            return E_FAULT
        n = min(cap, len(self.input))
        if n:
            self.memory.write(caller, self.input[:n], ptr)
        return n

    def _output_write(self, caller: wasmtime.Caller, ptr: int, n: int) -> int:
        if not self._range(caller, ptr, n):
            return E_FAULT
        if n > MAX_OUTPUT:
            return E_TOO_LARGE
        data = bytes(self.memory.read(caller, ptr, ptr + n))
        try:
            value = strict_json(data)
        except ValueError:
            return E_INVALID_JSON
        self.result.output, self.result.output_raw = value, data
        return 0

    def _log(self, caller: wasmtime.Caller, level: int, ptr: int, n: int) -> int:
        if level not in (0, 1, 2, 3):
            return E_INVALID_ARGS
        if not self._range(caller, ptr, n):
            return E_FAULT
        if n > MAX_LOG:
            return E_TOO_LARGE
        msg = bytes(self.memory.read(caller, ptr, ptr + n)).decode("utf-8", "replace")
        self.result.logs.append((level, msg))
        return 0

    def _error(
        self,
        code: int,
        message: str,
        rule: str | None = None,
        retryable: bool = False,
        details: Any = None,
    ) -> int:
        err: dict[str, Any] = {"code": CODE_NAMES[code], "message": message, "retryable": retryable}
        if rule is not None:
            err["rule"] = rule
        if details:  # attached details are members of the error object (ABI.md section 5)
            err.update({k: v for k, v in details.items() if k not in err})
        self.response = json.dumps(err).encode()
        return code

    def _tool_call(self, caller: wasmtime.Caller, np: int, nl: int, ap: int, al: int) -> int:
        rc = self._tool_call_inner(caller, np, nl, ap, al)
        name = bytes(self.memory.read(caller, np, np + nl)) if self._range(caller, np, nl) else b"?"
        args = bytes(self.memory.read(caller, ap, ap + al)) if self._range(caller, ap, al) else b"?"
        self.result.tool_calls.append((name.decode("utf-8", "replace"), args, rc))
        return rc

    def _tool_call_inner(self, caller: wasmtime.Caller, np: int, nl: int, ap: int, al: int) -> int:
        self.response = b""
        if not self._range(caller, np, nl) or not self._range(caller, ap, al):
            return self._error(E_FAULT, "tool name or arguments out of bounds")
        if nl > MAX_TOOL_NAME or al > MAX_ARGS:
            return self._error(E_TOO_LARGE, "tool name or arguments too large")
        try:
            name = bytes(self.memory.read(caller, np, np + nl)).decode("utf-8")
        except UnicodeDecodeError:
            return self._error(E_UNKNOWN_TOOL, "tool name is not UTF-8")
        raw = bytes(self.memory.read(caller, ap, ap + al))
        try:
            args = strict_json(raw) if raw.strip() else {}
        except ValueError:
            return self._error(E_INVALID_JSON, "arguments are not valid JSON")
        if name not in self.tools:  # not granted (whether or not it exists)
            return self._error(
                E_DENIED,
                f"tool {name!r} is not granted",
                "tools",
                details={"reason_code": "not_granted"},
            )
        tool = self.tools[name]
        if tool is None:  # granted, but not registered
            return self._error(E_UNKNOWN_TOOL, f"no tool named {name!r} is available")
        if not isinstance(args, dict):
            return self._error(E_INVALID_ARGS, "arguments must be a JSON object")
        try:
            result = tool(args)
        except ToolError as e:
            return self._error(e.code, e.message, e.rule, e.retryable, e.details)
        except Exception as e:  # a raising tool is tool_failed
            # host.tools.registry.ToolError carries a code *name* and **details
            code = {v: k for k, v in CODE_NAMES.items()}.get(
                getattr(e, "code", None), E_TOOL_FAILED
            )
            return self._error(
                code,
                str(e) or type(e).__name__,
                None,
                bool(getattr(e, "retryable", False)),
                getattr(e, "details", None) or None,
            )
        data = json.dumps(result).encode()
        if len(data) > MAX_RESPONSE:
            return self._error(E_RESULT_TOO_LARGE, "result too large")
        self.response = data
        return 0

    def _response_len(self, caller: wasmtime.Caller) -> int:
        return len(self.response)

    def _response_read(self, caller: wasmtime.Caller, ptr: int, cap: int) -> int:
        if not self._range(caller, ptr, cap):
            return E_FAULT
        n = min(cap, len(self.response))
        if n:
            self.memory.write(caller, self.response[:n], ptr)
        return n

    def _abort(self, caller: wasmtime.Caller, kind: int, ptr: int, n: int) -> None:
        if self._range(caller, ptr, n):
            msg = bytes(self.memory.read(caller, ptr, ptr + min(n, MAX_LOG))).decode(
                "utf-8", "replace"
            )
        else:
            msg = "<message out of bounds>"
        raise GuestAbort(kind, msg)

    # -- running -------------------------------------------------------------------

    def run_main(self) -> RunResult:
        r = self.result
        try:
            r.rc = self.call("torpor_main")
        except GuestAbort as e:
            r.status = "failed"
            r.error_code = "memory_limit" if e.kind == 1 else "aborted"
            r.error_message = e.message
            return r
        except wasmtime.Trap as e:
            r.status = "failed"
            msg = str(e)
            if e.trap_code == wasmtime.TrapCode.OUT_OF_FUEL:
                r.error_code = "out_of_fuel"
            elif e.trap_code == wasmtime.TrapCode.STACK_OVERFLOW:
                r.error_code = "stack_overflow"
            else:
                r.error_code = "trap"
            r.error_message = msg
            return r
        if r.rc == 0:
            r.status = "completed"
        else:
            r.status, r.error_code = "failed", "agent_error"
        return r


def python_tool(fn: Callable[..., Any]) -> Tool:
    """Adapt `def tool(args: SomeModel, ctx) -> dict` the way the host is meant to:
    validate the JSON arguments against the pydantic model (invalid_args), then call."""
    import inspect
    import typing

    from pydantic import BaseModel, ValidationError

    hints = typing.get_type_hints(fn)
    first = next(iter(inspect.signature(fn).parameters))
    model = hints.get(first)
    assert isinstance(model, type) and issubclass(model, BaseModel), model

    def tool(args: dict[str, Any]) -> Any:
        try:
            parsed = model.model_validate(args)
        except ValidationError as e:
            errs = "; ".join(
                f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()
            )
            raise ToolError(E_INVALID_ARGS, errs) from None
        return fn(parsed, None)

    return tool


class KV:
    """In-memory builtin kv.* tools with the documented JSON contracts."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def _key(self, args: dict[str, Any]) -> str:
        key = args.get("key")
        if not isinstance(key, str):
            raise ToolError(E_INVALID_ARGS, "key: must be a string")
        return key

    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"value": self.data.get(self._key(args))}

    def set(self, args: dict[str, Any]) -> dict[str, Any]:
        key = self._key(args)
        if "value" not in args:
            raise ToolError(E_INVALID_ARGS, "value: field required")
        self.data[key] = args["value"]
        return {}

    def incr(self, args: dict[str, Any]) -> dict[str, Any]:
        key = self._key(args)
        by = args.get("by", 1)
        if not isinstance(by, int) or isinstance(by, bool):
            raise ToolError(E_INVALID_ARGS, "by: must be an integer")
        cur = self.data.get(key, 0)
        if not isinstance(cur, int):
            raise ToolError(E_TOOL_FAILED, f"{key!r} does not hold an integer")
        self.data[key] = cur + by
        return {"value": cur + by}

    def tools(self) -> dict[str, Tool]:
        return {"kv.get": self.get, "kv.set": self.set, "kv.incr": self.incr}


# --- Asyncify (what `torpor build` adds), for the hibernation round-trip tests ----

def asyncify(
    wasm: bytes, passes: Sequence[str] = ("strip-debug", "memory-packing")
) -> bytes:
    """What `torpor build` does after compiling (the host's own transform): Asyncify on
    torpor.tool_call, every mutable global exported as torpor.gN, the `torpor.abi` section."""
    return host_binaryen.asyncify(
        wasm,
        suspending_imports=["torpor.tool_call"],
        custom_sections={"torpor.abi": b"1"},
        extra_passes=tuple(passes),
    )


class HibernatingRun:
    """Runs an asyncified agent, hibernating at EVERY tool call: the instance is
    unwound, its memory and mutable globals copied out, the instance dropped, and
    a fresh instance rewound from the copy (ABI.md, "Suspension")."""

    def __init__(self, host: MockHost, wasm: bytes, input_json: str, tools: dict[str, Tool | None]):
        self.host, self.input, self.tools = host, input_json, tools
        self.module = wasmtime.Module(host.engine, wasm)
        self.pending: int | None = None
        self.response = b""
        self.hibernations = 0

    def run(self) -> RunResult:
        # pristine cur/end of the asyncify buffer, from a fresh instance
        probe = GuestSession(self.host, self.module, self.input, self.tools, 10**10, None)
        addr = probe.exports["__torpor_async"].value(probe.store)  # type: ignore[union-attr]
        self.pristine_header = probe.read(addr, 8)
        del probe
        snapshot: tuple[bytes, dict[str, Any]] | None = None
        logs: list[tuple[int, str]] = []
        calls: list[tuple[str, bytes, int]] = []
        while True:
            s = _ResumableSession(self)
            if snapshot is not None:
                mem, globs = snapshot
                grow = len(mem) // 65536 - s.memory.size(s.store)
                if grow > 0:
                    s.memory.grow(s.store, grow)
                s.write(0, mem)
                for name, val in globs.items():
                    s.exports[name].set_value(s.store, val)  # type: ignore[union-attr]
                s.call("asyncify_start_rewind", s.async_addr)
            r = s.run_main()
            logs += r.logs
            calls += r.tool_calls
            if s.call("asyncify_get_state") != 1:
                r.logs, r.tool_calls = logs, calls
                return r
            s.call("asyncify_stop_unwind")
            self.hibernations += 1
            mem = s.read(0, s.memory.data_len(s.store))
            globs = {
                name: s.exports[name].value(s.store)  # type: ignore[union-attr]
                for name in s.exports
                if name.startswith("torpor.g")
            }
            snapshot = (mem, globs)
            del s


class _ResumableSession(GuestSession):
    def __init__(self, run: HibernatingRun):
        self.run_ctl = run
        super().__init__(run.host, run.module, run.input, run.tools, 10**10, None)
        self.response = run.response
        self.async_addr = self.exports["__torpor_async"].value(self.store)  # type: ignore[union-attr]

    def _tool_call(self, caller: wasmtime.Caller, np: int, nl: int, ap: int, al: int) -> int:
        ctl = self.run_ctl
        if self.call("asyncify_get_state") == 2:  # rewinding: the call completes now
            self.call("asyncify_stop_rewind")
            assert ctl.pending is not None
            rc, ctl.pending = ctl.pending, None
            return rc
        ctl.pending = super()._tool_call(caller, np, nl, ap, al)
        ctl.response = self.response
        self.write(self.async_addr, ctl.pristine_header)  # reset cur before every unwind
        self.call("asyncify_start_unwind", self.async_addr)
        return 0


# --- one build per test session ------------------------------------------------------

EXAMPLES = REPO / "guest_sdk" / "examples"
GUESTS = REPO / "tests" / "guests"
# the test guests this SDK test-suite owns (others in tests/guests/ belong to host tests)
SDK_GUESTS = ("loop", "grow", "recurse", "wild", "notool", "noentry", "badargs", "sdk_selftest")
_built: dict[str, Path] | None = None


def built() -> dict[str, Path]:
    """Compile every example and test guest once per process (in parallel).
    Keys: example names ("hello", ...) and test guests ("guests/wild", ...)."""
    global _built
    if _built is None:
        import atexit
        import shutil
        import tempfile

        out = Path(tempfile.mkdtemp(prefix="torpor-guest-sdk-"))
        atexit.register(shutil.rmtree, out, True)
        jobs: dict[str, tuple[Sequence[Path], Sequence[str]]] = {}
        for d in sorted(EXAMPLES.iterdir()):
            if (d / "agent.c").exists():
                jobs[d.name] = ([d / "agent.c"], [])
        for name in SDK_GUESTS:
            jobs[f"guests/{name}"] = ([GUESTS / name / "agent.c"], [])
        flat = {k.replace("/", "__"): v for k, v in jobs.items()}
        paths = compile_many(flat, out)
        _built = {k: paths[k.replace("/", "__")] for k in jobs}
    return _built
