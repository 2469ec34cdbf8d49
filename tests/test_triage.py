"""The support-triage example, end to end: a C agent compiled to wasm, an OpenAI-compatible
LLM and a CRM on 127.0.0.1, an MCP server, a human approval, the token budget and the
audit log — through the embeddable Host and through the README's CLI commands. The main
paths run against the TypeScript and Python ports (guest_sdk/examples/triage-ts/, triage-py/) too."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from host.errors import McpServerNotConfigured
from host.runtime import Host
from host.sandbox import bundle as bundle_mod
from host.tools import mcp, mcp_config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "guest_sdk" / "examples" / "triage"
#: The agent in C and its TypeScript and Python ports: (directory, source file).
PORTS = {"c": (EXAMPLE, "agent.c"), "ts": (ROOT / "guest_sdk" / "examples" / "triage-ts", "agent.ts"),
         "py": (ROOT / "guest_sdk" / "examples" / "triage-py", "agent.py")}
MCP_SERVER = Path(__file__).parent / "mcp_fixture_server.py"
CRM_TOKEN = "crm-live-token-5f3a9c1e77"

TICKET = {
    "id": "T-1001",
    "customer_id": "C-42",
    "subject": "Charged twice",
    "body": "My card was charged twice for the March invoice. Please fix this ASAP.",
}


def _services_module() -> Any:
    spec = importlib.util.spec_from_file_location("triage_fake_services", EXAMPLE / "services" / "fake_services.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


fake = _services_module()


@pytest.fixture
def services() -> Iterator[Any]:
    with fake.Services(0, 0, lifetime=120) as s:
        yield s


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A compile cache the tests' stores share: a port's module (the Python one takes ~9 s
    of Cranelift) is compiled once in this module, not once per test."""
    return tmp_path_factory.mktemp("compiled")


@pytest.fixture(autouse=True)
def _shared_compile_cache(compiled: Path, tmp_path: Path) -> Iterator[None]:
    cache = tmp_path / "store" / "cache"
    shutil.copytree(compiled, cache, dirs_exist_ok=True)
    yield
    if cache.is_dir():
        shutil.copytree(cache, compiled, dirs_exist_ok=True)


@pytest.fixture(scope="module", autouse=True)
def stop_mcp() -> Iterator[None]:
    yield
    mcp.shutdown()


class Broker:
    """A credential broker holding one CRM token (the host's side only)."""

    def __init__(self) -> None:
        self.leased: list[tuple[str, tuple[str, ...]]] = []

    def check(self, agent_id: str, policy: Any) -> None:
        pass

    def secrets_for(self, agent_id: str, tool: str, names: tuple[str, ...], **_: Any) -> dict[str, str]:
        self.leased.append((tool, names))
        return {n: CRM_TOKEN for n in names if n == "crm_token"}

    def revoke(self, agent_id: str) -> list[str]:
        return []


def agent_dir(tmp_path: Path, s: Any, *, replace: dict[str, str] | None = None, extra: str = "",
              port: str = "c") -> Path:
    """The example (or its TypeScript port) with the services' real ports (and any policy changes)."""
    src_dir, src = PORTS[port]
    d = tmp_path / "triage"
    d.mkdir(exist_ok=True)
    shutil.copy(src_dir / src, d / src)
    text = (src_dir / "policy.toml").read_text()
    text = text.replace("127.0.0.1:8400", f"127.0.0.1:{s.llm_port}").replace("127.0.0.1:8401", f"127.0.0.1:{s.crm_port}")
    for old, new in (replace or {}).items():
        assert old in text, old
        text = text.replace(old, new)
    (d / "policy.toml").write_text(text + "\n" + extra)
    return d


def build(d: Path) -> Any:
    return bundle_mod.load_bytes(bundle_mod.build_dir(d), source=str(d))


def payload(s: Any, **extra: Any) -> dict[str, Any]:
    return {"ticket": TICKET, "crm": f"http://127.0.0.1:{s.crm_port}", **extra}


