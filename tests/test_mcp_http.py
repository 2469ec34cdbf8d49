"""MCP over streamable HTTP, and the client side of the protocol, against a real server
written with the ``mcp`` SDK and served by uvicorn on 127.0.0.1 (tests/mcp_http_server.py).

What is checked: ``url =`` with headers from the credentials, a remote crash named
``server_crashed`` at once (not a timeout), progress keeping a call alive past its
timeout up to a hard limit, progress and log notifications as the agent's events,
roots from the policy, elicitation and sampling refused with an error that says why where
the policy does not allow them, and an elicitation a person answers while the agent hibernates
(its call cut, made again with the answer, across a restart of the host and its servers).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import GUESTS, BundleFactory
from loopback import Loopback, Reply, Request, chat_completion, json_reply
from tools_helpers import Ctx, invoke, policy

from host.tools import mcp
from host.tools.registry import ToolError

SERVER = Path(__file__).parent / "mcp_http_server.py"
TOOLS = '["lookup", "pid", "crash", "whoami", "progress", "silent", "sample", "elicit", "elicit_twice", "roots", "chatty", "counter", "big"]'


def start_server(*flags: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, str(SERVER), *flags], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("PORT "), line
    return proc, f"http://127.0.0.1:{int(line.split()[1])}/mcp"


def stop_server(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    proc, address = start_server()
    yield address
    mcp.shutdown()
    stop_server(proc)


def ctx(tool: str, address: str, name: str = "remote", extra: str = "", secrets: dict[str, str] | None = None,
        timeout: str = "5s") -> Ctx:
    # A generous startup: the machine running the suite may be loaded, and a slow start is not under test.
    toml = (f'[mcp.{name}]\nurl = "{address}"\ntools = {TOOLS}\ntimeout = "{timeout}"\nstartup_timeout = "60s"\n'
            f'headers = {{ Authorization = "Bearer {{crm_token}}" }}\ncredentials = ["crm_token"]\n{extra}')
    return Ctx(policy("", toml), tool, secrets={"crm_token": "s3cret"} if secrets is None else secrets)


def ok(tool: str, args: dict[str, Any], c: Ctx) -> dict[str, Any]:
    r = invoke(tool, args, c)
    assert not isinstance(r, ToolError), r
    return dict(r)


def test_a_remote_call_carries_the_leased_header_and_its_text_once(url: str) -> None:
    r = ok("mcp.remote.whoami", {}, ctx("mcp.remote.whoami", url))
    assert r["structured"] == {"authorization": "Bearer s3cret"}
    r = ok("mcp.remote.lookup", {"customer_id": "C-1"}, ctx("mcp.remote.lookup", url))
    assert r == {"structured": {"id": "C-1", "name": "Ada Lovelace"}, "text": "", "content": []}
    bad = invoke("mcp.remote.lookup", {"customer_id": 1}, ctx("mcp.remote.lookup", url))
    assert isinstance(bad, ToolError) and bad.code == "invalid_args"


def test_progress_keeps_a_call_alive_and_is_the_agents_event(url: str) -> None:
    c = ctx("mcp.remote.progress", url, timeout="2s")
    t0 = time.monotonic()
    r = ok("mcp.remote.progress", {"steps": 5, "every": 0.6}, c)  # 3 s in all, never 2 s silent
    assert r["structured"] == {"steps": 5} and time.monotonic() - t0 >= 2.9
    progress = [d for k, d in c.events if k == "mcp.progress"]
    assert [p["progress"] for p in progress] == [1, 2, 3, 4, 5]
    assert progress[-1]["message"] == "step 5" and progress[0]["tool"] == "mcp.remote.progress"
    # Silence is still cut at the timeout, and the server is reconnected.
    s = invoke("mcp.remote.silent", {"seconds": 5}, ctx("mcp.remote.silent", url, timeout="2s"))
    assert isinstance(s, ToolError) and s.code == "timeout" and "no progress within 2s" in str(s)


def test_progress_does_not_outlive_the_hard_limit(url: str) -> None:
    c = ctx("mcp.remote.progress", url, timeout="1s", extra='hard_timeout = "2s"')
    t0 = time.monotonic()
    r = invoke("mcp.remote.progress", {"steps": 40, "every": 0.25}, c)  # 10 s if it were let run
    assert isinstance(r, ToolError) and r.code == "timeout", r
    assert r.details["reason_code"] == "hard_timeout" and "hard limit of 2s" in str(r)
    assert time.monotonic() - t0 < 8


def test_log_notifications_roots_elicitation_and_sampling(url: str) -> None:
    c = ctx("mcp.remote.chatty", url)
    assert ok("mcp.remote.chatty", {}, c)["text"] == "done"
    logs = [d for k, d in c.events if k == "mcp.log"]
    assert logs and logs[0]["data"] == "halfway there" and logs[0]["level"] == "info"
    [changed] = [d for k, d in c.events if k == "mcp.notification"]
    assert changed["method"] == "notifications/resources/updated"
    assert changed["params"]["uri"] == "file:///srv/data/report.csv"

    r = ok("mcp.rooted.roots", {}, ctx("mcp.rooted.roots", url, name="rooted",
                                        extra='roots = ["file:///srv/data", "file:///srv/repo"]'))
    assert r["structured"] == {"result": ["file:///srv/data", "file:///srv/repo"]}
    no_roots = invoke("mcp.remote.roots", {}, ctx("mcp.remote.roots", url))
    assert isinstance(no_roots, ToolError) and no_roots.code == "tool_failed"

    c = ctx("mcp.remote.elicit", url)
    e = invoke("mcp.remote.elicit", {}, c)
    assert isinstance(e, ToolError) and "elicitation refused" in str(e), e
    assert "[mcp.remote] elicitation = true" in str(e)
    assert [k for k, _ in c.events] == ["mcp.elicitation_refused"]

    s = invoke("mcp.remote.sample", {"prompt": "hi"}, ctx("mcp.remote.sample", url))
    assert isinstance(s, ToolError) and "sampling refused" in str(s) and "[mcp.remote].sampling" in str(s), s


def test_a_remote_crash_is_named_at_once_and_a_dead_remote_does_not_hang() -> None:
    proc, address = start_server()
    try:
        c = ctx("mcp.fragile.crash", address, name="fragile", timeout="20s")
        before = ok("mcp.fragile.pid", {}, ctx("mcp.fragile.pid", address, name="fragile", timeout="20s"))
        assert before["structured"]["pid"] == proc.pid
        t0 = time.monotonic()
        r = invoke("mcp.fragile.crash", {}, c)
        took = time.monotonic() - t0
        assert isinstance(r, ToolError) and r.code == "unavailable" and r.retryable, r
        assert r.details["reason_code"] == "server_crashed" and address in str(r)
        assert took < 10, f"a remote crash took {took:.1f}s to be named (the timeout is 20s)"
        proc.wait(5)
        t0 = time.monotonic()
        again = invoke("mcp.fragile.pid", {}, ctx("mcp.fragile.pid", address, name="fragile", timeout="20s"))
        assert isinstance(again, ToolError) and again.code == "unavailable", again
        assert again.details["reason_code"] == "server_start_failed" and time.monotonic() - t0 < 10
    finally:
        stop_server(proc)


@pytest.mark.parametrize("toml, says", [
    ('[mcp.s]\ncommand = "x"\nurl = "http://h/mcp"', "at most one of command"),
    ('[mcp.s]\nargs = ["a"]', "they go with command, in the operator config"),
    ('[mcp.s]\nurl = "ftp://h/mcp"', "not an http:// or https:// URL"),
    ('[mcp.s]\nurl = "http://u:p@h/mcp"', "must not carry credentials"),
    ('[mcp.s]\nurl = "http://h/mcp"\nargs = ["a"]', "they go with command, in the operator config"),
    ('[mcp.s]\ncommand = "x"\nheaders = { A = "b" }', "headers are sent to a url server"),
    ('[mcp.s]\nurl = "http://h/mcp"\nheaders = { Authorization = "Bearer {tok}" }', "{tok} names no credential"),
    ('[mcp.s]\nurl = "http://h/mcp"\nheaders = { "X Y" = "b" }', "not an HTTP header name"),
    ('[mcp.s]\nurl = "http://h/mcp"\nroots = ["/srv"]', "name a root of the operator config"),
    ('[mcp.s]\nroots = ["data/../etc"]', "must stay inside it"),
    ('[mcp.s]\nurl = "http://h/mcp"\nsampling = "llm.chat"', "'llm.chat' is not an llm.* tool this policy grants"),
])
def test_the_policy_says_what_is_wrong_with_a_server(toml: str, says: str) -> None:
    from policies import PolicyError

    with pytest.raises(PolicyError) as err:
        policy("", toml)
    assert says in str(err.value), str(err.value)


def test_a_url_server_is_host_code_of_its_bundle() -> None:
    """Where the host connects with the agent's credentials is the bundle's choice, so a
    bundle's url server needs the operator's trust as a command server does."""
    from host.sandbox.bundle import Bundle

    p = policy("", '[mcp.s]\nurl = "https://mcp.example/mcp"\nheaders = { A = "{t}" }\ncredentials = ["t"]')
    b = Bundle(digest="d", name="t", module=b"", module_digest="m", policy_text="", policy=p)
    assert b.mcp_commands == {"mcp.s": ["https://mcp.example/mcp"]}
    assert set(b.host_code) == {"mcp.s"}


HEAD = '[agent]\nname = "sampler"\n\n[budgets]\nfuel = 500_000_000\nmemory = "32MiB"\nwall_clock = "60s"\n'


def test_a_real_agent_answers_sampling_through_its_own_llm_grant(bundles: BundleFactory, url: str,
                                                                   tmp_path: Path) -> None:
    """The server's sampling request is the agent's model call: decided by its policy,
    its tokens counted, audited; progress and log lines land in the agent's audit."""
    import anyio

    from host.runtime import Host
    from host.sandbox import bundle as bundle_mod

    asked: list[Any] = []

    def reply(r: Request) -> Reply:
        asked.append(r.json)
        return json_reply(chat_completion("forty-two", prompt_tokens=11, completion_tokens=3))

    module = bundles.load(GUESTS / "caller").module
    with Loopback({"/v1/chat/completions": reply}) as llm:
        pol = HEAD + (f'[tools."llm.chat"]\nbase_url = "{llm.base}/v1"\nmodel = "m"\n\n'
                      f'[mcp.remote]\nurl = "{url}"\ntools = ["sample", "chatty"]\nsampling = "llm.chat"\n'
                      'startup_timeout = "60s"\n')
        b = bundle_mod.load_bytes(bundle_mod.pack(module, pol))
        calls = [{"tool": "mcp.remote.sample", "args": {"prompt": "the answer?"}},
                 {"tool": "mcp.remote.chatty", "args": {}}]
        with Host(tmp_path, trust_bundle_code=[b.digest]) as host:
            res = anyio.run(lambda: host.run(b, {"calls": calls}))
            records = host.audit_records(res.agent_id)
    kinds = [(r["kind"], r.get("tool")) for r in records]
    assert res.status == "completed", res.error
    results = res.output["results"]
    assert results[0]["code"] == "ok" and results[0]["value"]["text"] == "forty-two", results
    assert asked and asked[0]["messages"][-1] == {"role": "user", "content": "the answer?"}
    assert res.tokens >= 14  # the model call the server asked for was paid by the agent
    assert ("tool.allowed", "llm.chat") in kinds and ("tool.nested", "llm.chat") in kinds, kinds
    assert ("mcp.log", None) in kinds


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def torpor(*args: str, store: Path) -> Ran:
    """The ``torpor`` command line, in this process (its parser, its error handling, its exit
    code), so that the MCP SDK is imported once for the module, not once per command."""
    import contextlib
    import io

    from host.cli.app import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([*args, "--store", str(store)])
    return Ran(code, out.getvalue(), err.getvalue())


