"""Python agents: CPython for WASI linked by the project's toolchain, hibernating at every await.

The runtime is built once per machine (cached; the ``py_built`` fixture builds it at most
once per session and says how long that took), every agent here is built from its
``agent.py`` by ``torpor build``'s own code and runs in real Wasmtime against a real LMDB
store. The bad inputs of issue 26 come from one agent, ``tests/guests/py_hostile``, that
misbehaves on request, so the suite pays for few Cranelift compiles of the 4 MB module:
one host per module, and the CLI test starts with that host's compile cache.
"""

from __future__ import annotations

import json
import shutil
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
from host.sandbox import py_runtime


@pytest.fixture(scope="session")
def py_built() -> bytes:
    """The Python runtime module: from the machine's cache, or built now (about a minute)."""
    return built_runtime(py_runtime, "CPython")


@pytest.fixture(scope="module")
def hostile(py_built: bytes, bundles: BundleFactory) -> bundle_mod.Bundle:
    return bundles.load(GUESTS / "py_hostile")


def test_runtime_imports_only_the_abi(py_built: bytes) -> None:
    """Read by the host's own validator (the check a bundle passes before it runs; the
    runtime before pre-initialisation still has the linker's many small data segments)."""
    from host.sandbox.validate import HostLimits, check_module

    module, _ = py_runtime._split_section(py_built, py_runtime.FROZEN_SECTION)
    shape = check_module(module, HostLimits(max_data_segments=1 << 20))
    assert {i.module for i in shape.imports} == {"torpor"}, shape.imports
    assert "torpor_main" in shape.exports


def test_steps_py_in_a_host_and_from_the_cli(py_built: bytes, host: Host, bundles: BundleFactory,
                                             tmp_path: Path) -> None:
    """The issue's 'done when': build, run with n = 50, 50 suspensions, the exact sums; a
    checkpoint is a delta against the pre-initialised image, a few hundred bytes."""
    res = run(host, bundles.load(EXAMPLES / "steps-py"), {"n": 50})
    assert res.status == "completed" and res.output == {"sum": 1275, "last": 50}, res.error
    assert res.suspensions == 50 and res.tool_calls == 50
    cli = [sys.executable, "-m", "host.cli"]
    out = tmp_path / "s.torpor"
    subprocess.run([*cli, "build", str(EXAMPLES / "steps-py"), "-o", str(out)], check=True, capture_output=True,
                   timeout=600)
    assert out.read_bytes() == bundles.example("steps-py").read_bytes()  # the build is reproducible
    shutil.copytree(host.store_dir / "cache", tmp_path / "st" / "cache")  # compiled once, above
    proc = subprocess.run([*cli, "run", str(out), "--input", '{"n": 50}', "--json", "--store", str(tmp_path / "st")],
                          capture_output=True, text=True, timeout=300)
    body = json.loads(proc.stdout)
    assert body["output"] == {"sum": 1275, "last": 50}, proc.stderr
    assert body["suspensions"] == 50 and body["tool_calls"] == 50
    assert 0 < body["snapshot_bytes"] < 1024 * 50


def test_a_python_agents_delta_does_not_creep(host: Host, bundles: BundleFactory) -> None:
    """Small objects come from runtime.c's arena allocator (pymalloc's shape; this libpython
    has no pymalloc), so the objects an await makes land where the previous await's were:
    the delta against the image after 200 awaits is within a few pages of the one after
    20. With libc's malloc for every object it grew by a third over the same awaits."""
    from bench.rig import make_rig
    from host.sandbox.execution import Completed, Suspended

    rig = make_rig(host.engine, bundles.load(EXAMPLES / "steps-py"))
    ex = rig.execution(b'{"n": 200}')
    out = ex.start()
    pages: dict[int, int] = {}
    k = 0
    while isinstance(out, Suspended):
        k += 1
        if k in (20, 200):
            pages[k] = len(ex.capture().memory.indices)
        out = ex.resume(0, b'{"value":%d}' % k)
    assert isinstance(out, Completed) and out.output == {"sum": 20100, "last": 200}, out
    assert pages[200] <= pages[20] + 6, pages
    ex.release()


