"""A secret used by a tool never reaches the guest, a snapshot, the journal or the audit log.

The agent (tests/guests/secretuse) calls a host tool whose grant names the
`erp_token` credential; the tool reads it from ``ctx.secrets`` and answers
only ``{"ok": true, "order": i}``. Each answer takes longer than the host's
warm window, so the agent is hibernated at every call (snapshots). Afterwards
every byte the run left behind is searched for the secret: the guest's live
memory at every capture and at the end, every checkpoint decoded back to full
memory, the raw compressed checkpoints, the journal, the audit log, the agent
record, the result and logs, and every file of the store directory (LMDB data
file included). Forms searched: the value, its hex and base64 encodings, and
every 8-byte window of it.

A control run with a leaky tool (it returns the token) proves the scan finds
what it looks for.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from host.runtime import Host, RunResult
from host.sandbox.execution import Execution
from host.trust import audit
from host.trust.credentials import VaultBroker
from host.trust.vault import Vault
from snapshots.delta import apply_delta
from snapshots.format import decode_snapshot

pytestmark = pytest.mark.timeout(120)
GUEST = Path(__file__).parent / "guests" / "secretuse"


def needles(secret: str) -> list[bytes]:
    raw = secret.encode()
    forms = [raw, raw.hex().encode(), base64.b64encode(raw), base64.urlsafe_b64encode(raw).rstrip(b"=")]
    forms += [raw[i:i + 8] for i in range(len(raw) - 7)]
    return forms


def holds(haystack: bytes, secret: str) -> bool:
    return any(n in haystack for n in needles(secret))


def run_and_scan(b: Any, store_dir: Path, secret: str, monkeypatch: pytest.MonkeyPatch) -> tuple[RunResult, list[str]]:
    """Run the agent with the secret in the vault; return where any trace of the secret was found."""
    monkeypatch.delenv("TORPOR_VAULT_KEY", raising=False)
    monkeypatch.delenv("TORPOR_VAULT_KEY_FILE", raising=False)
    Vault(store_dir).set("erp_token", secret)
    memories: list[bytes] = []
    real_capture, real_release = Execution.capture, Execution.release

    def capture(self: Execution) -> Any:
        memories.append(bytes(self._buffer()))
        return real_capture(self)

    def release(self: Execution) -> None:
        if self.live:
            memories.append(bytes(self._buffer()))
        real_release(self)

    monkeypatch.setattr(Execution, "capture", capture)
    monkeypatch.setattr(Execution, "release", release)
    found: list[str] = []
    host = Host(store_dir, warm_idle_s=0.0, broker=VaultBroker.for_store(store_dir))
    try:
        res = anyio.run(lambda: host.run(b, {"n": 4, "ms": 5}))
        assert res.suspensions == 4
        assert host.get_agent(res.agent_id)["usage"]["hibernations"] >= 1  # it really went cold
        loaded, _ = host.load_module(b)
        assert len(memories) >= 5
        # 1. the guest's linear memory, live, at every capture and at the end
        found += [f"guest memory #{i}" for i, mem in enumerate(memories) if holds(mem, secret)]
        with host.store.read() as txn:
            # 2. every checkpoint, raw and decoded back to the full memory it restores
            cps = txn.list_checkpoints(res.agent_id)
            assert len(cps) == 4
            for cp in cps:
                blob = txn.get_checkpoint(res.agent_id, cp.seq)
                assert blob is not None
                if holds(blob, secret):
                    found.append(f"checkpoint {cp.seq} (raw)")
                snap = decode_snapshot(blob, pristine=loaded.pristine)
                size = snap.memory.memory_size
                mem = (bytearray(loaded.pristine) + bytearray(max(0, size - len(loaded.pristine))))[:size]
                apply_delta(snap.memory, mem)
                if holds(bytes(mem), secret) or holds(json.dumps([snap.pending, snap.usage]).encode(), secret):
                    found.append(f"checkpoint {cp.seq} (memory)")
            # 3. the journal, 4. the audit log, 5. the agent record, every blob bucket
            if holds(json.dumps(list(txn.iter_journal(res.agent_id))).encode(), secret):
                found.append("journal")
            recs = [e for _, v in txn.iter_blobs(audit.BUCKET, "") for e in audit.expand(json.loads(v))]
            assert {"credential.leased", "credential.revoked"} <= {r["kind"] for r in recs}
            if holds(json.dumps(recs).encode(), secret):
                found.append("audit log")
            if holds(json.dumps(txn.get_agent(res.agent_id)).encode(), secret):
                found.append("agent record")
            for bucket in ("bundles", "audit", "approvals", "meta", "identity", "revocations", "audit_heads"):
                found += [f"blob {bucket}/{k}" for k, v in txn.iter_blobs(bucket, "") if holds(v, secret)]
        # 6. what the caller got: output, logs
        if holds(json.dumps([res.to_dict(), res.logs]).encode(), secret):
            found.append("result or logs")
    finally:
        host.close()
    # 7. every file of the store directory, the LMDB data file included (the vault holds only ciphertext)
    files = [p for p in store_dir.rglob("*") if p.is_file()]
    assert any(p.name == "data.mdb" for p in files)
    found += [f"file {p.relative_to(store_dir)}" for p in files if holds(p.read_bytes(), secret)]
    return res, found


def test_secret_never_reaches_guest_snapshot_journal_or_audit(bundles: Any, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "sk-live-" + secrets.token_hex(24)
    b = bundles.load(GUEST)
    res, found = run_and_scan(b, tmp_path / "store", secret, monkeypatch)
    assert res.status == "completed", res.error
    assert res.output == {"ok": 4, "sum": 6}
    tool_mod = next(m for n, m in sys.modules.items()  # the operator's tool, loaded under a private name
                    if n.startswith("torpor_tools_") and getattr(m, "__file__", None) == str((GUEST / "secret_tools.py").resolve()))
    assert hashlib.sha256(secret.encode()).hexdigest() in tool_mod.SEEN  # the tool did get it, host side
    assert found == []


def test_the_scan_finds_a_secret_that_does_leak(bundles: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Control: a tool that hands the token to the guest is caught everywhere the token then goes.

    The pipeline's scrubber would mask the token, so the control switches it off: what is
    left is the scan itself, which must find the leak it looks for."""
    from host.trust.scrub import Scrubber

    monkeypatch.setattr(Scrubber, "json_bytes", lambda self, data: None)
    good = bundles.load(GUEST)
    leaky_tool = (GUEST / "secret_tools.py").read_text().replace(
        'return {"ok": bool(token), "order": args.order}', 'return {"ok": bool(token), "order": args.order, "t": token}')
    leaky = tmp_path / "leaky-tools"  # the operator installs the leaky variant instead
    leaky.mkdir()
    (leaky / "secret_tools.py").write_text(leaky_tool)
    monkeypatch.setenv("TORPOR_TOOLS_PATH", str(leaky))
    b = good
    secret = "sk-leak-" + secrets.token_hex(24)
    res, found = run_and_scan(b, tmp_path / "store", secret, monkeypatch)
    assert res.status == "completed", res.error
    assert any(f.startswith("guest memory") for f in found)
    assert any(f.startswith("checkpoint") for f in found)
    assert "journal" in found
    assert "result or logs" in found  # the guest logged the raw answer
