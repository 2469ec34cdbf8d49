"""The server under load and faults, each against a real server on 127.0.0.1: 1,000
concurrent run requests, SIGKILL of a ``torpor serve`` process with 500 agents in flight
(a new ``serve`` on the store finishes every one, no recorded tool call run twice), and a
SIGTERM drain that leaves every agent completed or hibernated."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
from conftest import BundleFactory
from serve_helpers import InProcessServer, auth, register, start_process, token

from host.runtime.agent import TERMINAL
from host.server.config import ServerConfig
from host.trust import audit
from snapshots.lmdb_store import LmdbStore

LOAD = ServerConfig(token_rate=100_000, token_burst=100_000, tenant_rate=100_000, tenant_burst=100_000)


async def _post_all(url: str, secret: str, bodies: list[dict[str, Any]], *, limit: int) -> list[httpx.Response]:
    """POST every body to /v1/runs at once, ``limit`` connections at a time.

    At most ``limit`` requests wait in httpx's pool at a time: its pool hands every queued
    request the first idle connection and lets them race for it, so a thousand queued
    requests cost the client (and, sharing this process's GIL, the server) quadratic work
    and leave connections idle for seconds. The server sees the same: ``limit`` requests in
    flight on ``limit`` connections until all are answered."""
    out: list[httpx.Response | None] = [None] * len(bodies)
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    gate = anyio.Semaphore(limit)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(300, pool=300)) as c:
        async def one(i: int) -> None:
            async with gate:
                out[i] = await c.post("/v1/runs", headers=auth(secret), json=bodies[i])

        async with anyio.create_task_group() as tg:
            for i in range(len(bodies)):
                tg.start_soon(one, i)
    return [r for r in out if r is not None]


def _agents(url: str, secret: str) -> list[dict[str, Any]]:
    return list(httpx.get(url + "/v1/agents", headers=auth(secret), timeout=120).json()["agents"])


def test_a_thousand_concurrent_runs_none_lost_all_answered(bundles: BundleFactory, tmp_path: Path) -> None:
    store = tmp_path / "store"
    [hello] = register(store, bundles.example("hello"))
    with InProcessServer(store, LOAD, durability="process") as srv:
        secret = token(srv.host.store, "acme", "runs:write", "runs:read")
        bodies = [{"agent": hello, "input": {"name": f"n{i}"}, "wait": 120} for i in range(1000)]
        responses = anyio.run(lambda: _post_all(srv.url, secret, bodies, limit=64))
        assert len(responses) == 1000
        assert [r.status_code for r in responses] == [201] * 1000, {r.status_code for r in responses}
        outputs = {r.json()["agent_id"]: r.json()["output"] for r in responses}
        assert len(outputs) == 1000  # a thousand distinct agents
        assert sorted(o["greeting"] for o in outputs.values()) == sorted(f"hello, n{i}" for i in range(1000))
        rows = _agents(srv.url, secret)
        assert len(rows) == 1000 and {r["status"] for r in rows} == {"completed"}


def _statuses(store: Path) -> dict[str, str]:
    s = LmdbStore.open(store / "db", readonly=True, create=False)
    try:
        with s.read() as txn:
            return {r["agent_id"]: str(r["status"]) for r in txn.iter_agents()}
    finally:
        s.close()


def _finish_all(url: str, secret: str, n: int, limit_s: float = 600) -> list[dict[str, Any]]:
    deadline = time.monotonic() + limit_s
    while True:
        rows = _agents(url, secret)
        if len(rows) == n and all(r["status"] in TERMINAL for r in rows):
            return rows
        assert time.monotonic() < deadline, {r["status"] for r in rows}
        time.sleep(0.5)


def test_sigkill_with_500_agents_in_flight_then_a_new_serve_finishes_each_once(
        bundles: BundleFactory, tmp_path: Path) -> None:
    store = tmp_path / "store"
    [steps] = register(store, bundles.example("steps"))
    secret = token(store, "acme", "runs:write", "runs:read")
    n = 30
    proc, url = start_process(store, "--durability", "process")
    failed: BaseException | None = None
    try:
        bodies = [{"agent": steps, "input": {"n": n}} for _ in range(500)]
        responses = anyio.run(lambda: _post_all(url, secret, bodies, limit=32))
    except BaseException as exc:  # shown with what the server said
        failed = exc
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    assert failed is None, f"{failed!r}; the server said: {err.decode()[-4000:]}"
    assert [r.status_code for r in responses] == [201] * 500
    ids = {r.json()["agent_id"] for r in responses}
    at_kill = _statuses(store)
    assert set(at_kill) == ids  # every accepted run was recorded before it was answered
    unfinished = [a for a, s in at_kill.items() if s not in TERMINAL]
    assert unfinished, "every agent finished before the kill: nothing was in flight"

    proc, url = start_process(store, "--durability", "process")
    try:
        rows = _finish_all(url, secret, 500)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    # kv.incr is counted once per recorded call: a call run twice would push `last` past n
    bad = [(r["agent_id"], r["status"], r.get("output"), r.get("error")) for r in rows
           if r["status"] != "completed" or r["output"] != {"sum": n * (n + 1) // 2, "last": n}]
    assert not bad, bad[:5]
    s = LmdbStore.open(store / "db", readonly=True, create=False)
    try:
        report = audit.verify_store(s)
    finally:
        s.close()
    assert report.ok, report.summary()


def test_sigterm_drains_every_agent_completed_or_hibernated(bundles: BundleFactory, tmp_path: Path) -> None:
    store = tmp_path / "store"
    # 8 agents of 1,000 calls take seconds, shared fairly, so all are under way at the signal;
    # their budget has room for a loaded machine, where the restarted ones outlasted 30 s
    [steps] = register(store, bundles.example_with_wall_clock("steps", "600s"))
    secret = token(store, "acme", "runs:write", "runs:read")
    n = 1000
    proc, url = start_process(store, "--durability", "process", "--drain-timeout", "0.2")
    responses = anyio.run(lambda: _post_all(url, secret, [{"agent": steps, "input": {"n": n}}] * 8, limit=8))
    assert [r.status_code for r in responses] == [201] * 8
    time.sleep(0.3)  # under way
    proc.send_signal(signal.SIGTERM)
    try:  # a request during the drain is refused as such (or finds the listener closed)
        r = httpx.get(url + "/v1/agents", headers=auth(secret), timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
    except httpx.TransportError:
        pass
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-3000:]
    assert b"Traceback" not in err, err.decode()[-3000:]
    at_exit = _statuses(store)
    assert len(at_exit) == 8
    assert set(at_exit.values()) <= {*TERMINAL, "running", "suspended"}
    assert "failed" not in at_exit.values()  # the interrupt is not taken for a deadline
    assert set(at_exit.values()) - set(TERMINAL), "all finished within the drain: the interrupt was not exercised"
    # a later serve picks up what the drain left and finishes each with the right sum
    proc, url = start_process(store, "--durability", "process")
    try:
        rows = _finish_all(url, secret, 8)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    assert all(r["output"] == {"sum": n * (n + 1) // 2, "last": n} for r in rows), [r.get("error") for r in rows]


def test_serve_refuses_a_bad_listen_address(tmp_path: Path) -> None:
    import sys

    r = subprocess.run([sys.executable, "-m", "host.cli", "serve", "--store", str(tmp_path), "--listen", "nowhere"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "error[invalid_config]" in r.stderr


def test_serve_on_a_port_in_use_says_so_in_one_line_and_never_that_it_listens(tmp_path: Path) -> None:
    """A port another process holds: one typed line and exit 2, before the store is opened, and
    no "listening on" line (which a user would believe, and a readiness probe would then reach
    the other process)."""
    import socket
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "host.cli", "serve", "--store", str(tmp_path / "s"), "--listen",
                            f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"torpor: error[address_in_use]: --listen 127.0.0.1:{port}: Address already in use: another process "
        "listens there (stop it, or pick another port)"], r.stderr
    assert not (tmp_path / "s").exists()  # nothing was opened or created
