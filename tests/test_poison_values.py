"""Poison values: valid-looking JSON that a Python host cannot carry (nesting tens of
thousands deep, lone surrogates, numbers beyond a double, integers beyond 64 bits).

Sent by a real guest as tool arguments or as its output, each is an error code at the
import (``invalid_json``), the agent completes, and the store stays healthy: the next
`resume --all` and `ps` work. Given as an agent's input, it is refused before anything
is written. All through the real CLI.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import GUESTS, BundleFactory

from host.sandbox import guest_json

POISON = {
    "deep_array": "[" * 50_000 + "]" * 50_000,
    "deep_object": '{"a":' * 20_000 + "1" + "}" * 20_000,
    "past_max_depth": "[" * (guest_json.MAX_DEPTH + 1) + "]" * (guest_json.MAX_DEPTH + 1),
    "lone_surrogate_value": '{"key": "\\ud800"}',
    "lone_surrogate_key": '{"\\udfff": 1}',
    "beyond_double": '{"key": "k", "value": 1e999}',
    "beyond_double_negative": '{"key": "k", "value": -1e400}',
    "int_beyond_64_bits": '{"key": "k", "value": 18446744073709551616}',
    "int_thousands_of_digits": '{"key": "k", "value": ' + "9" * 5000 + "}",
    "nan": '{"key": "k", "value": NaN}',
}


def torpor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "host.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def bundle(bundles: BundleFactory, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("poison") / "poison.torpor"
    path.write_bytes(bundles.load(GUESTS / "poison").raw)
    return path


def run(bundle: Path, store: Path, payload: Any) -> tuple[int, dict[str, Any]]:
    given = store.parent / "input.json"  # @FILE: a poison text can be longer than one argv entry may be
    given.write_text(json.dumps(payload))
    proc = torpor("run", str(bundle), "--input", f"@{given}", "--store", str(store), "--json")
    assert proc.returncode >= 0, f"killed by signal {-proc.returncode}: {proc.stderr}"
    assert "Traceback" not in proc.stderr and "internal" not in proc.stdout, proc.stdout + proc.stderr
    return proc.returncode, json.loads(proc.stdout)


@pytest.mark.parametrize("mode", ["call", "output"])
def test_a_poison_value_from_the_guest_is_an_error_code(bundle: Path, tmp_path: Path, mode: str) -> None:
    for name, text in POISON.items():
        code, res = run(bundle, tmp_path, {"mode": mode, "text": text})
        assert code == 0 and res["status"] == "completed", (name, res)
        assert res["output"] == {"rc": -2, "code": "invalid_json"}, (name, res)
    # The same agent with a sound value: the call goes through, the output is taken.
    code, res = run(bundle, tmp_path, {"mode": mode, "text": '{"key": "k", "value": [1, 2.5, "é"]}'})
    assert code == 0 and res["output"] == ({"rc": 0, "code": "ok"} if mode == "call"
                                           else {"key": "k", "value": [1, 2.5, "é"]})
    # The store is healthy: nothing is left running, and listing it works.
    resumed = torpor("resume", "--all", "--store", str(tmp_path), "--json")
    assert resumed.returncode == 0 and json.loads(resumed.stdout) == [], resumed.stdout + resumed.stderr
    ps = torpor("ps", "--store", str(tmp_path), "--json")
    assert ps.returncode == 0 and {r["status"] for r in json.loads(ps.stdout)} == {"completed"}


@pytest.mark.parametrize("name", ["deep_array", "lone_surrogate_value", "int_beyond_64_bits", "beyond_double"])
def test_a_poison_input_is_refused_before_anything_is_written(bundle: Path, tmp_path: Path, name: str) -> None:
    given = tmp_path / "input.json"
    given.write_text(POISON[name])
    proc = torpor("run", str(bundle), "--input", f"@{given}", "--store", str(tmp_path / "store"), "--json")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = json.loads(proc.stdout)["error"]
    assert err["code"] == "invalid_config" and "input" in err["message"], err
    assert not (tmp_path / "store" / "db").exists() or json.loads(
        torpor("ps", "--store", str(tmp_path / "store"), "--json").stdout) == []


def test_the_parser_takes_what_json_allows_within_bounds() -> None:
    sound = '{"a": [1, -9223372036854775808, 18446744073709551615, 1.5e308, "\\u00e9\\ud83d\\ude00", null, true]}'
    assert guest_json.parse(sound.encode()) == json.loads(sound)
    nested = "[" * guest_json.MAX_DEPTH + "]" * guest_json.MAX_DEPTH
    assert guest_json.parse(nested) == json.loads(nested)
    for text in POISON.values():
        with pytest.raises(guest_json.PoisonValue):
            guest_json.parse(text)
    with pytest.raises(guest_json.PoisonValue, match="UTF-8"):
        guest_json.parse(b'{"a": "\xff"}')
    with pytest.raises(guest_json.PoisonValue):
        guest_json.check({"a": {1, 2}})
