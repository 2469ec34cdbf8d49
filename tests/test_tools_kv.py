"""kv namespaces: private by default, shared namespaces only when the grant lists them,
read and write granted separately."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tools_helpers import Ctx, policy

from host.tools.builtin import BUILTINS
from host.tools.registry import ToolError
from snapshots.lmdb_store import LmdbStore

GRANTS = """
[tools."kv.get"]
namespaces = ["team", "config"]
[tools."kv.set"]
namespaces = ["team"]
[tools."kv.incr"]
namespaces = ["team"]
"""


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = LmdbStore.open(tmp_path / "db")
    yield s
    s.close()


def kv(store: Any, tool: str, args: dict[str, Any], agent: str = "a1", grants: str = GRANTS) -> Any:
    spec = BUILTINS[tool]
    c = Ctx(policy(grants), tool, agent_id=agent).ctx()
    try:
        parsed = spec.validate(args)
        return store.transact(lambda txn: spec.func(parsed, c, txn))
    except ToolError as err:
        return err


def test_private_by_default(store: Any) -> None:
    assert kv(store, "kv.set", {"key": "k", "value": 1}) == {}
    assert kv(store, "kv.get", {"key": "k"}) == {"value": 1}
    assert kv(store, "kv.get", {"key": "k"}, agent="a2") == {"value": None}  # another agent's private space


def test_shared_namespaces_are_shared(store: Any) -> None:
    assert kv(store, "kv.incr", {"key": "n", "namespace": "team"}) == {"value": 1}
    assert kv(store, "kv.incr", {"key": "n", "namespace": "team", "by": 2}, agent="a2") == {"value": 3}
    assert kv(store, "kv.get", {"key": "n", "namespace": "team"}, agent="a3") == {"value": 3}
    assert kv(store, "kv.get", {"key": "n"}) == {"value": None}  # not the private one


def test_namespaces_are_granted_per_tool(store: Any) -> None:
    r = kv(store, "kv.set", {"key": "k", "value": 1, "namespace": "config"})  # read-only for this agent
    assert isinstance(r, ToolError) and r.code == "denied"
    assert r.details == {"rule": 'tools."kv.set".namespaces', "reason_code": "namespace_not_granted"}
    assert kv(store, "kv.get", {"key": "k", "namespace": "config"}) == {"value": None}
    r = kv(store, "kv.get", {"key": "k", "namespace": "secrets"})
    assert isinstance(r, ToolError) and r.code == "denied"
    r = kv(store, "kv.get", {"key": "k", "namespace": "team"}, grants='[tools."kv.get"]')
    assert isinstance(r, ToolError) and "lists no shared namespaces" in str(r)


def test_a_namespace_cannot_reach_private_data(store: Any) -> None:
    kv(store, "kv.set", {"key": "k", "value": "private"})
    grants = '[tools."kv.get"]\nnamespaces = ["agent"]'
    # "agent:a1" is not a valid namespace name, and "agent" maps to shared:agent, not agent:a1
    r = kv(store, "kv.get", {"key": "k", "namespace": "agent:a1"}, grants=grants)
    assert isinstance(r, ToolError) and r.code == "denied"
    assert kv(store, "kv.get", {"key": "k", "namespace": "agent"}, grants=grants) == {"value": None}


def test_namespace_argument_is_strict(store: Any) -> None:
    for bad in ({"key": "k", "namespace": 1}, {"key": "k", "namespace": ""}, {"key": "k", "namespace": "x" * 65}):
        r = kv(store, "kv.get", bad)
        assert isinstance(r, ToolError) and r.code == "invalid_args", bad
