"""Portable bundles: a bundle names its MCP servers, the host's operator config (torpor.toml)
says how to start them, and a server's environment is what that config and the policy give
it, nothing else of the host's.

Real parts throughout: the `caller` guest compiled by the project's toolchain, bundles
written to disk and run by `torpor` processes on two "machines" (two directories with their
own operator configs, server copies and roots), the stdio fixture server reporting the
environment it was exec'd with (/proc/self/environ) and the roots the host answers it.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from conftest import GUESTS, BundleFactory

sys.path.insert(0, str(Path(__file__).parent))
from serve_helpers import auth, start_process, token
from tools_helpers import Ctx, invoke, policy

from host.errors import ConfigError
from host.runtime import Host
from host.sandbox import bundle as bundle_mod
from host.tools import mcp, mcp_config
from host.tools.registry import ToolError

SERVER = Path(__file__).parent / "mcp_fixture_server.py"
POLICY = ('[agent]\nname = "caller"\n[budgets]\nfuel = 500_000_000\nmemory = "32MiB"\nwall_clock = "60s"\n'
          '[mcp.crm]\ntools = ["environment", "list_roots", "pid"]\nroots = ["data", "data/reports"]\n'
          'startup_timeout = "60s"\n')
CALLS = {"calls": [{"tool": "mcp.crm.environment", "args": {}}, {"tool": "mcp.crm.list_roots", "args": {}}]}


@pytest.fixture(scope="module", autouse=True)
def stop_servers() -> Any:
    yield
    mcp.shutdown()


@pytest.fixture(scope="module")
def portable(bundles: BundleFactory, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The caller agent with a policy that names the server crm and says nothing of where it is."""
    path = tmp_path_factory.mktemp("bundle") / "caller.torpor"
    path.write_bytes(bundle_mod.pack(bundles.load(GUESTS / "caller").module, POLICY))
    return path


def machine(root: Path, *, relative: bool) -> Path:
    """One host: its copy of the server, its roots, its operator config (paths relative to the
    config's directory, or absolute)."""
    (root / "servers").mkdir(parents=True)
    shutil.copy(SERVER, root / "servers" / "crm.py")
    (root / "data" / "reports").mkdir(parents=True)
    if relative:
        text = (f'[roots]\ndata = "data"\n[mcp]\nhome = "homes"\n'
                f'[mcp.servers.crm]\ncommand = "{sys.executable}"\nargs = ["crm.py"]\ncwd = "servers"\n')
    else:
        text = (f'[roots]\ndata = "{root / "data"}"\n[mcp]\nhome = "{root / "homes"}"\n'
                f'[mcp.servers.crm]\ncommand = "{sys.executable}"\nargs = ["{root / "servers" / "crm.py"}"]\n')
    (root / "torpor.toml").write_text(text)
    return root / "torpor.toml"


