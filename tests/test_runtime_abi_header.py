"""The JavaScript and Python runtimes declare the ABI once (guest_sdk/runtime_abi.h): both
drivers include it, and both builds' cache keys hash it, so a change rebuilds both."""

from __future__ import annotations

from pathlib import Path

import pytest

from host.sandbox import guest_runtime_build as grb
from host.sandbox import js_runtime, py_runtime

SDK = Path(__file__).resolve().parents[1] / "guest_sdk"


def test_both_drivers_include_the_shared_header_and_declare_no_import_of_their_own() -> None:
    assert grb.SHARED_ABI_HEADER == SDK / "runtime_abi.h"
    header = grb.SHARED_ABI_HEADER.read_text()
    for name in ("tool_call", "response_read", "abort"):
        assert f'IMPORT("{name}")' in header
    for driver in (SDK / "js" / "runtime.c", SDK / "python" / "runtime.c"):
        text = driver.read_text()
        assert '#include "runtime_abi.h"' in text
        assert "import_module(" not in text and "struct torpor_async_buf {" not in text, driver


def test_a_change_of_the_header_changes_both_runtime_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = (js_runtime.runtime_key(), py_runtime.runtime_key())
    changed = tmp_path / "runtime_abi.h"
    changed.write_bytes(grb.SHARED_ABI_HEADER.read_bytes() + b"\n/* changed */\n")
    monkeypatch.setattr(grb, "SHARED_ABI_HEADER", changed)
    after = (js_runtime.runtime_key(), py_runtime.runtime_key())
    assert after[0] != before[0] and after[1] != before[1]
