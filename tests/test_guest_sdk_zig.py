"""The Zig guest SDK (guest_sdk/zig/): agents compiled from Zig by `torpor build` with the
pip-installed Zig, run by the real host. steps-zig behaves as the C steps does, tool
errors reach Zig code as error sets with the host's object behind them, the agent's own
failures are reported as the C SDK's are, and a compile error names its file and line."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
import wasmtime
from conftest import EXAMPLES, GUESTS, BundleFactory
from conftest import run_agent as run

from host.errors import BundleError, ToolchainError
from host.runtime import Host
from host.sandbox import abi, toolchain, wasm_binary
from host.sandbox import bundle as bundle_mod

ERRORS = GUESTS / "zig_sdk"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "host.cli", *args], capture_output=True, text=True, timeout=120)


def _async_buffer(module: bytes) -> tuple[int, int, int]:
    """(A, cur0, end0) of ``__torpor_async`` in a module's pristine image (ABI section 7)."""
    store = wasmtime.Store(wasmtime.Engine())
    m = wasmtime.Module(store.engine, module)
    linker = wasmtime.Linker(store.engine)
    linker.define_unknown_imports_as_traps(m)
    inst = linker.instantiate(store, m)
    glob = inst.exports(store)[abi.ASYNC_BUF_EXPORT]
    mem = inst.exports(store)["memory"]
    assert isinstance(glob, wasmtime.Global) and isinstance(mem, wasmtime.Memory)
    a = int(glob.value(store))
    head = mem.read(store, a, a + 8)
    return a, int.from_bytes(head[:4], "little"), int.from_bytes(head[4:], "little")


def test_the_asyncify_buffer_is_laid_out_as_the_abi_says(bundles: BundleFactory) -> None:
    """cur0 = A + 8 and end0 = A + 8 + N: 16 KiB by default, what the agent declares otherwise."""
    for where, size in ((EXAMPLES / "steps-zig", 16 * 1024), (ERRORS, 24 * 1024)):
        a, cur0, end0 = _async_buffer(bundles.load(where).module)
        assert (cur0, end0) == (a + 8, a + 8 + size), where


def test_steps_zig_runs_with_a_suspension_at_every_call(bundles: BundleFactory, tmp_path: Path) -> None:
    """The issue's own check, through the CLI: 50 calls, 50 hibernations, the sum exact."""
    res = _cli("run", str(bundles.example("steps-zig")), "--input", '{"n": 50}', "--json",
               "--store", str(tmp_path / "store"))
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["output"] == {"sum": 1275, "last": 50}
    assert out["suspensions"] == 50 and out["checkpoints"] == 50 and out["tool_calls"] == 50


def test_a_zig_bundle_is_an_abi_v1_module_like_any_other(bundles: BundleFactory) -> None:
    b = bundles.load(EXAMPLES / "steps-zig")
    assert b.name == "steps-zig"
    assert wasm_binary.custom_sections(b.module)[abi.ABI_SECTION] == b"1"
    m = wasmtime.Module(wasmtime.Engine(), b.module)
    imports = {(i.module, i.name) for i in m.imports}
    # only the torpor imports it uses: no WASI, nothing else
    assert {mod for mod, _ in imports} == {"torpor"}
    assert {"tool_call", "response_len", "response_read", "input_len", "input_read"} <= {n for _, n in imports}
    exports = {e.name for e in m.exports}
    assert {"memory", abi.ENTRY_EXPORT, abi.ASYNC_BUF_EXPORT, "asyncify_start_unwind"} <= exports
    assert any(e.startswith(abi.GLOBAL_EXPORT_PREFIX) for e in exports)  # __stack_pointer, reachable


@pytest.mark.parametrize("case", ["denied", "namespace", "sleep"])
def test_a_denial_reaches_zig_code_as_a_typed_error(host: Host, bundles: BundleFactory, case: str) -> None:
    res = run(host, bundles.load(ERRORS), {"case": case})
    assert res.status == "completed", res.error
    out = res.output
    assert out["heap_ok"] is True  # what the failed call allocated and freed left the heap sound
    assert out["err"] == "Denied" and out["is_denied"] is True and out["code"] == "denied"
    assert out["retryable"] is False
    if case in ("denied", "sleep"):  # a tool the policy does not grant (sleep is the timer.sleep tool)
        tool = "kv.set" if case == "denied" else "timer.sleep"
        assert (out["tool"], out["rule"], out["reason_code"]) == (tool, "tools", "not_granted")
        assert f"'{tool}' is not granted" in out["message"]
    else:  # a granted tool, refused by the rule on its namespaces
        assert out["tool"] == "kv.incr" and out["reason_code"] == "namespace_not_granted"
        assert out["rule"] == 'tools."kv.incr".namespaces' and "'secret'" in out["message"]


