"""SDK guests under Asyncify: hibernate at EVERY tool call (unwind, copy memory and
mutable globals out, drop the instance, rewind a fresh one) and still finish with
the same answer. Checks the __torpor_async layout and that the SDK runtime is
Asyncify-safe; the real host/ implementation has its own tests."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
pytest.importorskip("icpp_binaryen")
from guest_sdk_mock import EXAMPLES, KV, HibernatingRun, MockHost, asyncify, built, python_tool


@pytest.fixture(scope="module")
def host() -> MockHost:
    return MockHost()


def test_steps_hibernating_at_every_call(host: MockHost) -> None:
    wasm = asyncify(built()["steps"].read_bytes())
    kv = KV()
    run = HibernatingRun(host, wasm, '{"n": 200}', kv.tools())
    r = run.run()
    assert r.status == "completed", (r.error_code, r.error_message)
    assert r.output == {"sum": 20100, "last": 200}
    assert run.hibernations == 200 and kv.data == {"counter": 200}


def test_inventory_hibernating_at_every_call(host: MockHost) -> None:
    sys.path.insert(0, str(EXAMPLES / "inventory"))
    import inventory_tools as it

    it.reset()
    kv = KV()
    tools = {**kv.tools(), "inventory.reserve": python_tool(it.reserve)}
    order = {"order_id": "H-1", "order": [{"sku": "fig", "qty": "4"}, {"sku": "pear", "qty": 3}]}
    run = HibernatingRun(
        host, asyncify(built()["inventory"].read_bytes()), json.dumps(order), tools
    )
    r = run.run()
    assert r.status == "completed", (r.error_code, r.error_message)
    assert r.output["reserved"] == [
        {"sku": "fig", "qty": 4, "reservation": "H-1/1"},
        {"sku": "pear", "qty": 2, "reservation": "H-1/2"},
    ]
    assert r.output["backordered"] == [{"sku": "pear", "qty": 1}]
    assert run.hibernations == len(r.tool_calls) == 6


def test_built_module_sizes() -> None:
    """After what `torpor build` adds (Asyncify, debug info stripped, zero runs of the
    data segment packed away), a hello agent is about 10 KiB."""
    sizes = {name: len(asyncify(built()[name].read_bytes())) for name in ["hello", "steps"]}
    assert sizes["hello"] < 12 * 1024, sizes
    assert sizes["steps"] < 16 * 1024, sizes
