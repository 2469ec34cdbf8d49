"""The vault (encrypted at rest, key checked) and the broker (leases per agent and tool, never to the guest)."""

from __future__ import annotations

import io
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from host.runtime import Host
from host.trust.credentials import CredentialMissing, LeaseRevoked, VaultBroker
from host.trust.vault import SecretNotFound, Vault, VaultKeyError, generate_key

pytestmark = pytest.mark.timeout(120)
GUEST = Path(__file__).parent / "guests" / "secretuse"
SECRET = "erp-secret-value-0123456789"


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORPOR_VAULT_KEY", raising=False)
    monkeypatch.delenv("TORPOR_VAULT_KEY_FILE", raising=False)


def test_vault_round_trip_encrypted_at_rest(tmp_path: Path) -> None:
    v = Vault(tmp_path)
    info = v.set("erp_token", SECRET)
    assert info.version == 1
    assert v.set("erp_token", SECRET + "2").version == 2
    v.set("other", "x")
    assert [i.name for i in v.list()] == ["erp_token", "other"]
    assert v.get("erp_token") == SECRET + "2"
    raw = (tmp_path / "vault.json").read_bytes()
    assert SECRET.encode() not in raw and b"erp_token" in raw  # names plain, values sealed
    for name in ("vault.json", "vault.key"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600
    assert v.remove("other") and not v.remove("other")
    with pytest.raises(SecretNotFound, match="torpor secrets set nope"):
        v.get("nope")
    with pytest.raises(Exception, match="not a secret name"):
        v.set("bad name", "x")


def test_wrong_vault_key_is_refused_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORPOR_VAULT_KEY", generate_key())
    Vault(tmp_path).set("erp_token", SECRET)
    monkeypatch.setenv("TORPOR_VAULT_KEY", generate_key())
    v = Vault(tmp_path)
    with pytest.raises(VaultKeyError, match="does not open the vault") as exc:
        v.get("erp_token")
    assert exc.value.code == "vault_key" and "TORPOR_VAULT_KEY" in str(exc.value)
    with pytest.raises(VaultKeyError):
        v.set("another", "x")  # never mixes keys in one vault
    assert [i.name for i in v.list()] == ["erp_token"]  # listing needs no key
    monkeypatch.setenv("TORPOR_VAULT_KEY", "a passphrase, not a key")
    with pytest.raises(VaultKeyError, match="not a 32-byte"):
        Vault(tmp_path).get("erp_token")


def test_passphrase_key_and_tampered_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORPOR_VAULT_KEY", "correct horse battery staple")
    Vault(tmp_path).set("a", SECRET)
    assert Vault(tmp_path).get("a") == SECRET
    monkeypatch.setenv("TORPOR_VAULT_KEY", "wrong horse")
    with pytest.raises(VaultKeyError, match="fingerprint"):
        Vault(tmp_path).get("a")
    monkeypatch.setenv("TORPOR_VAULT_KEY", "correct horse battery staple")
    data = json.loads((tmp_path / "vault.json").read_text())
    data["secrets"]["b"] = dict(data["secrets"]["a"])  # a ciphertext moved to another name
    (tmp_path / "vault.json").write_text(json.dumps(data))
    with pytest.raises(VaultKeyError, match="does not decrypt"):
        Vault(tmp_path).get("b")


def test_cli_secrets_set_list_rm_never_print_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from host.cli import main

    store = ["--store", str(tmp_path)]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO((SECRET + "\n").encode())))
    assert main(["secrets", "set", "erp_token", *store]) == 0
    (tmp_path / "v.txt").write_text("from-a-file\n")
    assert main(["secrets", "set", "file_token", "--value-file", str(tmp_path / "v.txt"), "--json", *store]) == 0
    assert main(["secrets", "list", "--json", *store]) == 0
    out = capsys.readouterr().out
    listed = json.loads(out.strip().splitlines()[-1])
    assert [i["name"] for i in listed] == ["erp_token", "file_token"]
    assert SECRET not in out and "from-a-file" not in out
    assert Vault(tmp_path).get("erp_token") == SECRET  # one trailing newline dropped
    assert Vault(tmp_path).get("file_token") == "from-a-file"
    assert main(["secrets", "rm", "file_token", *store]) == 0
    assert main(["secrets", "rm", "file_token", *store]) == 2
    with pytest.raises(SystemExit):  # there is no way to pass a value on the command line
        main(["secrets", "set", "erp_token", "--value", SECRET, *store])
    monkeypatch.setenv("TORPOR_VAULT_KEY", generate_key())
    assert main(["secrets", "set", "x", "--value-file", str(tmp_path / "v.txt"), *store]) == 2
    assert "vault_key" in capsys.readouterr().err


