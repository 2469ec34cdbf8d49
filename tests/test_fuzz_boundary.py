"""The boundary's fuzz targets (``bench/fuzz.py``), each with a fixed seed and a small
budget of examples, so CI is fast and repeatable; ``torpor bench fuzz --minutes N`` runs
the same targets for as long as one likes (bench/RESULTS.md has a long run's counts).

Every case runs against one long-lived real host (real Wasmtime, a real LMDB store, the
``fuzzops`` guest compiled from C by the project's toolchain), and after every case the
same host must run ``hello`` correctly. Below them, the regression tests of what the
fuzzing found, each fixed at its choke point.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench import fuzz
from bench.cli import FUZZ_TARGETS

#: Examples per target in CI (the imports and the SDK's parser run a guest per case).
BUDGET = {"imports": 40, "sdk_json": 25, "validator": 200, "modules": 40, "snapshots": 100, "bundles": 80,
          "policies": 40}


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[fuzz.FuzzRig]:
    r = fuzz.FuzzRig(tmp_path_factory.mktemp("fuzz") / "store")
    yield r
    r.close()


@pytest.mark.parametrize("name", list(fuzz.TARGETS))
def test_target(name: str, rig: fuzz.FuzzRig) -> None:
    target = fuzz.TARGETS[name]
    one = fuzz.case_runner(rig, target)

    @settings(max_examples=BUDGET[name], derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def prop(data: st.DataObject) -> None:
        one(data.draw(target.strategy(rig), label="case"))

    before = rig.cases
    prop()
    assert rig.cases - before >= BUDGET[name] // 2  # the target really ran (and hello after each case)


def test_the_parser_knows_every_target() -> None:
    assert tuple(fuzz.TARGETS) == FUZZ_TARGETS


def test_the_oracle_is_written_from_abi_md() -> None:
    """The imports' oracle is no rubber stamp: it expects each code of ABI.md's order."""
    mem, scratch = 65536, 1024
    out = [2, 0, 0, 2, 0, 0, 0, 0]
    assert fuzz.expected_code([*out, b"{}".hex()], [0, scratch, 2, scratch, 0, mem, 0], scratch, 9) == 0
    assert fuzz.expected_code([*out, b"{]".hex()], [0, scratch, 2, scratch, 0, mem, 0], scratch, 9) == fuzz.INVALID_JSON
    assert fuzz.expected_code([*out, b"{}".hex()], [0, mem - 1, 2, scratch, 0, mem, 0], scratch, 9) == fuzz.FAULT
    assert fuzz.expected_code([*out, b"{}".hex()], [0, scratch, -1, scratch, 0, mem, 0], scratch, 9) == fuzz.FAULT
    assert fuzz.expected_code([*out, ""], [0, 0, (1 << 20) + 1, 0, 0, 2 << 20, 0], scratch, 9) == fuzz.TOO_LARGE
    log = [3, 0, 0, 2, 0, 0, 0, 9, ""]
    assert fuzz.expected_code(log, [0, mem + 5, 2, 0, 0, mem, 0], scratch, 9) == fuzz.INVALID_ARGS  # level first
    for poison in ["[" * 65 + "]" * 65, '"\\ud800"', "1e400", "18446744073709551616", "NaN", "", " "]:
        assert not fuzz.acceptable_json(poison.encode()), poison
    assert fuzz.acceptable_json(b" [1, -9223372036854775808, 18446744073709551615, 1.5e308, \"\\u00e9\"] ")


# -- what the fuzzing found ----------------------------------------------------------------


def _rc(rig: fuzz.FuzzRig, op: list[Any]) -> int:
    case = {"mode": "ops", "scratch": 4096, "ops": [op]}
    fuzz.check_imports(rig, case)  # the oracle agrees, and hello runs after it
    rig.hello_ok()
    res = rig.run(rig.fuzzops, case)
    return int(res.output["results"][0][0])


def test_a_tool_call_checks_both_buffers_bounds_before_sizes(rig: fuzz.FuzzRig) -> None:
    """A name over 128 bytes but in bounds, with arguments out of bounds, is a fault: every
    pair's bounds are checked before any size limit (ABI.md 3). It was ``too_large``."""
    name_then_args = (b"x" * 129 + b"{}").hex()
    assert _rc(rig, [4, 0, 0, 129, 1, 0, 12, 0, name_then_args]) == fuzz.FAULT
    assert _rc(rig, [4, 0, 0, 129, 0, 129, 2, 0, name_then_args]) == fuzz.TOO_LARGE


@pytest.mark.parametrize("args", [b"\x0b", b"\x0c", b" \x0b "])
def test_arguments_of_non_json_whitespace_are_invalid_json(rig: fuzz.FuzzRig, args: bytes) -> None:
    """Only JSON whitespace means ``{}``; a vertical tab was taken as ``{}`` too."""
    assert _rc(rig, [4, 0, 0, 6, 0, 6, len(args), 0, (b"kv.get" + args).hex()]) == fuzz.INVALID_JSON
    assert _rc(rig, [4, 0, 0, 6, 0, 6, 3, 0, (b"kv.get \t\n").hex()]) == fuzz.INVALID_ARGS  # {} lacks "key"


@pytest.mark.parametrize(("kind", "code"), [(2, "aborted"), (-1, "aborted"), (7, "aborted"), (1, "memory_limit")])
def test_an_abort_of_any_kind_fails_the_agent_as_abi_md_says(rig: fuzz.FuzzRig, kind: int, code: str) -> None:
    """``abort(2, ...)`` was taken for WASI's proc_exit and ended in ``host_error``
    (ValueError: int('agent aborted')); every kind but 1 is a panic."""
    res = rig.run(rig.fuzzops, {"mode": "ops", "scratch": 4096, "ops": [[7, 0, 0, 4, 0, 0, 0, kind, b"boom".hex()]]})
    assert res.status == "failed" and res.error is not None and res.error["code"] == code, res.error
    assert "boom" in res.error["message"]
    rig.hello_ok()


def test_torpor_bench_fuzz_runs_and_reports() -> None:
    proc = subprocess.run([sys.executable, "-m", "host.cli", "bench", "fuzz", "--minutes", "0.05", "--seed", "7",
                           "--target", "validator", "--target", "bundles", "--json", "--no-plot"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["bench"] == "fuzz" and r["seed"] == 7 and set(r["per_target"]) == {"validator", "bundles"}
    assert r["cases"] > 0 and r["findings"] == [], r["findings"]
    assert r["command"] == "torpor bench fuzz --minutes 0.05 --seed 7 --target validator --target bundles --json " \
                           "--no-plot"
