"""Red team (session 10), bundles and requests over HTTP, against a real uvicorn server on
127.0.0.1 (``torpor serve --mcp``'s application) and the ``mcp`` SDK's own client.

What was found and fixed at its choke point, each kept here as a regression:

* a pushed bundle whose manifest nests 5,000 deep answered ``500`` (a RecursionError out
  of ``json.loads``), and one holding ``NaN`` was stored: the manifest is now read by the
  host's bounded JSON parser (``host.sandbox.bundle.load_bytes``), ``400 invalid_bundle``;
* a pushed bundle's input schema with a backtracking pattern (``^(a|a)*$``) wedged the
  whole server on one MCP call (jsonschema matched it with ``re`` on the event loop,
  hours for 40 characters): every schema the host did not write is now applied through
  ``host.json_schema``, whose patterns run under a time budget;
* a run whose input is a string of 50,000 brackets made its console page answer ``500``
  (``json.loads`` in the console's ``shown``): the console parses it within the host's bounds;
* ``PUT /v1/bundles/{name}/tags/{tag}`` took a 64 MiB JSON body (the push's cap): the
  bundle cap now covers the push alone;
* an MCP server's tool schema 300 levels deep raised RecursionError out of the listing;
* a request naming two ``Mcp-Session-Id`` headers, another client's first, reached that
  client's session (the owner was checked by the last, the SDK routes by the first).

And what held: every agent route, the SSE stream, the long poll, the registry by digest
and the audit check, asked with another tenant's token, answer ``404`` and change nothing.
"""

from __future__ import annotations

import io
import json
import time
import zipfile
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest
from conftest import BundleFactory
from serve_helpers import InProcessServer, auth, token

from host.sandbox import bundle as bundle_mod
from host.server.config import ServerConfig

pytestmark = pytest.mark.timeout(240)

#: A pattern that backtracks exponentially: Python's re takes ~13 s on 24 characters.
BACKTRACKS = "^(a|a)*$"
SLOW_SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "pattern": BACKTRACKS}}}