def torpor(*args: str, config: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    pre = ["--config", str(config)] if config is not None else []
    return subprocess.run([sys.executable, "-m", "host.cli", *pre, *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=180)


def test_a_bundle_runs_on_any_host_whose_operator_config_names_its_servers(portable: Path, tmp_path: Path) -> None:
    """Built once, run on two machines: each starts the server its own config names, with
    its own roots and HOME; the bundle carries no host code, so no trust is needed; a host
    that does not configure the server refuses the run before the agent starts."""
    host_env = {"TORPOR_TEST_HOST_ONLY": "not for servers", "SHELL": "/bin/zsh"}
    for name, relative in (("a", True), ("b", False)):
        root = tmp_path / name
        config = machine(root, relative=relative)
        p = torpor("run", str(portable), "--store", str(root / "store"), "--input", json.dumps(CALLS), "--json",
                   config=config, env=host_env)
        assert p.returncode == 0, p.stdout + p.stderr
        env_result, roots_result = json.loads(p.stdout)["output"]["results"]
        seen = env_result["value"]["structured"]
        # Nothing of the host's environment: PATH fixed, HOME the server's own directory.
        assert seen["environ"] == {"PATH": mcp_config.DEFAULT_PATH, "HOME": str(root / "homes" / "crm")}, seen
        assert stat.S_IMODE((root / "homes" / "crm").stat().st_mode) == 0o700
        assert Path(seen["cwd"]) == (root / "servers" if relative else Path.cwd())
        uris = [r["uri"] for r in roots_result["value"]["structured"]["roots"]]
        assert uris == [(root / "data").as_uri(), (root / "data" / "reports").as_uri()]
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    store = tmp_path / "c-store"
    p = torpor("run", str(portable), "--store", str(store), "--input", json.dumps(CALLS), config=empty)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "error[mcp_server_not_configured]" in p.stderr and "[mcp.servers.crm]" in p.stderr, p.stderr
    assert str(empty) in p.stderr  # it says which config it read
    ps = torpor("ps", "--store", str(store), "--json")
    assert ps.returncode == 0 and json.loads(ps.stdout) == [], ps.stdout + ps.stderr  # no agent was started


def test_policy_check_doctor_and_mcp_tools_read_the_operator_config(portable: Path, tmp_path: Path) -> None:
    config = machine(tmp_path / "a", relative=True)
    p = torpor("policy", "check", str(portable), "--connect", "--json", config=config)
    assert p.returncode == 0, p.stdout + p.stderr
    out = json.loads(p.stdout)
    assert out["ok"] and out["notes"] == [] and out["operator_config"] == str(config.resolve())
    assert "environment" in [t["name"] for t in out["servers"]["crm"]["tools"]]
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    p = torpor("policy", "check", str(portable), config=empty)
    assert p.returncode == 1 and "does not configure: add [mcp.servers.crm]" in p.stdout, p.stdout
    p = torpor("inspect-bundle", str(portable), "--json")
    shown = json.loads(p.stdout)
    assert shown["mcp_servers"] == ["crm"] and shown["host_code"] == [] and shown["runs_with"] is None, shown
    p = torpor("mcp", "tools", "crm", "--json", config=config)  # the operator's server, no policy needed
    assert p.returncode == 0, p.stderr
    assert "list_roots" in [t["name"] for t in json.loads(p.stdout)["tools"]]
    broken = tmp_path / "broken.toml"
    broken.write_text('[mcp.servers.gone]\ncommand = "no-such-mcp-server"\n[roots]\nnowhere = "/nonexistent/dir"\n')
    p = torpor("doctor", "--json", config=broken)
    assert p.returncode == 0, p.stderr
    survey = json.loads(p.stdout)["operator_config"]
    assert "not an executable on its PATH" in survey["servers"]["gone"]["problem"]
    assert "give its absolute path as `command`, or a PATH in `env`" in survey["servers"]["gone"]["problem"]
    assert survey["roots"]["nowhere"]["exists"] is False
    # Listing its tools says the same, and where to say it (a command in a virtualenv is
    # found by the user's shell, not by the server's minimal PATH).
    p = torpor("mcp", "tools", "gone", config=broken)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert ("command 'no-such-mcp-server' is not on its PATH (/usr/local/bin:/usr/bin:/bin): give its absolute "
            "path as `command`, or a PATH in `env`, under [mcp.servers.gone]") in p.stderr, p.stderr
    p = torpor("doctor", "--bundle", str(portable), config=config)
    assert p.returncode == 0 and "mcp.crm" in p.stdout and "problem" not in p.stdout, p.stdout
    assert "every MCP server it names is configured here" in p.stdout
    p = torpor("doctor", "--bundle", str(portable), "--json", config=empty)
    assert p.returncode == 1 and "[mcp.servers.crm]" in json.loads(p.stdout)["bundle"]["errors"][0], p.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[mcp.servers.x]\ncommand = "a"\nurl = "http://h/mcp"\n')
    p = torpor("run", str(portable), "--store", str(tmp_path / "s"), config=bad)
    assert p.returncode == 2 and "error[invalid_config]" in p.stderr and "exactly one of command" in p.stderr


def test_a_legacy_policy_still_runs_and_is_noted(bundles: BundleFactory, tmp_path: Path) -> None:
    """A policy that says itself how to start a server (the deprecated form): packed with a
    note, accepted where the operator config does not name the server, with a note; ignored
    where it does."""
    legacy = tmp_path / "policy.toml"
    legacy.write_text('[agent]\nname = "old"\n'
                      f'[mcp.crm]\ncommand = "{sys.executable}"\nargs = ["{SERVER}"]\ntools = ["pid"]\n')
    module = tmp_path / "caller.wasm"
    module.write_bytes(bundles.load(GUESTS / "caller").module)
    p = torpor("pack", str(module), "--policy", str(legacy), "-o", str(tmp_path / "old.torpor"))
    assert p.returncode == 0 and "note: the policy says itself how to start mcp.crm" in p.stdout, p.stdout + p.stderr
    assert "--trust-bundle-code" in p.stdout
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    p = torpor("policy", "check", str(legacy), config=empty)
    assert p.returncode == 0 and "note: mcp.crm: the policy says itself how to start the server (command)" in p.stdout
    config = machine(tmp_path / "a", relative=False)
    p = torpor("policy", "check", str(legacy), "--json", config=config)
    assert p.returncode == 0 and "is ignored here" in json.loads(p.stdout)["notes"][0], p.stdout


def test_the_operator_config_wins_over_a_bundles_own_command(bundles: BundleFactory, tmp_path: Path) -> None:
    """A bundle whose policy carries a command line is refused as host code, unless the
    operator config names that server: then the operator's server runs, the bundle's command
    never does, and there is nothing of the bundle's to trust."""
    from host.errors import BundleCodeRefused

    marker = tmp_path / "bundle-command-ran"
    evil = (POLICY.replace('[mcp.crm]\n', f'[mcp.crm]\ncommand = "{sys.executable}"\n'
                                          f'args = ["-c", "open({str(marker)!r}, \'w\')"]\n')
            .replace('roots = ["data", "data/reports"]\n', ''))
    b = bundle_mod.load_bytes(bundle_mod.pack(bundles.load(GUESTS / "caller").module, evil))
    assert list(b.host_code) == ["mcp.crm"]
    config = mcp_config.load(machine(tmp_path / "a", relative=False))

    async def go() -> None:
        with Host(tmp_path / "refusing") as host, pytest.raises(BundleCodeRefused):
            await host.run(b, {"calls": [{"tool": "mcp.crm.pid", "args": {}}]})
        with Host(tmp_path / "store", operator_config=config) as host:
            r = await host.run(b, {"calls": [{"tool": "mcp.crm.environment", "args": {}}]})
            assert r.status == "completed", r.error
            seen = r.output["results"][0]["value"]["structured"]
            assert seen["environ"]["HOME"] == str(tmp_path / "a" / "homes" / "crm")

    anyio.run(go)
    assert not marker.exists()


def test_a_server_sees_only_the_environment_its_config_and_policy_give(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """PATH, its own HOME, the host variables the operator names, and the operator's env with
    the credentials the policy grants filled in: nothing else of the host's."""
    monkeypatch.setenv("TORPOR_TEST_PASSED_ON", "yes")
    monkeypatch.setenv("TORPOR_TEST_KEPT_BACK", "no")
    monkeypatch.setenv("SHELL", "/bin/zsh")
    config = mcp_config.parse(
        f'[mcp.servers.envdump]\ncommand = "{sys.executable}"\nargs = ["{SERVER}"]\ncwd = "{tmp_path}"\n'
        'inherit_env = ["TORPOR_TEST_PASSED_ON", "TORPOR_TEST_UNSET"]\n'
        'env = { CRM_TOKEN = "Bearer {crm_token}", MODE = "test", PATH = "/opt/x/bin:/usr/bin:/bin" }\n'
        'home = "h"\n', source=str(tmp_path / "torpor.toml"))
    pol = policy("", '[mcp.envdump]\ntools = ["environment"]\ncredentials = ["crm_token"]\n')
    c = Ctx(pol, "mcp.envdump.environment", secrets={"crm_token": "s3cret"}, mcp_config=config)
    r = invoke("mcp.envdump.environment", {}, c)
    assert not isinstance(r, ToolError), r
    assert r["structured"]["environ"] == {"PATH": "/opt/x/bin:/usr/bin:/bin", "HOME": str(tmp_path / "h"),
                                          "TORPOR_TEST_PASSED_ON": "yes", "CRM_TOKEN": "Bearer s3cret",
                                          "MODE": "test"}
    assert r["structured"]["cwd"] == str(tmp_path)
    # The deprecated form gets the same floor: PATH, its own HOME, and the policy's env.
    legacy = policy("", f'[mcp.oldenv]\ncommand = "{sys.executable}"\nargs = ["{SERVER}"]\ntools = ["environment"]\n'
                        'env = { MODE = "legacy" }\n')
    r = invoke("mcp.oldenv.environment", {}, Ctx(legacy, "mcp.oldenv.environment",
                                                 mcp_config=mcp_config.parse(f'[mcp]\nhome = "{tmp_path}"\n')))
    assert not isinstance(r, ToolError), r
    assert r["structured"]["environ"] == {"PATH": mcp_config.DEFAULT_PATH, "HOME": str(tmp_path / "oldenv"),
                                          "MODE": "legacy"}


def test_what_the_operator_config_and_the_policy_must_agree_on(tmp_path: Path) -> None:
    config = mcp_config.parse('[roots]\ndata = "/srv/data"\n'
                              '[mcp.servers.crm]\ncommand = "crm"\nenv = { T = "{crm_token}" }\n'
                              '[mcp.servers.web]\nurl = "https://mcp.example.com/mcp"\n'
                              'headers = { Authorization = "Bearer {web_token}" }\n', source="/etc/torpor/torpor.toml")
    ok = policy("", '[mcp.crm]\ncredentials = ["crm_token"]\nroots = ["data/reports"]\n'
                    '[mcp.web]\ncredentials = ["web_token"]\n')
    assert mcp_config.check(ok, config).errors == []
    resolved = mcp_config.resolve("web", ok.mcp["web"], config, {"web_token": "w"})
    assert resolved.url == "https://mcp.example.com/mcp" and dict(resolved.headers) == {"Authorization": "Bearer w"}
    assert mcp_config.resolve("crm", ok.mcp["crm"], config, {"crm_token": "t"}).roots == ("file:///srv/data/reports",)
    bad = policy("", '[mcp.crm]\nroots = ["dta"]\n[mcp.nope]\ntools = ["x"]\n')
    errors = mcp_config.check(bad, config).errors
    assert any("'dta' names no root" in e and "its roots: data" in e for e in errors), errors
    assert any("credential 'crm_token', which the policy does not grant" in e for e in errors), errors
    assert any(e.startswith("mcp.nope:") and "/etc/torpor/torpor.toml" in e for e in errors), errors
    with pytest.raises(ToolError) as info:  # at call time too, should a call get that far
        mcp_config.resolve("nope", bad.mcp["nope"], config, {})
    assert info.value.details["reason_code"] == "server_not_configured"
    for text, says in (('[mcp.servers.x]\nurl = "ftp://h"\n', "not an http:// or https:// URL"),
                       ('[mcp.servers.x]\ncommand = "a"\nheaders = { A = "b" }\n', "a command server takes env"),
                       ('[mcp.servers."a b"]\ncommand = "a"\n', "not a server name"),
                       ('[roots]\n"a/b" = "/x"\n', "not a root name"),
                       ('[mcp.servers.x]\ncommand = "a"\nshell = true\n', "Extra inputs are not permitted"),
                       ('[mcp.crm]\ncommand = "a"\n', "a server is configured as [mcp.servers.crm]"),
                       ("[mcp", "not valid TOML")):
        with pytest.raises(ConfigError, match="operator config") as err:
            mcp_config.parse(text)
        assert says in str(err.value), (text, str(err.value))
    rel = mcp_config.parse('[roots]\nd = "data"\n[mcp.servers.s]\ncommand = "./bin/s"\ncwd = "."\n',
                           source=str(tmp_path / "torpor.toml"))
    assert rel.roots["d"] == str(tmp_path / "data") and rel.servers["s"].command == str(tmp_path / "bin" / "s")
    with pytest.raises(ConfigError, match="no such file"):
        mcp_config.load(tmp_path / "missing.toml")


def test_torpor_serve_reads_the_operator_config_from_the_environment(portable: Path, tmp_path: Path) -> None:
    """`torpor serve` ($TORPOR_CONFIG) starts the servers its operator config names for the
    registry's agents, as `torpor run` does."""
    config = machine(tmp_path / "a", relative=True)
    store = tmp_path / "store"
    with Host(store) as host:
        host.registry.push(portable.read_bytes(), tenant="acme")
        ops = token(host.store, "acme", "runs:write", "runs:read")
    proc, url = start_process(store, env={mcp_config.CONFIG_ENV: str(config)})
    try:
        with httpx.Client(base_url=url, timeout=120) as c:
            rec = c.post("/v1/runs", headers=auth(ops), json={"agent": "caller", "input": CALLS, "wait": 60}).json()
        assert rec["status"] == "completed", rec
        seen = rec["output"]["results"][0]["value"]["structured"]
        assert seen["environ"]["HOME"] == str(tmp_path / "a" / "homes" / "crm")
    finally:
        proc.terminate()
        proc.communicate(timeout=60)


def test_resuming_on_a_host_without_the_server_leaves_the_agent_as_it_was(bundles: BundleFactory,
                                                                         tmp_path: Path) -> None:
    """A parked agent approved on a host whose operator config lacks its server: refused
    before anything is decided, the agent still waits; approved where the server is
    configured, it goes on and calls it."""
    from host.errors import McpServerNotConfigured

    pol = POLICY + '[tools."mcp.crm.pid"]\napproval = true\n'
    b = bundle_mod.load_bytes(bundle_mod.pack(bundles.load(GUESTS / "caller").module, pol))
    config = str(machine(tmp_path / "a", relative=False))  # a path: the Host reads it
    store = tmp_path / "store"

    async def go() -> None:
        with Host(store, operator_config=config) as host:
            r = await host.run(b, {"calls": [{"tool": "mcp.crm.pid", "args": {}}]})
            assert r.status == "waiting_approval", r.error
        with Host(store) as host:
            with pytest.raises(McpServerNotConfigured, match="crm"):
                await host.approve(r.agent_id)
            assert host.get_agent(r.agent_id)["status"] == "waiting_approval"
        with Host(store, operator_config=config) as host:
            done = await host.approve(r.agent_id)
            assert done.status == "completed" and done.output["results"][0]["value"]["structured"]["pid"] > 0

    anyio.run(go)


def test_torpor_mcp_serve_starts_the_servers_its_operator_config_names(portable: Path, tmp_path: Path) -> None:
    """`torpor --config FILE mcp serve`: a registry agent called by an MCP client reaches the
    MCP server that config names (the two directions of MCP in one process)."""
    from mcp import ClientSession, StdioServerParameters, stdio_client

    config = machine(tmp_path / "a", relative=True)
    store = tmp_path / "store"
    with Host(store) as host:
        host.registry.push(portable.read_bytes())

    async def main() -> Any:
        params = StdioServerParameters(command=sys.executable, args=["-m", "host.cli", "--config", str(config), "mcp",
                                                                     "serve", "--store", str(store)],
                                       env=dict(os.environ))
        async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            with anyio.fail_after(120):
                return await session.call_tool("caller", CALLS)

    result = anyio.run(main)
    assert not result.is_error, result
    seen = result.structured_content["results"][0]["value"]["structured"]
    assert seen["environ"] == {"PATH": mcp_config.DEFAULT_PATH, "HOME": str(tmp_path / "a" / "homes" / "crm")}


def test_the_reference_everything_server_from_the_operator_config(tmp_path: Path) -> None:
    """The npm reference server, started as an operator config says: `node` found on the
    server's own minimal PATH (Debian's /usr/bin/node), the policy's named roots told as the
    operator's directories."""
    import everything_server

    if everything_server.node() is None:
        if everything_server.required():
            pytest.fail("node is not installed (Debian's nodejs; .ci/run installs it)")
        pytest.skip("node is not installed (Debian's nodejs)")
    entry = everything_server.install()
    config = mcp_config.parse(f'[roots]\nrepo = "{tmp_path / "repo"}"\n[mcp]\nhome = "{tmp_path / "homes"}"\n'
                              f'[mcp.servers.ev]\ncommand = "node"\nargs = ["{entry}", "stdio"]\n'
                              'startup_timeout = "60s"\n')
    pol = policy("", '[mcp.ev]\ntools = ["get-roots-list"]\nroots = ["repo", "repo/src"]\ntimeout = "10s"\n')
    r = invoke("mcp.ev.get-roots-list", {}, Ctx(pol, "mcp.ev.get-roots-list", mcp_config=config))
    assert not isinstance(r, ToolError), r
    for uri in ((tmp_path / "repo").as_uri(), (tmp_path / "repo" / "src").as_uri()):
        assert uri in r["text"], r
    assert (tmp_path / "homes" / "ev").is_dir()
