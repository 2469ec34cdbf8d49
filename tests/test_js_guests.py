"""JavaScript agents: QuickJS-ng built by the project's toolchain, hibernating at every await.

The runtime is built once per machine (cached; the ``js_runtime`` fixture builds it at
most once per session and says how long that took), every agent here is compiled from
its ``agent.js`` by ``torpor build``'s own code, and runs in real Wasmtime against a
real LMDB store. The bad inputs of issue 25 come from one agent, ``tests/guests/js_hostile``,
that misbehaves on request, so the suite pays for one Cranelift compile, not one per case.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
from conftest import EXAMPLES, GUESTS, BundleFactory, built_runtime
from conftest import run_agent as run

from host.errors import ToolchainError
from host.runtime import Host
from host.sandbox import bundle as bundle_mod
from host.sandbox import js_modules, js_runtime


@pytest.fixture(scope="session")
def js_built(request: pytest.FixtureRequest) -> bytes:
    """The JS runtime module: from the machine's cache, or built now (about a minute)."""
    return built_runtime(js_runtime, "QuickJS")


@pytest.fixture(scope="module")
def hostile(js_built: bytes, bundles: BundleFactory) -> bundle_mod.Bundle:
    return bundles.load(GUESTS / "js_hostile")


def test_runtime_imports_only_the_abi(js_built: bytes) -> None:
    import wasmtime

    module = wasmtime.Module(wasmtime.Engine(), js_built)
    assert {i.module for i in module.imports} == {"torpor"}
    assert "torpor_main" in {e.name for e in module.exports}


def test_steps_js_from_the_cli(js_built: bytes, tmp_path: Path) -> None:
    """The issue's 'done when': build, run with n = 50, 50 suspensions."""
    cli = [sys.executable, "-m", "host.cli"]
    out = tmp_path / "s.torpor"
    subprocess.run([*cli, "build", str(EXAMPLES / "steps-js"), "-o", str(out)], check=True, capture_output=True,
                   timeout=300)
    res = subprocess.run([*cli, "run", str(out), "--input", '{"n": 50}', "--json", "--store", str(tmp_path / "st")],
                         capture_output=True, text=True, timeout=300)
    body = json.loads(res.stdout)
    assert body["output"] == {"sum": 1275, "last": 50}, res.stderr
    assert body["suspensions"] == 50 and body["tool_calls"] == 50
    # Each checkpoint is a delta against the pre-initialised image: a few hundred bytes.
    assert 0 < body["snapshot_bytes"] < 5 * 1024 * 50


def test_agent_module_is_compiled_at_build_not_spawn(hostile: bundle_mod.Bundle) -> None:
    """The bundle's module carries the pre-initialised image: no build exports are left,
    and its initial memory already holds the compiled agent (its source text is in it)."""
    import wasmtime

    module = wasmtime.Module(wasmtime.Engine(), hostile.module)
    names = {e.name for e in module.exports}
    assert not names & js_runtime.BUILD_EXPORTS
    assert b"boom from JS" in hostile.module  # the agent's atoms live in the data segments


def test_syntax_error_names_file_and_line(js_built: bytes, tmp_path: Path) -> None:
    d = tmp_path / "bad"
    d.mkdir()
    (d / "policy.toml").write_text((EXAMPLES / "steps-js" / "policy.toml").read_text())
    (d / "agent.js").write_text('import { tool } from "torpor";\n\nconst x = ;\nexport default async () => x;\n')
    with pytest.raises(ToolchainError, match=r"agent\.js:3:\d+: SyntaxError"):
        bundle_mod.build_dir(d)


def test_uncaught_exception_is_agent_error_with_message_and_stack(host: Host, hostile: bundle_mod.Bundle) -> None:
    res = run(host, hostile, {"mode": "throw"})
    assert res.status == "failed" and res.error is not None
    assert res.error["code"] == "agent_error"
    assert "Error: boom from JS" in res.error["message"]
    assert "at thrower (agent.js:6" in res.error["message"]  # the stack, with the source line
    assert res.suspensions == 1  # it had hibernated once before it threw


@pytest.mark.parametrize(("mode", "code"), [
    ("loop", "out_of_fuel"),
    ("alloc", "memory_limit"),
    ("huge", "memory_limit"),
    ("recurse", "stack_overflow"),
    ("wide", "stack_overflow"),
])
def test_runaway_agents_end_with_a_typed_error(host: Host, hostile: bundle_mod.Bundle, mode: str, code: str) -> None:
    res = run(host, hostile, {"mode": mode})
    assert res.status == "failed" and res.error is not None, res
    assert res.error["code"] == code, res.error


