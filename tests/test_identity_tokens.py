"""Agent identity: provisioned at spawn, a signed expiring token tools can verify, retired at termination."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from host.runtime import Host
from host.tools.registry import ToolContext
from host.trust.identity import (
    KEY_FILE,
    HostKey,
    IdentityService,
    TokenExpired,
    TokenInvalid,
    TokenRevoked,
    b64d,
    b64e,
    token_for,
    verify_token,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def steps_run(bundles: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, Any]:
    store = tmp_path_factory.mktemp("ident") / "store"
    b = bundles.load(Path(__file__).parent.parent / "guest_sdk" / "examples" / "steps")
    with Host(store) as host:
        res = anyio.run(lambda: host.run(b, {"n": 2}, on_behalf_of="alice@example.com"))
    assert res.status == "completed"
    return store, res.agent_id, b


def test_host_key_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    k1 = HostKey.load_or_create(tmp_path)
    k2 = HostKey.load_or_create(tmp_path)
    assert k1.key_id == k2.key_id
    assert stat.S_IMODE(os.stat(tmp_path / KEY_FILE).st_mode) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_concurrent_key_creation_agrees(tmp_path: Path) -> None:
    code = "import sys; from host.trust.identity import HostKey; print(HostKey.load_or_create(sys.argv[1]).key_id)"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    ids = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert len(ids) == 1 and HostKey.load_or_create(tmp_path).key_id in ids


def test_spawn_provisions_identity_and_termination_retires_it(steps_run: tuple[Path, str, Any]) -> None:
    store, aid, b = steps_run
    with Host(store) as host:
        rec = host.get_agent(aid)
        ident = rec["identity"]
        assert ident["version"] == b.digest and ident["principal"] == "alice@example.com"
        assert ident["retired_at"] is not None and ident["retired_at"] >= rec["created_at"]
        assert "token" not in ident  # the record holds claims, never the bearer token
        kinds = [r["kind"] for r in host.audit_records(aid)]
        assert kinds[:2] == ["agent.spawned", "identity.issued"]
        assert kinds[-2:] == ["identity.revoked", "agent.completed"]
        with host.store.read() as txn:
            assert txn.get_blob("identity", aid) is None  # the token is gone with the agent
            assert json.loads(txn.get_blob("revocations", f"agent/{aid}"))["agent_id"] == aid
        with pytest.raises(TokenRevoked, match="completed: its identity was retired"):
            host.identity.token_for(aid)


def _suspended_agent(host: Host, **fields: Any) -> str:
    rec = {"agent_id": "01TESTAGENT0000000000000000"[:26], "name": "probe", "bundle_digest": "ab" * 32,
           "status": "suspended", "principal": "bob", "parent": {"agent_id": "01PARENT", "checkpoint": 3}, **fields}
    host.store.transact(lambda txn: txn.put_agent(rec))
    return str(rec["agent_id"])


def test_tools_verify_tokens_and_tampering_fails(tmp_path: Path) -> None:
    with Host(tmp_path / "s") as host:
        aid = _suspended_agent(host)
        ctx = ToolContext(agent_id=aid, agent_name="probe", call_seq=1, kv_namespace="x", store=host.store)
        token = token_for(ctx)  # what a host-side tool calls
        claims = verify_token(token, store=host.store)
        assert (claims.agent_id, claims.name, claims.version, claims.principal, claims.parent) == (
            aid, "probe", "ab" * 32, "bob", "01PARENT")
        assert claims.expires_at - claims.issued_at == pytest.approx(3600)
        assert token_for(ctx) == token  # stable while it has life left
        # offline, with the host's public key only
        assert verify_token(token, public_keys={host.identity.key.key_id: host.identity.key.public}).agent_id == aid
        prefix, payload, sig = token.split(".")
        body = json.loads(b64d(payload))
        body["prn"] = "mallory"
        forged = f"{prefix}.{b64e(json.dumps(body).encode())}.{sig}"
        with pytest.raises(TokenInvalid, match="altered or forged"):
            verify_token(forged, store=host.store)
        other = IdentityService(host.store, tmp_path / "elsewhere", key=HostKey.generate())
        with pytest.raises(TokenInvalid, match="does not know"):
            verify_token(other.issue({"agent_id": aid, "name": "probe"}).token, store=host.store)
        with pytest.raises(TokenInvalid):
            verify_token("not-a-token", store=host.store)
        with pytest.raises(TokenExpired, match="expired"):
            verify_token(token, store=host.store, now=time.time() + 7200)


def test_token_renews_for_a_live_agent_and_revocation_wins(tmp_path: Path) -> None:
    with Host(tmp_path / "s") as host:
        svc = IdentityService(host.store, host.store_dir, ttl_s=60)
        aid = _suspended_agent(host)
        t1 = svc.token_for(aid)
        t2 = svc.token_for(aid, min_remaining_s=3600)  # near expiry: a fresh one (the agent waited for days, say)
        assert t1 != t2 and svc.verify(t2).agent_id == aid
        rec = host.get_agent(aid)
        rec.pop("stalled", None)
        retire = svc.retire(rec, lambda kind, **d: None, reason="terminated by operator")
        host.store.transact(retire)
        for t in (t1, t2):
            with pytest.raises(TokenRevoked, match="terminated by operator"):
                svc.verify(t)


def test_fork_gets_its_own_identity_naming_its_parent(bundles: Any, tmp_path: Path) -> None:
    b = bundles.load(Path(__file__).parent.parent / "guest_sdk" / "examples" / "steps")
    with Host(tmp_path / "s") as host:
        res = anyio.run(lambda: host.run(b, {"n": 3}))
        child = host.fork(res.agent_id, 2)
        rec = host.get_agent(child)
        assert rec["identity"]["parent"] == res.agent_id
        assert rec["identity"]["token_id"] != host.get_agent(res.agent_id)["identity"]["token_id"]
        assert rec["identity"]["retired_at"] is None
        claims = host.identity.verify(host.identity.token_for(child))
        assert claims.parent == res.agent_id and claims.version == b.digest
        assert [r["kind"] for r in host.audit_records(child)] == ["agent.forked", "identity.issued"]
        done = anyio.run(lambda: host.resume(child))
        assert done.status == "completed"
        with pytest.raises(TokenRevoked):
            host.identity.token_for(child)


def test_cli_identity_show_token_verify_key(steps_run: tuple[Path, str, Any], tmp_path: Path) -> None:
    from host.cli import main

    store, aid, _ = steps_run
    env_store = ["--store", str(store)]
    assert main(["identity", "key", "--json", *env_store]) == 0
    assert main(["identity", "show", aid, *env_store]) == 0
    # a retired agent gets no token
    assert main(["identity", "token", aid, *env_store]) == 2
    with Host(tmp_path / "s") as host:
        live = _suspended_agent(host)
        token = host.identity.token_for(live)
        pub = host.identity.key.public_pem()
    (tmp_path / "pub.pem").write_text(pub)
    assert main(["identity", "verify", token, "--store", str(tmp_path / "s")]) == 0
    assert main(["identity", "verify", token, "--public-key", str(tmp_path / "pub.pem")]) == 0
    assert main(["identity", "verify", token[:-4] + "AAAA", "--store", str(tmp_path / "s")]) == 1


def test_one_leaked_token_can_be_revoked_without_retiring_the_agent(tmp_path: Path) -> None:
    with Host(tmp_path / "s") as host:
        aid = _suspended_agent(host)
        leaked = host.identity.token_for(aid)
        assert host.identity.revoke_token(leaked, reason="pasted in a chat").agent_id == aid
        with pytest.raises(TokenRevoked, match="pasted in a chat"):
            host.identity.verify(leaked)
        fresh = host.identity.token_for(aid)
        assert fresh != leaked and host.identity.verify(fresh).agent_id == aid
