"""``torpor serve --mcp``: Torpor agents as MCP tools, called by the ``mcp`` SDK's own client
over streamable HTTP against a real uvicorn server on 127.0.0.1, behind the gateway.

The procurement agent parks for approval above 50,000: the MCP call stays open with
progress saying so, someone approves over the API, and the client receives the output.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from conftest import BundleFactory
from serve_helpers import InProcessServer, auth, token

from host.runtime import Host
from host.sandbox import bundle as bundle_mod
from host.server.config import ServerConfig

BIG = {"item": "laptops", "amount": 75000}
STRICT = {"type": "object", "properties": {"name": {"type": "string", "minLength": 1}}, "required": ["name"],
          "additionalProperties": False}


@pytest.fixture(scope="module")
def served(bundles: BundleFactory, tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    store = tmp_path_factory.mktemp("mcp-serve") / "store"
    with Host(store) as host:
        for name in ("procurement", "hello"):
            host.registry.push(bundle_mod.load(bundles.example(name)).raw, tenant="acme")
        host.registry.push(bundle_mod.load(bundles.example("hello")).raw, name="other-hello", tenant="globex")
        hello = bundle_mod.load(bundles.example("hello"))
        host.registry.push(bundle_mod.pack(hello.module, hello.policy_text, input_schema=STRICT), name="strict-hello",
                           tenant="initech")
    with InProcessServer(store, config=ServerConfig(mcp=True)) as srv:
        yield srv


async def _session(url: str, secret: str, work: Any, **session_kw: Any) -> Any:
    import httpx2
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    async with (
        httpx2.AsyncClient(headers=auth(secret), timeout=httpx2.Timeout(30, read=120)) as http,
        streamable_http_client(url + "/mcp", http_client=http) as (read, write),
        ClientSession(read, write, **session_kw) as session,
    ):
        await session.initialize()
        return await work(session)


def test_an_mcp_client_runs_an_agent_that_parks_for_approval(served: InProcessServer) -> None:
    ops = token(served.host.store, "acme", "runs:write", "runs:read", "approvals:write")
    progress: list[str] = []
    approved: list[int] = []

    async def work(session: Any) -> Any:
        listed = await session.list_tools()
        names = sorted(t.name for t in listed.tools)
        assert names == ["hello", "procurement"]  # this tenant's registry, not globex's
        proc = next(t for t in listed.tools if t.name == "procurement")
        assert "Twelve-step purchase workflow" in (proc.description or "")

        async def on_progress(done: float, total: float | None, message: str | None) -> None:
            progress.append(message or "")
            if "waits for a person to approve" in (message or "") and not approved:
                agent = (message or "").split()[1]
                async with httpx.AsyncClient(base_url=served.url, timeout=60) as c:
                    r = await c.post(f"/v1/agents/{agent}/approve", headers=auth(ops), json={"note": "via mcp test"})
                approved.append(r.status_code)

        return await session.call_tool("procurement", BIG, progress_callback=on_progress)

    result = anyio.run(_session, served.url, ops, work)
    assert approved == [200], progress
    assert not result.is_error, result
    assert result.structured_content["status"] == "ordered", result
    assert json.loads(result.content[0].text)["status"] == "ordered"
    agent_id = result.meta["torpor/agent_id"]
    rec = served.host.get_agent(agent_id)
    assert rec["status"] == "completed" and rec.get("tenant") == "acme"
    kinds = [r["kind"] for r in served.host.audit_records(agent_id)]
    assert "tool.approval_requested" in kinds and "approval.granted" in kinds


@pytest.mark.parametrize("approve", [True, False])
def test_a_client_that_can_be_asked_decides_the_approval_itself(served: InProcessServer, approve: bool) -> None:
    """The client declares elicitation: the agent's approval reaches it as an
    ``elicitation/create`` (the call, its arguments, a yes/no schema); its answer is the
    calling token's decision, audited, and the call answers with the agent's output."""
    from mcp import types

    ops = token(served.host.store, "acme", "runs:write", "runs:read", "approvals:write")
    asked: list[Any] = []

    async def on_elicit(context: Any, params: Any) -> Any:
        asked.append(params)
        return types.ElicitResult(action="accept", content={"approve": approve, "note": "from the client"})

    async def work(session: Any) -> Any:
        return await session.call_tool("procurement", BIG)

    result = anyio.run(lambda: _session(served.url, ops, work, elicitation_callback=on_elicit))
    [question] = asked
    assert "waits for a person to approve erp.create_po" in question.message and "75000" in question.message
    assert question.requested_schema["required"] == ["approve"]
    agent_id = result.meta["torpor/agent_id"]
    records = served.host.audit_records(agent_id)
    decided = [r for r in records if r["kind"] in ("approval.granted", "approval.denied")]
    assert [r["kind"] for r in decided] == ["approval.granted" if approve else "approval.denied"]
    assert decided[0]["by"].startswith("token:")
    if approve:
        assert not result.is_error and result.structured_content["status"] == "ordered", result
    else:
        assert served.host.get_agent(agent_id)["status"] in ("completed", "failed")
        assert "ordered" not in json.dumps(result.structured_content or {}), result


def test_an_mcp_session_is_kept_to_the_token_that_opened_it(served: InProcessServer) -> None:
    """Sessions carry the questions put to a client: another token naming one is refused."""
    a = token(served.host.store, "acme", "runs:read")
    b = token(served.host.store, "acme", "runs:read")
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
    accept = {"Accept": "application/json, text/event-stream"}
    with httpx.Client(base_url=served.url, timeout=30) as c:
        r = c.post("/mcp", json=init, headers={**auth(a), **accept})
        assert r.status_code == 200, r.text
        sid = r.headers["mcp-session-id"]
        listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {}}
        stolen = c.post("/mcp", json=listing, headers={**auth(b), **accept, "mcp-session-id": sid,
                                                       "mcp-protocol-version": "2025-06-18"})
        assert stolen.status_code == 404 and stolen.json()["error"]["code"] == "not_found", stolen.text
        mine = c.post("/mcp", json=listing, headers={**auth(a), **accept, "mcp-session-id": sid,
                                                     "mcp-protocol-version": "2025-06-18"})
        assert mine.status_code == 200 and "procurement" in mine.text, mine.text


def test_the_mcp_endpoint_is_behind_the_gateway(served: InProcessServer) -> None:
    reader = token(served.host.store, "acme", "runs:read")
    r = httpx.post(served.url + "/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}},
                   timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthenticated"

    async def work(session: Any) -> Any:
        assert [t.name for t in (await session.list_tools()).tools] == ["hello", "procurement"]
        return await session.call_tool("hello", {"name": "Ada"})

    result = anyio.run(_session, served.url, reader, work)
    assert result.is_error and "error[forbidden]" in result.content[0].text and "runs:write" in result.content[0].text

    other = token(served.host.store, "globex", "runs:write", "runs:read")

    async def other_work(session: Any) -> Any:
        assert [t.name for t in (await session.list_tools()).tools] == ["other-hello"]
        missing = await session.call_tool("procurement", BIG)
        done = await session.call_tool("other-hello", {"name": "Ada"})
        return missing, done

    missing, done = anyio.run(_session, served.url, other, other_work)
    assert missing.is_error and "error[bundle_not_found]" in missing.content[0].text
    assert not done.is_error and done.structured_content, done


def test_torpor_mcp_serve_over_stdio_on_a_local_store(bundles: BundleFactory, tmp_path: Path) -> None:
    """An MCP client starts `torpor mcp serve`; the agent it calls parks for approval; another
    process (`torpor approve`) takes it to its end; the open call answers with the output."""
    import os
    import sys

    from mcp import ClientSession, StdioServerParameters, stdio_client

    root = Path(__file__).resolve().parent.parent
    store = tmp_path / "store"
    with Host(store) as host:
        host.registry.push(bundle_mod.load(bundles.example("procurement")).raw)
    approved: list[str] = []

    async def main() -> Any:
        params = StdioServerParameters(command=sys.executable, args=["-m", "host.cli", "mcp", "serve", "--store",
                                                                     str(store)], cwd=str(root), env=dict(os.environ))
        async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            assert [t.name for t in (await session.list_tools()).tools] == ["procurement"]

            async def on_progress(done: float, total: float | None, message: str | None) -> None:
                if "waits for a person to approve" in (message or "") and not approved:
                    agent = (message or "").split()[1]
                    approved.append(agent)  # the call may answer before this process has exited
                    await anyio.run_process([sys.executable, "-m", "host.cli", "approve", agent, "--store",
                                             str(store), "--json", "--note", "from the MCP test"], cwd=root,
                                            check=False)

            with anyio.fail_after(120):
                return await session.call_tool("procurement", BIG, progress_callback=on_progress)

    result = anyio.run(main)
    assert not result.is_error and result.structured_content["status"] == "ordered", result
    assert approved == [result.meta["torpor/agent_id"]]
    with Host(store) as host:
        granted = [r for r in host.audit_records(approved[0]) if r["kind"] == "approval.granted"]
    assert len(granted) == 1 and granted[0]["note"] == "from the MCP test"


def test_torpor_mcp_serve_asks_a_client_that_can_answer(bundles: BundleFactory, tmp_path: Path) -> None:
    """Over stdio too, a client that declares elicitation is asked: its yes is the approval
    (recorded as the decision of the MCP client of whoever started the process)."""
    import os
    import sys

    from mcp import ClientSession, StdioServerParameters, stdio_client, types

    root = Path(__file__).resolve().parent.parent
    store = tmp_path / "store"
    with Host(store) as host:
        host.registry.push(bundle_mod.load(bundles.example("procurement")).raw)
    asked: list[str] = []

    async def on_elicit(context: Any, params: Any) -> Any:
        asked.append(params.message)
        return types.ElicitResult(action="accept", content={"approve": True, "note": "yes, over stdio"})

    async def main() -> Any:
        params = StdioServerParameters(command=sys.executable, args=["-m", "host.cli", "mcp", "serve", "--store",
                                                                     str(store)], cwd=str(root), env=dict(os.environ))
        async with stdio_client(params) as (read, write), \
                ClientSession(read, write, elicitation_callback=on_elicit) as session:
            await session.initialize()
            with anyio.fail_after(120):
                return await session.call_tool("procurement", BIG)

    result = anyio.run(main)
    assert not result.is_error and result.structured_content["status"] == "ordered", result
    assert len(asked) == 1 and "approve erp.create_po" in asked[0]
    with Host(store) as host:
        [granted] = [r for r in host.audit_records(result.meta["torpor/agent_id"]) if r["kind"] == "approval.granted"]
    assert granted["note"] == "yes, over stdio" and granted["by"].startswith("mcp-client:")


def test_a_call_open_when_the_server_drains_says_so(bundles: BundleFactory, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A draining server answers an open call at once (shutting_down, naming the agent) rather
    than holding the request until it is cut; the agent stays parked for the next process."""
    from host.server import mcp_endpoint

    monkeypatch.setattr(mcp_endpoint, "HEARTBEAT_S", 0.2)
    store = tmp_path / "store"
    with Host(store) as host:
        host.registry.push(bundle_mod.load(bundles.example("procurement")).raw, tenant="acme")
    with InProcessServer(store, config=ServerConfig(mcp=True)) as srv:
        ops = token(srv.host.store, "acme", "runs:write", "runs:read")

        async def work(session: Any) -> Any:
            async def on_progress(done: float, total: float | None, message: str | None) -> None:
                if "waits for a person" in (message or ""):
                    srv.state.scheduler.draining = True  # what SIGTERM sets first (app._Server.handle_exit)

            return await session.call_tool("procurement", BIG, progress_callback=on_progress)

        result = anyio.run(_session, srv.url, ops, work)
        agent_id = result.meta["torpor/agent_id"]
        assert result.is_error and "error[shutting_down]" in result.content[0].text and agent_id in result.content[0].text
        assert srv.host.get_agent(agent_id)["status"] == "waiting_approval"