def test_torpor_mcp_tools_lists_schemas_and_annotations(url: str, tmp_path: Path) -> None:
    import json

    p = torpor("mcp", "tools", url, "--json", store=tmp_path)
    assert p.returncode == 0, p.stderr
    listing = json.loads(p.stdout)
    tools = {t["name"]: t for t in listing["tools"]}
    assert tools["lookup"]["input_schema"]["required"] == ["customer_id"]
    assert tools["lookup"]["output_schema"]["type"] == "object"
    assert tools["counter"]["annotations"]["readOnlyHint"] is True
    p = torpor("mcp", "tools", url, store=tmp_path)
    assert p.returncode == 0 and "counter  [readOnlyHint]" in p.stdout, p.stdout
    p = torpor("mcp", "tools", "nowhere", store=tmp_path)  # neither a URL nor a server of the operator config
    assert p.returncode == 2 and "error[invalid_config]" in p.stderr and "no MCP server 'nowhere'" in p.stderr


def test_policy_check_connect_finds_a_misspelt_grant(url: str, tmp_path: Path) -> None:
    """The policy itself is valid (the name is listed and granted alike); only the server
    knows there is no such tool."""
    import json

    pol = tmp_path / "policy.toml"
    pol.write_text(f'[agent]\nname = "t"\n\n[mcp.remote]\nurl = "{url}"\ntools = ["lookup", "pidd"]\nstartup_timeout = "60s"\n')
    assert torpor("policy", "check", str(pol), store=tmp_path).returncode == 0
    p = torpor("policy", "check", str(pol), "--connect", store=tmp_path)
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert "the MCP server remote offers no tool 'pidd' — did you mean 'pid'?" in p.stdout, p.stdout
    pol.write_text(f'[agent]\nname = "t"\n\n[mcp.remote]\nurl = "{url}"\ntools = ["lookup", "pid"]\nstartup_timeout = "60s"\n')
    p = torpor("policy", "check", str(pol), "--connect", "--json", store=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    out = json.loads(p.stdout)
    assert out["ok"] is True and out["issues"] == [] and len(out["servers"]["remote"]["tools"]) >= 10
    dead = tmp_path / "dead.toml"
    dead.write_text('[agent]\nname = "t"\n\n[mcp.gone]\nurl = "http://127.0.0.1:9/mcp"\ntools = ["x"]\n')
    p = torpor("policy", "check", str(dead), "--connect", store=tmp_path)
    assert p.returncode == 1 and "mcp.gone: the server could not be asked for its tools" in p.stdout, p.stdout


def test_annotations_count_only_where_the_policy_trusts_them(url: str) -> None:
    import anyio

    async def safe(tool: str, trust: str) -> bool:
        c = ctx(f"mcp.remote.{tool}", url, extra=f"trust_annotations = {trust}")
        return await mcp.rerun_safe(c.ctx(), tool=f"mcp.remote.{tool}")

    assert anyio.run(safe, "counter", "true") is True
    assert anyio.run(safe, "counter", "false") is False
    assert anyio.run(safe, "pid", "true") is False  # no annotation: not safe


@pytest.mark.parametrize("tool, trust, status", [("peek", "true", "completed"), ("charge", "true", "in_doubt")])
def test_a_host_killed_mid_call_reruns_only_what_a_trusted_server_marks_read_only(
        bundles: BundleFactory, url: str, tmp_path: Path, tool: str, trust: str, status: str) -> None:
    """SIGKILL of `torpor run` while an MCP call is in flight; `torpor resume --all` runs the
    call again only when the server marks the tool read-only and the policy trusts its
    annotations; otherwise the agent waits for an operator (in_doubt), the call not repeated."""
    import json
    import os
    import signal

    from host.sandbox import bundle as bundle_mod

    pol = HEAD + (f'[mcp.remote]\nurl = "{url}"\ntools = ["{tool}"]\ntrust_annotations = {trust}\ntimeout = "60s"\n'
                  'startup_timeout = "60s"\n')
    raw = bundle_mod.pack(bundles.load(GUESTS / "caller").module, pol)
    digest = bundle_mod.load_bytes(raw).digest
    path = tmp_path / "b.torpor"
    path.write_bytes(raw)
    marker, store = tmp_path / "marker", tmp_path / "store"
    payload = {"calls": [{"tool": f"mcp.remote.{tool}", "args": {"marker": str(marker), "seconds": 30}}]}
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-m", "host.cli", "run", str(path), "--input", json.dumps(payload),
                             "--store", str(store), "--trust-bundle-code", digest, "--json"], cwd=root,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not marker.exists() or "started" not in marker.read_text():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    res = torpor("resume", "--all", "--trust-bundle-code", digest, "--json", store=store)
    rows = json.loads(res.stdout)
    assert [r["status"] for r in rows] == [status], res.stdout + res.stderr
    runs = marker.read_text().count("started")
    if status == "completed":
        assert runs == 2 and rows[0]["output"]["results"][0]["value"]["structured"] == {"runs": 2}
    else:
        assert runs == 1  # not repeated


