"""``torpor tokens``: operator tokens created, listed, revoked and refused as real processes
run them, and the token store's own rules (hashed, expiring, revocable)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from host.errors import ConfigError, Unauthenticated
from host.trust import operator_tokens
from snapshots.lmdb_store import LmdbStore


def torpor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "host.cli", *args], capture_output=True, text=True, timeout=120)


def test_create_list_revoke_through_the_cli(tmp_path: Path) -> None:
    store = str(tmp_path / "s")
    r = torpor("tokens", "create", "--store", store, "--tenant", "acme", "--scope", "runs:read", "--scope",
               "runs:write", "--name", "ci", "--expires", "30d", "--json")
    assert r.returncode == 0, r.stderr
    made = json.loads(r.stdout)
    secret = made["secret"]
    assert secret.startswith("tpo_") and made["tenant"] == "acme" and made["scopes"] == ["runs:read", "runs:write"]
    assert made["expires_at"] > time.time() + 29 * 86400
    listed = json.loads(torpor("tokens", "list", "--store", store, "--json").stdout)
    assert [(t["token_id"], t["state"], t["name"]) for t in listed] == [(made["token_id"], "active", "ci")]
    assert secret not in json.dumps(listed)
    raw = (tmp_path / "s" / "db" / "data.mdb").read_bytes()
    assert secret.encode() not in raw and operator_tokens.secret_hash(secret).encode() in raw  # kept hashed
    r = torpor("tokens", "revoke", made["token_id"], "--store", store)
    assert r.returncode == 0 and "revoked" in r.stdout
    assert json.loads(torpor("tokens", "list", "--store", store, "--json").stdout)[0]["state"] == "revoked"
    s = LmdbStore.open(tmp_path / "s" / "db", create=False)
    try:
        with pytest.raises(Unauthenticated, match="revoked"):
            operator_tokens.authenticate(s, secret)
    finally:
        s.close()


@pytest.mark.parametrize(("args", "code"), [
    (("--tenant", "acme", "--scope", "root"), "invalid_config"),
    (("--tenant", "acme"), "invalid_config"),
    (("--tenant", "a/b", "--scope", "admin"), "invalid_config"),
    (("--tenant", "acme", "--scope", "admin", "--expires", "soon"), "invalid_config"),
    (("--tenant", "acme", "--scope", "admin", "--expires", "0s"), "invalid_config"),
])
def test_bad_token_requests_are_one_line_errors(tmp_path: Path, args: tuple[str, ...], code: str) -> None:
    r = torpor("tokens", "create", "--store", str(tmp_path), *args)
    assert r.returncode == 2 and r.stderr.startswith(f"torpor: error[{code}]:") and r.stderr.count("\n") == 1, r.stderr


def test_revoking_an_unknown_token_and_listing_no_store(tmp_path: Path) -> None:
    torpor("tokens", "create", "--store", str(tmp_path), "--tenant", "acme", "--scope", "admin")
    r = torpor("tokens", "revoke", "tok_nope", "--store", str(tmp_path), "--json")
    assert r.returncode == 2 and json.loads(r.stdout)["error"]["code"] == "token_not_found"
    r = torpor("tokens", "list", "--store", str(tmp_path / "nowhere"))
    assert r.returncode == 2 and "error[invalid_config]" in r.stderr


def test_expiry_and_damaged_entries_grant_nothing(tmp_path: Path) -> None:
    (tmp_path / "db").mkdir()
    s = LmdbStore.open(tmp_path / "db")
    try:
        now = time.time()
        secret, tok = operator_tokens.create(s, tenant="acme", scopes=["admin"], expires_at=now + 60)
        assert operator_tokens.authenticate(s, secret, now=now).token_id == tok.token_id
        with pytest.raises(Unauthenticated, match="expired"):
            operator_tokens.authenticate(s, secret, now=now + 61)
        with pytest.raises(ConfigError):
            operator_tokens.create(s, tenant="acme", scopes=["admin"], expires_at=now - 1)
        s.transact(lambda txn: txn.put_blob(operator_tokens.BUCKET, operator_tokens.secret_hash(secret), b"{not json"))
        with pytest.raises(Unauthenticated, match="unknown"):
            operator_tokens.authenticate(s, secret)
        assert operator_tokens.tokens(s) == []
        with pytest.raises(Unauthenticated):
            operator_tokens.authenticate(s, "not-a-token")
    finally:
        s.close()
