"""A Python agent that misbehaves on request: input {"mode": "..."}. Each mode is one of the
bad inputs of issue 26; tests/test_py_guests.py says what the host must answer."""

import random
from typing import Any

import helper  # vendored beside agent.py: bundled by torpor build
import torpor


class Never:
    """An awaitable that yields something other than a torpor call (a bare value)."""

    def __await__(self) -> Any:
        yield "waiting for nothing"


def thrower() -> None:
    raise ValueError("boom from Python")


def recurse(n: int) -> int:
    return recurse(n + 1) + 1


class Deep:
    def __repr__(self) -> str:
        return repr(Deep())  # C-level recursion (repr), not Python frames alone


async def main(input: Any) -> Any:
    mode = input["mode"]
    if mode == "throw":
        await torpor.tool("kv.incr", {"key": "before-throw"})
        thrower()
    if mode == "loop":
        while True:
            pass
    if mode == "alloc":
        keep = []
        while True:
            keep.append(bytearray(1 << 20))
    if mode == "huge":
        return len(bytearray(1 << 30))
    if mode == "recurse":
        try:
            recurse(0)
        except RecursionError as exc:
            return {"caught": type(exc).__name__}
    if mode == "deep_repr":
        return repr(Deep())
    if mode == "eval":
        seen: dict[str, Any] = {
            "sum": eval("1 + 2"),
            "exec": None,
            "helper": helper.double(21),
        }
        ns: dict[str, Any] = {}
        exec(compile("def f(a, b):\n    return a * b\n", "<s>", "exec"), ns)
        seen["exec"] = ns["f"](6, 7)
        try:
            __import__("socket").socket()
            seen["socket"] = "opened"
        except Exception as exc:
            seen["socket"] = type(exc).__name__
        try:
            with open("/etc/passwd") as fh:
                seen["file"] = fh.read()[:10]
        except Exception as exc:
            seen["file"] = type(exc).__name__
        import time

        seen["time"] = time.time()
        try:
            await eval('torpor.tool("kv.set", {"key": "x", "value": 1})')
            seen["denied"] = None
        except torpor.DeniedError as e:
            seen["denied"] = {"name": type(e).__name__, "code": e.code, "rule": e.rule, "retryable": e.retryable}
        return seen
    if mode == "unsettled":
        await Never()
    if mode == "random":
        return {"a": random.random(), "b": random.randint(0, 10**9), "h": hash("x") != 0,
                "hash": hash("torpor"), "frozen": __import__("gc").get_freeze_count()}
    if mode == "sleep":
        before = await torpor.tool("clock.now")
        await torpor.sleep(input["ms"])
        after = await torpor.tool("clock.now")
        return {"elapsed": after["unix_ms"] - before["unix_ms"]}
    if mode == "print":
        print("hello from print")
        torpor.log.warn("a warning", {"k": 1})
        return "printed"
    if mode in REDTEAM:  # the red-team cases (tests/test_py_guests.py, redteam section)
        return await REDTEAM[mode](input)
    raise ValueError(f"unknown mode {mode!r}")


# ---- red-team cases: each must end this agent with a typed error, never the host --------

class BadRepr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("str of the exception raises")

    def __repr__(self) -> str:
        raise RuntimeError("repr of the exception raises")


class LoopingStr(Exception):
    def __str__(self) -> str:
        while True:
            pass


class BadAwaitable:
    """Yields to the runtime a value that is no tool call and whose repr raises."""

    def __await__(self) -> Any:
        yield BadRepr()


def nested(n: int) -> Any:
    v: Any = []
    for _ in range(n):
        v = [v]
    return v


async def finally_loop(input: Any) -> Any:
    try:
        raise ValueError("x")
    finally:
        while True:
            pass


async def except_loop(input: Any) -> Any:
    try:
        raise ValueError("x")
    except ValueError:
        while True:
            pass


async def bad_repr(input: Any) -> Any:
    raise BadRepr()


async def looping_str(input: Any) -> Any:
    raise LoopingStr()


async def bad_awaitable(input: Any) -> Any:
    await BadAwaitable()


async def raw_call(input: Any) -> Any:
    # Text json.dumps would refuse, sent as the call's raw arguments past torpor.tool.
    code, body = await torpor._Call("kv.incr", input["text"])
    return {"code": code, "body": body}


async def raw_output(input: Any) -> Any:
    import _torpor  # the runtime's native module: any agent can reach it

    n = input.get("depth", 0)
    _torpor.output("[" * n + "]" * n if n else input["text"])


async def deep_output(input: Any) -> Any:
    return nested(100_000)


async def deep_args(input: Any) -> Any:
    return await torpor.tool("kv.incr", {"key": "k", "by": nested(100_000)})


async def surrogate_key(input: Any) -> Any:
    return await torpor.tool("kv.incr", {"key": chr(0xD800)})


async def surrogate_output(input: Any) -> Any:
    return chr(0xDFFF)


async def big_int_arg(input: Any) -> Any:
    return await torpor.tool("kv.incr", {"key": "k", "by": 2 ** 70})


async def big_int_output(input: Any) -> Any:
    return 2 ** 70


async def inf_output(input: Any) -> Any:
    return float("1e400")


async def nan_output(input: Any) -> Any:
    return float("nan")


async def deep_c_recursion(input: Any) -> Any:
    import sys

    sys.setrecursionlimit(10 ** 7)
    return recurse(0)


async def huge_output(input: Any) -> Any:
    return "x" * (2 << 20)


async def log_flood(input: Any) -> Any:
    while True:  # the host works inside every call: the wall clock, not the fuel, ends it
        torpor.log("x" * 60000)


REDTEAM = {f.__name__: f for f in (log_flood,
    finally_loop, except_loop, bad_repr, looping_str, bad_awaitable, raw_call, raw_output, deep_output,
    deep_args, surrogate_key, surrogate_output, big_int_arg, big_int_output, inf_output, nan_output,
    deep_c_recursion, huge_output)}
