"""The registry over HTTP (host/server/registry_routes.py) against a real uvicorn server on
127.0.0.1: push, list, show, tag, diff, a run by name@tag that keeps its digest when the tag
moves, and every bad input: malformed and oversized uploads, unknown name/tag/digest,
another tenant's name, a token without the scope."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import EXAMPLES, BundleFactory
from serve_helpers import InProcessServer, auth, token

from host.sandbox import bundle as bundle_mod
from host.server.config import ServerConfig
from host.trust import audit

pytestmark = pytest.mark.timeout(240)

PARKS = {"item": "laptops", "amount": 75_000}
OCTETS = {"Content-Type": "application/octet-stream"}


@pytest.fixture(scope="module")
def versions(bundles: BundleFactory) -> tuple[bytes, bytes]:
    """The procurement example, and a version whose spending authority is 100,000."""
    b = bundles.load(EXAMPLES / "procurement")
    text = b.policy_text.replace("amount > 50000", "amount > 100000").replace("max = 50000, action",
                                                                              "max = 100000, action")
    return b.raw, bundle_mod.pack(b.module, text)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[InProcessServer]:
    with InProcessServer(tmp_path / "store", config=ServerConfig(max_bundle_bytes=256 << 10)) as srv:
        yield srv


def wait_for(c: httpx.Client, agent_id: str, headers: dict[str, str], status: str) -> dict[str, Any]:
    r = c.get(f"/v1/agents/{agent_id}/wait", params={"timeout": 60}, headers=headers)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    assert body["status"] == status, body
    return body


def error(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["code"] == code, err
    return str(err["message"])


def test_push_show_tag_diff_and_a_run_that_keeps_its_digest(served: InProcessServer,
                                                            versions: tuple[bytes, bytes]) -> None:
    first, second = versions
    admin = auth(token(served.host.store, "acme", "registry:write", "runs:write", "runs:read", "approvals:write"))
    with httpx.Client(base_url=served.url, timeout=60) as c:
        r = c.post("/v1/bundles", params={"name": "procurement", "tag": "production"}, content=first,
                   headers={**admin, **OCTETS})
        assert r.status_code == 201, r.text
        v1 = r.json()
        assert v1["name"] == "procurement" and v1["tags"] == ["production"] and v1["abi"] == 1
        assert {"digest", "abi", "tools", "pushed_at", "tags"} <= set(v1) and "erp.create_po" in v1["tools"]
        v2 = c.post("/v1/bundles", params={"name": "procurement", "tag": "canary"}, content=second,
                    headers={**admin, **OCTETS}).json()
        listed = c.get("/v1/bundles", headers=admin).json()
        assert listed == {"bundles": [{"name": "procurement", "versions": 2, "latest": v2["digest"],
                                       "tags": {"production": v1["digest"], "canary": v2["digest"]},
                                       "updated_at": listed["bundles"][0]["updated_at"]}]}
        shown = c.get("/v1/bundles/procurement", headers=admin).json()
        assert [v["digest"] for v in shown["versions"]] == [v1["digest"], v2["digest"]]
        d = c.get("/v1/bundles/diff", params={"a": "procurement@production", "b": "procurement@canary"},
                  headers=admin).json()
        assert d["same"] is False and d["sections"]["approvals"][0]["after"] == "when amount > 100000"
        assert "~ erp.create_po: when amount > 50000 -> when amount > 100000" in d["text"]
        # The OpenAPI document describes every registry route, with its scope, upload and queries.
        paths = c.get("/openapi.json", headers=admin).json()["paths"]
        push_doc = paths["/v1/bundles"]["post"]
        assert push_doc["x-torpor-scope"] == "registry:write" and "201" in push_doc["responses"]
        assert "application/octet-stream" in push_doc["requestBody"]["content"]
        assert {p["name"] for p in push_doc["parameters"]} == {"name", "tag"}
        assert {p["name"] for p in paths["/v1/bundles/diff"]["get"]["parameters"] if p["required"]} == {"a", "b"}
        assert paths["/v1/bundles/{name}/tags/{tag}"]["put"]["x-torpor-scope"] == "registry:write"
        assert paths["/v1/bundles/{name}"]["get"]["x-torpor-scope"] == "runs:read"

        started = c.post("/v1/runs", json={"agent": "procurement@production", "input": PARKS}, headers=admin)
        assert started.status_code == 201, started.text
        agent_id = started.json()["agent_id"]
        wait_for(c, agent_id, admin, "waiting_approval")
        moved = c.put("/v1/bundles/procurement/tags/production", json={"digest": f"sha256:{v2['digest']}"},
                      headers=admin)
        assert moved.status_code == 200 and moved.json()["previous"] == v1["digest"], moved.text
        tagged = audit.records(served.host.store, "host.registry")[-1]
        assert tagged["kind"] == "registry.tagged" and tagged["by"].startswith("token:")  # who moved it
        assert (tagged["tenant"], tagged["previous"], tagged["digest"]) == ("acme", v1["digest"], v2["digest"])
        assert c.post(f"/v1/agents/{agent_id}/approve", json={}, headers=admin).status_code == 200
        done = wait_for(c, agent_id, admin, "completed")
        assert done["bundle_digest"] == v1["digest"]  # the digest it started with
        info = c.get(f"/v1/agents/{agent_id}/inspect", headers=admin).json()
        assert info["started_as"]["ref"] == "procurement@production" and info["bundle_digest"] == v1["digest"]
        again = c.post("/v1/runs", json={"agent": "procurement@production", "input": PARKS, "wait": 60},
                       headers=admin).json()
        assert again["bundle_digest"] == v2["digest"] and again["status"] == "completed"


def test_bad_uploads_unknown_refs_other_tenants_and_missing_scopes(served: InProcessServer,
                                                                    versions: tuple[bytes, bytes]) -> None:
    first, _ = versions
    store = served.host.store
    acme = auth(token(store, "acme", "registry:write", "runs:read", "runs:write"))
    reader = auth(token(store, "acme", "runs:read"))
    writer_only = auth(token(store, "acme", "registry:write"))
    globex = auth(token(store, "globex", "registry:write", "runs:read", "runs:write"))
    with httpx.Client(base_url=served.url, timeout=60) as c:
        push = c.post("/v1/bundles", params={"name": "procurement", "tag": "production"}, content=first,
                      headers={**acme, **OCTETS})
        assert push.status_code == 201, push.text
        digest = push.json()["digest"]
        # Malformed uploads: 400 with the loader's code, and nothing stored.
        error(c.post("/v1/bundles", params={"name": "junk"}, content=b"not a bundle", headers={**acme, **OCTETS}),
              400, "invalid_bundle")
        error(c.post("/v1/bundles", params={"name": "junk"}, content=first[: len(first) // 2],
                     headers={**acme, **OCTETS}), 400, "invalid_bundle")
        error(c.post("/v1/bundles", params={"name": "junk"}, content=b"", headers={**acme, **OCTETS}),
              400, "invalid_bundle")
        error(c.post("/v1/bundles", params={"name": "a b"}, content=first, headers={**acme, **OCTETS}),
              400, "invalid_reference")
        error(c.post("/v1/bundles", params={"name": "diff"}, content=first, headers={**acme, **OCTETS}),
              400, "invalid_reference")
        # Oversized: refused by its Content-Length before it is read, or where a stream crosses the cap.
        big = first + b"\0" * (300 << 10)
        error(c.post("/v1/bundles", params={"name": "big"}, content=big, headers={**acme, **OCTETS}),
              413, "payload_too_large")

        def chunks() -> Iterator[bytes]:
            for i in range(0, len(big), 64 << 10):
                yield big[i:i + (64 << 10)]

        error(c.post("/v1/bundles", params={"name": "big"}, content=chunks(), headers={**acme, **OCTETS}),
              413, "payload_too_large")
        assert [b["name"] for b in c.get("/v1/bundles", headers=acme).json()["bundles"]] == ["procurement"]

        # Unknown name, tag, digest: 404 bundle_not_found, for reads, tags and runs alike.
        error(c.get("/v1/bundles/ghost", headers=acme), 404, "bundle_not_found")
        error(c.put("/v1/bundles/ghost/tags/production", json={"digest": f"sha256:{digest}"}, headers=acme),
              404, "bundle_not_found")
        error(c.put("/v1/bundles/procurement/tags/production", json={"digest": "sha256:" + "0" * 64},
                    headers=acme), 404, "bundle_not_found")
        error(c.put("/v1/bundles/procurement/tags/production", json={"digest": "nope"}, headers=acme),
              400, "invalid_reference")
        error(c.put("/v1/bundles/procurement/tags/production", json={}, headers=acme), 400, "invalid_input")
        error(c.get("/v1/bundles/diff", params={"a": "procurement", "b": "procurement@nope"}, headers=acme),
              404, "bundle_not_found")
        error(c.get("/v1/bundles/diff", params={"a": "procurement"}, headers=acme), 400, "invalid_input")
        for ref in ("ghost", "procurement@nope", "sha256:" + "0" * 64):
            error(c.post("/v1/runs", json={"agent": ref, "input": PARKS}, headers=acme), 404, "bundle_not_found")

        # Another tenant: the name, its tags and its digest do not exist for it.
        error(c.get("/v1/bundles/procurement", headers=globex), 404, "bundle_not_found")
        assert c.get("/v1/bundles", headers=globex).json() == {"bundles": []}
        error(c.put("/v1/bundles/procurement/tags/canary", json={"digest": digest}, headers=globex),
              404, "bundle_not_found")
        for ref in ("procurement@production", f"sha256:{digest}"):
            error(c.post("/v1/runs", json={"agent": ref, "input": PARKS}, headers=globex), 404, "bundle_not_found")
        # Its own push of the same name is its own, and leaves acme's as it was.
        assert c.post("/v1/bundles", params={"name": "procurement"}, content=first,
                      headers={**globex, **OCTETS}).status_code == 201
        assert c.get("/v1/bundles/procurement", headers=acme).json()["tags"] == {"production": digest}
        assert c.get("/v1/bundles/procurement", headers=globex).json()["tags"] == {}

        # Scopes: pushing and tagging need registry:write, reading needs runs:read.
        error(c.post("/v1/bundles", params={"name": "procurement"}, content=first, headers={**reader, **OCTETS}),
              403, "forbidden")
        error(c.put("/v1/bundles/procurement/tags/canary", json={"digest": digest}, headers=reader),
              403, "forbidden")
        for path in ("/v1/bundles", "/v1/bundles/procurement"):
            error(c.get(path, headers=writer_only), 403, "forbidden")
        error(c.get("/v1/bundles", headers={}), 401, "unauthenticated")
        assert c.get("/v1/bundles/procurement", headers=acme).json()["tags"] == {"production": digest}


def test_a_damaged_registry_entry_is_named_in_a_json_500(versions: tuple[bytes, bytes], tmp_path: Path) -> None:
    """Bytes on disk are not trusted: a registry entry changed under the server answers
    ``record_corrupt`` (the server's data, not the request, is at fault), naming the entry,
    and never runs what it would point at."""
    import lmdb

    first, second = versions
    store_dir = tmp_path / "store"
    with InProcessServer(store_dir) as srv:
        acme = auth(token(srv.host.store, "acme", "registry:write", "runs:read", "runs:write"))
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            assert c.post("/v1/bundles", params={"name": "procurement", "tag": "production"}, content=first,
                          headers={**acme, **OCTETS}).status_code == 201
            assert c.post("/v1/bundles", params={"name": "procurement", "tag": "canary"}, content=second,
                          headers={**acme, **OCTETS}).status_code == 201
    env = lmdb.open(str(store_dir / "db"), max_dbs=32)
    try:  # production now names the canary's digest; the entry's seal is left as it was
        with env.begin(write=True, db=env.open_db(b"registry")) as txn:
            key = b"n/acme/procurement"
            one, two = bundle_mod.load_bytes(first).digest, bundle_mod.load_bytes(second).digest
            txn.put(key, bytes(txn.get(key)).replace(one.encode(), two.encode()))
    finally:
        env.close()
    with InProcessServer(store_dir) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        message = error(c.post("/v1/runs", json={"agent": "procurement@production", "input": PARKS}, headers=acme),
                        500, "record_corrupt")
        assert "registry" in message
        error(c.get("/v1/bundles/procurement", headers=acme), 500, "record_corrupt")
        assert srv.host.list_agents() == []  # nothing ran
