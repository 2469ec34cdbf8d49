"""A real ``torpor serve`` for the server tests: uvicorn on a free port of 127.0.0.1, in a
thread of the test process (:class:`InProcessServer`) or as a ``torpor serve`` process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.fleet import wait_ready
from host.runtime import Host
from host.sandbox import bundle as bundle_mod
from host.server.app import create_app, uvicorn_config
from host.server.config import ServerConfig
from host.trust import operator_tokens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def register(store: Path, *bundle_files: Path) -> list[str]:
    """Put bundles into a store (as a push would) and return their ``sha256:`` refs."""
    refs = []
    with Host(store) as host:
        for f in bundle_files:
            b = bundle_mod.load(f)
            host.register_bundle(b)
            refs.append(f"sha256:{b.digest}")
    return refs


def token(store: Any, tenant: str = "acme", *scopes: str, **kw: Any) -> str:
    """A new operator token's secret (``store``: an open store or a store directory)."""
    if isinstance(store, Path):
        from snapshots.lmdb_store import LmdbStore

        (store / "db").mkdir(parents=True, exist_ok=True)
        s = LmdbStore.open(store / "db")
        try:
            return operator_tokens.create(s, tenant=tenant, scopes=list(scopes or ("admin",)), **kw)[0]
        finally:
            s.close()
    return operator_tokens.create(store, tenant=tenant, scopes=list(scopes or ("admin",)), **kw)[0]


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


class InProcessServer:
    """uvicorn serving ``create_app(Host(store))`` in a thread; ``url`` once started."""

    def __init__(self, store: Path, config: ServerConfig | None = None, **host_kw: Any) -> None:
        import uvicorn

        self.host = Host(store, **host_kw)
        self.app = create_app(self.host, config=config)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # uvicorn as `torpor serve` sets it up (its protocol, its keep-alive), in a thread
        self.server = uvicorn.Server(uvicorn_config(self.app, host="127.0.0.1", port=self.port))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> InProcessServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        self.host.close()

    @property
    def state(self) -> Any:
        return self.app.state.server


def start_process(store: Path, *extra: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """``torpor serve`` as a real process on a free port; returns it once ``/readyz`` answers."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "host.cli", "serve", "--store", str(store), "--listen",
                             f"127.0.0.1:{port}", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, url, lambda: proc.communicate()[1].decode()[-2000:])
    return proc, url


#: The operator tool of the payer agent (also tests/test_in_doubt.py's): a charge that is not
#: idempotent, and sleeps through its first call so that its process can be killed mid-flight.
PAY_TOOLS = '''
import os, time
from pydantic import BaseModel


class ChargeArgs(BaseModel):
    marker: str
    amount: int


def charge(args: ChargeArgs, ctx) -> dict:
    first = not os.path.exists(args.marker)
    with open(args.marker, "a") as f:
        f.write("started\\n")
    if first:
        time.sleep(30)  # the host is killed while the payment is "in flight"
    return {"charged": args.amount}
'''

PAY_POLICY = '[agent]\nname = "payer"\n[tools."charge"]\nhandler = "pay_tools:charge"\n'


def payer_bundle(bundles: Any, tmp_path: Path, monkeypatch: Any) -> Path:
    """The payer bundle (the ``caller`` guest under :data:`PAY_POLICY`), with its operator
    tool put first on ``$TORPOR_TOOLS_PATH`` for every Host and ``torpor`` started after."""
    from conftest import GUESTS

    bundle = tmp_path / "payer.torpor"
    bundle.write_bytes(bundle_mod.pack(bundles.load(GUESTS / "caller").module, PAY_POLICY))
    tools = tmp_path / "pay_tools"
    tools.mkdir()
    (tools / "pay_tools.py").write_text(PAY_TOOLS)
    monkeypatch.setenv("TORPOR_TOOLS_PATH", os.pathsep.join([str(tools), os.environ.get("TORPOR_TOOLS_PATH", "")]))
    return bundle


def kill_mid_call(bundle: Path, store: Path, marker: Path) -> None:
    """A real ``torpor run`` of the payer on ``store``, SIGKILLed while its charge is in flight
    (``marker``: the file the charge writes to when it starts)."""
    import json
    import signal

    payload = {"calls": [{"tool": "charge", "args": {"marker": str(marker), "amount": 42}}]}
    proc = subprocess.Popen([sys.executable, "-m", "host.cli", "run", str(bundle), "--input", json.dumps(payload),
                             "--store", str(store), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not marker.exists() or "started" not in marker.read_text():
        if proc.poll() is not None:
            raise RuntimeError(f"the payer ended before its charge: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the payer's charge never started")
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
