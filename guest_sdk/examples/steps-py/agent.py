"""steps, in Python: input {"n": N}. Calls kv.incr("counter") N times and keeps a running
sum of the answers in ordinary Python variables, which must survive every hibernation at
an await. With a fresh store and n = 50: {"sum": 1275, "last": 50}."""

from typing import Any

import torpor


async def main(input: Any) -> dict[str, int]:
    n = input.get("n") if isinstance(input, dict) else None
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise TypeError('input needs a non-negative integer "n"')
    total = 0
    last = 0
    for _ in range(n):
        last = (await torpor.tool("kv.incr", {"key": "counter", "by": 1}))["value"]  # may hibernate here
        total += last
    return {"sum": total, "last": last}