def test_a_tool_call_under_many_frames_suspends_and_resumes(host: Host, bundles: BundleFactory) -> None:
    res = run(host, bundles.load(ERRORS), {"case": "deep_call", "by": 50})
    assert res.status == "completed" and res.output == {"value": 51} and res.suspensions == 1, res.error


def test_sleep_hibernates_for_the_wait_when_granted(host: Host, bundles: BundleFactory) -> None:
    b = bundles.load(ERRORS)
    policy = (ERRORS / "policy.toml").read_text() + '\n[tools."timer.sleep"]\n'
    granted = bundle_mod.load_bytes(bundle_mod.pack(b.module, policy))
    t0 = time.time()
    asleep = run(host, granted, {"case": "sleep", "by": 150})  # past 50 ms: parked sleeping, woken when due
    assert asleep.status == "sleeping" and asleep.wake_at is not None and asleep.wake_at >= t0 + 0.15, asleep.error
    time.sleep(max(0.0, asleep.wake_at - time.time()))
    [res] = anyio.run(host.wake_due)
    assert res.status == "completed" and res.output == {"slept": 150}, res.error
    assert time.time() - t0 >= 0.15 and res.suspensions == 1


def test_values_cross_in_both_directions(host: Host, bundles: BundleFactory) -> None:
    res = run(host, bundles.load(ERRORS), {"case": "values", "by": 7})
    assert res.status == "completed", res.error
    assert res.output == {"team": 7, "absent": True, "m": {"value": 1}}
    assert res.suspensions == 3


def test_the_heap_reuses_what_is_freed(host: Host, bundles: BundleFactory) -> None:
    """A growing list, 1,000 blocks of many sizes freed and taken again, an over-aligned block:
    right contents and alignment, and a memory near what is live (Zig's own wasm allocator
    reserves 64 KiB per size class; this one shares pages between classes)."""
    res = run(host, bundles.load(ERRORS), {"case": "heap"})
    assert res.status == "completed", res.error
    assert res.output["sum"] == sum(i * i for i in range(10_000)) and res.output["aligned"] is True
    assert res.output["pages"] <= 8, res.output  # 80 KB live at the end, in 64 KiB pages
    assert res.output["grown"] == 0, res.output  # 600 warm call-like turns: not a page more


def test_a_result_of_the_wrong_shape_is_unexpected_result(host: Host, bundles: BundleFactory) -> None:
    res = run(host, bundles.load(ERRORS), {"case": "unexpected"})
    assert res.status == "completed", res.error
    assert res.output["err"] == "UnexpectedResult" and res.output["code"] == "unexpected_result"
    assert "kv.incr answered a result that does not parse" in res.output["message"]


@pytest.mark.parametrize(("input", "code", "message"), [
    ({"case": "uncaught"}, "agent_error", "kv.set failed: denied: tool 'kv.set' is not granted"),
    ({"case": "fail", "by": 3}, "agent_error", "gave up at 3"),
    ({"case": "nope"}, "agent_error", 'input needs a "case"'),
    ({"case": "panic", "by": 10}, "aborted", "integer overflow"),
    ({"case": "oom"}, "memory_limit", "torpor.allocator: an allocation failed"),
    ({"case": "recurse", "by": 1000}, "stack_overflow", "overflowed its shadow stack"),
    ({"case": "deep_call", "by": 1500}, "suspend_overflow", "or `pub const torpor_async_stack` (Zig)"),
])
def test_the_agents_own_failures(host: Host, bundles: BundleFactory, input: dict[str, Any], code: str,
                                 message: str) -> None:
    res = run(host, bundles.load(ERRORS), input)
    assert res.status == "failed" and res.error is not None
    assert res.error["code"] == code and message in res.error["message"], res.error


