"""MCP servers as capabilities: a real stdio server (tests/mcp_fixture_server.py) through
the mcp SDK; schemas enforced; crashes, hangs and lies turned into structured errors
and restarts.  The policies name the servers; the operator config (OPERATOR) starts them."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tools_helpers import Ctx, invoke, policy, run

from host.tools import mcp, mcp_config
from host.tools.registry import ToolError

SERVER = Path(__file__).parent / "mcp_fixture_server.py"
OPERATOR = mcp_config.EMPTY  # set by operator() for this module: its servers' homes in a temporary directory


def server_toml(name: str = "crm", extra: str = "") -> str:
    return (f'[mcp.{name}]\n'
            f'tools = ["lookup_customer", "pid", "crash", "slow", "fail", "lie_output", "lie_input", "bad_schema", "big", "as_task"]\n'
            f'timeout = "5s"\n{extra}')


def ctx(tool: str, toml: str | None = None, grants: str = "") -> Ctx:
    return Ctx(policy(grants, toml or server_toml()), tool, mcp_config=OPERATOR)


@pytest.fixture(scope="module", autouse=True)
def operator(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """This host's operator config: how to start each server the module's policies name."""
    global OPERATOR
    home = tmp_path_factory.mktemp("mcp-home")
    OPERATOR = mcp_config.parse(
        f'[mcp]\nhome = "{home}"\n'
        f'[mcp.servers.crm]\ncommand = "{sys.executable}"\nargs = ["{SERVER}"]\n'
        f'[mcp.servers.junk]\ncommand = "{sys.executable}"\nargs = ["{SERVER}", "--garbage-after-init"]\n'
        f'[mcp.servers.nope]\ncommand = "/nonexistent/mcp-server"\n'
        f'[mcp.servers.envy]\ncommand = "{sys.executable}"\nargs = ["{SERVER}"]\nenv = {{ CRM_TOKEN = "{{crm_token}}" }}\n'
        f'[mcp.servers.time]\ncommand = "{sys.executable}"\nargs = ["-m", "mcp_server_time", "--local-timezone", "UTC"]\n',
        source=str(home / "torpor.toml"))
    yield OPERATOR
    mcp.shutdown()


def pid(c: Ctx) -> int:
    r = invoke("mcp.crm.pid", {}, c)
    assert not isinstance(r, ToolError), r
    return int(r["structured"]["pid"])


def test_call_and_schema_validation() -> None:
    c = ctx("mcp.crm.lookup_customer")
    r = invoke("mcp.crm.lookup_customer", {"customer_id": "C-42"}, c)
    assert r["structured"] == {"id": "C-42", "name": "Ada Lovelace", "plan": "enterprise", "open_tickets": 2}
    # The tool's text is its structured value's JSON: the guest is told it once, not three times.
    assert r["content"] == [] and r["text"] == ""
    for bad, where in (({"customer_id": 42}, "customer_id"), ({"customer_id": "nope"}, "customer_id"),
                       ({}, "(arguments)"), ({"customer_id": "C-1", "x": 1}, "(arguments)")):
        r = invoke("mcp.crm.lookup_customer", bad, c)
        assert isinstance(r, ToolError) and r.code == "invalid_args" and where in str(r), (bad, r)


def test_tool_errors_are_structured() -> None:
    c = ctx("mcp.crm.fail")
    r = invoke("mcp.crm.fail", {}, c)
    assert isinstance(r, ToolError) and r.code == "tool_failed" and "widget is jammed" in str(r)
    assert r.details["reason_code"] == "tool_error"
    r = invoke("mcp.crm.lookup_customer", {"customer_id": "C-999"}, ctx("mcp.crm.lookup_customer"))
    assert isinstance(r, ToolError) and r.code == "tool_failed" and "no customer C-999" in str(r)


def test_the_server_is_shared_and_reused() -> None:
    c = ctx("mcp.crm.pid")
    assert pid(c) == pid(c)
    assert mcp.SUPERVISOR.running().get("crm", 0) >= 1


def test_crash_mid_call_gives_a_structured_error_and_a_restart() -> None:
    c = ctx("mcp.crm.crash")
    before = pid(ctx("mcp.crm.pid"))
    r = invoke("mcp.crm.crash", {}, c)
    assert isinstance(r, ToolError) and r.code == "unavailable" and r.retryable
    assert r.details["reason_code"] == "server_crashed"
    after = pid(ctx("mcp.crm.pid"))
    assert after != before


def test_a_server_killed_while_idle_is_replaced_before_the_next_call() -> None:
    import os
    import signal
    import time

    before = pid(ctx("mcp.crm.pid"))
    os.kill(before, signal.SIGKILL)
    time.sleep(0.3)
    after = invoke("mcp.crm.pid", {}, ctx("mcp.crm.pid"))
    assert not isinstance(after, ToolError), after
    assert after["structured"]["pid"] != before


def test_hang_times_out_and_restarts() -> None:
    toml = server_toml(extra="").replace('timeout = "5s"', 'timeout = "400ms"')
    before = pid(ctx("mcp.crm.pid", toml))
    r = invoke("mcp.crm.slow", {"seconds": 30}, ctx("mcp.crm.slow", toml))
    assert isinstance(r, ToolError) and r.code == "timeout" and r.retryable
    assert pid(ctx("mcp.crm.pid", toml)) != before
    # the grant's own timeout wins over the server's
    r = invoke("mcp.crm.slow", {"seconds": 0.6}, ctx("mcp.crm.slow", toml, '[tools."mcp.crm.slow"]\ntimeout = "3s"'))
    assert not isinstance(r, ToolError), r


@pytest.mark.parametrize(
    ("tool", "args", "code", "reason"),
    [
        ("lie_output", {}, "tool_failed", "schema_violation"),
        ("lie_input", {"x": 1}, "tool_failed", "schema_mismatch"),
    ],
)
def test_a_server_that_lies_about_its_schema(tool: str, args: dict[str, Any], code: str, reason: str) -> None:
    before = pid(ctx("mcp.crm.pid"))
    r = invoke(f"mcp.crm.{tool}", args, ctx(f"mcp.crm.{tool}"))
    assert isinstance(r, ToolError) and r.code == code and r.details["reason_code"] == reason, r
    assert pid(ctx("mcp.crm.pid")) != before  # restarted: its tools are listed afresh


def test_a_tool_with_an_invalid_schema_is_refused() -> None:
    before = pid(ctx("mcp.crm.pid"))
    r = invoke("mcp.crm.bad_schema", {"x": 1}, ctx("mcp.crm.bad_schema"))
    assert isinstance(r, ToolError) and r.code == "unavailable" and not r.retryable
    assert r.details["reason_code"] == "schema_invalid" and "nonsense" in str(r)
    assert pid(ctx("mcp.crm.pid")) == before  # the other tools keep working, no restart


def test_a_server_that_sends_garbage_or_will_not_start() -> None:
    toml = server_toml("junk")
    r = invoke("mcp.junk.pid", {}, ctx("mcp.junk.pid", toml))
    assert isinstance(r, ToolError) and r.code == "unavailable" and r.details["reason_code"] == "server_start_failed"
    toml = '[mcp.nope]\ntools = ["x"]\n'
    r = invoke("mcp.nope.x", {}, ctx("mcp.nope.x", toml))
    assert isinstance(r, ToolError) and r.code == "unavailable"
    r = invoke("mcp.nope.x", {}, ctx("mcp.nope.x", toml))  # backing off: fails fast, says when to retry
    assert isinstance(r, ToolError) and r.code == "unavailable" and r.details.get("retry_after_s", 0) > 0


def test_a_tool_the_server_does_not_offer() -> None:
    toml = server_toml().replace('"as_task"]', '"as_task", "teleport"]')
    r = invoke("mcp.crm.teleport", {}, ctx("mcp.crm.teleport", toml))
    assert isinstance(r, ToolError) and r.code == "unknown_tool"


def test_list_tools_shows_schemas() -> None:
    p = policy("", server_toml())
    cfg = mcp_config.resolve("crm", p.mcp["crm"], OPERATOR, {})

    async def go() -> list[dict[str, Any]]:
        return await mcp.SUPERVISOR.list_tools(cfg)

    tools = {t["name"]: t for t in run(go)}
    assert tools["lookup_customer"]["input_schema"]["required"] == ["customer_id"]
    assert tools["bad_schema"]["schema_error"] and tools["pid"]["schema_error"] is None


def test_env_credentials_are_filled_host_side() -> None:
    toml = server_toml("envy", extra='credentials = ["crm_token"]\n')
    p = policy("", toml)
    assert p.grants["mcp.envy.pid"].credentials == ("crm_token",)
    cfg = mcp_config.resolve("envy", p.mcp["envy"], OPERATOR, {"crm_token": "s3cret"})
    assert dict(cfg.env) == {"CRM_TOKEN": "s3cret", "PATH": mcp_config.DEFAULT_PATH, "HOME": OPERATOR.home_of("envy")}
    with pytest.raises(ToolError) as info:
        mcp_config.resolve("envy", p.mcp["envy"], OPERATOR, {})
    assert info.value.code == "unavailable" and info.value.details["reason_code"] == "credential_missing"


def test_a_huge_answer_is_cut_at_the_cap_while_it_is_read() -> None:
    """40 MB from the server: refused at 1 MiB, at once, without the host holding it; the
    rest is drained, so the same server answers the next call (no restart)."""
    import resource
    import time

    c = ctx("mcp.crm.big")
    before = pid(ctx("mcp.crm.pid"))
    ok = invoke("mcp.crm.big", {"n": 500_000}, c)
    assert not isinstance(ok, ToolError) and len(ok["text"]) == 500_000
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.monotonic()
    r = invoke("mcp.crm.big", {"n": 40_000_000}, c)
    took = time.monotonic() - t0
    assert isinstance(r, ToolError) and r.code == "result_too_large", r
    assert "cut there, unread" in str(r) and took < 5, took
    grew_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024
    assert grew_mib < 40, f"the host's peak memory grew {grew_mib:.0f} MiB for a refused 40 MB answer"
    assert pid(ctx("mcp.crm.pid")) == before


def test_a_task_only_tool_is_refused_with_its_reason_at_call_and_check_time() -> None:
    import anyio

    from host.tools import mcp_catalog

    r = invoke("mcp.crm.as_task", {}, ctx("mcp.crm.as_task"))
    assert isinstance(r, ToolError) and r.code == "unavailable" and not r.retryable
    assert r.details["reason_code"] == "task_required" and "taskSupport = required" in str(r)
    p = policy("", server_toml())
    listings = anyio.run(mcp_catalog.list_policy_servers, p, {}, OPERATOR)
    issues = [i.message for i in mcp_catalog.grant_issues(p, listings)]
    assert len(issues) == 1 and "as_task" in issues[0] and "task-augmented" in issues[0], issues


def test_the_reference_time_server_from_pypi() -> None:
    """A third-party server (mcp-server-time, a dev dependency): its tools called through the
    host, its structured answers told once, its errors structured, its annotations read."""
    import anyio

    toml = ('[mcp.time]\ntools = ["get_current_time", "convert_time"]\ntimeout = "20s"\nstartup_timeout = "60s"\n'
            'trust_annotations = true\n')
    now = invoke("mcp.time.get_current_time", {"timezone": "Asia/Tokyo"}, ctx("mcp.time.get_current_time", toml))
    assert not isinstance(now, ToolError), now
    assert now["structured"]["timezone"] == "Asia/Tokyo" and now["text"] == "" and now["content"] == []
    conv = invoke("mcp.time.convert_time", {"source_timezone": "UTC", "time": "12:00", "target_timezone": "Asia/Tokyo"},
                  ctx("mcp.time.convert_time", toml))
    assert not isinstance(conv, ToolError) and conv["structured"]["target"]["datetime"].endswith("21:00:00+09:00"), conv
    bad = invoke("mcp.time.get_current_time", {"timezone": "Mars/Olympus"}, ctx("mcp.time.get_current_time", toml))
    assert isinstance(bad, ToolError) and bad.code == "tool_failed" and "Mars/Olympus" in str(bad), bad
    c = ctx("mcp.time.get_current_time", toml)
    assert anyio.run(lambda: mcp.rerun_safe(c.ctx(), tool="mcp.time.get_current_time")) is True