def test_policy_naming_a_missing_credential_is_refused_before_start(bundles: Any, tmp_path: Path) -> None:
    b = bundles.load(GUEST)
    Vault(tmp_path / "s").set("unrelated", "x")
    with Host(tmp_path / "s", broker=VaultBroker.for_store(tmp_path / "s")) as host:
        with pytest.raises(CredentialMissing, match=r"`erp_token`.*torpor secrets set erp_token") as exc:
            anyio.run(lambda: host.run(b, {"n": 1, "ms": 0}))
        assert exc.value.code == "credential_missing" and "erp.check" in str(exc.value)
        assert host.list_agents() == []  # nothing was spawned


def test_wrong_vault_key_refuses_the_agent_at_spawn(bundles: Any, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    b = bundles.load(GUEST)
    monkeypatch.setenv("TORPOR_VAULT_KEY", generate_key())
    Vault(tmp_path / "s").set("erp_token", SECRET)
    monkeypatch.setenv("TORPOR_VAULT_KEY", generate_key())
    with Host(tmp_path / "s", broker=VaultBroker.for_store(tmp_path / "s")) as host:
        with pytest.raises(VaultKeyError):
            anyio.run(lambda: host.run(b, {"n": 1, "ms": 0}))
        assert host.list_agents() == []


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def test_leases_renew_expire_and_are_revoked(tmp_path: Path) -> None:
    Vault(tmp_path).set("erp_token", SECRET)
    clock = Clock()
    broker = VaultBroker(Vault(tmp_path), lease_ttl_s=10, clock=clock)
    events: list[tuple[str, dict[str, Any]]] = []

    def sink(kind: str, data: dict[str, Any]) -> None:
        events.append((kind, data))

    s1 = broker.secrets_for("A", "erp.check", ("erp_token",), on_event=sink)
    assert s1["erp_token"] == SECRET and SECRET not in repr(s1)
    lease_id = events[0][1]["lease_id"]
    clock.t += 2
    broker.secrets_for("A", "erp.check", ("erp_token",), on_event=sink)  # plenty left: the same lease, no event
    assert len(events) == 1
    clock.t += 5  # 3 s left of 10: renewed in place
    broker.secrets_for("A", "erp.check", ("erp_token",), on_event=sink)
    assert events[-1][0] == "credential.renewed" and events[-1][1]["lease_id"] == lease_id
    clock.t += 60  # idle past expiry (waiting on a human): a fresh lease replaces it
    broker.secrets_for("A", "erp.check", ("erp_token",), on_event=sink)
    kind, data = events[-1]
    assert kind == "credential.leased" and data["replaces"] == lease_id and data["lease_id"] != lease_id
    s_other = broker.secrets_for("A", "other.tool", ("erp_token",), on_event=sink)  # per tool: its own lease
    assert events[-1][1]["tool"] == "other.tool"
    clock.t += 60  # expires while a long tool still holds the mapping: reading renews it, the agent lives
    assert s_other["erp_token"] == SECRET and events[-1][0] == "credential.renewed"
    assert {ev[1]["lease_id"] for ev in events} and all(SECRET not in json.dumps(ev) for ev in events)
    assert broker.revoke("A") == ["erp_token"]
    with pytest.raises(LeaseRevoked, match="must not keep secrets"):
        _ = s_other["erp_token"]
    with pytest.raises(LeaseRevoked):
        broker.secrets_for("A", "erp.check", ("erp_token",))
    assert broker.leases("A") == []


def test_lease_expiring_mid_run_is_renewed_and_audited(bundles: Any, tmp_path: Path) -> None:
    """Leases of 50 ms, tool calls of 80 ms: every lease runs out mid-call; the run never notices."""
    b = bundles.load(GUEST)
    Vault(tmp_path / "s").set("erp_token", SECRET)
    broker = VaultBroker.for_store(tmp_path / "s", lease_ttl_s=0.05)
    with Host(tmp_path / "s", warm_idle_s=0.0, broker=broker) as host:
        res = anyio.run(lambda: host.run(b, {"n": 3, "ms": 80}))
        assert res.status == "completed", res.error
        recs = host.audit_records(res.agent_id)
    kinds = [r["kind"] for r in recs]
    # One lease for the task and tool, expired mid-call each time and renewed when the tool read it (on a
    # loaded machine a gap between calls can also outlast it: then a fresh lease replaces it, saying so).
    leased = [r for r in recs if r["kind"] == "credential.leased"]
    assert leased and all(r.get("replaces") for r in leased[1:])
    assert kinds.count("credential.renewed") >= 1
    assert len(leased) + kinds.count("credential.renewed") >= 4
    revoked = [r for r in recs if r["kind"] == "credential.revoked"]
    assert revoked and revoked[0]["names"] == ["erp_token"]
    assert kinds.index("credential.revoked") > kinds.index("agent.completed")
    assert all(SECRET not in json.dumps(r) for r in recs)