def test_torpor_serve_keeps_mcp_servers_on_its_own_loop(bundles: BundleFactory, tmp_path: Path) -> None:
    """Agents run by `torpor serve` reach MCP servers from the server's own event loop (no
    supervisor thread, no thread crossed per call), the same server process for every run
    and agent, stopped when the server stops."""
    import os
    import sys
    import threading

    from host.tools import mcp

    fixture = Path(__file__).parent / "mcp_fixture_server.py"
    pol = ('[agent]\nname = "caller"\n[budgets]\nfuel = 500_000_000\nmemory = "32MiB"\nwall_clock = "60s"\n'
           f'[mcp.crm]\ncommand = "{sys.executable}"\nargs = ["{fixture}"]\ntools = ["pid"]\nstartup_timeout = "60s"\n')
    from conftest import GUESTS

    raw = bundle_mod.pack(bundles.load(GUESTS / "caller").module, pol)
    digest = bundle_mod.load_bytes(raw).digest
    store = tmp_path / "store"
    with Host(store) as host:
        host.registry.push(raw, tenant="acme")
    pids = []
    with InProcessServer(store, config=ServerConfig(), trust_bundle_code=[digest]) as srv:
        ops = token(srv.host.store, "acme", "runs:write", "runs:read")
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            for _ in range(2):
                r = c.post("/v1/runs", headers=auth(ops), json={
                    "agent": "caller", "input": {"calls": [{"tool": "mcp.crm.pid", "args": {}}]}, "wait": 60})
                rec = r.json()
                assert rec["status"] == "completed", rec
                pids.append(rec["output"]["results"][0]["value"]["structured"]["pid"])
        assert pids[0] == pids[1]  # one server process for both runs
        assert mcp.SUPERVISOR._thread is None
        assert not [t for t in threading.enumerate() if t.name == "torpor-mcp"]
    with pytest.raises(ProcessLookupError):  # stopped with the server (and reaped)
        for _ in range(100):
            os.kill(pids[0], 0)
            anyio.run(anyio.sleep, 0.05)