@pytest.fixture(scope="module")
def served(bundles: BundleFactory, tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    with InProcessServer(tmp_path_factory.mktemp("redteam") / "store", config=ServerConfig(mcp=True)) as srv:
        hello = bundle_mod.load(bundles.example("hello"))
        srv.host.registry.push(hello.raw, tenant="acme")
        srv.host.registry.push(bundle_mod.pack(hello.module, hello.policy_text, input_schema=SLOW_SCHEMA),
                               name="slow-hello", tenant="acme")
        yield srv


def _rezip(raw: bytes, manifest: bytes) -> bytes:
    """``raw``'s members with ``manifest`` in place of its manifest (what an attacker uploads)."""
    src = zipfile.ZipFile(io.BytesIO(raw))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name in src.namelist():
            z.writestr(name, manifest if name == bundle_mod.MANIFEST_MEMBER else src.read(name))
    return out.getvalue()


def test_a_pathological_manifest_pushed_over_http_is_invalid_bundle(served: InProcessServer,
                                                                   bundles: BundleFactory) -> None:
    raw = bundles.example("hello").read_bytes()
    manifest = json.loads(zipfile.ZipFile(io.BytesIO(raw)).read(bundle_mod.MANIFEST_MEMBER))
    text = json.dumps({**manifest, "x": "HOLE"})
    evil = {
        "deep_member": text.replace('"HOLE"', "[" * 5000 + "]" * 5000),
        "deep_schema": json.dumps({**manifest, "input_schema": "HOLE"}).replace(
            '"HOLE"', '{"type":"object","properties":{"a":' * 3000 + "{}" + "}}" * 3000),
        "nan": text.replace('"HOLE"', "NaN"),
        "lone_surrogate": text.replace('"HOLE"', '"\\udfff"'),
    }
    push = auth(token(served.host.store, "acme", "registry:write", "runs:read"))
    with httpx.Client(base_url=served.url, timeout=60) as c:
        for case, body in evil.items():
            r = c.post("/v1/bundles", params={"name": "evil"}, headers={**push, "Content-Type": "application/zip"},
                       content=_rezip(raw, body.encode()))
            assert r.status_code == 400, (case, r.status_code, r.text)
            assert r.json()["error"]["code"] == "invalid_bundle" and "manifest" in r.json()["error"]["message"], case
        assert "evil" not in {b["name"] for b in c.get("/v1/bundles", headers=push).json()["bundles"]}
        assert c.get("/healthz").status_code == 200


async def _call(url: str, secret: str, tool: str, args: dict[str, Any]) -> Any:
    import httpx2
    from mcp import ClientSession, MCPError
    from mcp.client.streamable_http import streamable_http_client

    async with (
        httpx2.AsyncClient(headers=auth(secret), timeout=httpx2.Timeout(30, read=60)) as http,
        streamable_http_client(url + "/mcp", http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        try:
            return await session.call_tool(tool, args)
        except MCPError as exc:  # a refused call: JSON-RPC invalid params, its message
            return exc


def test_a_backtracking_input_schema_is_refused_in_bounded_time_not_a_wedge(served: InProcessServer) -> None:
    """The tenant pushed the schema; its MCP caller sends 40 characters. Before the fix the
    server's event loop spent hours in ``re`` (every tenant wedged); now the call is refused
    within the pattern budget, naming the schema, and the next call runs."""
    caller = token(served.host.store, "acme", "runs:write", "runs:read")
    t0 = time.monotonic()
    slow = anyio.run(_call, served.url, caller, "slow-hello", {"name": "a" * 40 + "!"})
    took = time.monotonic() - t0
    assert "the input schema cannot be applied" in str(slow) and BACKTRACKS in str(slow), slow
    assert took < 20, took  # generous for a loaded machine; the unfixed server never answers
    fine = anyio.run(_call, served.url, caller, "slow-hello", {"name": "aaaa"})
    assert not fine.is_error and fine.structured_content is not None, fine
    assert anyio.run(_call, served.url, caller, "hello", {"name": "ada"}).is_error is False


def test_schema_patterns_run_under_one_budget_everywhere() -> None:
    """The choke point itself, for the three kinds of untrusted schema: a bundle's input
    schema, an MCP server's tool schema, a server's elicitation schema."""
    from host.errors import InvalidInput
    from host.runtime.approvals import check_answer
    from host.tools import mcp as mcp_tool

    value = {"name": "a" * 40 + "!"}
    t0 = time.monotonic()
    problem = bundle_mod.input_problem(SLOW_SCHEMA, value)
    assert problem is not None and "took more than" in problem
    errors = mcp_tool._schema_errors(mcp_tool._compile(SLOW_SCHEMA), value)
    assert errors and "took more than" in errors[0]
    with pytest.raises(InvalidInput, match="cannot check an answer"):
        check_answer("a1", {"server": "s", "requested_schema": SLOW_SCHEMA}, value)
    # patternProperties and additionalProperties match keys with the same engine
    keys = {"type": "object", "patternProperties": {BACKTRACKS: {}}, "additionalProperties": False}
    assert "took more than" in str(bundle_mod.input_problem(keys, {"a" * 40 + "!": 1}))
    assert time.monotonic() - t0 < 30
    # and a sound pattern still decides as re would
    assert bundle_mod.input_problem(SLOW_SCHEMA, {"name": "aaaa"}) is None
    assert "does not match" in str(bundle_mod.input_problem(SLOW_SCHEMA, {"name": "ab"}))


def test_another_tenants_token_reaches_nothing_through_any_route(served: InProcessServer) -> None:
    acme = auth(token(served.host.store, "acme", "admin"))
    globex = auth(token(served.host.store, "globex", "runs:read", "runs:write", "approvals:write",
                        "registry:write"))
    digest = served.host.registry.resolve("hello", tenant="acme")
    with httpx.Client(base_url=served.url, timeout=60) as c:
        r = c.post("/v1/runs", headers={**acme, "Idempotency-Key": "same"}, json={"agent": "hello", "wait": 30,
                                                                                "input": {"name": "ada"}})
        assert r.status_code == 201, r.text
        aid = r.json()["agent_id"]
        before = c.get(f"/v1/agents/{aid}", headers=acme).json()
        for method, path, body in [
            ("GET", f"/v1/agents/{aid}", None), ("GET", f"/v1/agents/{aid}/inspect", None),
            ("GET", f"/v1/agents/{aid}/wait?timeout=0", None), ("GET", f"/v1/agents/{aid}/logs", None),
            ("GET", f"/v1/agents/{aid}/audit", None), ("GET", f"/v1/agents/{aid}/audit/verify", None),
            ("GET", f"/v1/audit/verify?agent={aid}", None), ("GET", f"/v1/agents/{aid}/events", None),
            ("POST", f"/v1/agents/{aid}/approve", {}), ("POST", f"/v1/agents/{aid}/deny", {"reason": "x"}),
            ("POST", f"/v1/agents/{aid}/resume", {}), ("POST", f"/v1/agents/{aid}/fork", {"at": 0}),
            ("POST", f"/v1/agents/{aid}/resolve", {"outcome": "failed"}),
        ]:
            r = c.request(method, path, headers={**globex, "Last-Event-ID": "0"}, json=body)
            assert r.status_code == 404 and r.json()["error"]["code"] == "agent_not_found", (method, path, r.text)
        for ref in (f"sha256:{digest}", "hello", f"hello@sha256:{digest}"):
            r = c.post("/v1/runs", headers=globex, json={"agent": ref})
            assert r.status_code == 404 and r.json()["error"]["code"] == "bundle_not_found", (ref, r.text)
        r = c.get("/v1/bundles/diff", headers=globex, params={"a": f"sha256:{digest}", "b": f"sha256:{digest}"})
        assert r.status_code == 404, r.text
        r = c.put("/v1/bundles/hello/tags/prod", headers=globex, json={"digest": f"sha256:{digest}"})
        assert r.status_code == 404, r.text
        # the same Idempotency-Key in another tenant: its own request (here refused: no such agent)
        r = c.post("/v1/runs", headers={**globex, "Idempotency-Key": "same"}, json={"agent": "hello"})
        assert r.status_code == 404
        assert c.get("/v1/agents", headers=globex).json() == {"agents": []}
        assert c.get("/v1/approvals", headers=globex).json() == {"approvals": []}
        after = c.get(f"/v1/agents/{aid}", headers=acme).json()
        assert after["status"] == before["status"] == "completed" and after["output"] == before["output"]


def test_every_json_route_is_capped_at_the_body_cap(served: InProcessServer) -> None:
    """The bundle cap (64 MiB) is the push's alone: a tag move's JSON body was taken up to it."""
    admin = auth(token(served.host.store, "acme", "admin"))
    cap = ServerConfig().max_body_bytes
    big = json.dumps({"digest": "sha256:" + "0" * 64, "pad": "x" * (cap + 1)})
    with httpx.Client(base_url=served.url, timeout=60) as c:
        for method, path in [("PUT", "/v1/bundles/hello/tags/prod"), ("POST", "/v1/runs"),
                             ("POST", "/v1/agents/x/approve"), ("POST", "/v1/agents/x/fork"), ("POST", "/mcp")]:
            r = c.request(method, path, headers={**admin, "Content-Type": "application/json"}, content=big)
            assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large", (method, path, r.text)


def test_a_pushed_bundle_carrying_python_runs_none_of_it(served: InProcessServer, bundles: BundleFactory,
                                                         tmp_path: Any) -> None:
    """A tenant pushes a bundle whose policy names a handler in its own ``tools/*.py``, which
    would write a marker when imported: the push is stored (the operator may trust it by
    digest), but a run over HTTP or MCP is refused ``bundle_code_refused`` and nothing of
    it is imported into the server, also by listing it as an MCP tool."""
    from conftest import GUESTS

    marker = tmp_path / "imported.txt"
    source = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('imported')\n\ndef echo(args, ctx):\n    return {{}}\n"
    policy = '[agent]\nname = "coded"\n[tools."echo"]\nhandler = "coded_tools:echo"\n'
    raw = bundle_mod.pack(bundles.load(GUESTS / "caller").module, policy, python={"coded_tools": source})
    admin = auth(token(served.host.store, "acme", "admin"))
    with httpx.Client(base_url=served.url, timeout=60) as c:
        r = c.post("/v1/bundles", params={"name": "coded"}, headers={**admin, "Content-Type": "application/zip"},
                   content=raw)
        assert r.status_code == 201 and r.json()["host_code"], r.text
        r = c.post("/v1/runs", headers=admin, json={"agent": "coded", "wait": 30,
                                                   "input": {"calls": [{"tool": "echo", "args": {}}]}})
        assert r.status_code >= 400 and r.json()["error"]["code"] == "bundle_code_refused", r.text
        assert "coded" not in {a["name"] for a in c.get("/v1/agents", headers=admin).json()["agents"]}
    called = anyio.run(_call, served.url, admin.get("Authorization", "").removeprefix("Bearer "), "coded", {})
    assert "bundle_code_refused" in str(called), called
    assert not marker.exists()  # nothing of the bundle's Python ran in the server


def test_a_schema_nested_past_the_stack_is_a_schema_error_not_a_recursion_error() -> None:
    """An MCP server's tool listing (its answers are untrusted) with a schema 300 levels deep
    raised RecursionError out of the listing; now the tool carries a schema error."""
    from host.tools.mcp import ToolInfo

    deep: dict[str, Any] = {}
    for _ in range(300):
        deep = {"type": "object", "properties": {"a": deep}}
    info = ToolInfo.from_listing({"name": "deep", "inputSchema": deep})
    assert info.schema_error is not None and "nested too deeply" in info.schema_error
    with pytest.raises(Exception, match="nested too deeply"):
        bundle_mod.check_input_schema(deep, "manifest")


def test_a_second_mcp_session_header_does_not_borrow_another_clients_session(served: InProcessServer) -> None:
    """The endpoint kept each MCP session to the token that opened it by the *last*
    Mcp-Session-Id header, while the SDK routes by the *first*: another tenant sending the
    victim's id then its own reached the victim's session (its questions, its answers).
    Now a request with more than one is refused as an unknown session."""
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
    accept = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}

    def open_session(c: httpx.Client, who: dict[str, str]) -> str:
        r = c.post("/mcp", headers={**who, **accept}, json=init)
        assert r.status_code == 200, r.text
        return r.headers["mcp-session-id"]

    victim = auth(token(served.host.store, "acme", "runs:read", "runs:write"))
    other = auth(token(served.host.store, "globex", "runs:read", "runs:write"))
    ping = json.dumps({"jsonrpc": "2.0", "id": 2, "method": "ping"})
    with httpx.Client(base_url=served.url, timeout=60) as c:
        theirs, mine = open_session(c, victim), open_session(c, other)
        for sids in ([theirs], [theirs, mine], [mine, theirs], [mine, mine]):
            headers = [*other.items(), *accept.items(), *(("mcp-session-id", s) for s in sids)]
            r = c.post("/mcp", headers=headers, content=ping)
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (sids, r.status_code, r.text)
        r = c.post("/mcp", headers=[*other.items(), *accept.items(), ("mcp-session-id", mine)], content=ping)
        assert r.status_code == 200, r.text  # its own session, named once, works


def test_a_console_page_shows_a_string_of_deep_json_as_text(served: InProcessServer) -> None:
    """The console shows a string that holds JSON indented, parsed with json.loads: an
    input (or output, or answer) that is a string of 50,000 brackets raised RecursionError
    and the agent's page answered 500. Now it is parsed within the host's bounds, and shown
    as the text it is."""
    from test_console import login

    secret = token(served.host.store, "acme", "admin")
    deep = "[" * 50_000 + "]" * 50_000
    with httpx.Client(base_url=served.url, timeout=60) as api:
        r = api.post("/v1/runs", headers=auth(secret), json={"agent": "hello", "input": deep, "wait": 30})
        assert r.status_code == 201, r.text
        aid = r.json()["agent_id"]
    with login(served, secret) as c:
        page = c.get(f"/console/agents/{aid}")
        assert page.status_code == 200, page.text[-2000:]
        assert "[[[[[[[[" in page.text