def test_a_huge_remote_answer_is_cut_at_the_cap(url: str) -> None:
    """As an event (the SDK's per-event cap) and as one JSON body (our transport's counter)."""
    c = ctx("mcp.remote.big", url)
    r = invoke("mcp.remote.big", {"n": 3_000_000}, c)
    assert isinstance(r, ToolError) and r.code == "result_too_large", r
    assert ok("mcp.remote.pid", {}, ctx("mcp.remote.pid", url))["structured"]["pid"] > 0  # the session lives on
    proc, address = start_server("--json")
    try:
        # About 1 MiB of content reaches the guest, though the server sends it twice (its
        # string as text and wrapped as structuredContent {"result": ...}): told once.
        for where, server in ((url, "remote"), (address, "plain")):
            fine = ok(f"mcp.{server}.big", {"n": 1_000_000}, ctx(f"mcp.{server}.big", where, name=server))
            assert len(fine["text"]) == 1_000_000 and fine["structured"] is None, server
        r = invoke("mcp.plain.big", {"n": 3_000_000}, ctx("mcp.plain.big", address, name="plain"))
        assert isinstance(r, ToolError) and r.code == "result_too_large", r
    finally:
        stop_server(proc)


def test_a_chatty_server_cannot_fill_the_agents_audit(url: str) -> None:
    c = ctx("mcp.remote.progress", url)
    assert ok("mcp.remote.progress", {"steps": 150, "every": 0.001}, c)["structured"] == {"steps": 150}
    kinds = [k for k, _ in c.events]
    assert kinds.count("mcp.progress") == 100 and kinds[-1] == "mcp.events_dropped"
    assert c.events[-1][1]["dropped"] == 50


