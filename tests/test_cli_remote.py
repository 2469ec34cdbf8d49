"""`torpor --server URL`: the CLI as a client of a real `torpor serve` (uvicorn on 127.0.0.1).

The same scenario runs through real `torpor` processes twice, once on a local store and once
against the server, and each command's output (text and --json) and exit code must be equal
once what differs by nature (agent ids, times, who decided, the store's path or the
server's URL) is normalized: push, a run that parks on approval and one that completes,
ps, approvals, inspect, approve (the agent resumes and completes), deny, audit show and
verify, registry list/show/tag/diff. Then the faults: no server, a wrong URL, a bad token,
a token without the scope, a rate limit, options and commands a server cannot take.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import BundleFactory
from serve_helpers import InProcessServer, auth, free_port, kill_mid_call, payer_bundle, token

from host.cli import remote
from host.cli.app import _command_of, main
from host.errors import AgentNotFound, BadServerAnswer, RateLimited, TorporError
from host.server import client as client_mod
from host.server.config import ServerConfig
from host.server.scheduler import RecentLogs

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parent.parent
PARKS = '{"item": "laptops", "amount": 75000}'
COMPLETES = '{"item": "pens", "amount": 20}'


def torpor(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """A `torpor` process (its own environment: no server or token but what ``env`` says)."""
    full = {k: v for k, v in os.environ.items() if k not in (remote.SERVER_ENV, remote.TOKEN_ENV)}
    return subprocess.Popen([sys.executable, "-m", "host.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env={**full, "USER": "alice", **(env or {})})


_IDS = re.compile(r"\b01[0-9A-HJKMNP-TV-Z]{24}\b")
_TIMES = re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(\.\d+)?Z?")


#: Fields that differ between two runs of one scenario by nature: whom a server runs it for,
#: hashes over ids and times, the keys that signed them.
VOLATILE = frozenset({"tenant", "audit_head", "token_id", "key_id", "hash", "prev", "prev_hash", "sig", "signature",
                      "output_digest", "id", "key_ids",
                      "hibernations"})  # whether a wait outlasted the warm window: the machine's load


def _blank(value: Any, key: str = "") -> Any:
    """A JSON document with its volatile fields blanked (floats that are Unix times too)."""
    if key in VOLATILE or (isinstance(value, float) and value > 1e9):
        return "<x>"
    if isinstance(value, dict):
        return {k: _blank(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_blank(v) for v in value]
    return value


def normalize(text: str, ids: dict[str, str]) -> str:
    """Agent ids numbered in order of appearance, times and the two sides' names blanked."""
    with contextlib.suppress(ValueError):  # --json: its volatile fields blanked
        text = json.dumps(_blank(json.loads(text))) + "\n"

    def agent(m: re.Match[str]) -> str:
        return ids.setdefault(m.group(0), f"<agent{len(ids)}>")

    text = _IDS.sub(agent, text)
    text = _TIMES.sub("<time>", text)
    text = re.sub(r'"(created_at|pushed_at|updated_at|at|t|requested_at|decided_at|last_progress|started_at|'
                  r'ended_at|expires_at|time|exec_s|wall_s|seconds)": [0-9.e+-]+', r'"\1": 0', text)
    text = re.sub(r"(store|server) (/\S+|http://\S+?)(?=[)\"])", "<where>", text)
    text = re.sub(r"token:tok_[0-9a-f]+|\balice\b", "<who>", text)
    text = re.sub(r"identity token [0-9a-f]+|key [0-9a-f]{16}", "<identity>", text)  # each agent's own
    # A snapshot's size differs by a few bytes with the ids and times compressed into it.
    text = re.sub(r"snapshot bytes \d+|\d+ bytes", "<bytes>", text)
    text = re.sub(r"hibernations \d+", "hibernations <n>", text)
    # A head is signed at most once a minute when the log changed, so how many each store has
    # depends on how long the test ran (past a minute under load), not on the command's path.
    text = re.sub(r"\d+ signed heads", "<n> signed heads", text)
    text = re.sub(r'"(snapshot_bytes|last_checkpoint_bytes|size|bytes|heads)": \d+', r'"\1": 0', text)
    return re.sub(r"(?m)^(<agent\d+> .*\s)\d+$", r"\1<bytes>", text)  # ps: the LAST column


