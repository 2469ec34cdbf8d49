"""Torpor as an MCP client of the reference "everything" server from npm (pinned in
tests/everything_server.py), run with Debian's Node over stdio.

What is checked against that real third-party server: roots from the policy, progress that
keeps a long-running operation alive past its timeout (and becomes the agent's events),
sampling answered through the agent's own ``llm.chat`` grant, elicitation as a wait for a
person through the ``torpor`` command line (the question shown by ``torpor run`` and
``torpor approvals``, an answer the schema refuses named, the answer given after every MCP
session was stopped), and a server killed mid-call named ``server_crashed`` at once.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import everything_server
from conftest import GUESTS, BundleFactory
from loopback import Loopback, Reply, Request, chat_completion, json_reply
from tools_helpers import Ctx, invoke, policy

from host.tools import mcp
from host.tools.registry import ToolError

TOOLS = ('["echo", "get-roots-list", "trigger-long-running-operation", "trigger-sampling-request", '
         '"trigger-elicitation-request"]')
HEAD = '[agent]\nname = "everything"\n\n[budgets]\nfuel = 500_000_000\nmemory = "32MiB"\nwall_clock = "60s"\n'


@pytest.fixture(scope="module")
def entry() -> Iterator[Path]:
    if everything_server.node() is None:
        if everything_server.required():
            pytest.fail("node is not installed (Debian's nodejs; .ci/run installs it)")
        pytest.skip("node is not installed (Debian's nodejs)")
    yield everything_server.install()
    mcp.shutdown()


def server(entry: Path, name: str = "ev", extra: str = "", timeout: str = "10s") -> str:
    """The ``[mcp.NAME]`` table that starts the everything server."""
    return (f'[mcp.{name}]\ncommand = "{everything_server.node()}"\nargs = ["{entry}", "stdio"]\ntools = {TOOLS}\n'
            f'timeout = "{timeout}"\nstartup_timeout = "60s"\n{extra}')


def test_roots_and_progress(entry: Path) -> None:
    c = Ctx(policy("", server(entry, extra='roots = ["file:///srv/data", "file:///srv/repo"]\n')),
            "mcp.ev.get-roots-list")
    r = invoke("mcp.ev.get-roots-list", {}, c)
    assert not isinstance(r, ToolError), r
    assert "file:///srv/data" in r["text"] and "file:///srv/repo" in r["text"] and "(2 total)" in r["text"], r

    # 3 s in all, a progress notification every second: never 1.5 s silent, so never cut.
    c = Ctx(policy("", server(entry, timeout="1.5s")), "mcp.ev.trigger-long-running-operation")
    t0 = time.monotonic()
    r = invoke("mcp.ev.trigger-long-running-operation", {"duration": 3, "steps": 3}, c)
    assert not isinstance(r, ToolError), r
    assert "Long running operation completed" in r["text"] and time.monotonic() - t0 >= 2.9
    progress = [d for k, d in c.events if k == "mcp.progress"]
    assert [(p["progress"], p["total"]) for p in progress] == [(1, 3), (2, 3), (3, 3)], c.events


def test_a_server_killed_mid_call_is_named_at_once(entry: Path) -> None:
    """SIGKILL of the node process during a 30 s operation: ``server_crashed`` within seconds,
    and the next call gets a fresh server."""
    c = Ctx(policy("", server(entry, name="fragile", timeout="30s")), "mcp.fragile.trigger-long-running-operation")
    assert invoke("mcp.fragile.echo", {"message": "up"}, Ctx(c.pol, "mcp.fragile.echo"))["text"] == "Echo: up"
    before = set(_node_children(entry))
    assert before, "the server's node process is not a child of this process"
    result: list[Any] = []
    call = threading.Thread(target=lambda: result.append(
        invoke("mcp.fragile.trigger-long-running-operation", {"duration": 30, "steps": 30}, c)))
    t0 = time.monotonic()
    call.start()
    while not any(k == "mcp.progress" for k, _ in c.events):  # the operation is under way
        assert time.monotonic() - t0 < 20
        time.sleep(0.05)
    for pid in before:
        os.kill(pid, signal.SIGKILL)
    call.join(20)
    took = time.monotonic() - t0
    [r] = result
    assert isinstance(r, ToolError) and r.code == "unavailable" and r.details["reason_code"] == "server_crashed", r
    assert took < 15, f"a crash took {took:.1f}s to be named"
    again = invoke("mcp.fragile.echo", {"message": "back"}, Ctx(c.pol, "mcp.fragile.echo"))
    assert again["text"] == "Echo: back" and not set(_node_children(entry)) & before


def _node_children(entry: Path) -> list[int]:
    """Pids of this process's children running the everything server."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (d / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == os.getpid() and str(entry) in (d / "cmdline").read_bytes().decode(errors="replace"):
                out.append(int(d.name))
    return out


