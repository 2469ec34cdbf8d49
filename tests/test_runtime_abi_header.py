"""The JavaScript and Python runtimes declare the ABI once (guest_sdk/runtime_abi.h) and
share one allocator (guest_sdk/runtime_alloc.h): both drivers include both headers, and
both builds' cache keys hash them, so a change of either rebuilds both."""

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


def test_both_drivers_take_their_allocator_from_the_shared_header() -> None:
    assert grb.SHARED_ALLOC_HEADER == SDK / "runtime_alloc.h"
    header = grb.SHARED_ALLOC_HEADER.read_text()
    for own in ("static void *m_malloc(size_t n)", "static void *p_malloc(size_t n)", "static void *t_malloc(size_t n)",
                "static void wipe_dead_stack(void)"):
        assert own in header, own
    for driver in (SDK / "js" / "runtime.c", SDK / "python" / "runtime.c"):
        text = driver.read_text()
        assert '#include "runtime_alloc.h"' in text
        # the one hook the header asks for, and none of the allocator's own definitions
        assert "static void alloc_failed(size_t n) {" in text, driver
        for own in ("m_malloc(size_t", "p_malloc(size_t", "mid_bits[", "pool_room[", "volatile wipe", "class_sizes[] ="):
            assert own not in text, (driver, own)
    # QuickJS's own arena of small blocks is bypassed: every block is the runtime's
    assert "#define __SANITIZE_ADDRESS__ 1\n#include \"quickjs.c\"" in (SDK / "js" / "qjs_link.c").read_text()


def test_a_change_of_the_allocator_header_changes_both_runtime_keys(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    before = (js_runtime.runtime_key(), py_runtime.runtime_key())
    changed = tmp_path / "runtime_alloc.h"
    changed.write_bytes(grb.SHARED_ALLOC_HEADER.read_bytes().replace(b"#define MID_MAXPAGES 8192",
                                                                     b"#define MID_MAXPAGES 4096"))
    assert changed.read_bytes() != grb.SHARED_ALLOC_HEADER.read_bytes()
    monkeypatch.setattr(grb, "SHARED_ALLOC_HEADER", changed)
    after = (js_runtime.runtime_key(), py_runtime.runtime_key())
    assert after[0] != before[0] and after[1] != before[1]
