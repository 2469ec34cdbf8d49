"""The child process the guest toolchain runs in (see ``isolation.py`` for why).

``python -m host.sandbox.toolchain_worker asyncify MEMORY CPU``
    reads one request from stdin (a JSON line with :func:`binaryen.asyncify`'s
    arguments, then the module's bytes) and writes ``ok\\n`` and the transformed
    module, or ``error\\n`` and a JSON ``{code, message, validation}``, to stdout.
    Anything else (Binaryen's ``Fatal`` exits, its aborts, a signal) the parent reads
    from the exit status and stderr.

``python -m host.sandbox.toolchain_worker zig MEMORY CPU ARGS...``
    becomes ``python -m ziglang ARGS...`` under the limits (ziglang then execs Zig,
    which inherits them, as do the clang processes it starts).

MEMORY is the address-space limit in bytes, CPU the CPU-time limit in seconds; both
are set before anything else is loaded.
"""

from __future__ import annotations

import json
import os
import sys

from host.sandbox import isolation

USAGE = "usage: python -m host.sandbox.toolchain_worker {asyncify|zig} MEMORY CPU [ARGS...]"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 3 or args[0] not in {"asyncify", "zig"}:
        print(USAGE, file=sys.stderr)
        return 2
    mode, memory, cpu, rest = args[0], int(args[1]), int(args[2]), args[3:]
    isolation.limit_self(memory, cpu)
    if mode == "zig":
        return _zig(rest)
    try:
        return _asyncify()
    except MemoryError:
        os._exit(isolation.EXIT_NO_MEMORY)


def _zig(args: list[str]) -> int:
    import runpy

    sys.argv = ["ziglang", *args]
    runpy.run_module("ziglang", run_name="__main__", alter_sys=True)  # execs Zig
    return 0  # pragma: no cover - only where ziglang does not exec (not POSIX)


def _asyncify() -> int:
    # The result goes to a copy of stdout; fd 1 itself then points at stderr, so that
    # whatever Binaryen prints to stdout cannot corrupt the result.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    stdin = sys.stdin.buffer
    request = json.loads(stdin.readline())
    wasm = stdin.read()

    from host.errors import TorporError
    from host.sandbox import binaryen

    try:
        result = binaryen.asyncify_in_process(
            wasm,
            suspending_imports=list(request["suspending_imports"]),
            global_export_prefix=str(request["global_export_prefix"]),
            custom_sections={k: bytes.fromhex(v) for k, v in request["custom_sections"].items()},
            optimize_level=int(request["optimize_level"]),
            extra_passes=tuple(request["extra_passes"]),
            pass_arguments={str(k): str(v) for k, v in request.get("pass_arguments", {}).items()},
            enable_features=tuple(str(f) for f in request.get("enable_features", ())),
        )
    except TorporError as exc:
        payload = {
            "code": exc.code,
            "message": str(exc),
            "validation": isinstance(exc, binaryen.ValidationFailed),
        }
        out.write(b"error\n" + json.dumps(payload).encode())
    else:
        out.write(b"ok\n" + result)
    out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