def test_an_elicitation_is_a_wait_for_a_person_that_survives_a_restart(bundles: BundleFactory, url: str,
                                                                     tmp_path: Path) -> None:
    """The server asks mid-call: the call is cut and the agent parks ``waiting_approval`` with
    the question (its instance dropped).  The host and every MCP session are then stopped; a
    new host takes the person's answer (checked against the schema the server asked for),
    the call is made again, the server's same question is answered from the journal, and
    the agent completes with what the server made of the answer.  A declined one says so."""
    import anyio

    from host.errors import InvalidInput
    from host.runtime import Host
    from host.sandbox import bundle as bundle_mod

    pol = HEAD + (f'[mcp.remote]\nurl = "{url}"\ntools = ["elicit"]\nelicitation = true\nstartup_timeout = "60s"\n')
    b = bundle_mod.load_bytes(bundle_mod.pack(bundles.load(GUESTS / "caller").module, pol))
    calls = {"calls": [{"tool": "mcp.remote.elicit", "args": {}}]}
    with Host(tmp_path, trust_bundle_code=[b.digest]) as host:
        res = anyio.run(lambda: host.run(b, calls))
        declined = anyio.run(lambda: host.run(b, calls))
        assert res.status == "waiting_approval", res.error
        question = res.approval["question"]
        assert question["server"] == "remote" and question["message"] == "What is your name?"
        assert question["requested_schema"]["required"] == ["name"]
        [listed] = [a for a in host.approvals() if a["agent_id"] == res.agent_id]
        assert listed["kind"] == "elicitation" and listed["question"]["message"] == "What is your name?"
        with pytest.raises(InvalidInput, match="name"):  # the field the answer lacks is named
            host.decide_approve(res.agent_id, answer={"nom": "Ada"})
        with pytest.raises(InvalidInput, match="waits for an answer"):
            host.decide_approve(res.agent_id)
        done = anyio.run(lambda: host.deny(declined.agent_id, reason="not telling"))
        assert done.status == "completed", done.error
        assert done.output["results"][0]["value"]["text"] == "decline:"
    mcp.shutdown()  # every session gone: the answer cannot go to the request that asked
    with Host(tmp_path, trust_bundle_code=[b.digest]) as host:
        done = anyio.run(lambda: host.approve(res.agent_id, answer={"name": "Ada"}))
        assert done.status == "completed", done.error
        assert done.output["results"][0] == {**done.output["results"][0], "code": "ok"}
        assert done.output["results"][0]["value"]["text"] == "accept:Ada"
        kinds = [r["kind"] for r in host.audit_records(res.agent_id)]
    assert kinds.count("mcp.elicitation_requested") == 1 and "mcp.elicitation_answered" in kinds, kinds
    assert kinds.index("mcp.elicitation_requested") < kinds.index("approval.granted") < kinds.index(
        "mcp.elicitation_answered"), kinds


