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
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import BundleFactory
from serve_helpers import InProcessServer, token

from host.cli import remote

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
                      "output_digest", "id", "key_ids"})


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
    text = re.sub(r'"(snapshot_bytes|last_checkpoint_bytes|size|bytes)": \d+', r'"\1": 0', text)
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
    diff = [line for i in (1, 2) for line in difflib.unified_diff(lo[i].splitlines(), so[i].splitlines(), lineterm="")]
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
