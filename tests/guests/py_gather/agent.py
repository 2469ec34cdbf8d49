"""Concurrent tool calls with asyncio: input {"mode": "...", ...}; tests/test_py_gather.py
says what each mode must answer. Every ``kv.incr`` answers the counter's new value, so the
values each task saw say in which order the host settled the calls."""

import contextlib
from typing import Any

import textkit  # a package vendored beside agent.py
import torpor
from textkit.formats.table import row


async def incr(key: str = "counter") -> int:
    return int((await torpor.tool("kv.incr", {"key": key, "by": 1}))["value"])


async def worker(name: str, calls: int, seen: dict[str, list[int]]) -> str:
    for _ in range(calls):
        seen[name].append(await incr())
    return name


class Never:
    """An awaitable that yields something other than a tool call (a bare value)."""

    def __await__(self) -> Any:
        yield "waiting for nothing"


async def main(input: Any) -> Any:
    # Imported here, not at the top, on purpose: torpor build sees the name and imports it
    # into the image, so main runs as a task of the agent's event loop all the same.
    import asyncio

    mode = input["mode"]
    if mode == "sum":
        # n calls in rounds of `width` at once; the running sum lives in this frame and
        # in the tasks' results across every hibernation.
        n, width = input["n"], input["width"]
        total = last = 0
        done = 0
        while done < n:
            k = min(width, n - done)
            values = await asyncio.gather(*(incr() for _ in range(k)))
            total += sum(values)
            last = max(last, *values)
            done += k
        return {"sum": total, "last": last}
    if mode == "tasks":
        # Three tasks with different numbers of calls: they finish in a different order
        # from the one they were created in; gather still answers in argument order.
        seen: dict[str, list[int]] = {"a": [], "b": [], "c": []}
        finished: list[str] = []

        async def tracked(name: str, calls: int) -> str:
            r = await worker(name, calls, seen)
            finished.append(r)
            return r

        ta = asyncio.create_task(tracked("a", 3))
        tb = asyncio.create_task(tracked("b", 1))
        tc = asyncio.create_task(tracked("c", 2))
        first, pending = await asyncio.wait({ta, tb, tc}, return_when=asyncio.FIRST_COMPLETED)
        first_names = sorted(t.result() for t in first)
        order = await asyncio.gather(ta, tb, tc)
        return {"seen": seen, "finished": finished, "first": first_names, "pending_after_first": len(pending),
                "gathered": order}
    if mode == "errors":
        # One call refused by the policy among allowed ones: gather with
        # return_exceptions answers it in place; without, it raises the DeniedError.
        results = await asyncio.gather(incr(), torpor.tool("kv.set", {"key": "x", "value": 1}), incr(),
                                       return_exceptions=True)
        shown = [r if not isinstance(r, BaseException) else {"error": type(r).__name__, "code": r.code}
                 for r in results]
        try:
            await asyncio.gather(incr(), torpor.tool("kv.set", {"key": "y", "value": 2}))
            raised = None
        except torpor.DeniedError as e:
            raised = e.code
        return {"results": shown, "raised": raised}
    if mode == "cancel":
        # A task cancelled before its call's turn: that call is never made.
        slow = asyncio.create_task(worker("slow", 5, {"slow": []}))
        await asyncio.sleep(0)  # let it queue its first call
        slow.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await slow
        return {"cancelled": slow.cancelled(), "value": await incr()}
    if mode == "taskgroup":
        async with asyncio.TaskGroup() as tg:
            ts = [tg.create_task(incr(f"k{i}")) for i in range(4)]
        return [t.result() for t in ts]
    if mode == "vendored":
        names = await asyncio.gather(*(torpor.tool("kv.get", {"key": k}) for k in ("a", "b")))
        return {"slug": textkit.slugify("Crème Brûlée, 2 Portions!"), "row": row("Hello World", "Ça va"),
                "version": textkit.VERSION, "file": textkit.__file__, "answers": len(names)}
    if mode == "approval":
        # the second of three calls waits for a person: the agent hibernates on it with the
        # third still queued in its heap, and goes on when the person decides
        results = await asyncio.gather(incr("a"), incr("gate"), incr("b"), return_exceptions=True)
        return [r if isinstance(r, int) else getattr(r, "code", repr(r)) for r in results]
    if mode == "surrogate":
        # arguments that are not valid UTF-8 raise in the agent's own frame, catchable
        try:
            await incr("\ud800")
        except UnicodeEncodeError as e:
            return type(e).__name__
    if mode == "bad_yield":
        await asyncio.gather(incr(), Never())
    if mode == "deadlock":
        await asyncio.Event().wait()
    if mode == "timer":
        await asyncio.sleep(0.5)
    raise ValueError(f"unknown mode {mode!r}")