def test_a_call_that_asks_twice_waits_twice_and_repeats_no_answer(bundles: BundleFactory, url: str,
                                                                    tmp_path: Path) -> None:
    """The second question comes on the call made again after the first answer: the agent
    parks a second time (its first answer given from the journal), and the third issue of
    the call answers both at once."""
    import anyio

    from host.runtime import Host
    from host.sandbox import bundle as bundle_mod

    pol = HEAD + (f'[mcp.remote]\nurl = "{url}"\ntools = ["elicit_twice"]\nelicitation = true\n'
                  'startup_timeout = "60s"\n')
    b = bundle_mod.load_bytes(bundle_mod.pack(bundles.load(GUESTS / "caller").module, pol))
    with Host(tmp_path, trust_bundle_code=[b.digest]) as host:
        res = anyio.run(lambda: host.run(b, {"calls": [{"tool": "mcp.remote.elicit_twice", "args": {}}]}))
        assert res.approval["question"]["message"] == "What is your name?"
        again = anyio.run(lambda: host.approve(res.agent_id, answer={"name": "Ada"}))
        assert again.status == "waiting_approval" and again.approval["question"]["message"] == "Which colour?"
        assert again.approval["question"]["index"] == 1
        done = anyio.run(lambda: host.approve(res.agent_id, answer={"colour": "teal"}))
        kinds = [r["kind"] for r in host.audit_records(res.agent_id)]
    assert done.status == "completed", done.error
    assert done.output["results"][0]["value"]["text"] == "accept:Ada,accept:teal"
    assert kinds.count("mcp.elicitation_requested") == 2 and kinds.count("mcp.elicitation_answered") == 3, kinds