class Side:
    """One side of the comparison: the local store, or the server (its store in `srv`)."""

    def __init__(self, name: str, prefix: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.prefix = prefix
        self.env = env
        self.ids: dict[str, str] = {}

    def start(self, *args: str) -> subprocess.Popen[str]:
        return torpor(*self.prefix, *args, env=self.env)

    def finish(self, proc: subprocess.Popen[str]) -> tuple[int, str, str]:
        out, err = proc.communicate(timeout=180)
        return proc.returncode, normalize(out, self.ids), normalize(err, self.ids)

    def __call__(self, *args: str) -> tuple[int, str, str]:
        return self.finish(self.start(*args))


@pytest.fixture(scope="module")
def procurement(bundles: BundleFactory) -> Path:
    return bundles.example("procurement")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    with InProcessServer(tmp_path_factory.mktemp("served") / "store") as srv:
        yield srv


@pytest.fixture(scope="module")
def sides(server: InProcessServer, tmp_path_factory: pytest.TempPathFactory) -> tuple[Side, Side]:
    local_store = tmp_path_factory.mktemp("local") / "store"
    secret = token(server.host.store, "acme", "runs:write", "runs:read", "approvals:write", "registry:write")
    # The server's URL from $TORPOR_SERVER and the token from --token-file: both ways are used.
    token_file = tmp_path_factory.mktemp("token") / "token"
    token_file.write_text(secret + "\n")
    return (Side("local", [], {"TORPOR_STORE": str(local_store)}),
            Side("server", ["--token-file", str(token_file)], {remote.SERVER_ENV: server.url}))


def both(sides: tuple[Side, Side], *args: str, code: int = 0) -> tuple[str, str]:
    """Run ``args`` on both sides (``{n}``: the n-th agent id each side printed); the outputs
    and exit codes must be equal. The local stdout and stderr."""
    pair = [(side, side.start(*[_fill(a, side) for a in args])) for side in sides]  # the two at once
    lo, so = (side.finish(proc) for side, proc in pair)
    assert lo[0] == code, (args, lo)
    if "--json" in args and so[0] == lo[0] == code and so[1] != lo[1]:  # name the fields that differ
        sj, lj = json.loads(so[1]), json.loads(lo[1])
        assert sj == lj, json.dumps({k: (sj.get(k), lj.get(k)) for k in {*sj, *lj} if sj.get(k) != lj.get(k)})
    diff = [line for a, b in ((lo[1], so[1]), (lo[2], so[2]))
            for line in difflib.unified_diff(a.splitlines(), b.splitlines(), lineterm="")]
    assert so == lo, (args, so[0], lo[0], "\n".join(diff))
    return lo[1], lo[2]


def same_error(sides: tuple[Side, Side], *args: str, code: str) -> None:
    """Both sides refuse ``args`` with exit 2 and the same error code (the messages may name
    the local store, which a server does not)."""
    for side in sides:
        status, out, _ = side(*[_fill(a, side) for a in args], "--json")
        assert status == 2 and json.loads(out)["error"]["code"] == code, (side.name, args, out)


def _fill(arg: str, side: Side) -> str:
    m = re.fullmatch(r"\{(\d)\}", arg)
    return list(side.ids)[int(m.group(1))] if m else arg


def test_every_command_prints_the_same_against_a_server_as_on_a_store(sides: tuple[Side, Side],
                                                                      procurement: Path) -> None:
    out, _ = both(sides, "push", str(procurement), "--tag", "production")
    assert out.startswith("pushed procurement sha256:") and "tagged production" in out
    both(sides, "push", str(procurement), "--name", "buyer", "--json")
    # A run that parks on a person: exit 4, the same output and the guest's log lines on stderr.
    out, err = both(sides, "run", "procurement@production", "--input", PARKS, "--on-behalf-of", "carol", code=4)
    assert "waiting_approval" in out and "waiting on erp.create_po" in out
    assert "[info] requisition: 75000 for laptops" in err
    both(sides, "run", "procurement", "--input", COMPLETES, "--json")
    both(sides, "run", "buyer", "--input", PARKS, "--json", code=4)
    assert [len(side.ids) for side in sides] == [3, 3]
    both(sides, "ps")
    both(sides, "ps", "--json", "--status", "waiting_approval")
    out, _ = both(sides, "approvals")
    assert out.count("call   erp.create_po") == 2
    both(sides, "approvals", "--json")
    out, _ = both(sides, "inspect", "{0}")
    assert "version  started as procurement@production" in out and "for      carol" in out
    both(sides, "inspect", "{1}", "--json")
    # Approve: the agent resumes (in the server's background) and the command waits for its end.
    out, _ = both(sides, "approve", "{0}", "--note", "within budget")
    assert "completed" in out and "PO-000001" in out
    out, _ = both(sides, "inspect", "{0}")
    assert "status   completed" in out and "started as procurement@production: bundle sha256:" in out
    out, _ = both(sides, "deny", "{2}", "--reason", "not this quarter", "--json")
    assert json.loads(out)["status"] == "completed"
    # The guest's log lines, as the store keeps them (the server's, across its drives of the agent).
    out, _ = both(sides, "logs", "{0}")
    assert "[info] requisition: 75000 for laptops" in out and "ordered" in out
    both(sides, "logs", "{0}", "--after", "1", "--limit", "2", "--json")
    both(sides, "logs", "{0}", "--follow")  # it has ended: every line, then done
    # A fork of the agent at its first checkpoint, resumed: it waits for its own approval.
    out, _ = both(sides, "fork", "{0}", "--checkpoint", "1")
    assert "run `torpor resume <agent3>`" in out
    out, _ = both(sides, "resume", "{3}", code=4)
    assert "waiting_approval" in out
    out, _ = both(sides, "audit", "show", "{0}")
    assert "approval.granted" in out and "chain intact" in out
    both(sides, "audit", "show", "{2}", "--json")
    out, _ = both(sides, "audit", "verify", "--agent", "{0}")
    assert out.startswith("audit log intact")
    both(sides, "audit", "verify", "--agent", "{0}", "--json")
    out, _ = both(sides, "registry", "list")
    assert "buyer" in out and "procurement" in out
    out, _ = both(sides, "registry", "show", "procurement", "--json")
    both(sides, "registry", "tag", "procurement", "canary", "sha256:" + json.loads(out)["latest"])
    both(sides, "registry", "diff", "procurement@production", "buyer")
    # What both sides refuse: an unknown agent, tag or name, a second decision.
    same_error(sides, "inspect", "01M9AAAAAAAAAAAAAAAAAAAAAA", code="agent_not_found")
    same_error(sides, "run", "procurement@nosuchtag", code="bundle_not_found")
    same_error(sides, "approve", "{0}", code="invalid_state")


def test_logs_follow_an_agent_parked_on_a_person_until_it_ends(sides: tuple[Side, Side], procurement: Path) -> None:
    """`torpor logs --follow` of a parked agent waits (a long poll on the server, a read of the
    store every 0.2 s locally), prints the lines its approval's drive commits, and ends with it."""
    both(sides, "push", str(procurement), "--name", "followed")
    both(sides, "run", "followed", "--input", PARKS, code=4)
    n = len(sides[0].ids) - 1
    followers = [(side, side.start("logs", _fill(f"{{{n}}}", side), "--follow")) for side in sides]
    time.sleep(1.0)
    assert all(proc.poll() is None for _, proc in followers), "a follower of a parked agent ended early"
    both(sides, "approve", f"{{{n}}}")
    printed = [side.finish(proc) for side, proc in followers]
    assert printed[0] == printed[1] and printed[0][0] == 0, printed
    assert "requisition: 75000 for laptops" in printed[0][1] and "ordered" in printed[0][1], printed


def test_the_audit_verified_through_a_server_is_torpor_audit_verify_on_its_store(server: InProcessServer,
                                                                                 procurement: Path) -> None:
    """The whole store's check, and a host chain's check and records, need an admin token; the
    report is the one `torpor audit verify` (`show`) makes on the server's store itself (run
    beside the server)."""
    admin = token(server.host.store, "acme", "admin")
    env = {remote.SERVER_ENV: server.url, remote.TOKEN_ENV: admin}
    same = Side("server", [], env)("audit", "show", "host.nothing", "--json")
    assert same[0] == 2 and json.loads(same[1])["error"]["code"] == "agent_not_found", same  # as on a store
    assert httpx.get(server.url + "/v1/agents", headers=auth("tpo_not-a-token")).status_code == 401  # a refusal
    deadline = time.monotonic() + 30
    with client_mod.Client(server.url, admin) as c:
        c.push(procurement.read_bytes(), name="verified")  # a record of host.registry
        while not c.verify_audit("host.gateway")["records"]:  # the gateway's refusals are flushed in the background
            assert time.monotonic() < deadline
            time.sleep(0.1)
    for argv in (["audit", "verify"], ["audit", "verify", "--json"], ["audit", "verify", "--agent", "host.gateway"],
                 ["audit", "show", "host.gateway", "--json"], ["audit", "show", "host.registry"]):
        there = Side("server", [], env)
        here = Side("local", [], {"TORPOR_STORE": str(server.host.store_dir)})
        assert there(*argv) == here(*argv), argv
    out = here("audit", "verify", "--json")[1]
    assert json.loads(out)["ok"] is True and json.loads(out)["agents"] > 0
    reader = token(server.host.store, "acme", "runs:read")
    for argv in (["audit", "verify"], ["audit", "show", "host.gateway"]):
        status, out, _ = Side("server", [], {**env, remote.TOKEN_ENV: reader})(*argv, "--json")
        assert status == 2 and json.loads(out)["error"]["code"] == "forbidden", (argv, out)


def test_resume_and_resolve_of_an_in_doubt_agent_print_the_same_against_a_server(
        bundles: BundleFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real `torpor run` SIGKILLed mid-call on each side's store (the server's while it
    serves), then resumed (its call may have taken effect: in_doubt) and settled."""
    payer = payer_bundle(bundles, tmp_path, monkeypatch)
    with InProcessServer(tmp_path / "served") as srv:
        secret = token(srv.host.store, "default", "runs:write", "runs:read", "approvals:write")
        sides = (Side("local", [], {"TORPOR_STORE": str(tmp_path / "local")}),
                 Side("server", [], {remote.SERVER_ENV: srv.url, remote.TOKEN_ENV: secret}))
        marker = tmp_path / "charge.log"  # one path, so that both agents' calls read the same
        kill_mid_call(payer, tmp_path / "local", marker)
        marker.unlink()
        kill_mid_call(payer, tmp_path / "served", marker)
        both(sides, "ps")
        out, _ = both(sides, "resume", "{0}", code=4)
        assert "in_doubt" in out
        out, _ = both(sides, "resolve", "{0}", "--result", '{"charged": 42}', "--json")
        assert json.loads(out)["status"] == "completed" and json.loads(out)["output"]["results"][0]["value"] == {
            "charged": 42}
        same_error(sides, "resolve", "{0}", "--fail", "late", code="invalid_state")
        assert marker.read_text().count("started") == 1  # neither side ran the call again


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    """``torpor ARGV --json`` in this process: its exit code and its JSON."""
    code = main([*argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_what_a_server_cannot_take_is_refused_in_one_line(server: InProcessServer, procurement: Path,
                                                          tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(remote.SERVER_ENV, server.url)
    monkeypatch.setenv(remote.TOKEN_ENV, token(server.host.store, "acme", "admin"))
    for argv, says in ((["ps", "--store", "/tmp"], "--store does not apply"),
                       (["run", "x", "--tools-dir", "/tmp"], "--tools-dir does not apply"),
                       (["approve", "01M9AAAAAAAAAAAAAAAAAAAAAA", "--by", "bob"], "--by does not apply"),
                       (["audit", "show", "01M9AAAAAAAAAAAAAAAAAAAAAA", "--payloads"], "--payloads does not apply"),
                       (["resume", "--all"], "--all does not apply against a server"),
                       (["run", str(procurement)], "push it first"),
                       (["replay", "01M9AAAAAAAAAAAAAAAAAAAAAA"], "`torpor replay` does not go to a server"),
                       (["store", "check"], "`torpor store check` does not go to a server")):
        code, out = cli(capsys, *argv)
        assert code == 2 and out["error"]["code"] == "invalid_config", (argv, out)
        assert says in out["error"]["message"], (argv, out)
    # The server's own side stays local under $TORPOR_SERVER; an explicit --server is refused.
    token(tmp_path / "own", "globex")
    code, out = cli(capsys, "tokens", "list", "--store", str(tmp_path / "own"))
    assert code == 0 and [t["tenant"] for t in out] == ["globex"], out
    monkeypatch.delenv(remote.SERVER_ENV)
    code, out = cli(capsys, "--server", server.url, "tokens", "list")
    assert code == 2 and "`torpor tokens list` does not go to a server" in out["error"]["message"]
    assert _command_of(["--server", server.url, "--token-file", "t", "ps", "-h"]) == "ps"


def test_no_server_a_wrong_url_a_bad_token_and_a_token_without_the_scope(
        server: InProcessServer, tmp_path: Path) -> None:
    reader = token(server.host.store, "acme", "runs:read")
    cases = [
        ([], {remote.SERVER_ENV: f"http://127.0.0.1:{free_port()}"}, "server_unreachable", "cannot connect"),
        ([], {remote.SERVER_ENV: server.url + "/api", remote.TOKEN_ENV: reader}, "not_found",
         "GET /api/v1/agents (check the --server URL)"),
        ([], {remote.SERVER_ENV: "127.0.0.1:8700"}, "invalid_config", "give the server's URL"),
        ([], {remote.SERVER_ENV: server.url, remote.TOKEN_ENV: "tpo_not-a-token"}, "unauthenticated", "token"),
        ([], {remote.SERVER_ENV: server.url}, "unauthenticated", "set $TORPOR_TOKEN or pass --token-file"),
        (["--token-file", str(tmp_path / "none")], {remote.SERVER_ENV: server.url}, "invalid_config",
         "cannot read it"),
    ]
    procs = [(code, says, torpor(*pre, "ps", env=env), torpor(*pre, "ps", "--json", env=env))
             for pre, env, code, says in cases]
    for code, says, text, as_json in procs:
        out, err = text.communicate(timeout=120)
        assert text.returncode == 2 and out == "" and err.count("\n") == 1, (code, out, err)
        assert err.startswith(f"torpor: error[{code}]: ") and says in err, (code, err)
        out, err = as_json.communicate(timeout=120)
        assert as_json.returncode == 2 and json.loads(out) == {"status": "error", "error": {
            "code": code, "message": err.strip() or json.loads(out)["error"]["message"]}}
    # A token that may read but not decide, push or run: 403 forbidden, exit 2; reading works.
    env = {remote.SERVER_ENV: server.url, remote.TOKEN_ENV: reader}
    procs = [torpor(*argv, "--json", env=env) for argv in (["approve", "01M9AAAAAAAAAAAAAAAAAAAAAA"],
                                                          ["run", "procurement"], ["approvals"])]
    for proc, code in zip(procs, ("forbidden", "forbidden", None), strict=True):
        out, _ = proc.communicate(timeout=120)
        if code is None:
            assert proc.returncode == 0 and isinstance(json.loads(out), list)
        else:
            assert proc.returncode == 2 and json.loads(out)["error"]["code"] == code, out
            assert "lacks the scope" in json.loads(out)["error"]["message"]


def test_a_rate_limit_is_waited_out_once_then_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    config = ServerConfig(token_rate=1.0, token_burst=1, tenant_rate=1.0, tenant_burst=1)
    with InProcessServer(tmp_path / "store", config=config) as srv:
        secret = token(srv.host.store, "acme", "runs:read")
        slept: list[float] = []

        def sleep(s: float) -> None:
            slept.append(s)
            time.sleep(s)

        with client_mod.Client(srv.url, secret, sleep=sleep) as c:
            assert c.agents() == [] and c.agents() == []  # the second waited out its Retry-After
            assert slept == [1.0]
        # A Retry-After longer than the client waits: one line (and --json), exit 2.
        monkeypatch.setattr(client_mod, "MAX_RETRY_AFTER_S", 0.5)
        monkeypatch.setenv(remote.SERVER_ENV, srv.url)
        monkeypatch.setenv(remote.TOKEN_ENV, secret)
        codes = [cli(capsys, "approvals") for _ in range(2)]
        assert codes[0] == (0, []) or codes[0][1]["error"]["code"] == "rate_limited"
        code, out = codes[1]
        assert code == 2 and out["error"]["code"] == "rate_limited" and "retry after 1s" in out["error"]["message"]
        with client_mod.Client(srv.url, secret, sleep=slept.append) as c, pytest.raises(RateLimited):
            monkeypatch.setattr(client_mod, "MAX_RETRY_AFTER_S", 10.0)
            c.agents()  # refused, retried once after the (recorded, not slept) wait, refused again
        assert slept[1:] == [1.0]


def test_the_server_keeps_a_runs_log_lines_and_principal_and_one_key_starts_one_run(
        server: InProcessServer, procurement: Path) -> None:
    secret = token(server.host.store, "acme", "admin")
    with client_mod.Client(server.url, secret) as c:
        c.push(procurement.read_bytes(), name="logs-test")
        first = c.start_run("logs-test", json.loads(COMPLETES), on_behalf_of="dave", wait=60,
                            idempotency_key="k-1")
        again = c.start_run("logs-test", json.loads(COMPLETES), on_behalf_of="dave", wait=60,
                            idempotency_key="k-1")
        assert first["agent_id"] == again["agent_id"] and first["status"] == "completed"
        assert first["principal"] == "dave"
        assert {"level": "warn", "message": "rejected (unknown_item): 'pens' is not in the catalogue"} in first["logs"]
        assert c.wait(first["agent_id"], 1)["logs"] == first["logs"]
        # The same key for another request is a conflict, not a second run.
        with pytest.raises(TorporError) as exc:
            c.start_run("logs-test", json.loads(COMPLETES), on_behalf_of="erin", idempotency_key="k-1")
        assert exc.value.code == "idempotency_conflict"
    r = httpx.post(server.url + "/v1/runs", json={"agent": "logs-test", "on_behalf_of": 7}, headers=auth(secret))
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_input"


def test_recent_logs_are_bounded_by_count_and_bytes() -> None:
    kept = RecentLogs(max_agents=2, max_bytes=100)
    kept.put("a", [{"level": "info", "message": "x" * 10}])
    kept.put("b", [{"level": "info", "message": "y"}])
    kept.put("c", [{"level": "info", "message": "z"}])
    assert kept.get("a") == [] and kept.get("b") and kept.get("c")
    kept.put("d", [{"level": "info", "message": "w" * 90}])  # over the bytes: the older go first
    assert kept.get("b") == [] and kept.get("c") == [] and kept.get("d") and kept.bytes == 106
    kept.put("d", [])  # a drive that logged nothing replaces the earlier lines
    assert kept.get("d") == [] and kept.bytes == 0


def test_an_answer_that_is_not_the_apis_is_bad_server_answer(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A web server that is not Torpor's (its 404 page is HTML), and the one parser's codes."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as web:
        threading.Thread(target=web.serve_forever, daemon=True).start()
        try:
            monkeypatch.setenv(remote.SERVER_ENV, f"http://127.0.0.1:{web.server_address[1]}")
            code, out = cli(capsys, "ps")
        finally:
            web.shutdown()
    assert code == 2 and out["error"]["code"] == "bad_server_answer"
    assert "HTTP 404" in out["error"]["message"] and "/v1/agents is not a Torpor API answer" in out["error"]["message"]
    request = httpx.Request("GET", "http://127.0.0.1:8700/v1/agents")
    for status, body, cls, code_ in ((500, {"error": {"code": "internal", "message": "boom"}}, TorporError, "internal"),
                                     (404, {"error": {"code": "agent_not_found", "message": "no agent x"}},
                                      AgentNotFound, "agent_not_found"),
                                     (503, {"error": {"code": "store_full", "message": "full"}}, TorporError,
                                      "store_full"),
                                     (400, {"error": "not an object"}, BadServerAnswer, "bad_server_answer")):
        err = client_mod.error_of(httpx.Response(status, json=body, request=request), "http://127.0.0.1:8700")
        assert type(err) is cls and err.code == code_, (status, body, err)


def test_a_run_against_a_server_imports_no_wasmtime(server: InProcessServer, procurement: Path) -> None:
    """The client prints a run's result from the agent's record: it needs no sandbox."""
    secret = token(server.host.store, "acme", "admin")
    with client_mod.Client(server.url, secret) as c:
        c.push(procurement.read_bytes(), name="light")
    code = ("import json, sys\nfrom host.cli.app import main\n"
            f"rc = main(['--server', {server.url!r}, 'run', 'light', '--input', {COMPLETES!r}, '--json'])\n"
            "sys.stderr.write('MODULES ' + json.dumps(sorted(sys.modules)) + ' RC ' + str(rc))\n")
    env = {k: v for k, v in os.environ.items() if k != remote.SERVER_ENV}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**env, remote.TOKEN_ENV: secret})
    mods, rc = proc.stderr.rsplit("MODULES ", 1)[1].rsplit(" RC ", 1)
    assert rc == "0" and json.loads(proc.stdout)["status"] == "completed", proc
    heavy = [m for m in json.loads(mods) if m.split(".")[0] in ("wasmtime", "pydantic", "starlette", "uvicorn")
             or m in ("host.runtime.host", "host.runtime.agent")]
    assert not heavy, heavy


def test_ctrl_c_ends_the_waiting_not_the_run(server: InProcessServer, bundles: BundleFactory) -> None:
    secret = token(server.host.store, "acme", "admin")
    with client_mod.Client(server.url, secret) as c:
        c.push(bundles.guest("slowtool").read_bytes(), name="slow")
        proc = torpor("run", "slow", "--input", '{"n": 3, "ms": 1000}',
                      env={remote.SERVER_ENV: server.url, remote.TOKEN_ENV: secret})
        deadline = time.monotonic() + 60
        waiters = server.state.scheduler._waiters
        while True:  # the run started and the CLI heard its id: it long-polls the agent now
            started = [a for a in c.agents() if a.get("name") == "slowtool"]
            if started and started[0]["agent_id"] in waiters:
                break
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 128 + signal.SIGINT, err
        said = re.search(r"stopped waiting; agent (\S+) goes on on the server", err)
        assert said is not None, err
        assert c.wait(said.group(1), 60)["status"] == "completed"  # the run went on without its client


class _DropFirstRun:
    """A proxy in front of the server that forwards the first ``POST /v1/runs`` and then
    breaks the connection instead of answering: the run started, its client did not hear it."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.runs = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as f:
            while True:
                line = f.readline()
                if not line:
                    return
                method, path, _ = line.decode().split(" ", 2)
                headers = {}
                while (h := f.readline().decode().strip()):
                    k, v = h.split(":", 1)
                    headers[k.strip().lower()] = v.strip()
                body = f.read(int(headers.get("content-length", 0)))
                headers.pop("host", None)
                r = httpx.request(method, self.upstream + path, headers=headers, content=body, timeout=60)
                if method == "POST" and path == "/v1/runs":
                    self.runs += 1
                    if self.runs == 1:
                        return  # the answer is lost on the way
                conn.sendall(f"HTTP/1.1 {r.status_code} X\r\nContent-Type: application/json\r\n"
                             f"Content-Length: {len(r.content)}\r\n\r\n".encode() + r.content)


def test_a_run_request_whose_answer_is_lost_is_retried_with_its_key_and_starts_one_run(
        server: InProcessServer, procurement: Path) -> None:
    secret = token(server.host.store, "acme", "admin")
    with client_mod.Client(server.url, secret) as c:
        c.push(procurement.read_bytes(), name="once")
        before = {a["agent_id"] for a in c.agents()}
    proxy = _DropFirstRun(server.url)
    try:
        proc = torpor("run", "once", "--input", COMPLETES, "--json",
                      env={remote.SERVER_ENV: proxy.url, remote.TOKEN_ENV: secret})
        out, err = proc.communicate(timeout=120)
    finally:
        proxy.sock.close()
    assert proc.returncode == 0 and json.loads(out)["status"] == "completed", (out, err)
    assert proxy.runs == 2  # sent twice, with one Idempotency-Key
    with client_mod.Client(server.url, secret) as c:
        started = [a for a in c.agents() if a["agent_id"] not in before]
    assert [a["agent_id"] for a in started] == [json.loads(out)["agent_id"]]  # one run, the one printed