@pytest.mark.parametrize("port", list(PORTS))
def test_triage_end_to_end(tmp_path: Path, services: Any, port: str) -> None:
    """Classify, look up (with an injected credential), count, draft, park for approval, send."""
    crm_auth = ('methods = ["GET"]\n', 'methods = ["GET"]\nheaders = { Authorization = "Bearer {crm_token}" }\n'
                'credentials = ["crm_token"]\n')
    b = build(agent_dir(tmp_path, services, replace=dict([crm_auth]), port=port))
    broker = Broker()

    async def go() -> None:
        with Host(tmp_path / "store", broker=broker) as host:
            r = await host.run(b, payload(services))
            assert r.status == "waiting_approval", (r.error, r.logs)
            assert r.pending is not None and r.pending["tool"] == "http.send_reply"
            # Nothing was sent yet; a human sees exactly what would be.
            assert services.replies == []
            [req] = host.approvals()
            assert req["agent_id"] == r.agent_id and req["rule"] == 'tools."http.send_reply".approval'
            draft = req["call"]["args"]["json"]["body"]
            assert draft.startswith("Dear Ada Lovelace")

            done = await host.approve(r.agent_id, by="lead@example.com")
            assert done.status == "completed", (done.error, done.logs)
            out = done.output
            assert out["category"] == "billing" and out["priority"] == "high" and out["sent"] is True
            assert out["reply_id"] == "R-1" and out["customer"]["plan"] == "enterprise" and out["draft"] == draft
            assert out["category_count"] == 1
            assert services.replies == [{"reply_id": "R-1", "ticket": "T-1001", "status": "sent", "to": "C-42",
                                         "body": draft}]

            # Token usage: the agent's own sum, the LLM's bill, the host's record and the audit log agree.
            info = host.inspect(r.agent_id)
            assert info["usage"]["tokens"] == services.tokens == out["tokens"] > 0
            assert info["usage"]["calls_by_tool"]["llm.chat"] == 2
            audit = host.audit_records(r.agent_id)
            used = [a for a in audit if a["kind"] == "tokens.used"]
            assert [u["tool"] for u in used] == ["llm.chat", "llm.chat"]
            assert sum(u["tokens"] for u in used) == services.tokens
            assert used[-1]["total"] == services.tokens
            kinds = [a["kind"] for a in audit]
            assert "tool.approval_requested" in kinds and "approval.granted" in kinds and kinds[-1] != "agent.failed"

            # The credential went to the CRM and nowhere else.
            lookups = [h for m, p, h in services.crm_requests if m == "GET"]
            assert lookups[0]["Authorization"] == f"Bearer {CRM_TOKEN}"
            assert ("http.fetch", ("crm_token",)) in broker.leased
            assert CRM_TOKEN not in json.dumps(out) and CRM_TOKEN not in json.dumps(audit)
            journal_and_state = b"".join(p.read_bytes() for p in (tmp_path / "store").rglob("*") if p.is_file())
            assert CRM_TOKEN.encode() not in journal_and_state

    anyio.run(go)


@pytest.mark.parametrize("port", list(PORTS))
def test_denied_send_and_shared_counter(tmp_path: Path, services: Any, port: str) -> None:
    b = build(agent_dir(tmp_path, services, port=port))

    async def go() -> None:
        with Host(tmp_path / "store") as host:
            first = await host.run(b, payload(services))
            out = (await host.deny(first.agent_id, reason="tone is off", by="lead")).output
            assert out["sent"] is False and out["not_sent"]["code"] == "denied" and "tone is off" in out["not_sent"]["message"]
            assert services.replies == []
            second = await host.run(b, payload(services))  # another agent, the same shared namespace
            out2 = (await host.approve(second.agent_id)).output
            assert out["category_count"] == 1 and out2["category_count"] == 2 and out2["sent"] is True

    anyio.run(go)