def test_a_served_agents_question_is_answered_over_the_api_the_console_and_by_an_mcp_client(
        bundles: BundleFactory, url: str, tmp_path: Path) -> None:
    """Under ``torpor serve --mcp``: the approvals API lists the server's question; an answer
    the schema refuses is ``invalid_input`` naming the field; the console shows the question
    with an answer field; a valid answer over the API lets the agent complete.  Then an MCP
    client that declares elicitation calls the same agent through ``/mcp`` and is asked the
    server's question itself; its answer reaches the server and the call gives the output."""
    import re

    import anyio
    import httpx
    from mcp import types
    from serve_helpers import InProcessServer, auth, token
    from test_serve_mcp import _session

    from host.errors import InvalidInput
    from host.sandbox import bundle as bundle_mod
    from host.server.client import Client
    from host.server.config import ServerConfig

    pol = HEAD.replace('name = "sampler"', 'name = "asker"') + (
        f'[mcp.remote]\nurl = "{url}"\ntools = ["elicit"]\nelicitation = true\nstartup_timeout = "60s"\n')
    raw = bundle_mod.pack(bundles.load(GUESTS / "caller").module, pol)
    digest = bundle_mod.load_bytes(raw).digest
    calls = {"calls": [{"tool": "mcp.remote.elicit", "args": {}}]}
    with InProcessServer(tmp_path / "store", config=ServerConfig(mcp=True), trust_bundle_code=[digest]) as srv:
        srv.host.registry.push(raw, tenant="acme")
        ops = token(srv.host.store, "acme", "runs:write", "runs:read", "approvals:write")
        with httpx.Client(base_url=srv.url, timeout=60, headers=auth(ops)) as api:
            r = api.post("/v1/runs", json={"agent": "asker", "input": calls, "wait": 60})
            assert r.status_code == 201 and r.json()["status"] == "waiting_approval", r.text
            aid = r.json()["agent_id"]
            [listed] = api.get("/v1/approvals").json()["approvals"]
            assert listed["kind"] == "elicitation" and listed["question"]["message"] == "What is your name?"
            bad = api.post(f"/v1/agents/{aid}/approve", json={"answer": {"name": 42}})
            assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_input", bad.text
            assert "name: 42 is not of type 'string'" in bad.json()["error"]["message"]
            with Client(srv.url, ops) as client, pytest.raises(InvalidInput, match="'name' is a required property"):
                client.approve(aid, answer={})  # what `torpor --server URL approve --answer '{}'` sends
            with httpx.Client(base_url=srv.url, timeout=60) as browser:
                login = browser.get("/console/login")
                csrf = re.search(r'name="csrf" value="([^"]+)"', login.text)
                assert csrf is not None
                browser.post("/console/login", data={"csrf": csrf.group(1), "token": ops, "next": "/"})
                page = browser.get("/console/approvals")
                assert "remote asks: <strong>What is your name?</strong>" in page.text, page.text
                assert f'id="answer-{aid}"' in page.text and ">Decline<" in page.text
            assert api.post(f"/v1/agents/{aid}/approve", json={"answer": {"name": "Ada"}}).status_code == 200
            done = api.get(f"/v1/agents/{aid}/wait", params={"timeout": 60}).json()
            assert done["status"] == "completed", done
            assert done["output"]["results"][0]["value"]["text"] == "accept:Ada"

        asked: list[Any] = []

        async def on_elicit(context: Any, params: Any) -> Any:
            asked.append(params)
            return types.ElicitResult(action="accept", content={"name": "Grace"})

        async def work(session: Any) -> Any:
            return await session.call_tool("asker", calls)

        result = anyio.run(lambda: _session(srv.url, ops, work, elicitation_callback=on_elicit))
    [question] = asked
    assert question.message.endswith("remote asks: What is your name?") and question.requested_schema["required"] == [
        "name"]
    assert not result.is_error, result
    assert result.structured_content["results"][0]["value"]["text"] == "accept:Grace", result