def test_eval_is_allowed_and_reaches_nothing(host: Host, hostile: bundle_mod.Bundle) -> None:
    res = run(host, hostile, {"mode": "eval"})
    assert res.status == "completed", res.error
    out = res.output
    assert out["sum"] == 3 and out["fn"] == 42
    assert out["native"] == "undefined" and out["indirect"] == "undefined" * 5
    assert out["date"] == 0  # no clock inside the sandbox (clock.now is a tool)
    assert "cannot import 'os' from agent.js: only the modules `torpor build` bundled" in out["import"]
    # A tool the policy does not grant, called from eval'd code: a typed denial with its rule.
    assert out["denied"] == {"name": "ToolError", "code": "denied", "rule": "tools", "retryable": False}


def test_promise_nothing_settles_is_a_clear_error(host: Host, hostile: bundle_mod.Bundle) -> None:
    res = run(host, hostile, {"mode": "unsettled"})
    assert res.status == "failed" and res.error is not None
    assert res.error["code"] == "agent_error"
    assert "nothing will settle" in res.error["message"]


def test_promise_all_over_many_tool_calls_is_bounded(host: Host, hostile: bundle_mod.Bundle) -> None:
    """1,100 calls at once: 1,024 may wait (the rest are refused in the guest), the policy's
    max_calls = 20 lets 20 run and answers the others rate_limited; one suspension each.
    1,024 checkpoints of a JS heap take a few seconds here, but a minute on a machine loaded
    ~20 deep (seen in CI beside other work): the same module under a wall clock a loaded
    machine cannot outlast (the budget's own test is the redteam one below)."""
    roomy = bundle_mod.load_bytes(bundle_mod.pack(hostile.module, hostile.policy_text.replace(
        'wall_clock = "60s"', 'wall_clock = "600s"')))
    assert roomy.policy.budgets.wall_clock == 600
    res = run(host, roomy, {"mode": "many", "count": 1100})
    assert res.status == "completed", res.error
    assert res.output == {"ok": 20, "rate_limited": 1004, "RangeError": 76}
    assert res.tool_calls == 20 and res.suspensions == 1024


def test_each_agent_draws_its_own_random_sequence_and_replays_it_exactly(host: Host,
                                                                         hostile: bundle_mod.Bundle) -> None:
    """The image froze one Math.random state; the host's per-agent seed (from the agent's
    id, so recorded) makes two agents differ, and a replay, warm or cold, draw the same."""
    from host.runtime.replay import replay

    first, second = run(host, hostile, {"mode": "random"}), run(host, hostile, {"mode": "random"})
    assert first.ok and second.ok
    assert first.output["a"] != second.output["a"]
    for cold in (False, True):
        r = replay(host, first.agent_id, cold=cold)
        assert r.matched and r.complete, r.summary()
        assert r.outcome == {"status": "completed", "output": first.output}
        assert r.fuel_used == first.fuel_used  # fuel-exact


# -- TypeScript -----------------------------------------------------------------------------
TS_SAMPLE = '''import { tool, type Json } from "torpor";
import type { ToolError } from "torpor";
interface Order { sku: string; qty: number }
export type Id = string;
export default async function main(input: { n?: number }): Promise<Json> {
  const xs: Array<number> = [];
  let y = input as unknown as Order;
  const z = input!.n;
  function g<T>(a: T, b?: string): T { return a }
  class C implements Order { private a: number = 1; readonly b = 2; sku = ""; qty = 0; c?: string; }
  const f = <T,>(v: T): T => v;
  return g<number>(1) satisfies number;
}
'''


def test_type_stripping_keeps_every_position() -> None:
    from host.sandbox.ts_strip import strip_types

    out = strip_types(TS_SAMPLE)
    assert [len(line) for line in out.splitlines()] == [len(line) for line in TS_SAMPLE.splitlines()]
    for gone in ("interface", "Order", "Promise<Json>", "Array<number>", " as ", "private", "readonly",
                 "satisfies", "implements", "<T>", "type Json", "import type"):
        assert gone not in out, gone
    assert 'import { tool            } from "torpor";' in out
    assert "const z = input .n;" in out
    # What is left is JavaScript QuickJS accepts (checked by compiling it in the runtime).