def test_triage_through_an_mcp_server(tmp_path: Path, services: Any) -> None:
    d = agent_dir(tmp_path, services, extra='[mcp.crm]\ntools = ["lookup_customer"]\ntimeout = "10s"\n')
    b = build(d)
    # The policy names the server; the host's operator config starts it (as the example's README shows).
    operator = mcp_config.parse(f'[mcp]\nhome = "{tmp_path / "homes"}"\n'
                                f'[mcp.servers.crm]\ncommand = "{sys.executable}"\nargs = ["{MCP_SERVER}"]\n')

    async def go() -> None:
        with Host(tmp_path / "refusing") as host, pytest.raises(McpServerNotConfigured, match=r"mcp\.servers\.crm"):
            await host.run(b, payload(services, lookup="mcp"))
        with Host(tmp_path / "store", operator_config=operator) as host:
            r = await host.run(b, payload(services, lookup="mcp"))
            assert r.status == "waiting_approval", (r.error, r.logs)
            done = await host.approve(r.agent_id)
            assert done.output["customer"] == {"id": "C-42", "name": "Ada Lovelace", "plan": "enterprise",
                                               "open_tickets": 2}
            assert [m for m, _, _ in services.crm_requests] == ["POST"]  # no HTTP lookup happened
            calls = host.inspect(r.agent_id)["usage"]["calls_by_tool"]
            assert calls["mcp.crm.lookup_customer"] == 1

    anyio.run(go)


def test_token_budget_stops_the_agent(tmp_path: Path, services: Any) -> None:
    b = build(agent_dir(tmp_path, services, replace={"tokens = 20_000": "tokens = 100"}))

    async def go() -> None:
        with Host(tmp_path / "store") as host:
            r = await host.run(b, payload(services))
            assert r.status == "terminated" and r.error is not None and r.error["code"] == "budget_exceeded"
            assert r.error["rule"] == "budgets.tokens"
            kinds = [a["kind"] for a in host.audit_records(r.agent_id)]
            assert "budget.warning" in kinds and "budget.exceeded" in kinds
            assert services.replies == []

    anyio.run(go)


def test_llm_outage_is_a_clean_failure(tmp_path: Path, services: Any) -> None:
    from loopback import free_port

    port = free_port()
    b = build(agent_dir(tmp_path, services, replace={f"127.0.0.1:{services.llm_port}": f"127.0.0.1:{port}",
                                                     "retries = 2": "retries = 0"}))

    async def go() -> None:
        with Host(tmp_path / "store") as host:
            r = await host.run(b, payload(services))
            assert r.status == "failed" and r.error is not None and r.error["code"] == "agent_error"
            assert any("unavailable" in line["message"] for line in r.logs)
            assert host.inspect(r.agent_id)["usage"]["tokens"] == 0

    anyio.run(go)


def test_readme_commands(tmp_path: Path, services: Any) -> None:
    """The CLI path of the example's README: build, run, approvals, approve, inspect, audit."""
    d = agent_dir(tmp_path, services)
    env = {**os.environ, "TORPOR_STORE": str(tmp_path / "cli-store")}
    (tmp_path / "ticket.json").write_text(json.dumps(payload(services)))

    def torpor(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "host.cli", *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=120)

    assert torpor("build", str(d), "-o", str(tmp_path / "triage.torpor")).returncode == 0
    run = torpor("run", str(tmp_path / "triage.torpor"), "--input", f"@{tmp_path / 'ticket.json'}", "--json")
    res = json.loads(run.stdout)
    assert res["status"] == "waiting_approval" and res["tokens"] > 0, run.stderr
    pending = json.loads(torpor("approvals", "--json").stdout)
    assert pending[0]["call"]["tool"] == "http.send_reply"
    done = json.loads(torpor("approve", res["agent_id"], "--json").stdout)
    assert done["status"] == "completed" and done["output"]["sent"] is True
    info = json.loads(torpor("inspect", res["agent_id"], "--json").stdout)
    assert info["usage"]["tokens"] == services.tokens
    trace = torpor("audit", "show", res["agent_id"])
    assert trace.returncode == 0 and "tokens.used" in trace.stdout
