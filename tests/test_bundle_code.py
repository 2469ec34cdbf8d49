"""A bundle is not host code (issue 21, class 6): through the real CLI and a real store.

A bundle's Python runs in the host process with the host's privileges, so it runs only for
a bundle the operator trusts by digest; a policy's handler names an operator tool (entry
points, a tools directory, callables given to ``Host``), never any importable callable.
Each refusal is proved by a module that would write a marker file when imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import GUESTS, BundleFactory

from host.errors import BundleCodeRefused, ConfigError, HandlerNotRegistered
from host.runtime import Host
from host.sandbox import bundle as bundle_mod
from host.tools.sources import TOOLS_PATH_ENV

ROOT = Path(__file__).resolve().parent.parent

ECHO_TOOL = '''
import pathlib
pathlib.Path({marker!r}).write_text("imported")  # proof: this file ran in the host process

from pydantic import BaseModel


class EchoArgs(BaseModel):
    v: int


def echo(args: EchoArgs, ctx: object) -> dict:
    return {{"echo": args.v, "by": {by!r}}}
'''

POLICY = '''[agent]
name = "coded"
[tools."echo"]
handler = "coded_tools:echo"
'''

APPROVAL_POLICY = POLICY + '''[tools."echo2"]
handler = "coded_tools:echo"
approval = true
'''


def torpor(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != TOOLS_PATH_ENV}  # no operator tools unless a test names them
    return subprocess.run([sys.executable, "-m", "host.cli", *args], capture_output=True, text=True, timeout=180,
                          env={**base, **(env or {})}, cwd=ROOT)


def calls(*tools: str, v: int = 7) -> str:
    return json.dumps({"calls": [{"tool": t, "args": {"v": v}} for t in tools]})


@pytest.fixture(scope="module")
def caller_wasm(bundles: BundleFactory, tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("caller") / "caller.wasm"
    p.write_bytes(bundles.load(GUESTS / "caller").module)
    return p


def pack(tmp_path: Path, wasm: Path, policy: str, *, python: dict[str, str] | None = None,
         name: str = "coded.torpor") -> tuple[Path, str]:
    """A bundle packed by `torpor pack` (with `--python` files if given), and its digest."""
    (tmp_path / "policy.toml").write_text(policy)
    args = ["pack", str(wasm), "--policy", str(tmp_path / "policy.toml"), "-o", str(tmp_path / name), "--json"]
    for mod, source in (python or {}).items():
        src = tmp_path / "src" / f"{mod}.py"
        src.parent.mkdir(exist_ok=True)
        src.write_text(source)
        args += ["--python", str(src)]
    proc = torpor(*args)
    assert proc.returncode == 0, proc.stderr
    return tmp_path / name, json.loads(proc.stdout)["digest"]


def test_a_bundle_with_python_is_refused_by_default_and_nothing_is_imported(tmp_path: Path, caller_wasm: Path) -> None:
    marker = tmp_path / "imported.txt"
    source = ECHO_TOOL.format(marker=str(marker), by="bundle")
    path, digest = pack(tmp_path, caller_wasm, POLICY, python={"coded_tools": source})
    store = tmp_path / "store"
    proc = torpor("run", str(path), "--input", calls("echo"), "--store", str(store))
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("torpor: error[bundle_code_refused]:") or "error[bundle_code_refused]" in line, proc.stderr
    assert f"--trust-bundle-code {digest}" in proc.stderr and "tools/coded_tools.py" in proc.stderr
    assert not marker.exists()  # nothing of the bundle's Python ran
    listed = torpor("ps", "--store", str(store), "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout) == []  # and nothing was stored
    as_json = torpor("run", str(path), "--input", calls("echo"), "--store", str(store), "--json")
    assert as_json.returncode == 2 and json.loads(as_json.stdout)["error"]["code"] == "bundle_code_refused"
    # Trusting another bundle, or a prefix of this one, is not trusting this one.
    other = torpor("run", str(path), "--input", calls("echo"), "--store", str(store), "--trust-bundle-code", "0" * 64)
    assert other.returncode == 2 and "bundle_code_refused" in other.stderr
    prefix = torpor("run", str(path), "--input", calls("echo"), "--store", str(store), "--trust-bundle-code", digest[:16])
    assert prefix.returncode == 2 and "invalid_config" in prefix.stderr and "full digest" in prefix.stderr
    assert not marker.exists()


def test_the_opt_in_runs_it_and_the_audit_inspect_and_inspect_bundle_show_its_digest(tmp_path: Path,
                                                                                      caller_wasm: Path) -> None:
    marker = tmp_path / "imported.txt"
    source = ECHO_TOOL.format(marker=str(marker), by="bundle")
    sha = hashlib.sha256(source.encode()).hexdigest()
    path, digest = pack(tmp_path, caller_wasm, POLICY, python={"coded_tools": source})

    shown = torpor("inspect-bundle", str(path), "--json")
    info = json.loads(shown.stdout)
    assert info["host_code"] == [{"name": "tools/coded_tools.py", "kind": "python", "sha256": sha,
                                  "size": len(source.encode())}]
    assert info["runs_with"] == f"--trust-bundle-code {digest}"
    assert info["handlers"] == {"echo": "coded_tools:echo"}
    human = torpor("inspect-bundle", str(path)).stdout
    assert f"tools/coded_tools.py  sha256 {sha}" in human and f"--trust-bundle-code {digest}" in human
    assert not marker.exists()  # inspecting imports nothing

    store = tmp_path / "store"
    run = torpor("run", str(path), "--input", calls("echo"), "--store", str(store), "--json",
                 "--trust-bundle-code", digest)
    assert run.returncode == 0, run.stderr
    res = json.loads(run.stdout)
    assert res["output"]["results"][0]["value"] == {"echo": 7, "by": "bundle"}
    assert marker.exists()

    audit = json.loads(torpor("audit", "show", res["agent_id"], "--store", str(store), "--json").stdout)["records"]
    trusted = [r for r in audit if r["kind"] == "bundle_code.trusted"]
    assert len(trusted) == 1
    assert trusted[0]["code"] == {"tools/coded_tools.py": sha}
    assert trusted[0]["bundle_digest"] == digest
    assert torpor("audit", "verify", "--store", str(store)).returncode == 0

    inspected = json.loads(torpor("inspect", res["agent_id"], "--store", str(store), "--json").stdout)
    assert inspected["bundle_code"] == {"trusted_by": "operator", "code": {"tools/coded_tools.py": sha}}
    assert f"tools/coded_tools.py sha256 {sha}" in torpor("inspect", res["agent_id"], "--store", str(store)).stdout


def test_a_resume_needs_the_same_opt_in(tmp_path: Path, caller_wasm: Path) -> None:
    """An agent started with bundle code, parked on a person: its approval (a resume) without the opt-in
    is refused before the decision is recorded; with it, the agent finishes and the audit says so again."""
    marker = tmp_path / "imported.txt"
    source = ECHO_TOOL.format(marker=str(marker), by="bundle")
    path, digest = pack(tmp_path, caller_wasm, APPROVAL_POLICY, python={"coded_tools": source})
    store = tmp_path / "store"
    run = torpor("run", str(path), "--input", calls("echo", "echo2"), "--store", str(store), "--json",
                 "--trust-bundle-code", digest)
    assert run.returncode == 4, run.stderr
    aid = json.loads(run.stdout)["agent_id"]
    marker.unlink()

    refused = torpor("approve", aid, "--store", str(store))
    assert refused.returncode == 2 and "error[bundle_code_refused]" in refused.stderr, refused.stderr
    assert not marker.exists()
    pending = json.loads(torpor("approvals", "--store", str(store), "--json").stdout)
    assert [p["agent_id"] for p in pending] == [aid]  # the decision was not taken
    every = json.loads(torpor("resume", "--all", "--store", str(store), "--json").stdout)
    assert every == []  # parked: not resumed by --all either

    approved = torpor("approve", aid, "--store", str(store), "--json", "--trust-bundle-code", digest)
    assert approved.returncode == 0, approved.stderr
    assert [r["value"]["echo"] for r in json.loads(approved.stdout)["output"]["results"]] == [7, 7]
    audit = json.loads(torpor("audit", "show", aid, "--store", str(store), "--json").stdout)["records"]
    assert [r["kind"] for r in audit].count("bundle_code.trusted") == 2  # at spawn and at the resume


def test_a_suspended_agent_with_bundle_code_is_not_resumed_silently(tmp_path: Path, bundles: BundleFactory) -> None:
    """`resume --all` over an agent left running with bundle code: a clear error for it, untouched."""
    source = ECHO_TOOL.format(marker=str(tmp_path / "imported.txt"), by="bundle")
    b = bundle_mod.load_bytes(bundle_mod.pack(bundles.load(GUESTS / "caller").module, POLICY,
                                              python={"coded_tools": source}))
    store = tmp_path / "store"
    with Host(store, trust_bundle_code=[b.digest]) as host:
        agent = anyio.run(lambda: host.lifecycle.spawn(b, json.loads(calls("echo")), fuel=None, on_behalf_of=None))
        host.lifecycle.release_claim(agent.agent_id)  # as if its process had died after the spawn
    (tmp_path / "imported.txt").unlink()
    res = torpor("resume", "--all", "--store", str(store), "--json")
    rows = json.loads(res.stdout)
    assert [(r["agent_id"], r["error"]["code"]) for r in rows] == [(agent.agent_id, "bundle_code_refused")]
    assert not (tmp_path / "imported.txt").exists()
    state = json.loads(torpor("inspect", agent.agent_id, "--store", str(store), "--json").stdout)
    assert state["status"] == "running" and state["error"] is None
    ok = torpor("resume", "--all", "--store", str(store), "--json", "--trust-bundle-code", b.digest)
    assert [r["status"] for r in json.loads(ok.stdout)] == ["completed"], ok.stderr


@pytest.mark.parametrize("ref", ["os:system", "subprocess:run", "json:loads", "builtins:exec", "host.cli.app:main"])
def test_a_handler_naming_an_importable_callable_is_refused(tmp_path: Path, caller_wasm: Path, ref: str) -> None:
    policy = POLICY.replace("coded_tools:echo", ref)
    path, _ = pack(tmp_path, caller_wasm, policy)
    proc = torpor("run", str(path), "--input", calls("echo"), "--store", str(tmp_path / "store"))
    assert proc.returncode == 2 and "error[handler_not_registered]" in proc.stderr, proc.stderr
    assert json.loads(torpor("ps", "--store", str(tmp_path / "store"), "--json").stdout) == []


def test_a_custom_validator_resolves_the_same_way(tmp_path: Path, caller_wasm: Path) -> None:
    policy = '[agent]\nname = "v"\n[tools."kv.incr"]\n[[validators]]\non = ["tool:kv.incr"]\ncustom = "os:system"\n'
    path, _ = pack(tmp_path, caller_wasm, policy)
    proc = torpor("run", str(path), "--input", "{}", "--store", str(tmp_path / "store"))
    assert proc.returncode == 2 and "error[handler_not_registered]" in proc.stderr, proc.stderr
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "checks.py").write_text("def never(value, ctx=None):\n    return 'never'\n")
    denied = torpor("run", str(path), "--input", '{"calls": [{"tool": "kv.incr", "args": {"key": "k"}}]}',
                    "--store", str(tmp_path / "store"), "--tools-dir", str(tools), "--json")
    assert denied.returncode == 2 and json.loads(denied.stdout)["error"]["code"] == "handler_not_registered"
    path2, _ = pack(tmp_path, caller_wasm, policy.replace("os:system", "checks:never"), name="v2.torpor")
    ran = torpor("run", str(path2), "--input", '{"calls": [{"tool": "kv.incr", "args": {"key": "k"}}]}',
                 "--store", str(tmp_path / "store"), "--tools-dir", str(tools), "--json")
    res = json.loads(ran.stdout)
    assert res["output"]["results"][0]["code"] == "denied", ran.stdout + ran.stderr


def test_tools_dir_tools_work_and_expose_only_their_own_functions(tmp_path: Path, caller_wasm: Path) -> None:
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "coded_tools.py").write_text(ECHO_TOOL.format(marker=str(tmp_path / "m"), by="tools-dir")
                                          + "from subprocess import run\n\ndef _hidden(args, ctx):\n    return {}\n")
    path, _ = pack(tmp_path, caller_wasm, POLICY)
    store = tmp_path / "store"
    ok = torpor("run", str(path), "--input", calls("echo"), "--store", str(store), "--json", "--tools-dir", str(tools))
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["output"]["results"][0]["value"] == {"echo": 7, "by": "tools-dir"}
    via_env = torpor("run", str(path), "--input", calls("echo"), "--store", str(store), "--json",
                     env={TOOLS_PATH_ENV: str(tools)})
    assert via_env.returncode == 0, via_env.stderr
    for name in ("run", "_hidden", "BaseModel", "EchoArgs", "pathlib"):  # imported, private, classes, modules
        bad, _ = pack(tmp_path, caller_wasm, POLICY.replace("coded_tools:echo", f"coded_tools:{name}"),
                      name=f"{name}.torpor")
        proc = torpor("run", str(bad), "--input", calls("echo"), "--store", str(store), "--tools-dir", str(tools))
        assert proc.returncode == 2 and "error[handler_not_registered]" in proc.stderr, (name, proc.stderr)
    missing = torpor("run", str(path), "--input", "{}", "--store", str(store), "--tools-dir", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "error[invalid_config]" in missing.stderr


def test_entry_point_tools_work(tmp_path: Path, caller_wasm: Path) -> None:
    """An installed distribution (a real dist-info on sys.path) registers tools in `torpor.tools`."""
    site = tmp_path / "site"
    (site / "acme_tools").mkdir(parents=True)
    (site / "acme_tools" / "__init__.py").write_text(ECHO_TOOL.format(marker=str(tmp_path / "m"), by="entry point"))
    info = site / "acme_tools-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-tools\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[torpor.tools]\ncoded_tools:echo = acme_tools:echo\n"
                                           "acme.shout = acme_tools:echo\n")
    env = {"PYTHONPATH": str(site)}
    store = tmp_path / "store"
    by_name, _ = pack(tmp_path, caller_wasm, POLICY)  # coded_tools:echo is the entry point's name
    proc = torpor("run", str(by_name), "--input", calls("echo"), "--store", str(store), "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["output"]["results"][0]["value"] == {"echo": 7, "by": "entry point"}
    by_value, _ = pack(tmp_path, caller_wasm, POLICY.replace("coded_tools:echo", "acme_tools:echo"), name="v.torpor")
    proc = torpor("run", str(by_value), "--input", calls("echo"), "--store", str(store), "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    without = torpor("run", str(by_value), "--input", calls("echo"), "--store", str(store))
    assert without.returncode == 2 and "handler_not_registered" in without.stderr  # not installed: not a tool
    doctor = json.loads(torpor("doctor", "--json", env={**env, TOOLS_PATH_ENV: str(tmp_path)}).stdout)
    assert doctor["operator_tools"] == {"tools_path": [str(tmp_path)], "entry_points": {
        "coded_tools:echo": "acme_tools:echo", "acme.shout": "acme_tools:echo"}}


# -- in one process: no shadowing, no sharing ---------------------------------------------------------------


def _run(host: Host, b: bundle_mod.Bundle) -> Any:
    res = anyio.run(lambda: host.run(b, json.loads(calls("echo"))))
    assert res.status == "completed", res.error
    return res.output["results"][0]["value"]


def test_two_bundles_with_the_same_module_name_never_meet(tmp_path: Path, bundles: BundleFactory) -> None:
    module = bundles.load(GUESTS / "caller").module
    one = bundle_mod.load_bytes(bundle_mod.pack(module, POLICY, python={
        "coded_tools": ECHO_TOOL.format(marker=str(tmp_path / "1"), by="one")}))
    two = bundle_mod.load_bytes(bundle_mod.pack(module, POLICY, python={
        "coded_tools": ECHO_TOOL.format(marker=str(tmp_path / "2"), by="two")}))
    before = set(sys.modules)
    with Host(tmp_path / "s", trust_bundle_code=[one.digest, two.digest], tools_dirs=[]) as host:
        assert _run(host, one) == {"echo": 7, "by": "one"}
        assert _run(host, two) == {"echo": 7, "by": "two"}
    added = set(sys.modules) - before
    assert "coded_tools" not in sys.modules and all(n.startswith("torpor_") for n in added if "coded" in n)


def test_a_module_named_like_the_stdlib_shadows_nothing(tmp_path: Path, bundles: BundleFactory) -> None:
    import json as real_json

    module = bundles.load(GUESTS / "caller").module
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "json.py").write_text(ECHO_TOOL.format(marker=str(tmp_path / "j"), by="tools json"))
    b = bundle_mod.load_bytes(bundle_mod.pack(module, POLICY.replace("coded_tools", "json")))
    carried = bundle_mod.load_bytes(bundle_mod.pack(module, POLICY.replace("coded_tools", "os"), python={
        "os": ECHO_TOOL.format(marker=str(tmp_path / "o"), by="bundle os")}))
    with Host(tmp_path / "s", tools_dirs=[tools], trust_bundle_code=[carried.digest]) as host:
        assert _run(host, b) == {"echo": 7, "by": "tools json"}
        assert _run(host, carried) == {"echo": 7, "by": "bundle os"}
    assert sys.modules["json"] is real_json and sys.modules["os"] is os and not hasattr(os, "echo")
    assert str(tools) not in sys.path


def test_a_trusted_bundle_does_not_shadow_an_operator_tool(tmp_path: Path, bundles: BundleFactory) -> None:
    module = bundles.load(GUESTS / "caller").module
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "coded_tools.py").write_text(ECHO_TOOL.format(marker=str(tmp_path / "t"), by="operator"))
    b = bundle_mod.load_bytes(bundle_mod.pack(module, POLICY, python={
        "coded_tools": ECHO_TOOL.format(marker=str(tmp_path / "b"), by="bundle")}))
    with Host(tmp_path / "s", tools_dirs=[tools], trust_bundle_code=[b.digest]) as host:
        with pytest.raises(ConfigError, match="never shadows the operator's tools"):
            anyio.run(lambda: host.run(b, json.loads(calls("echo"))))
        assert host.list_agents() == []
    assert not (tmp_path / "b").exists()


def test_the_embedded_host_refuses_and_takes_handlers(tmp_path: Path, bundles: BundleFactory) -> None:
    module = bundles.load(GUESTS / "caller").module
    carried = bundle_mod.load_bytes(bundle_mod.pack(module, POLICY, python={
        "coded_tools": ECHO_TOOL.format(marker=str(tmp_path / "b"), by="bundle")}))
    plain = bundle_mod.load_bytes(bundle_mod.pack(module, POLICY))

    def echo(args: Any, ctx: Any) -> dict[str, Any]:
        return {"echo": args.v, "by": "handlers"}

    from pydantic import BaseModel

    class EchoArgs(BaseModel):
        v: int

    echo.__annotations__["args"] = EchoArgs
    with Host(tmp_path / "s", tools_dirs=[], handlers={"coded_tools:echo": echo}) as host:
        with pytest.raises(BundleCodeRefused, match=carried.digest):
            anyio.run(lambda: host.run(carried, json.loads(calls("echo"))))
        assert _run(host, plain) == {"echo": 7, "by": "handlers"}
    with Host(tmp_path / "s2", tools_dirs=[]) as host, pytest.raises(HandlerNotRegistered):
        anyio.run(lambda: host.run(plain, json.loads(calls("echo"))))
    assert not (tmp_path / "b").exists()


def test_an_mcp_server_command_in_a_bundle_policy_is_host_code(tmp_path: Path, caller_wasm: Path) -> None:
    """`[mcp.NAME] command = ...` in a bundle's policy would make the host start a process the bundle
    chose: refused like Python unless the bundle is trusted; shown by inspect-bundle with its digest."""
    marker = tmp_path / "started.txt"
    policy = (POLICY.replace('handler = "coded_tools:echo"\n', "")
              .replace('[tools."echo"]\n', '[tools."mcp.evil.echo"]\n')
              + f'[mcp.evil]\ncommand = "{sys.executable}"\nargs = ["-c", "open({str(marker)!r}, \'w\')"]\n'
              + 'tools = ["echo"]\n')
    path, digest = pack(tmp_path, caller_wasm, policy)
    info = json.loads(torpor("inspect-bundle", str(path), "--json").stdout)
    assert [(c["name"], c["kind"], c["command"][0]) for c in info["host_code"]] == [("mcp.evil", "mcp_server",
                                                                                  sys.executable)]
    assert info["runs_with"] == f"--trust-bundle-code {digest}"
    proc = torpor("run", str(path), "--input", calls("mcp.evil.echo"), "--store", str(tmp_path / "store"))
    assert proc.returncode == 2 and "error[bundle_code_refused]" in proc.stderr and "mcp.evil" in proc.stderr
    assert not marker.exists()
    trusted = torpor("run", str(path), "--input", calls("mcp.evil.echo"), "--store", str(tmp_path / "store"),
                     "--json", "--trust-bundle-code", digest)
    assert trusted.returncode in (0, 1), trusted.stderr  # it ran (the "server" is no MCP server: its call fails)
    assert marker.exists()
    aid = json.loads(trusted.stdout)["agent_id"]
    records = json.loads(torpor("audit", "show", aid, "--store", str(tmp_path / "store"), "--json").stdout)["records"]
    assert [r["code"] for r in records if r["kind"] == "bundle_code.trusted"] == [{"mcp.evil": info["host_code"][0]["sha256"]}]


@pytest.mark.parametrize("source, code, said", [
    ("raise SystemExit(3)\n", "invalid_config", "SystemExit"),
    ("def echo(:\n", "invalid_config", "SyntaxError"),
    ("import no_such_module_here\n", "invalid_config", "ModuleNotFoundError"),
    ("echo = 1\n", "handler_not_registered", "no public function 'echo'"),
])
def test_trusted_bundle_code_that_fails_is_a_typed_error(tmp_path: Path, caller_wasm: Path, source: str, code: str,
                                                         said: str) -> None:
    """Trusted code that fails to load (even by SystemExit) is one readable error line, never a crash."""
    path, digest = pack(tmp_path, caller_wasm, POLICY, python={"coded_tools": source})
    proc = torpor("run", str(path), "--input", calls("echo"), "--store", str(tmp_path / "store"),
                  "--trust-bundle-code", f"sha256:{digest.upper()}")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"error[{code}]" in proc.stderr and said in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
