"""Concurrent tool calls in a Python agent: ``asyncio.gather``, ``create_task``, ``wait``
and ``TaskGroup`` over ``torpor.tool(...)`` calls (issue 26, item 3); and a package the
agent vendors beside agent.py.

An agent that imports asyncio runs ``main`` as a task of its own event loop inside the
coroutine the runtime drives (``torpor._drive``), so the host mechanism is the JavaScript
runtime's ``Promise.all``: the queued calls are made one at a time, oldest first, each a
suspension, and every other pending call waits in the agent's heap, hibernated with it.
The agent (``tests/guests/py_gather``) is built by ``torpor build``'s own code and runs in
real Wasmtime against a real LMDB store; the kill test SIGKILLs a real ``torpor run``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import EXAMPLES, GUESTS, BundleFactory, store_entries
from conftest import run_agent as run

from host.runtime import Host
from host.sandbox import bundle as bundle_mod

AGENT = GUESTS / "py_gather"


@pytest.fixture(scope="module")
def gather(bundles: BundleFactory) -> bundle_mod.Bundle:
    return bundles.load(AGENT)


def test_gather_makes_every_call_a_suspension_and_sums_exactly(host: Host, gather: bundle_mod.Bundle) -> None:
    """12 calls, 4 at a time: every call hibernates the agent with the others pending, and
    the sums kept in the main task's frame and the tasks' results come out exact; a
    replay, warm and cold, answers the same."""
    from host.runtime.replay import replay

    res = run(host, gather, {"mode": "sum", "n": 12, "width": 4})
    assert res.status == "completed" and res.output == {"sum": 78, "last": 12}, res.error
    assert res.suspensions == 12 and res.tool_calls == 12
    for cold in (False, True):
        r = replay(host, res.agent_id, cold=cold)
        assert r.matched and r.complete, r.summary()
        assert r.outcome == {"status": "completed", "output": res.output}


def test_tasks_interleave_their_calls_and_finish_in_any_order(host: Host, gather: bundle_mod.Bundle) -> None:
    """Tasks a, b, c make 3, 1 and 2 calls. The calls are made in the order the tasks
    issued them (each answer is the counter's next value), so the tasks' calls
    interleave; b finishes first (``wait(FIRST_COMPLETED)`` sees it alone), then c, then
    a, and ``gather`` still answers in argument order."""
    res = run(host, gather, {"mode": "tasks"})
    assert res.status == "completed", res.error
    assert res.output == {"seen": {"a": [1, 4, 6], "b": [2], "c": [3, 5]}, "finished": ["b", "c", "a"],
                          "first": ["b"], "pending_after_first": 2, "gathered": ["a", "b", "c"]}
    assert res.suspensions == 6


@pytest.mark.parametrize(("mode", "output", "calls"), [
    # a denial among allowed calls: in place with return_exceptions, raised without
    ("errors", {"results": [1, {"error": "DeniedError", "code": "denied"}, 2], "raised": "denied"}, 3),
    # a task cancelled before its call's turn: the call is never made
    ("cancel", {"cancelled": True, "value": 1}, 1),
    # a TaskGroup of four calls on four keys
    ("taskgroup", [1, 1, 1, 1], 4),
    # arguments with a lone surrogate: a UnicodeEncodeError at the agent's await, no call made
    ("surrogate", "UnicodeEncodeError", 0),
])
def test_asyncio_semantics_hold(host: Host, gather: bundle_mod.Bundle, mode: str, output: Any, calls: int) -> None:
    res = run(host, gather, {"mode": mode})
    assert res.status == "completed" and res.output == output, res.error
    assert res.tool_calls == calls


@pytest.mark.parametrize(("decide", "output"), [("approve", [1, 1, 1]), ("deny", [1, "denied", 1])])
def test_a_call_in_a_gather_waits_for_a_person(host: Host, gather: bundle_mod.Bundle, decide: str,
                                              output: list[Any]) -> None:
    """The policy parks the agent on the second of three calls (``waiting_approval``), the
    third still queued in its heap; approved or denied, the gather goes on with it."""
    res = run(host, gather, {"mode": "approval"})
    assert res.status == "waiting_approval", res.error
    assert res.pending is not None and res.pending["tool"] == "kv.incr" and res.pending["args"] == {
        "key": "gate", "by": 1}
    assert res.tool_calls == 2  # "a" made, "gate" asked; "b" not yet
    if decide == "approve":
        done = anyio.run(lambda: host.approve(res.agent_id))
    else:
        done = anyio.run(lambda: host.deny(res.agent_id, reason="not today"))
    assert done.status == "completed" and done.output == output, done.error


def test_a_vendored_package_is_bundled_and_runs(host: Host, gather: bundle_mod.Bundle) -> None:
    """``textkit/`` beside agent.py (a package with a subpackage and relative imports) is
    bundled by ``torpor build`` and imported in the image; ``__file__`` is its path there."""
    res = run(host, gather, {"mode": "vendored"})
    assert res.status == "completed", res.error
    assert res.output == {"slug": "creme-brulee-2-portions", "row": "hello-world|ca-va", "version": "1.0",
                          "file": "textkit/__init__.py", "answers": 2}


@pytest.mark.parametrize(("mode", "message"), [
    ("bad_yield", "Task got bad yield: 'waiting for nothing'"),
    ("deadlock", "the agent waits on something nothing will settle (at agent.py:"),
    ("timer", "asyncio timers need a clock"),
])
def test_what_nothing_can_settle_is_a_clear_error(host: Host, gather: bundle_mod.Bundle, mode: str,
                                                  message: str) -> None:
    """A value other than a tool call, a wait on nothing, a timer without a clock: the
    agent fails ``agent_error`` at once, naming the agent's line, never a hang."""
    res = run(host, gather, {"mode": mode})
    assert res.status == "failed" and res.error is not None and res.error["code"] == "agent_error", res
    assert message in res.error["message"], res.error["message"]
    assert "agent.py" in res.error["message"]


def test_only_agents_that_use_asyncio_carry_it(gather: bundle_mod.Bundle, bundles: BundleFactory) -> None:
    """asyncio's frozen code (0.9 MB) is in the image of an agent that names it, not in
    steps-py's."""
    steps = bundles.load(EXAMPLES / "steps-py")
    assert b"asyncio.base_events" in gather.module
    assert b"asyncio.base_events" not in steps.module
    assert len(steps.module) < len(gather.module) - (1 << 20)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "host.cli", *args]