def test_agent_is_imported_at_build_not_spawn(hostile: bundle_mod.Bundle) -> None:
    """No build exports are left, and the image already holds the imported agent."""
    from host.sandbox.validate import check_module

    assert not set(check_module(hostile.module).exports) & py_runtime.BUILD_EXPORTS
    assert b"boom from Python" in hostile.module  # the agent's constants live in the data segments


@pytest.mark.parametrize(("source", "message"), [
    ("import torpor\n\nasync def main(:\n    pass\n", r"agent\.py:3: SyntaxError"),
    ("import torpor\nimport requests\n", r"agent\.py:2: ModuleNotFoundError: No module named 'requests'"),
    ("x = 1\n", r"agent\.py must define `async def main"),
    ("def main():\n    return 1\n", r"agent\.py must define `async def main"),
    ("raise SystemExit(3)\n", r"agent\.py:1: SystemExit"),
])
def test_bad_agents_are_refused_at_build_with_file_and_line(py_built: bytes, tmp_path: Path, source: str,
                                                           message: str) -> None:
    d = tmp_path / "bad"
    d.mkdir()
    (d / "policy.toml").write_text((EXAMPLES / "steps-py" / "policy.toml").read_text())
    (d / "agent.py").write_text(source)
    with pytest.raises(ToolchainError, match=message):
        bundle_mod.build_dir(d)


def test_uncaught_exception_is_agent_error_with_the_agents_traceback(host: Host,
                                                                     hostile: bundle_mod.Bundle) -> None:
    res = run(host, hostile, {"mode": "throw"})
    assert res.status == "failed" and res.error is not None
    assert res.error["code"] == "agent_error"
    msg = res.error["message"]
    assert "ValueError: boom from Python" in msg
    assert 'File "agent.py", line 19, in thrower' in msg and "in main" in msg  # the agent's own frames
    assert "torpor.py" not in msg  # not the runtime's
    assert res.suspensions == 1  # it had hibernated once before it threw


@pytest.mark.parametrize(("mode", "code"), [
    ("loop", "out_of_fuel"),
    ("alloc", "memory_limit"),
    ("huge", "memory_limit"),
])
def test_runaway_agents_end_with_a_typed_error(host: Host, hostile: bundle_mod.Bundle, mode: str, code: str) -> None:
    res = run(host, hostile, {"mode": mode})
    assert res.status == "failed" and res.error is not None, res
    assert res.error["code"] == code, res.error


def test_deep_recursion_is_a_recursion_error_or_a_clean_stack_error(host: Host, hostile: bundle_mod.Bundle) -> None:
    """Python frames: RecursionError inside the agent, which it can catch. Recursion in C
    (a __repr__ that calls repr): RecursionError too, or the host's stack_overflow; never
    a host crash, and the host runs the next agent."""
    caught = run(host, hostile, {"mode": "recurse"})
    assert caught.status == "completed" and caught.output == {"caught": "RecursionError"}, caught.error
    deep = run(host, hostile, {"mode": "deep_repr"})
    assert deep.status == "failed" and deep.error is not None
    assert deep.error["code"] in ("agent_error", "stack_overflow"), deep.error
    if deep.error["code"] == "agent_error":
        assert "RecursionError" in deep.error["message"]
    assert run(host, hostile, {"mode": "recurse"}).ok


def test_eval_exec_and_imports_reach_nothing_ungranted(host: Host, hostile: bundle_mod.Bundle) -> None:
    res = run(host, hostile, {"mode": "eval"})
    assert res.status == "completed", res.error
    out = res.output
    assert out["sum"] == 3 and out["exec"] == 42 and out["helper"] == 42  # the vendored module
    assert out["socket"] in ("OSError", "PermissionError", "ModuleNotFoundError", "AttributeError")
    assert out["file"] in ("OSError", "FileNotFoundError", "PermissionError")  # no file system
    assert out["time"] == 0  # no clock inside the sandbox (clock.now is a tool)
    assert out["denied"] == {"name": "DeniedError", "code": "denied", "rule": "tools", "retryable": False}


def test_an_await_nothing_settles_is_a_clear_error(host: Host, hostile: bundle_mod.Bundle) -> None:
    res = run(host, hostile, {"mode": "unsettled"})
    assert res.status == "failed" and res.error is not None
    assert res.error["code"] == "agent_error"
    assert "nothing here settles" in res.error["message"] and "agent.py" in res.error["message"]