def test_std_log_reaches_the_agents_log(host: Host, bundles: BundleFactory) -> None:
    res = run(host, bundles.load(ERRORS), {"case": "log", "by": 4})
    assert res.status == "completed", res.error
    said = [(line["level"], line["message"]) for line in res.logs]
    assert ("info", "through std.log: 4") in said
    assert ("warn", "(steps) scoped") in said
    assert ("debug", "direct debug") in said


def test_a_compile_error_names_the_file_and_line(tmp_path: Path) -> None:
    d = tmp_path / "broken"
    d.mkdir()
    (d / "policy.toml").write_text('[agent]\nname = "broken"\n')
    (d / "main.zig").write_text('const torpor = @import("torpor");\n\npub fn main() !void {\n'
                                '    try torpor.output(.{ .x = missing });\n}\n')
    with pytest.raises(ToolchainError, match=r"^Zig compilation failed at main\.zig:4:31: use of undeclared identifier"):
        bundle_mod.build_dir(d)
    res = _cli("build", str(d), "-o", str(tmp_path / "b.torpor"))
    assert res.returncode != 0 and not (tmp_path / "b.torpor").exists()
    assert res.stderr.startswith("torpor: error[toolchain]: Zig compilation failed at main.zig:4:31:"), res.stderr


def test_one_directory_holds_one_agent(tmp_path: Path) -> None:
    (tmp_path / "policy.toml").write_text('[agent]\nname = "two"\n')
    (tmp_path / "agent.zig").write_text("pub fn main() void {}\n")
    (tmp_path / "agent.c").write_text("int torpor_main(void) { return 0; }\n")
    with pytest.raises(BundleError, match=r"both C sources and agent\.zig"):
        bundle_mod.build_dir(tmp_path)
    (tmp_path / "agent.zig").unlink()
    (tmp_path / "agent.c").unlink()
    with pytest.raises(BundleError, match=r"no agent sources \(\*\.c, or agent\.zig or main\.zig\)"):
        bundle_mod.build_dir(tmp_path)
    assert toolchain.ZIG_ENTRY_FILES == ("agent.zig", "main.zig")


def test_the_sdk_readme_shows_steps_zig_exactly() -> None:
    """What a reader copies from guest_sdk/zig/README.md is the example the tests build and run."""
    readme = (EXAMPLES.parent / "zig" / "README.md").read_text()
    block = readme.split("```zig\n", 1)[1].split("```", 1)[0]
    source = (EXAMPLES / "steps-zig" / "agent.zig").read_text()
    body = source[source.index('const torpor = @import("torpor");'):]
    assert block == "// guest_sdk/examples/steps-zig/agent.zig\n" + body


def test_a_zig_run_replays_exactly_warm_and_cold(bundles: BundleFactory, tmp_path: Path) -> None:
    """Replay re-executes the run against its journal, call by call and fuel for fuel; cold
    rebuilds the instance from a checkpoint at every call, so Zig's frames and heap must
    come back exactly from each one."""
    from host.runtime.replay import replay

    with Host(tmp_path / "store", warm_idle_s=0.0) as h:
        res = anyio.run(lambda: h.run(bundles.load(EXAMPLES / "steps-zig"), {"n": 6}))
        assert res.output == {"sum": 21, "last": 6}
        for cold in (False, True):
            r = replay(h, res.agent_id, cold=cold)
            assert r.matched and r.complete, r.to_dict()
            assert r.calls_replayed == r.calls_recorded == 6
            assert r.fuel_used == res.fuel_used and r.outcome["output"] == {"sum": 21, "last": 6}


def test_an_agent_without_tools_imports_none_and_may_span_files(host: Host, tmp_path: Path) -> None:
    """Zig imports only the functions an agent reaches: one that calls no tool runs under a
    policy that grants none. Its directory's other files are its own to import; files
    outside it are not (Zig refuses to embed or import beyond the module's directory)."""
    d = tmp_path / "plain"
    d.mkdir()
    (d / "policy.toml").write_text('[agent]\nname = "plain"\n[budgets]\nmemory = "1MiB"\n')
    (d / "words.zig").write_text('pub const greeting = "hello";\n')
    (d / "agent.zig").write_text('const std = @import("std");\nconst torpor = @import("torpor");\n'
                                 'const words = @import("words.zig");\n\n'
                                 "pub fn main() !void {\n"
                                 "    const in = try torpor.input(struct { name: []const u8 });\n"
                                 "    defer in.deinit();\n"
                                 '    try torpor.output(.{ .greeting = words.greeting, .name = in.value.name });\n}\n')
    b = bundle_mod.load_bytes(bundle_mod.build_dir(d))
    m = wasmtime.Module(wasmtime.Engine(), b.module)
    assert {i.name for i in m.imports} <= {"input_len", "input_read", "output_write", "log", "abort"}
    res = run(host, b, {"name": "ada"})
    assert res.status == "completed", res.error
    assert res.output == {"greeting": "hello", "name": "ada"}

    (d / "agent.zig").write_text('const secret = @embedFile("../outside.txt");\npub fn main() void {\n    _ = secret;\n}\n')
    (tmp_path / "outside.txt").write_text("not the agent's")
    with pytest.raises(ToolchainError, match=r"agent\.zig:1:\d+: embed of file outside"):
        bundle_mod.build_dir(d)