@pytest.mark.parametrize(("source", "message"), [
    ("enum Color { Red }\n", r"agent\.ts:1:1: an enum"),
    ("\nnamespace N { }\n", r"agent\.ts:2:1: a namespace"),
    ("class Q {\n  constructor(private a: number) {}\n}\n", r"agent\.ts:2:15: a constructor parameter property"),
    ("const ok = 1;\nconst x: = 1;\n", r"agent\.ts:2:\d+: SyntaxError"),
])
def test_typescript_that_needs_code_generation_is_refused_with_its_line(source: str, message: str) -> None:
    from host.sandbox.ts_strip import strip_types

    with pytest.raises(ToolchainError, match=message):
        strip_types(source)


def test_typescript_agent_builds_and_its_errors_name_the_ts_line(js_built: bytes, tmp_path: Path,
                                                                 host: Host) -> None:
    d = tmp_path / "ts"
    d.mkdir()
    (d / "policy.toml").write_text((EXAMPLES / "steps-js" / "policy.toml").read_text())
    (d / "agent.ts").write_text(TS_SAMPLE.replace("  return g<number>(1) satisfies number;",
                                                  "  if (input.n === 7) throw new RangeError(`seven: ${xs.length}`);\n"
                                                  "  return { y: g<number>(1) satisfies number, z, f: f(2) };"))
    b = bundle_mod.load_bytes(bundle_mod.build_dir(d))
    ok = run(host, b, {"n": 3})
    assert ok.status == "completed" and ok.output == {"y": 1, "z": 3, "f": 2}, ok.error
    bad = run(host, b, {"n": 7})
    assert bad.error is not None and bad.error["code"] == "agent_error"
    assert "RangeError: seven: 0" in bad.error["message"]
    assert "agent.ts:12:" in bad.error["message"]  # the line of the throw in agent.ts


def test_sleep_is_a_durable_host_timer(js_built: bytes, bundles: BundleFactory, tmp_path: Path) -> None:
    """torpor.sleep(1.5 s) under `torpor run`: the agent parks `sleeping` (the command exits
    4, no process holds it), `resume --all` before its time leaves it asleep, and after it
    wakes it at once: the deadline is the one journaled with the call, not a new 1.5 s."""
    cli = [sys.executable, "-m", "host.cli"]
    store = str(tmp_path / "st")
    bundle = str(bundles.path(GUESTS / "js_hostile"))
    parked = subprocess.run([*cli, "run", bundle, "--input", '{"mode": "sleep", "ms": 1500}', "--store", store,
                             "--json"], capture_output=True, text=True, timeout=120)
    first = json.loads(parked.stdout)
    assert parked.returncode == 4 and first["status"] == "sleeping", parked.stdout + parked.stderr
    early = subprocess.run([*cli, "resume", "--all", "--store", store, "--json"], capture_output=True, text=True,
                           timeout=120)
    woken = json.loads(early.stdout)
    if woken:  # a loaded machine took so long to start the command that the agent was due
        assert time.time() >= first["wake_at"], early.stdout
        [final] = woken
    else:
        time.sleep(max(0.0, first["wake_at"] - time.time()))
        t0 = time.monotonic()
        res = subprocess.run([*cli, "resume", "--all", "--store", store, "--json"], capture_output=True, text=True,
                             timeout=120)
        took = time.monotonic() - t0
        [final] = json.loads(res.stdout)
        assert took < 5.0, f"resume took {took:.1f} s: the sleep started again"
    assert final["status"] == "completed", final
    assert final["output"]["elapsed"] >= 1500  # the clock.now calls straddle the whole wait


def test_sleep_parks_a_running_host_and_wakes_when_due(host: Host, hostile: bundle_mod.Bundle) -> None:
    asleep = run(host, hostile, {"mode": "sleep", "ms": 300})
    assert asleep.status == "sleeping" and asleep.wake_at is not None, asleep.error
    time.sleep(max(0.0, asleep.wake_at - time.time()))
    [res] = anyio.run(host.wake_due)
    assert res.status == "completed", res.error
    assert res.output["elapsed"] >= 300


def test_set_timeout_runs_over_the_host_timer(host: Host, hostile: bundle_mod.Bundle) -> None:
    res = run(host, hostile, {"mode": "timeout"})
    assert res.status == "completed", res.error
    assert res.output == {"order": ["fired"]}  # the cleared one never ran


