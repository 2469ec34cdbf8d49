"""A fleet for the tests and the fleet bench: ``torpor serve`` processes on one JetStream stream.

Each host is a real ``torpor serve --store nats://... --stream S --local-dir DIR --lease L``
process on a free port; the stream's setup (the bundles, an operator token) is written
in-process through a ``Host`` on the same fleet store, as ``torpor push`` and ``torpor
tokens create`` would.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from host.runtime import Host
from host.sandbox import bundle as bundle_mod
from host.trust import operator_tokens
from snapshots.nats_store import NatsStore


def seed(url: str, stream: str, local: Path, bundle_files: list[Path], tenant: str = "acme") -> tuple[list[str], str]:
    """Register bundles and create an operator token (all scopes) on the fleet store."""
    store = NatsStore.open(url, local / "copy", stream=stream)
    with Host(local, store=store) as host:
        refs = []
        for f in bundle_files:
            b = bundle_mod.load(f)
            host.register_bundle(b)
            refs.append(f"sha256:{b.digest}")
        secret = operator_tokens.create(store, tenant=tenant, scopes=["admin"])[0]
    return refs, secret


def start_host(url: str, stream: str, local: Path, *, lease: float, port: int,
               log: Path | None = None) -> subprocess.Popen[bytes]:
    """A ``torpor serve`` host of the fleet; returns once ``/readyz`` answers."""
    out = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen([sys.executable, "-m", "host.cli", "serve", "--store", url, "--stream", stream,
                             "--local-dir", str(local), "--lease", str(lease), "--listen", f"127.0.0.1:{port}",
                             "--token-rate", "100000", "--token-burst", "100000", "--tenant-rate", "100000",
                             "--tenant-burst", "100000", "--log-level", "info"],
                            stdout=out, stderr=out, env={**os.environ})
    if log is not None:
        out.close()  # type: ignore[union-attr]
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log is not None else ""
            raise RuntimeError(f"torpor serve exited {proc.returncode}: {tail}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("torpor serve did not become ready")
        time.sleep(0.05)


def agents(base: str, secret: str) -> list[dict[str, Any]]:
    r = httpx.get(base + "/v1/agents", headers={"Authorization": f"Bearer {secret}"}, timeout=60)
    r.raise_for_status()
    return list(r.json()["agents"])


def stop(proc: subprocess.Popen[bytes], grace: float = 30) -> None:
    """SIGTERM (a drain), SIGKILL after ``grace`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