def test_print_and_log_reach_the_agents_log(host: Host, hostile: bundle_mod.Bundle) -> None:
    res = run(host, hostile, {"mode": "print"})
    assert res.status == "completed" and res.output == "printed", res.error
    assert {"level": "info", "message": "hello from print"} in res.logs, res.logs
    assert {"level": "warn", "message": 'a warning {"k": 1}'} in res.logs, res.logs


def test_each_agent_draws_its_own_random_sequence_and_replays_it_exactly(host: Host,
                                                                         hostile: bundle_mod.Bundle) -> None:
    """`random` was seeded in the image; the host's per-agent seed (from the agent's id, so
    recorded) makes two agents differ, and a replay, warm or cold, draws the same."""
    from host.runtime.replay import replay

    first, second = run(host, hostile, {"mode": "random"}), run(host, hostile, {"mode": "random"})
    assert first.ok and second.ok
    assert first.output["a"] != second.output["a"]
    # The hash seed is the bundle's (its image holds dicts built with it): alike in every
    # agent of the bundle, and derived from the sources, so a rebuild picks it again.
    assert first.output["hash"] == second.output["hash"]
    blob = py_runtime.sources_blob(py_runtime.agent_sources(GUESTS / "py_hostile"))
    assert py_runtime.hash_seed(blob) == py_runtime.hash_seed(blob) != py_runtime.hash_seed(blob + b" ")
    # The collector's set-up objects (interpreter, torpor, the agent's imports) were frozen
    # in the image: a collection in an agent never walks, nor dirties, their pages.
    assert first.output["frozen"] > 1000, first.output
    for cold in (False, True):
        r = replay(host, first.agent_id, cold=cold)
        assert r.matched and r.complete, r.summary()
        assert r.outcome == {"status": "completed", "output": first.output}
        assert r.fuel_used == first.fuel_used  # fuel-exact


def test_sleep_parks_the_agent_and_wakes_when_due(host: Host, hostile: bundle_mod.Bundle) -> None:
    asleep = run(host, hostile, {"mode": "sleep", "ms": 300})
    assert asleep.status == "sleeping" and asleep.wake_at is not None, asleep.error
    time.sleep(max(0.0, asleep.wake_at - time.time()))
    [res] = anyio.run(host.wake_due)
    assert res.status == "completed", res.error
    assert res.output["elapsed"] >= 300


def test_agent_py_picks_python_and_refuses_a_second_language(tmp_path: Path) -> None:
    from host.errors import BundleError

    (tmp_path / "agent.py").write_text("async def main():\n    pass\n")
    assert bundle_mod.agent_language(tmp_path) == "python"
    for other in ("agent.js", "agent.c", "agent.zig"):
        (tmp_path / other).write_text("")
        with pytest.raises(BundleError, match="one directory holds one agent"):
            bundle_mod.agent_language(tmp_path)
        (tmp_path / other).unlink()


def test_the_agents_sources_are_its_modules_not_operator_tools(tmp_path: Path) -> None:
    (tmp_path / "agent.py").write_text("")
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "__init__.py").write_text("")
    (tmp_path / "lib" / "util.py").write_text("")
    (tmp_path / "shop_tools.py").write_text("")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "x.py").write_text("")
    files = py_runtime.agent_sources(tmp_path)
    assert set(files) == {"agent", "lib", "lib.util"}
    assert files["lib"] == ("lib/__init__.py", "", True)
    with pytest.raises(ToolchainError, match=r"no agent\.py"):
        py_runtime.agent_sources(tmp_path / "lib")


# ---- red team (session 10): a Python guest attacking the host through every value it hands over ----

NAN, INF, BIG, LONE = '{"key": "k", "by": NaN}', '{"key": "k", "by": 1e400}', '{"key": "k", "by": 1180591620717411303424}', \
    '{"key": "\\ud800"}'