def test_the_network_tool_helpers_against_loopback_servers(bundles: BundleFactory, tmp_path: Path) -> None:
    """torpor.llm, torpor.http, torpor.mcp: the arguments they send reach real servers
    (127.0.0.1, an MCP server process) through the host's tools, and the answers come
    back as typed Zig values."""
    sys.path.insert(0, str(Path(__file__).parent))
    from loopback import Loopback, Reply, chat_completion, json_reply

    def chat(req: Any) -> Reply:
        last = req.json["messages"][-1]["content"]
        return json_reply(chat_completion("hi" if last == "hello" else "three", prompt_tokens=4, completion_tokens=3))

    routes = {
        "/v1/chat/completions": chat,
        "/echo": lambda r: json_reply({"method": r.method, "body": r.body.decode(), "trace": r.headers.get("x-trace")}),
        "/item": lambda r: json_reply({"sku": "pear", "qty": 2, "note": "members a type does not name are ignored"}),
        "/text": lambda r: Reply(200, "plain text", {"Content-Type": "text/plain"}),
    }
    with Loopback(routes) as srv:
        policy = (f'[agent]\nname = "zig_tools"\n[budgets]\nfuel = 50_000_000\nmemory = "16MiB"\nwall_clock = "20s"\n'
                  f'[tools."llm.chat"]\nbase_url = "{srv.base}/v1"\nmodel = "m-small"\n'
                  f'[tools."http.fetch"]\nhosts = ["{srv.netloc}"]\nmethods = ["GET", "POST"]\n'
                  'allow_private = ["127.0.0.1"]\n'
                  f'[mcp.crm]\ncommand = "{sys.executable}"\nargs = ["{Path(__file__).parent / "mcp_fixture_server.py"}"]\n'
                  'tools = ["lookup_customer"]\n')
        built = bundles.load(GUESTS / "zig_tools")
        b = bundle_mod.load_bytes(bundle_mod.pack(built.module, policy))
        # the policy names an MCP server command: host code, run only for a trusted bundle
        with Host(tmp_path / "store", trust_bundle_code=[b.digest]) as h:
            res = run(h, b, {"base": srv.base})
        assert res.status == "completed", res.error
        assert res.output == {
            "reply": "hi", "chat": "three", "tokens": 7, "status": 200,
            "echo": {"method": "POST", "body": "ping", "trace": "zig"},
            "sku": "pear", "qty": 2, "not_json": "UnexpectedResult",
            "refused": "Denied", "rule": 'tools."http.fetch".hosts',
            "customer": {"id": "C-42", "name": "Ada Lovelace", "plan": "enterprise", "open_tickets": 2},
        }
        asks = [r.json for r in srv.requests if r.path == "/v1/chat/completions"]
        assert asks[0]["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
        assert asks[1]["messages"] == [{"role": "user", "content": "count"}]
        assert asks[1]["temperature"] == 0.5 and asks[1]["max_tokens"] == 7 and asks[1]["model"] == "m-small"
        assert "seed" not in asks[1]  # options left unset are not sent
        assert res.tokens == 14


def test_the_zig_sources_are_as_zig_fmt_writes_them() -> None:
    """What Zig programmers read and copy is in Zig's canonical form (and its current builtins)."""
    roots = [EXAMPLES.parent / "zig", EXAMPLES / "steps-zig", GUESTS / "zig_sdk", GUESTS / "zig_tools"]
    res = subprocess.run([sys.executable, "-m", "ziglang", "fmt", "--check", *map(str, roots)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
