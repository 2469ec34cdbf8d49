"""The registry of versioned agents (host/runtime/registry.py, host/cli/registry.py):
real bundles built by the project's toolchain, pushed into real LMDB stores, run by
reference through a real Host and a real ``torpor`` process.

The promise under test above all: a run resolves its reference once; moving a tag
leaves every agent already started (running or hibernated) on the digest it started
with, and ``inspect`` says which reference it was started as and which digest ran.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import lmdb
import pytest
from conftest import EXAMPLES, ROOT, BundleFactory

from host.errors import (
    BundleCodeRefused,
    BundleError,
    BundleNotFound,
    ImportNotGranted,
    InvalidReference,
)
from host.runtime import Host
from host.runtime.registry import Registry, parse_ref
from host.sandbox import bundle as bundle_mod
from host.sandbox.bundle import Bundle
from host.trust import audit
from policies import PolicyError
from snapshots.errors import RecordCorrupt
from snapshots.lmdb_store import LmdbStore

pytestmark = pytest.mark.timeout(180)

PARKS = {"item": "laptops", "amount": 75_000}  # above the 50,000 authority: waits for a person


@pytest.fixture(scope="module")
def production(bundles: BundleFactory) -> Bundle:
    return bundles.load(EXAMPLES / "procurement")


def variant(b: Bundle, *replacements: tuple[str, str], python: dict[str, str] | None = None) -> bytes:
    """The same module under an edited policy: another version of the same agent."""
    text = b.policy_text
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new)
    return bundle_mod.pack(b.module, text, python=python)


# A canary that grants differently in every section the diff knows.
CANARY_EDITS = (
    ("amount > 50000", "amount > 100000"),  # approvals
    ('[tools."kv.set"]', '[tools."http.fetch"]\nhosts = ["api.example.com"]\ncredentials = ["ERP_TOKEN"]'),
    ("max_calls = 1\n", "max_calls = 2\n"),  # limits
    ("tool_calls = 40", "tool_calls = 60"),  # budgets
)


@pytest.fixture(scope="module")
def canary(production: Bundle) -> bytes:
    return variant(production, *CANARY_EDITS)


def run(host: Host, ref: str, payload: Any, tenant: str = "default") -> Any:
    return anyio.run(lambda: host.run_ref(ref, payload, tenant=tenant))


# -- references ---------------------------------------------------------------------------
def test_references_parse_or_are_refused_with_a_code() -> None:
    hexd = "ab" * 32
    assert parse_ref("procurement") == ("procurement", None, None)
    assert parse_ref("procurement@production") == ("procurement", "production", None)
    assert parse_ref(f"procurement@sha256:{hexd}") == ("procurement", None, hexd)
    assert parse_ref(f"sha256:{hexd}") == (None, None, hexd)
    for bad in ("", "@prod", "proc@", "a/b", "proc@tag@x", "sha256:" + "AB" * 32, "sha256:abc", "x" * 400,
                "-lead", "name with space", "proc@../x"):
        with pytest.raises(InvalidReference) as info:
            parse_ref(bad)
        assert info.value.code == "invalid_reference"


# -- push, versions, tags, resolve ---------------------------------------------------------
def test_push_versions_tags_and_resolve(production: Bundle, canary: bytes, tmp_path: Path) -> None:
    clock = iter(float(t) for t in range(1000, 2000))
    with LmdbStore.open(tmp_path / "db") as store:
        reg = Registry(store, clock=lambda: next(clock))
        v1 = reg.push(production.raw, name="procurement", tag="production")
        assert v1["digest"] == production.digest and v1["abi"] == production.abi_version
        assert v1["tools"] == sorted(production.policy.grants) and v1["tags"] == ["production"] and v1["latest"]
        v2 = reg.push(canary, name="procurement", tag="canary")
        assert v2["digest"] != v1["digest"] and "http.fetch" in v2["tools"] and "kv.set" not in v2["tools"]
        # The bundle's bytes are in the store under their digest: a host can run it.
        with store.read() as txn:
            assert txn.get_blob("bundles", v2["digest"]) == canary
        assert reg.resolve("procurement@production") == v1["digest"]
        assert reg.resolve("procurement@canary") == v2["digest"]
        assert reg.resolve("procurement") == v2["digest"]  # the version pushed last
        assert reg.resolve(f"sha256:{v1['digest']}") == v1["digest"]
        assert reg.resolve(f"procurement@sha256:{v1['digest']}") == v1["digest"]
        shown = reg.versions("procurement")
        assert [v["digest"] for v in shown["versions"]] == [v1["digest"], v2["digest"]]
        assert shown["tags"] == {"production": v1["digest"], "canary": v2["digest"]}
        assert [v["pushed_at"] for v in shown["versions"]] == [v1["pushed_at"], v2["pushed_at"]]
        # Pushing a version again keeps its first push time, makes it the latest, moves the tag given.
        again = reg.push(production.raw, name="procurement", tag="canary")
        assert again["pushed_at"] == v1["pushed_at"] and again["tags"] == ["canary", "production"]
        assert reg.resolve("procurement") == v1["digest"] and reg.resolve("procurement@canary") == v1["digest"]
        assert len(reg.versions("procurement")["versions"]) == 2
        # A tag moves to any version of its name, and says where it was.
        moved = reg.tag("procurement", "canary", f"sha256:{v2['digest']}")
        assert moved == {"name": "procurement", "tag": "canary", "digest": v2["digest"], "previous": v1["digest"]}
        [row] = reg.names()
        assert row["name"] == "procurement" and row["versions"] == 2 and row["latest"] == v1["digest"]
        assert row["tags"] == {"production": v1["digest"], "canary": v2["digest"]}
        reg.tag("procurement", "production", v2["digest"], by="ops-lead")
        # Every write is on the host-level audit chain, sealed and verifiable.
        chain = ("agent_id", "seq", "t", "kind", "prev", "hash")
        log = [(r["kind"], {k: v for k, v in r.items() if k not in chain})
               for r in audit.records(store, "host.registry")]
        assert [k for k, _ in log] == ["registry.pushed"] * 3 + ["registry.tagged"] * 2
        assert [d["new_version"] for _, d in log[:3]] == [True, True, False]
        assert log[2][1]["tag"] == "canary" and log[2][1]["previous"] == v2["digest"]
        assert log[-1][1] == {"tenant": "default", "name": "procurement", "tag": "production",
                              "digest": v2["digest"], "previous": v1["digest"], "by": "ops-lead"}
        report = audit.verify_store(store, agent_id="host.registry")
        assert report.ok and report.records == 5, report.summary()


def test_a_tag_moves_to_a_version_named_as_registry_show_prints_it(production: Bundle, canary: bytes,
                                                                    tmp_path: Path) -> None:
    """``torpor registry show`` prints 12 hex digits of each digest: a tag move takes that (a
    unique prefix of at least 8 digits), or another tag of the same name (promote the canary)."""
    with LmdbStore.open(tmp_path / "db") as store:
        reg = Registry(store)
        v1 = reg.push(production.raw, name="procurement", tag="production")
        v2 = reg.push(canary, name="procurement", tag="canary")
        reg.push(production.raw, name="other")
        assert reg.tag("procurement", "production", f"sha256:{v2['digest'][:12]}")["digest"] == v2["digest"]
        assert reg.tag("procurement", "production", v1["digest"][:8])["previous"] == v2["digest"]
        assert reg.tag("procurement", "production", "procurement@canary")["digest"] == v2["digest"]
        assert reg.tag("procurement", "stable", f"procurement@sha256:{v1['digest']}")["digest"] == v1["digest"]
        refused = [
            (f"sha256:{v1['digest'][:7]}", InvalidReference, "its first 8 digits or more"),  # too short to be sure
            ("0" * 12 if not v1["digest"].startswith("0" * 12) else "f" * 12, BundleNotFound, "no version of"),
            ("other@latest", InvalidReference, "a tag moves within its name"),
            ("procurement@nope", BundleNotFound, "has no tag 'nope'"),
            ("production", InvalidReference, "or NAME@TAG"),
        ]
        for wanted, error, message in refused:
            with pytest.raises(error, match=message):
                reg.tag("procurement", "production", wanted)
        assert reg.resolve("procurement@production") == v2["digest"]  # nothing refused moved it


def test_unknown_names_tags_and_digests_are_bundle_not_found(production: Bundle, canary: bytes,
                                                             tmp_path: Path) -> None:
    with LmdbStore.open(tmp_path / "db") as store:
        reg = Registry(store)
        reg.push(production.raw, name="procurement", tag="production")
        other = bundle_mod.load_bytes(canary).digest
        cases = [
            (lambda: reg.resolve("ghost"), "no bundle named 'ghost'"),
            (lambda: reg.resolve("procurement@nope"), "has no tag 'nope' (its tags: production)"),
            (lambda: reg.resolve(f"sha256:{other}"), "in this registry"),  # nobody pushed it, not stored
            (lambda: reg.resolve(f"procurement@sha256:{other}"), "is not a version of 'procurement'"),
            (lambda: reg.versions("ghost"), "no bundle named 'ghost'"),
            (lambda: reg.tag("ghost", "production", production.digest), "no bundle named 'ghost'"),
            # A tag only points at a version of its own name (even a bundle the store holds).
            (lambda: reg.tag("procurement", "production", other), "is not a version of 'procurement'"),
        ]
        for call, message in cases:
            with pytest.raises(BundleNotFound, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
                call()
            assert info.value.code == "bundle_not_found"
        assert reg.resolve("procurement@production") == production.digest  # nothing moved


def test_a_bad_push_is_refused_before_anything_is_written(production: Bundle, tmp_path: Path) -> None:
    good = production.raw
    truncated = good[: len(good) // 2]
    # The module calls tools; a policy that grants none refuses its import (the one validator).
    no_tools = "[agent]\nname = \"procurement\"\n"
    with LmdbStore.open(tmp_path / "db") as store:
        reg = Registry(store)
        with pytest.raises(BundleError) as info:
            reg.push(b"not a zip at all", name="procurement")
        assert info.value.code == "invalid_bundle"
        with pytest.raises(BundleError):
            reg.push(truncated, name="procurement")
        with pytest.raises(ImportNotGranted) as imp:
            reg.push(bundle_mod.pack(production.module, no_tools), name="procurement")
        assert imp.value.code == "import_not_granted"
        with pytest.raises(PolicyError):
            reg.push(variant(production, ("tool_calls = 40", "tool_calls = -1")), name="procurement")
        for name in ("", "a/b", "x@y", "../up", "diff"):  # "diff" would read as GET /v1/bundles/diff
            with pytest.raises(InvalidReference):
                reg.push(good, name=name)
        with pytest.raises(InvalidReference):
            reg.push(good, name="procurement", tag="pro duction")
        with pytest.raises(InvalidReference):
            reg.push(good, name="procurement", tenant="a/b")
        assert reg.names() == []
        with store.read() as txn:
            assert list(txn.iter_blobs("bundles")) == [] and list(txn.iter_blobs("registry")) == []


def test_names_are_per_tenant_and_a_digest_resolves_only_for_the_tenant_that_pushed_it(
        production: Bundle, canary: bytes, tmp_path: Path) -> None:
    with LmdbStore.open(tmp_path / "db") as store:
        reg = Registry(store)
        reg.push(production.raw, name="procurement", tenant="acme", tag="production")
        reg.push(canary, name="procurement", tenant="globex", tag="production")
        assert reg.resolve("procurement@production", tenant="acme") == production.digest
        assert reg.resolve("procurement@production", tenant="globex") != production.digest
        assert [r["name"] for r in reg.names(tenant="acme")] == ["procurement"]
        assert reg.names(tenant="default") == [] and reg.names(tenant="initech") == []
        for call in (lambda: reg.resolve("procurement", tenant="initech"),
                     lambda: reg.resolve(f"sha256:{production.digest}", tenant="globex"),
                     lambda: reg.resolve(f"sha256:{production.digest}", tenant="default"),
                     lambda: reg.versions("procurement", tenant="initech"),
                     lambda: reg.tag("procurement", "production", production.digest, tenant="globex")):
            with pytest.raises(BundleNotFound):
                call()
        # A bundle the store keeps from a run of its file (pushed by nobody) is everyone's by digest.
        from host.runtime.loader import store_bundle

        unpushed = bundle_mod.load_bytes(variant(production, ("tool_calls = 40", "tool_calls = 41")))
        store.transact(lambda txn: store_bundle(txn, unpushed))
        for tenant in ("acme", "globex", "default"):
            assert reg.resolve(f"sha256:{unpushed.digest}", tenant=tenant) == unpushed.digest
        # A tenant whose name is a prefix of another's sees nothing of it.
        reg.push(production.raw, name="p", tenant="acme-eu")
        assert [r["name"] for r in reg.names(tenant="acme")] == ["procurement"]


def test_a_registry_entry_changed_on_disk_is_named_never_followed(production: Bundle, canary: bytes,
                                                                   tmp_path: Path) -> None:
    with LmdbStore.open(tmp_path / "db") as store:
        reg = Registry(store)
        reg.push(production.raw, name="procurement", tag="production")
        reg.push(canary, name="procurement", tag="canary")
    # Someone edits the head so that production names the canary's digest, digest seal untouched.
    env = lmdb.open(str(tmp_path / "db"), max_dbs=32)
    try:
        with env.begin(write=True, db=env.open_db(b"registry")) as txn:
            key = b"n/default/procurement"
            canary_digest = bundle_mod.load_bytes(canary).digest
            txn.put(key, bytes(txn.get(key)).replace(production.digest.encode(), canary_digest.encode()))
    finally:
        env.close()
    with LmdbStore.open(tmp_path / "db") as store:
        with pytest.raises(RecordCorrupt) as info:
            Registry(store).resolve("procurement@production")
        assert "registry" in str(info.value)
        assert any(p.database == "registry" for p in store.check().problems)


# -- diff ------------------------------------------------------------------------------------
def test_diff_says_what_the_policies_grant_differently(production: Bundle, canary: bytes, tmp_path: Path) -> None:
    with LmdbStore.open(tmp_path / "db") as store:
        reg = Registry(store)
        reg.push(production.raw, name="procurement", tag="production")
        reg.push(canary, name="procurement", tag="canary")
        d = reg.diff("procurement@production", "procurement@canary")
        same = reg.diff("procurement@production", f"sha256:{production.digest}")
    assert d["same"] is False and d["module"]["same"] is True
    assert d["a"]["digest"] == production.digest and d["b"]["ref"] == "procurement@canary"
    assert d["tools"] == {"added": ["http.fetch"], "removed": ["kv.set"], "changed": ["erp.create_po"]}
    s = d["sections"]
    assert s["approvals"] == [{"section": "approvals", "subject": "erp.create_po", "kind": "changed",
                               "before": "when amount > 50000", "after": "when amount > 100000"}]
    assert {(c["subject"], c["after"]) for c in s["network"]} == {("http.fetch host", "api.example.com")}
    assert {(c["subject"], c["kind"], c["after"]) for c in s["secrets"]} == {
        ("http.fetch credential", "added", "ERP_TOKEN")}
    assert {(c["subject"], c["before"], c["after"]) for c in s["limits"]} == {("erp.create_po max_calls", 1, 2)}
    assert {(c["subject"], c["before"], c["after"]) for c in s["budgets"]} == {("tool_calls", 40, 60)}
    text = d["text"]
    for line in ("+ http.fetch", "- kv.set", "~ erp.create_po: when amount > 50000 -> when amount > 100000",
                 "+ http.fetch host: api.example.com", "+ http.fetch credential: ERP_TOKEN",
                 "~ erp.create_po max_calls: 1 -> 2", "~ tool_calls: 40 -> 60", "module: the same"):
        assert line in text, (line, text)
    assert same["same"] is True and same["sections"] == {} and "grant the same" in same["text"]


# -- runs by reference ------------------------------------------------------------------------
def test_moving_a_tag_leaves_a_hibernated_agent_on_the_digest_it_started_with(
        production: Bundle, tmp_path: Path) -> None:
    raised = variant(production, ("amount > 50000", "amount > 100000"), ("max = 50000, action", "max = 100000, action"))
    with Host(tmp_path) as host:
        host.registry.push(production.raw, name="procurement", tag="production")
        res = run(host, "procurement@production", PARKS)
        assert res.status == "waiting_approval"
        first = host.inspect(res.agent_id)
        assert first["bundle_digest"] == production.digest
        assert first["started_as"] == {"ref": "procurement@production", "name": "procurement", "tag": "production"}
        # Roll production forward to a version that would not even have asked (authority 100,000).
        new = host.registry.push(raised, name="procurement")
        host.registry.tag("procurement", "production", new["digest"])
        assert host.registry.resolve("procurement@production") == new["digest"]
    with Host(tmp_path) as host:  # another process decides, later
        done = anyio.run(lambda: host.approve(res.agent_id))
        assert done.status == "completed" and done.output["status"] == "ordered"
        after = host.inspect(res.agent_id)
        assert after["bundle_digest"] == production.digest  # the digest it started with, to the end
        spawned = next(r for r in host.audit_records(res.agent_id) if r["kind"] == "agent.spawned")
        assert spawned["bundle_digest"] == production.digest
        assert spawned["started_as"]["ref"] == "procurement@production"
        # A new run on the tag gets the new version: it does not even wait (authority 100,000).
        again = run(host, "procurement@production", PARKS)
        assert again.status == "completed"
        assert host.inspect(again.agent_id)["bundle_digest"] == new["digest"]


def test_a_run_by_reference_still_refuses_a_bundles_untrusted_code(production: Bundle, tmp_path: Path) -> None:
    carrying = variant(production, python={"helper": "def f():\n    return 1\n"})
    with Host(tmp_path) as host:
        pushed = host.registry.push(carrying, name="procurement")  # stored: pushing runs nothing
        assert pushed["host_code"] == ["tools/helper.py"]
        with pytest.raises(BundleCodeRefused):
            run(host, "procurement", PARKS)
        assert host.list_agents() == []
    with Host(tmp_path, trust_bundle_code=[pushed["digest"]]) as host:
        assert run(host, "procurement", PARKS).status == "waiting_approval"


# -- the CLI ------------------------------------------------------------------------------------
def torpor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "host.cli", *args], capture_output=True, text=True, timeout=180,
                          env=dict(os.environ), cwd=ROOT)


def ok_json(proc: subprocess.CompletedProcess[str], code: int = 0) -> Any:
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    return json.loads(proc.stdout)


def test_the_cli_pushes_lists_shows_tags_diffs_and_runs_by_reference(
        production: Bundle, canary: bytes, bundles: BundleFactory, tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    path = bundles.path(EXAMPLES / "procurement")
    canary_path = tmp_path / "canary.torpor"
    canary_path.write_bytes(canary)
    # --name defaults to the agent's own name; the store is created by the first push.
    v1 = ok_json(torpor("push", str(path), "--tag", "production", "--store", store, "--json"))
    assert v1["name"] == "procurement" and v1["digest"] == production.digest and v1["tags"] == ["production"]
    v2 = ok_json(torpor("push", str(canary_path), "--name", "procurement", "--tag", "canary", "--store", store,
                        "--json"))
    listed = ok_json(torpor("registry", "list", "--store", store, "--json"))
    assert listed["bundles"][0]["versions"] == 2
    shown = ok_json(torpor("registry", "show", "procurement", "--store", store, "--json"))
    assert [v["digest"] for v in shown["versions"]] == [v1["digest"], v2["digest"]]
    human = torpor("registry", "show", "procurement", "--store", store)
    assert human.returncode == 0 and f"sha256:{v1['digest'][:12]}" in human.stdout and "[production]" in human.stdout
    diff = torpor("registry", "diff", "procurement@production", "procurement@canary", "--store", store)
    assert diff.returncode == 0 and "~ erp.create_po: when amount > 50000 -> when amount > 100000" in diff.stdout

    parked = ok_json(torpor("run", "procurement@production", "--input", json.dumps(PARKS), "--store", store,
                            "--json"), code=4)
    moved = ok_json(torpor("registry", "tag", "procurement", "production", v2["digest"], "--store", store, "--json"))
    assert moved["previous"] == v1["digest"]
    shown_log = ok_json(torpor("audit", "show", "host.registry", "--store", store, "--json"))
    records = shown_log["records"] if isinstance(shown_log, dict) else shown_log
    assert [r["kind"] for r in records] == ["registry.pushed", "registry.pushed", "registry.tagged"]
    done = ok_json(torpor("approve", parked["agent_id"], "--store", store, "--json"))
    assert done["status"] == "completed"
    info = ok_json(torpor("inspect", parked["agent_id"], "--store", store, "--json"))
    assert info["bundle_digest"] == v1["digest"] and info["started_as"]["ref"] == "procurement@production"
    text = torpor("inspect", parked["agent_id"], "--store", store)
    assert f"started as procurement@production: bundle sha256:{v1['digest']}" in text.stdout

    # Errors: one line with a code, exit 2; --json an object.
    for argv, code in ((["run", "procurement@nope"], "bundle_not_found"), (["run", "ghost"], "bundle_not_found"),
                       (["run", "sha256:abc"], "invalid_reference"), (["run", "missing.torpor"], "invalid_bundle"),
                       (["registry", "show", "ghost"], "bundle_not_found"),
                       (["registry", "tag", "procurement", "production", "00" * 32], "bundle_not_found"),
                       (["registry", "diff", "procurement", "ghost@x"], "bundle_not_found"),
                       (["push", str(tmp_path / "nothing.torpor")], "invalid_bundle"),
                       (["push", __file__, "--name", "procurement"], "invalid_bundle"),
                       (["push", str(path), "--name", "a/b"], "invalid_reference")):
        proc = torpor(*argv, "--store", store)
        assert proc.returncode == 2 and proc.stderr.startswith(f"torpor: error[{code}]: "), (argv, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        err = ok_json(torpor(*argv, "--store", store, "--json"), code=2)
        assert err["error"]["code"] == code
    # A store that does not exist is not an empty registry: listing names the mistake.
    missing = torpor("registry", "list", "--store", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "no Torpor store" in missing.stderr