def test_sampling_is_the_agents_own_model_call(bundles: BundleFactory, entry: Path, tmp_path: Path) -> None:
    import anyio

    from host.runtime import Host
    from host.sandbox import bundle as bundle_mod

    asked: list[Any] = []

    def reply(r: Request) -> Reply:
        asked.append(r.json)
        return json_reply(chat_completion("a sampled answer", prompt_tokens=9, completion_tokens=4))

    with Loopback({"/v1/chat/completions": reply}) as llm:
        pol = HEAD + f'[tools."llm.chat"]\nbase_url = "{llm.base}/v1"\nmodel = "m"\n\n' + server(
            entry, extra='sampling = "llm.chat"\n')
        b = bundle_mod.load_bytes(bundle_mod.pack(bundles.load(GUESTS / "caller").module, pol))
        calls = [{"tool": "mcp.ev.trigger-sampling-request", "args": {"prompt": "name a colour", "maxTokens": 20}}]
        with Host(tmp_path, trust_bundle_code=[b.digest]) as host:
            res = anyio.run(lambda: host.run(b, {"calls": calls}))
            kinds = [(r["kind"], r.get("tool")) for r in host.audit_records(res.agent_id)]
    assert res.status == "completed", res.error
    [got] = res.output["results"]
    assert got["code"] == "ok" and "a sampled answer" in json.dumps(got["value"]), got
    assert asked and "name a colour" in asked[0]["messages"][-1]["content"]
    assert res.tokens >= 13 and ("tool.nested", "llm.chat") in kinds, kinds


def torpor(*args: str, store: Path) -> tuple[int, str, str]:
    from host.cli.app import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([*args, "--store", str(store)])
    return code, out.getvalue(), err.getvalue()


def test_elicitation_through_the_command_line(bundles: BundleFactory, entry: Path, tmp_path: Path) -> None:
    """`torpor run` parks on the server's question and shows it; `torpor approvals` lists it;
    an answer the requested schema refuses is named; after every MCP session is gone,
    `torpor approve --answer` makes the call again and the server gets the answer."""
    from host.sandbox import bundle as bundle_mod

    raw = bundle_mod.pack(bundles.load(GUESTS / "caller").module, HEAD + server(entry, extra="elicitation = true\n"))
    digest = bundle_mod.load_bytes(raw).digest
    path = tmp_path / "b.torpor"
    path.write_bytes(raw)
    store = tmp_path / "store"
    payload = json.dumps({"calls": [{"tool": "mcp.ev.trigger-elicitation-request", "args": {}}]})
    code, out, err = torpor("run", str(path), "--input", payload, "--trust-bundle-code", digest, store=store)
    assert code == 4, out + err
    assert "ev asks: Please provide inputs for the following fields:" in out and "--answer JSON" in out, out
    agent = out.split()[1].rstrip(":")
    code, out, _ = torpor("approvals", store=store)
    assert code == 0 and f"{agent}" in out and "asks   ev: Please provide inputs" in out and '"required":["name"]' in out
    code, out, err = torpor("approve", agent, "--answer", '{"name": "Ada", "integer": 500}', "--trust-bundle-code", digest,
                            store=store)
    assert code == 2 and "integer: 500 is greater than the maximum of 100" in err, err
    mcp.shutdown()  # the session that asked is gone, as after a restart of the host
    code, out, err = torpor("approve", agent, "--answer", '{"name": "Ada Lovelace", "check": true, "integer": 7}',
                            "--trust-bundle-code", digest, "--json", store=store)
    assert code == 0, out + err
    result = json.loads(out)
    assert result["status"] == "completed"
    text = result["output"]["results"][0]["value"]["text"]
    assert "User provided the requested information" in text and "- Name: Ada Lovelace" in text, text
    assert "- Favorite Integer: 7" in text
