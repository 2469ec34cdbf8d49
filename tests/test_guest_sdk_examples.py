"""The examples and the host's bad-input test guests: they compile with the pip-installed
toolchain and behave as documented against a mock of the `torpor` imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import wasmtime

sys.path.insert(0, str(Path(__file__).parent))
from guest_sdk_mock import (
    E_DENIED,
    EXAMPLES,
    GUESTS,
    KV,
    REPO,
    SDK_GUESTS,
    MockHost,
    ToolError,
    built,
    python_tool,
)

CORE_IMPORTS = {"input_len", "input_read", "output_write", "log", "abort"}
TOOL_IMPORTS = {"tool_call", "response_len", "response_read"}


@pytest.fixture(scope="module")
def host() -> MockHost:
    return MockHost()


def imports_exports(path: Path) -> tuple[set[tuple[str, str]], set[str]]:
    m = wasmtime.Module.from_file(wasmtime.Engine(), str(path))
    return {(i.module, i.name or "") for i in m.imports}, {e.name for e in m.exports}


def test_every_example_and_guest_has_a_policy() -> None:
    dirs = [d for d in EXAMPLES.iterdir() if d.is_dir()] + [GUESTS / g for g in SDK_GUESTS]
    assert {d.name for d in EXAMPLES.iterdir() if d.is_dir()} >= {"hello", "steps", "inventory"}
    for d in dirs:
        sources = [d / f"agent.{ext}" for ext in ("c", "js", "ts", "zig", "py")]  # C, JavaScript, TypeScript, Zig or Python
        assert any(p.exists() for p in sources) and (d / "policy.toml").exists(), d
        from policies import load_policy

        assert load_policy(d / "policy.toml").agent.name == d.name


def test_all_compile_and_export_the_abi() -> None:
    for name, path in built().items():
        imps, exps = imports_exports(path)
        assert {m for m, _ in imps} <= {"torpor"}, name  # no WASI, nothing else
        assert {n for _, n in imps} <= CORE_IMPORTS | TOOL_IMPORTS, name
        assert {"memory", "__torpor_async"} <= exps, name
        assert ("torpor_main" in exps) == (name != "guests/noentry"), name


def test_the_documented_compile_command_works(tmp_path: Path) -> None:
    """The exact command from ABI.md, run from the repository root."""
    abi = (REPO / "guest_sdk" / "ABI.md").read_text()
    line = next(ln for ln in abi.splitlines() if ln.startswith("python -m ziglang cc "))
    cmd = line.split()
    cmd[0] = sys.executable
    out = tmp_path / "agent.wasm"
    cmd[cmd.index("-o") + 1] = str(out)
    cmd[-1] = str(EXAMPLES / "hello" / "agent.c")
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    imps, exps = imports_exports(out)
    assert {"memory", "torpor_main", "__torpor_async"} <= exps
    assert {n for _, n in imps} <= CORE_IMPORTS  # hello asks for no tool imports
    assert out.stat().st_size < 32 * 1024


def test_tool_imports_only_when_tools_are_used() -> None:
    for name in ["hello", "guests/loop", "guests/grow", "guests/recurse"]:
        imps, _ = imports_exports(built()[name])
        assert not {n for _, n in imps} & TOOL_IMPORTS, name
    imps, _ = imports_exports(built()["steps"])
    assert {"tool_call", "response_len", "response_read"} <= {n for _, n in imps}


def test_async_buffer_layout(host: MockHost) -> None:
    s = host.instantiate(built()["hello"])
    addr = s.exports["__torpor_async"].value(s.store)  # type: ignore[union-attr]
    cur, end = (int.from_bytes(s.read(addr + k, 4), "little") for k in (0, 4))
    assert cur == addr + 8 and end == cur + 16384


@pytest.mark.parametrize(
    ("name", "greeting"),
    [
        ("ada", "hello, ada"),
        ('q"uo\\te', 'hello, q"uo\\te'),
        ("é😀\n\u0000x", "hello, é😀\n\u0000x"),
    ],
)
def test_hello(host: MockHost, name: str, greeting: str) -> None:
    r = host.run(built()["hello"], json.dumps({"name": name}))
    assert r.status == "completed" and r.rc == 0
    assert r.output == {"greeting": greeting}
    assert r.tool_calls == []


def test_hello_exact_output_and_failure(host: MockHost) -> None:
    r = host.run(built()["hello"], '{"name":"ada"}')
    assert r.output_raw == b'{"greeting": "hello, ada"}'
    r = host.run(built()["hello"], '{"nom": 1}')
    assert r.status == "failed" and r.error_code == "agent_error"
    assert r.logs == [(3, 'input needs a string "name"')]


def test_steps(host: MockHost) -> None:
    kv = KV()
    r = host.run(built()["steps"], '{"n": 200}', tools=kv.tools())
    assert r.status == "completed" and r.output == {"sum": 20100, "last": 200}
    assert len(r.tool_calls) == 200 and kv.data == {"counter": 200}
    assert all(c == ("kv.incr", b'{"key": "counter", "by": 1}', 0) for c in r.tool_calls)
    r = host.run(built()["steps"], '{"n": 3}', tools=kv.tools())  # the store persists
    assert r.output == {"sum": 201 + 202 + 203, "last": 203}
    r = host.run(built()["steps"], '{"n": 0}', tools=kv.tools())
    assert r.output == {"sum": 0, "last": 0}


def test_steps_reports_tool_errors(host: MockHost) -> None:
    def broken(args: dict[str, Any]) -> Any:
        raise ToolError(E_DENIED, "kv.incr budget spent", rule="tools.kv.incr.max_calls")

    r = host.run(built()["steps"], '{"n": 5}', tools={"kv.incr": broken})
    assert r.status == "failed" and r.error_code == "agent_error"
    assert r.logs == [(3, "kv.incr failed at step 0: denied: kv.incr budget spent")]


def inventory_tools() -> Any:
    sys.path.insert(0, str(EXAMPLES / "inventory"))
    import inventory_tools as it

    return it


def test_inventory(host: MockHost) -> None:
    it = inventory_tools()
    it.reset()
    kv = KV()
    tools = {**kv.tools(), "inventory.reserve": python_tool(it.reserve)}
    order = {
        "order_id": "A-1001",
        "order": [
            {"sku": "apple", "qty": 3},
            {"sku": "pear", "qty": "5"},  # a string: invalid_args, normalised, retried
            {"sku": "plum", "qty": 1},  # none in stock: backordered
            {"sku": "kiwi", "qty": 1},  # not carried: rejected
            {"sku": "fig", "qty": "lots"},  # invalid_args that cannot be fixed
        ],
    }
    r = host.run(built()["inventory"], json.dumps(order), tools=tools)
    assert r.status == "completed", (r.error_code, r.logs)
    assert r.output == {
        "order_id": "A-1001",
        "reserved": [
            {"sku": "apple", "qty": 3, "reservation": "A-1001/1"},
            {"sku": "pear", "qty": 2, "reservation": "A-1001/2"},
        ],
        "backordered": [{"sku": "pear", "qty": 3}, {"sku": "plum", "qty": 1}],
        "rejected": [
            {"line": 3, "error": "tool_failed", "message": "unknown sku: kiwi"},
            {"line": 4, "error": "invalid_args", "message": "qty: Input should be a valid integer"},
        ],
        "open_backorders": 2,
    }
    codes = [(c[0], c[2]) for c in r.tool_calls]
    assert codes[0] == ("kv.get", 0) and codes[-1] == ("kv.set", 0)
    assert ("inventory.reserve", -5) in codes and ("inventory.reserve", -6) in codes
    assert kv.data["backorders"] == [
        {"order_id": "A-1001", "sku": "pear", "qty": 3},
        {"order_id": "A-1001", "sku": "plum", "qty": 1},
    ]
    # a second order appends to the durable backorder list
    r = host.run(
        built()["inventory"],
        '{"order_id": "B-7", "order": [{"sku": "apple", "qty": 99}]}',
        tools=tools,
    )
    assert r.output["backordered"] == [{"sku": "apple", "qty": 92}]
    assert r.output["open_backorders"] == 3 and len(kv.data["backorders"]) == 3


def test_wild_pointers_are_all_refused(host: MockHost) -> None:
    r = host.run(built()["guests/wild"], "{}", tools=KV().tools())
    assert r.status == "completed", r
    assert r.output["mismatches"] == []
    assert r.output["input_read"]["wrap_u32"] == -1
    r = host.run(built()["guests/wild"], '{"abort": true}', tools=KV().tools())
    assert r.status == "failed" and r.error_code == "aborted"


def test_badargs(host: MockHost) -> None:
    r = host.run(built()["guests/badargs"], "{}", tools=KV().tools())
    assert r.status == "completed"
    codes = {k: v["code"] for k, v in r.output.items()}
    assert codes == {
        "not_json": "invalid_json",
        "truncated": "invalid_json",
        "invalid_utf8": "invalid_json",
        "array": "invalid_args",
        "string": "invalid_args",
        "key_number": "invalid_args",
        "by_string": "invalid_args",
        "by_float": "invalid_args",
        "missing_key": "invalid_args",
        "valid": "ok",
    }
    assert r.output["valid"]["result"] == {"value": 1}


def test_notool(host: MockHost) -> None:
    kv = KV()
    r = host.run(built()["guests/notool"], "{}", tools={"kv.get": kv.get})
    assert r.status == "completed"
    assert r.output["kv.set"]["code"] == "denied" and r.output["kv.set"]["rc"] == -7
    assert r.output["kv.set"]["response"]["rule"] == "tools"
    assert r.output["no.such.tool"]["code"] == "denied"
    assert r.output["kv.get"] == {"rc": 0, "code": "ok", "message": "", "response": {"value": None}}


@pytest.mark.parametrize(
    ("name", "kw", "code"),
    [
        ("guests/loop", {"fuel": 5_000_000}, "out_of_fuel"),
        ("guests/grow", {"memory_limit": 16 << 20}, "memory_limit"),
        ("guests/recurse", {}, "stack_overflow"),
    ],
)
def test_runaway_guests_fail_cleanly(
    host: MockHost, name: str, kw: dict[str, Any], code: str
) -> None:
    r = host.run(built()[name], "{}", **kw)
    assert r.status == "failed" and r.error_code == code, (r.error_code, r.error_message[:200])
    # and the same host runs the next agent normally
    assert host.run(built()["hello"], '{"name": "next"}').output == {"greeting": "hello, next"}


def test_sdk_tool_wrappers(host: MockHost) -> None:
    kv = KV()

    def deny(args: dict[str, Any]) -> Any:
        raise ToolError(E_DENIED, "channel not allowed", rule="slack.channels")

    tools = {
        **kv.tools(),
        "clock.now": lambda a: {"unix_ms": 1_700_000_000_123},
        "test.deny": deny,
        "test.echo": lambda a: a,
        "no.such.tool": None,  # granted by the policy, but no such tool on the host
    }
    r = host.run(built()["guests/sdk_selftest"], "{}", tools=tools)
    assert r.status == "completed", (r.error_code, r.error_message)
    o = r.output
    assert o["get_missing"] == {"err": 0, "is_null": True}
    assert o["set_get"] == {"set": 0, "err": 0, "value": {"list": [1, 2, 3], "s": "é"}, "second": 2}
    assert o["incr"] == [5, -2, 0]
    assert o["clock"] == {"unix_ms": 1_700_000_000_123, "err": 0}
    assert o["incr_error"] == {
        "value": 0,
        "err": -6,
        "code": "tool_failed",
        "message": "'text' does not hold an integer",
    }
    assert o["unknown"]["code"] == -4 and o["unknown"]["name"] == "unknown_tool"
    assert o["unknown"]["raw"]["code"] == "unknown_tool" and o["unknown"]["ok"] is False
    assert o["ungranted"]["code"] == -7 and o["ungranted"]["name"] == "denied"
    assert o["denied"] == {
        "ok": False,
        "code": -7,
        "name": "denied",
        "rule": "slack.channels",
        "retryable": False,
    }
    assert o["echo"] == {"ok": True, "value": {"s": 'é\n"', "n": -(2**63)}}
    assert r.logs[0] == (1, "selftest done")


def test_readme_example_runs(host: MockHost, tmp_path: Path) -> None:
    import re

    from guest_sdk_mock import E_UNAVAILABLE, compile_guest

    readme = (REPO / "guest_sdk" / "c" / "README.md").read_text()
    src = tmp_path / "agent.c"
    src.write_text(re.search(r"```c\n(.*?)```", readme, re.S).group(1))  # type: ignore[union-attr]
    wasm = compile_guest([src], tmp_path / "agent.wasm")
    kv = KV()

    def weather(args: dict[str, Any]) -> Any:
        if args["city"] == "Atlantis":
            raise ToolError(E_UNAVAILABLE, "no service", retryable=True)
        return {"temp_c": 3}

    tools = {**kv.tools(), "weather.get": weather}
    r = host.run(wasm, '{"city": "Oslo", "items": ["a", "b"]}', tools=tools)
    assert r.output == {"city": "Oslo", "visits": 1, "weather": {"temp_c": 3}, "first_item": "a"}
    r = host.run(wasm, '{"city": "Atlantis"}', tools=tools)
    assert r.output == {"city": "Atlantis", "visits": 1, "weather": None, "first_item": None}
    assert kv.data == {"visits:Oslo": 1, "visits:Atlantis": 1}