@pytest.mark.parametrize(("source", "message"), [
    ("export default () => " + "(" * 100_000 + "1" + ")" * 100_000 + ";\n", "nests too deeply"),
    ("const s = '" + "x" * (17 << 20) + "';\n", "the limit is"),
])
def test_hostile_sources_are_refused_at_build(js_built: bytes, source: str, message: str) -> None:
    """Nesting that would overflow the parser's stack, a source past the size limit: a
    build error with the file named, and the builder lives on."""
    with pytest.raises(ToolchainError, match=message):
        js_runtime.pre_initialize(js_built, js_modules.ModuleGraph.single(source, "agent.js"))


# ---- red team (session 10): a JS guest attacking the host through every value it hands over ----

@pytest.mark.parametrize(("mode", "extra", "code", "says"), [
    ("finally_loop", {}, "out_of_fuel", ""),
    ("catch_loop", {}, "out_of_fuel", ""),
    ("looping_error", {}, "out_of_fuel", ""),
    ("bad_error", {}, "agent_error", "Uncaught"),
    ("null_proto", {}, "agent_error", "Uncaught"),
    ("proxy_error", {}, "agent_error", "Uncaught"),
    ("raw_output", {"text": "NaN"}, "agent_error", "refused the output"),
    ("raw_output", {"text": "1e400"}, "agent_error", "refused the output"),
    ("raw_output", {"text": "18446744073709551616"}, "agent_error", "refused the output"),
    ("raw_output", {"text": '"\\udfff"'}, "agent_error", "refused the output"),
    ("raw_output", {"depth": 100_000}, "agent_error", "refused the output"),
    ("raw_call", {"text": '{"key": "k", "by": NaN}'}, "agent_error", "NaN is not JSON"),
    ("raw_call", {"text": '{"key": "k", "by": 1e400}'}, "agent_error", "beyond the range of a double"),
    ("raw_call", {"text": '{"key": "k", "by": 1180591620717411303424}'}, "agent_error", "does not fit 64 bits"),
    ("raw_call", {"text": '{"key": "\\ud800"}'}, "agent_error", "lone surrogate"),
    ("deep_output", {}, "stack_overflow", ""),
    ("deep_args", {}, "stack_overflow", ""),
    ("surrogate_key", {}, "agent_error", "lone surrogate"),
    ("surrogate_output", {}, "agent_error", "refused the output"),
    ("then_hijack", {}, "agent_error", "Uncaught"),
    ("huge_output", {}, "agent_error", "refused the output"),
])
def test_redteam_a_hostile_value_ends_the_agent_typed_never_the_host(host: Host, hostile: bundle_mod.Bundle, mode: str,
                                                                    extra: dict[str, object], code: str, says: str) -> None:
    """Loops in finally/catch and in a thrown value's getters, thrown values whose every
    conversion throws, a hijacked Promise.prototype.then, and every poison value (100k deep,
    lone surrogates, 1e400, 2**70, NaN, 2 MiB), also sent past the SDK by replacing
    JSON.stringify: a typed end, and the host runs the next agent."""
    res = run(host, hostile, {"mode": mode, **extra})
    assert res.status == "failed" and res.error is not None, res
    assert res.error["code"] == code and says in res.error["message"], res.error
    assert run(host, hostile, {"mode": "random"}).ok


@pytest.mark.parametrize("mode", ["log_flood"])
def test_redteam_the_wall_clock_holds_while_the_host_works_inside_calls(host: Host, hostile: bundle_mod.Bundle,
                                                                       mode: str) -> None:
    """Fuel counts guest instructions only: an agent that spends its time in the host (60 KB
    log lines in a loop) is ended by the wall clock, at about its budget. The
    same module under a 2 s policy (the compile is the module's, so it is cached)."""
    policy = hostile.policy_text.replace('wall_clock = "60s"', 'wall_clock = "2s"').replace(
        "fuel = 500_000_000", "fuel = 1_000_000_000_000")
    short = bundle_mod.load_bytes(bundle_mod.pack(hostile.module, policy))
    t0 = time.monotonic()
    res = run(host, short, {"mode": mode})
    assert res.status in ("failed", "terminated") and res.error is not None, res
    assert res.error["code"] in ("deadline_exceeded", "budget_exceeded"), res.error
    assert time.monotonic() - t0 < 20