def test_an_agents_input_schema_is_its_tools_and_bad_input_is_refused_before_a_run(served: InProcessServer) -> None:
    """The schema built into the bundle is what tools/list offers; a call that does not match
    it is a JSON-RPC error naming the field, and no agent is spawned for it."""
    from mcp import MCPError

    ops = token(served.host.store, "initech", "runs:write", "runs:read")
    before = len(served.host.list_agents())

    async def work(session: Any) -> Any:
        [tool] = (await session.list_tools()).tools
        assert tool.name == "strict-hello" and tool.input_schema == STRICT
        refused = []
        for bad in ({"name": 7}, {}, {"name": "Ada", "extra": 1}):
            with pytest.raises(MCPError) as err:
                await session.call_tool("strict-hello", bad)
            refused.append(err.value)
        return refused, await session.call_tool("strict-hello", {"name": "Ada"})

    refused, done = anyio.run(_session, served.url, ops, work)
    assert [e.code for e in refused] == [-32602] * 3
    assert "name: 7 is not of type 'string'" in refused[0].message, refused[0].message
    assert "'name' is a required property" in refused[1].message
    assert "'extra' was unexpected" in refused[2].message
    assert not done.is_error and "Ada" in done.content[0].text, done
    assert len(served.host.list_agents()) == before + 1  # only the good call ran


def test_an_input_schema_is_checked_when_the_bundle_is_built(bundles: BundleFactory) -> None:
    from host.errors import BundleError

    hello = bundle_mod.load(bundles.example("hello"))
    inline = hello.policy_text.replace("[agent]\n", '[agent]\ninput_schema = { type = "object", required = ["name"] }\n', 1)
    assert bundle_mod.load_bytes(bundle_mod.pack(hello.module, inline)).input_schema == {
        "type": "object", "required": ["name"]}
    with pytest.raises(BundleError, match="not a valid JSON Schema at properties/name/type"):
        bundle_mod.pack(hello.module, hello.policy_text, input_schema={"properties": {"name": {"type": "text"}}})
    with pytest.raises(BundleError, match="keep one"):
        bundle_mod.pack(hello.module, inline, input_schema=STRICT)