def test_a_question_that_quotes_the_servers_credential_reaches_no_one(bundles: BundleFactory, url: str,
                                                                      tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Red team (session 10), secrets: a server asks the person a question quoting the
    Authorization header the host sent it (a vault secret). The question is scrubbed before
    it is stored: the approval listed, the audit, every byte of the store hold no part of it."""
    import anyio

    from host.runtime import Host
    from host.sandbox import bundle as bundle_mod
    from host.trust.vault import Vault

    monkeypatch.delenv("TORPOR_VAULT_KEY", raising=False)
    monkeypatch.delenv("TORPOR_VAULT_KEY_FILE", raising=False)
    secret = "crm-" + "7f3a9c" * 6
    Vault(tmp_path).set("crm_token", secret)
    pol = HEAD + (f'[mcp.remote]\nurl = "{url}"\ntools = ["elicit_token"]\nelicitation = true\n'
                  'headers = { Authorization = "Bearer {crm_token}" }\ncredentials = ["crm_token"]\n'
                  'startup_timeout = "60s"\n')
    b = bundle_mod.load_bytes(bundle_mod.pack(bundles.load(GUESTS / "caller").module, pol))
    with Host(tmp_path, trust_bundle_code=[b.digest]) as host:
        res = anyio.run(lambda: host.run(b, {"calls": [{"tool": "mcp.remote.elicit_token", "args": {}}]}))
        assert res.status == "waiting_approval", res.error
        message = res.approval["question"]["message"]
        assert message.startswith("Is Bearer ") and secret not in message, message  # asked, with the key cut out
        listed = [a for a in host.approvals() if a["agent_id"] == res.agent_id]
        records = host.audit_records(res.agent_id)
        assert secret not in repr(listed) + repr(records)
    for f in (f for f in (tmp_path / "db").rglob("*") if f.is_file()):
        assert secret[4:20].encode() not in f.read_bytes(), f  # the store holds no window of it
