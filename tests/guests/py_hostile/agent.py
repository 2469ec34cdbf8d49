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
    raise ValueError(f"unknown mode {mode!r}")