@pytest.mark.parametrize(("mode", "extra", "code", "says"), [
    ("finally_loop", {}, "out_of_fuel", ""),
    ("except_loop", {}, "out_of_fuel", ""),
    ("looping_str", {}, "out_of_fuel", ""),
    ("bad_repr", {}, "agent_error", "BadRepr"),
    ("bad_awaitable", {}, "agent_error", "RuntimeError"),
    ("raw_output", {"text": "NaN"}, "agent_error", "refused the output"),
    ("raw_output", {"text": "1e400"}, "agent_error", "refused the output"),
    ("raw_output", {"text": "18446744073709551616"}, "agent_error", "refused the output"),
    ("raw_output", {"text": '"\\udfff"'}, "agent_error", "refused the output"),
    ("raw_output", {"depth": 100_000}, "agent_error", "refused the output"),
    ("deep_output", {}, "agent_error", "RecursionError"),
    ("deep_args", {}, "agent_error", "RecursionError"),
    ("surrogate_key", {}, "agent_error", "UnicodeEncodeError"),
    ("surrogate_output", {}, "agent_error", "UnicodeEncodeError"),
    ("big_int_arg", {}, "agent_error", "invalid_json"),
    ("big_int_output", {}, "agent_error", "refused the output"),
    ("inf_output", {}, "agent_error", "Out of range float"),
    ("nan_output", {}, "agent_error", "Out of range float"),
    ("huge_output", {}, "agent_error", "refused the output"),
])
def test_redteam_a_hostile_value_ends_the_agent_typed_never_the_host(host: Host, hostile: bundle_mod.Bundle, mode: str,
                                                                    extra: dict[str, object], code: str, says: str) -> None:
    """Loops in finally/except and in __str__, exceptions whose str and repr raise, a
    coroutine yielding a non-call, and every poison value (100k deep, lone surrogates, 1e400,
    2**70, NaN, 2 MiB), also sent past the SDK through ``_torpor``: a typed end, nothing else."""
    res = run(host, hostile, {"mode": mode, **extra})
    assert res.status == "failed" and res.error is not None, res
    assert res.error["code"] == code and says in res.error["message"], res.error


@pytest.mark.parametrize("text", [NAN, INF, BIG, LONE, "[" * 100_000 + "]" * 100_000])
def test_redteam_raw_call_text_is_an_error_code_at_the_import(host: Host, hostile: bundle_mod.Bundle, text: str) -> None:
    """The call's raw text, past json.dumps: the import answers invalid_json, the agent goes on."""
    res = run(host, hostile, {"mode": "raw_call", "text": text})
    assert res.status == "completed", res.error
    assert res.output["code"] < 0 and json.loads(res.output["body"])["code"] == "invalid_json", res.output


def test_redteam_c_recursion_past_any_limit_and_then_the_store(host: Host, hostile: bundle_mod.Bundle,
                                                              tmp_path: Path) -> None:
    """sys.setrecursionlimit(10**7) and recursion: a typed end; then `resume --all` and `ps`
    on the store every case above left agents in (none left running, exit 0)."""
    res = run(host, hostile, {"mode": "deep_c_recursion"})
    assert res.status == "failed" and res.error is not None
    assert res.error["code"] in ("memory_limit", "stack_overflow", "agent_error"), res.error
    cli = [sys.executable, "-m", "host.cli"]
    resumed = subprocess.run([*cli, "resume", "--all", "--store", str(host.store_dir), "--json"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    ps = subprocess.run([*cli, "ps", "--store", str(host.store_dir), "--json"], capture_output=True, text=True,
                        timeout=120)
    assert ps.returncode == 0 and "running" not in {r["status"] for r in json.loads(ps.stdout)}, ps.stdout
    assert run(host, hostile, {"mode": "recurse"}).ok


@pytest.mark.parametrize("mode", ["log_flood"])
def test_redteam_the_wall_clock_holds_while_the_host_works_inside_calls(host: Host, hostile: bundle_mod.Bundle,
                                                                       mode: str) -> None:
    """Fuel counts guest instructions only: an agent that spends its time in the host (60 KB
    log lines in a loop) is ended by the wall clock, at about its budget. The
    same module under a 2 s policy (the compile is the module's, so it is cached)."""
    policy = hostile.policy_text.replace('wall_clock = "30s"', 'wall_clock = "2s"').replace(
        "fuel = 2_000_000_000", "fuel = 1_000_000_000_000")
    short = bundle_mod.load_bytes(bundle_mod.pack(hostile.module, policy))
    t0 = time.monotonic()
    res = run(host, short, {"mode": mode})
    assert res.status in ("failed", "terminated") and res.error is not None, res
    assert res.error["code"] in ("deadline_exceeded", "budget_exceeded"), res.error
    assert time.monotonic() - t0 < 20
