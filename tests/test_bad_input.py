"""Bad input, each case against one long-lived host: a clear typed error, then the next agent runs normally."""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import EXAMPLES, GUESTS, BundleFactory
from conftest import run_agent as run

from host.errors import BundleError, ImportNotGranted, ModuleError
from host.runtime import Host
from host.sandbox import bundle as bundle_mod
from policies import PolicyError

HELLO_POLICY = (EXAMPLES / "hello" / "policy.toml").read_text()


@pytest.fixture(autouse=True)
def host_still_works(host: Host, bundles: BundleFactory) -> Iterator[None]:
    yield
    res = run(host, bundles.load(EXAMPLES / "hello"), {"name": "after"})
    assert res.status == "completed" and res.output == {"greeting": "hello, after"}


def guest(bundles: BundleFactory, name: str) -> bundle_mod.Bundle:
    return bundles.load(GUESTS / name)


def test_not_wasm_is_refused() -> None:
    with pytest.raises(ModuleError, match="not a WebAssembly module"):
        bundle_mod.pack(b"hello, I am not wasm", HELLO_POLICY)


def test_truncated_wasm_is_refused(bundles: BundleFactory) -> None:
    module = bundles.load(EXAMPLES / "hello").module
    with pytest.raises((ModuleError, Exception)) as info:
        bundle_mod.pack(module[: len(module) // 2], HELLO_POLICY)
    assert "Traceback" not in str(info.value)


def test_unknown_abi_version_is_refused(bundles: BundleFactory) -> None:
    from host.errors import AbiVersionError
    from host.sandbox import wasm_binary

    raw = bundle_mod.build_dir(EXAMPLES / "hello")
    module = bundle_mod.load_bytes(raw).module
    future = wasm_binary.add_custom_section(module.replace(b"torpor.abi", b"torpor.xxx"), "torpor.abi", b"2")
    with pytest.raises(AbiVersionError, match=r"v2.*supports v1"):
        bundle_mod.pack(future, HELLO_POLICY)


def test_module_without_entry(host: Host, bundles: BundleFactory) -> None:
    with pytest.raises(ModuleError, match="torpor_main"):
        run(host, guest(bundles, "noentry"))


def test_import_not_granted(host: Host, bundles: BundleFactory) -> None:
    # The steps module imports tool_call; under hello's policy (no tools) it is refused before it runs.
    steps = bundles.load(EXAMPLES / "steps")
    b = bundle_mod.load_bytes(bundle_mod.pack(steps.module, HELLO_POLICY))
    with pytest.raises(ImportNotGranted, match=r"tool_call.*hello|hello.*tool_call"):
        run(host, b, {"n": 1})
    assert not [a for a in host.list_agents() if a["bundle_digest"] == b.digest]


def test_ungranted_and_unknown_tools_are_structured_errors(host: Host, bundles: BundleFactory) -> None:
    res = run(host, guest(bundles, "notool"), {})
    assert res.status == "completed", res.error
    out = res.output
    assert out["kv.set"]["code"] == "denied"
    assert out["kv.set"]["rc"] == -7
    assert out["no.such.tool"]["rc"] in (-4, -7)
    assert out["kv.get"]["rc"] == 0


def test_infinite_loop_runs_out_of_fuel(host: Host, bundles: BundleFactory) -> None:
    res = run(host, guest(bundles, "loop"), {}, fuel=5_000_000)
    assert res.status == "failed" and res.error is not None
    assert res.error["code"] == "out_of_fuel"


def test_infinite_loop_hits_deadline(host: Host, bundles: BundleFactory) -> None:
    b = guest(bundles, "loop")
    policy = '[agent]\nname = "loop"\n[budgets]\nmemory = "16MiB"\nwall_clock = "200ms"\n'
    fast = bundle_mod.load_bytes(bundle_mod.pack(b.module, policy))
    res = run(host, fast, {}, fuel=10**15)
    assert res.error is not None and res.error["code"] == "deadline_exceeded"


def test_memory_growth_hits_limit(host: Host, bundles: BundleFactory) -> None:
    res = run(host, guest(bundles, "grow"), {})
    assert res.error is not None and res.error["code"] == "memory_limit"


def test_unbounded_recursion(host: Host, bundles: BundleFactory) -> None:
    res = run(host, guest(bundles, "recurse"), {})
    assert res.error is not None and res.error["code"] == "stack_overflow"


def test_wild_pointers_get_error_codes(host: Host, bundles: BundleFactory) -> None:
    res = run(host, guest(bundles, "wild"), {})
    assert res.status == "completed", res.error
    out = res.output
    assert isinstance(out, dict)
    # The guest compares every return code with what ABI.md promises and lists the differences.
    assert out["mismatches"] == []
    for imp in ("input_read", "output_write", "log", "tool_call_name", "tool_call_args", "response_read"):
        codes = [v for k, v in out[imp].items() if k in {"neg_ptr", "past_end", "straddle_end", "wrap_u32", "huge_ptr"}]
        assert codes and all(c == -1 for c in codes), (imp, out[imp])


def test_abort_with_wild_message_pointer(host: Host, bundles: BundleFactory) -> None:
    res = run(host, guest(bundles, "wild"), {"abort": True})
    assert res.status == "failed" and res.error is not None and res.error["code"] == "aborted"


def _leaves(value: Any) -> Iterator[Any]:
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, list):
        for v in value:
            yield from _leaves(v)
    else:
        yield value


def test_unknown_tool_and_bad_args(host: Host, bundles: BundleFactory) -> None:
    res = run(host, guest(bundles, "badargs"), {})
    assert res.status == "completed", res.error
    assert res.output is not None
    text = str(res.output)
    assert "-2" in text or "invalid_json" in text
    assert "-5" in text or "invalid_args" in text


def test_corrupted_bundle(bundles: BundleFactory, tmp_path: Path) -> None:
    raw = bytearray(bundles.example("hello").read_bytes())
    for pos in (len(raw) // 3, len(raw) // 2, len(raw) - 30):
        bad = bytearray(raw)
        bad[pos] ^= 0xFF
        with pytest.raises(BundleError):
            bundle_mod.load_bytes(bytes(bad))
    with pytest.raises(BundleError):
        bundle_mod.load_bytes(bytes(raw[: len(raw) // 2]))
    # A member swapped for another with a valid zip CRC is caught by the manifest digest.
    p = tmp_path / "swapped.torpor"
    with zipfile.ZipFile(bundles.example("hello")) as src, zipfile.ZipFile(p, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "policy.toml":
                data += b"\n# tampered\n"
            dst.writestr(item, data)
    with pytest.raises(BundleError, match="digest"):
        bundle_mod.load(p)


def test_every_flipped_byte_is_a_typed_refusal(bundles: BundleFactory) -> None:
    """No corruption of any byte of a bundle (or cut of its tail) escapes as anything but a typed error."""
    from host.errors import TorporError

    raw = bundles.example("hello").read_bytes()
    accepted = 0
    for pos in range(len(raw)):
        bad = bytearray(raw)
        bad[pos] ^= 0xFF
        try:
            bundle_mod.load_bytes(bytes(bad))
            accepted += 1  # a byte nothing reads (a timestamp, a version field)
        except (TorporError, PolicyError):
            pass
    for end in range(0, len(raw), 13):
        with pytest.raises((TorporError, PolicyError)):
            bundle_mod.load_bytes(raw[:end])
    assert accepted < len(raw) // 20


def test_corrupted_compile_cache_is_rebuilt(bundles: BundleFactory, tmp_path: Path) -> None:
    b = bundles.load(EXAMPLES / "hello")
    with Host(tmp_path) as h1:
        assert run(h1, b, {"name": "x"}).status == "completed"
    arts = list((tmp_path / "cache").glob("*.cwasm"))
    assert len(arts) == 1
    data = bytearray(arts[0].read_bytes())
    data[len(data) // 2] ^= 0x55
    arts[0].write_bytes(bytes(data))
    h2 = Host(tmp_path)
    try:
        res = run(h2, b, {"name": "y"})
        assert res.output == {"greeting": "hello, y"}
        assert h2.engine.cache_rebuilds == 1
    finally:
        h2.close()


def test_malformed_policy_names_the_field(tmp_path: Path) -> None:
    d = tmp_path / "agent"
    d.mkdir()
    (d / "agent.c").write_text((EXAMPLES / "hello" / "agent.c").read_text())
    (d / "policy.toml").write_text('[agent]\nname = "x"\n[budgets]\nfuell = 100\n')
    with pytest.raises(PolicyError) as info:
        bundle_mod.build_dir(d)
    assert "fuell" in str(info.value) and "fuel" in str(info.value)