def test_sigkill_with_several_calls_pending_then_resume(host: Host, gather: bundle_mod.Bundle, bundles: BundleFactory,
                                                       tmp_path: Path) -> None:
    """``torpor run`` SIGKILLed while the agent hibernates in a gather of 5 calls (4 of
    them queued in its heap), at a random checkpoint; ``torpor resume --all`` finishes it
    with the exact sums: no call lost, none made twice."""
    bundle = str(bundles.path(AGENT))
    n, width = 100, 5
    payload = json.dumps({"mode": "sum", "n": n, "width": width})
    warm = tmp_path / "warm"
    if not (host.store_dir / "cache").is_dir():
        run(host, gather, {"mode": "sum", "n": 0, "width": 1})
    shutil.copytree(host.store_dir / "cache", warm / "cache")  # compiled once, by the module's host
    subprocess.run(_cli("run", bundle, "--input", json.dumps({"mode": "sum", "n": 0, "width": 1}),
                        "--store", str(warm), "--json"), check=True, capture_output=True, timeout=300)
    rng = random.Random(26)
    killed = 0
    for trial in range(1):  # one kill: the C and JS kill tests do the many
        store = tmp_path / f"s{trial}"
        shutil.copytree(warm / "cache", store / "cache")  # the compiled module: a kill is not a compile
        proc = subprocess.Popen(_cli("run", bundle, "--input", payload, "--store", str(store), "--json"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        target = rng.randint(3, n // 3)
        deadline = time.monotonic() + 120
        while proc.poll() is None and store_entries(store / "db", b"checkpoints") < target and time.monotonic() < deadline:
            time.sleep(0.002)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            killed += 1
        proc.communicate(timeout=60)
        res = subprocess.run(_cli("resume", "--all", "--store", str(store), "--json"), capture_output=True,
                             text=True, timeout=300)
        resumed = json.loads(res.stdout)
        assert len(resumed) == 1, (res.stdout, res.stderr)
        final = resumed[0]
        assert final["status"] == "completed", (trial, final.get("error"))
        assert final["output"] == {"sum": n * (n + 1) // 2, "last": n}, (trial, final["output"])
    assert killed == 1, "the host finished before it could be killed"
