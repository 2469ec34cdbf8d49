"""Hostile modules and bundles are refused before anything runs, is compiled or is allocated.

Each hostile input is made here (WAT through ``wasmtime.wat2wasm``, raw wasm bytes
through small section builders, zip archives byte by byte) and run through the
real CLI in a subprocess: it must exit 2 with the typed error code and a message
naming the rule or the member, never die of a signal nor report ``internal``; and
the store it ran against must still resume (``resume --all``) and run ``hello``.
"""

from __future__ import annotations

import hashlib
import json
import stat
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import wasmtime
from child_rss import run_measured
from conftest import BundleFactory

from host.errors import MemoryLimitError, ModuleError
from host.sandbox import abi, validate, wasm_binary
from host.sandbox.engine import Engine

POLICY = '[agent]\nname = "hostile"\n[budgets]\nmemory = "16MiB"\nwall_clock = "5s"\n[tools."kv.get"]\n'

# -- wasm by hand ---------------------------------------------------------------------------


def leb(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def section(sid: int, payload: bytes) -> bytes:
    return bytes([sid]) + leb(len(payload)) + payload


def name(s: str) -> bytes:
    return leb(len(s.encode())) + s.encode()


def raw_module(*, functions: bytes | None = None, bodies: list[bytes] | None = None, memory_pages: int = 1) -> bytes:
    """An entry-only module: type () -> (i32), functions of that type, one memory, exports."""
    bodies = [b"\x00\x41\x00\x0b"] if bodies is None else bodies  # no locals; i32.const 0; end
    if functions is None:
        functions = leb(len(bodies)) + b"\x00" * len(bodies)
    code = leb(len(bodies)) + b"".join(leb(len(b)) + b for b in bodies)
    return (wasm_binary.WASM_MAGIC + wasm_binary.WASM_VERSION
            + section(1, b"\x01\x60\x00\x01\x7f")
            + section(3, functions)
            + section(5, b"\x01\x00" + leb(memory_pages))
            + section(7, b"\x02" + name("memory") + b"\x02\x00" + name("torpor_main") + b"\x00\x00")
            + section(10, code))


# Everything a suspendable agent module exports, each piece replaceable by a test.
PARTS: dict[str, str] = {
    "memory": '(memory (export "memory") 1)',
    "entry": '''(func (export "torpor_main") (result i32)
                 (drop (call $tc (i32.const 1024) (i32.const 6) (i32.const 0) (i32.const 0))) (i32.const 0))''',
    "asyncify_start_unwind": '(func (export "asyncify_start_unwind") (param i32))',
    "asyncify_stop_unwind": '(func (export "asyncify_stop_unwind"))',
    "asyncify_start_rewind": '(func (export "asyncify_start_rewind") (param i32))',
    "asyncify_stop_rewind": '(func (export "asyncify_stop_rewind"))',
    "asyncify_get_state": '(func (export "asyncify_get_state") (result i32) (i32.const 0))',
    "g0": '(global (export "torpor.g0") (mut i32) (i32.const 0))',
    "async_buf": '(global (export "__torpor_async") i32 (i32.const 0))',
}


def agent_wat(extra: str = "", imports: str = "", **replace: str | None) -> bytes:
    parts = {**PARTS, **replace}
    body = "\n".join(p for p in parts.values() if p is not None)
    wat = f'''(module
      (import "torpor" "tool_call" (func $tc (param i32 i32 i32 i32) (result i32)))
      {imports}
      {body}
      (data (i32.const 1024) "kv.get")
      {extra})'''
    return bytes(wasmtime.wat2wasm(wat))


# -- bundles by hand ------------------------------------------------------------------------


@dataclass
class Entry:
    """One archive member, honest unless told otherwise."""

    name: str
    data: bytes
    stream: bytes | None = None  # the compressed bytes stored (default: deflate of data)
    file_size: int | None = None  # the inflated size the headers claim (default: len(data))
    mode: int = 0  # Unix mode bits recorded for the member (0: none, as bundle.pack writes)


def deflate(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


def zip_bytes(entries: list[Entry]) -> bytes:
    """A zip archive laid out like ``bundle.pack``'s (deflate, fixed 1980 timestamps)."""
    out, cd = bytearray(), bytearray()
    for e in entries:
        raw_name = e.name.encode()
        comp = deflate(e.data) if e.stream is None else e.stream
        crc = zlib.crc32(e.data)
        size = len(e.data) if e.file_size is None else e.file_size
        offset = len(out)
        out += struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, 0x800, 8, 0, 0x21, crc, len(comp), size,
                           len(raw_name), 0) + raw_name + comp
        cd += struct.pack("<4s6H3I5HII", b"PK\x01\x02", (3 << 8) | 20, 20, 0x800, 8, 0, 0x21, crc, len(comp), size,
                          len(raw_name), 0, 0, 0, 0, e.mode << 16, offset) + raw_name
    n = len(entries)
    return bytes(out + cd + struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, n, n, len(cd), len(out), 0))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest_for(members: dict[str, bytes], **over: Any) -> bytes:
    module = members["agent.wasm"]
    manifest: dict[str, Any] = {
        "format": "torpor-bundle/1", "name": "hostile", "abi_version": 1, "module_sha256": sha(module),
        "files": {n: {"sha256": sha(d), "size": len(d)} for n, d in members.items()},
    }
    manifest.update(over)
    return json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()


def with_abi(module: bytes) -> bytes:
    """The module as ``torpor pack`` leaves it (ABI section), without running Binaryen on it."""
    return wasm_binary.add_custom_section(module, "torpor.abi", b"1")


def bundle_of(module: bytes, policy: str = POLICY) -> bytes:
    members = {"agent.wasm": with_abi(module), "policy.toml": policy.encode()}
    return zip_bytes([Entry("manifest.json", manifest_for(members)), *(Entry(n, d) for n, d in members.items())])


# -- the CLI --------------------------------------------------------------------------------


@dataclass
class Ran:
    code: int
    out: Any
    seconds: float
    maxrss: int  # peak RSS in bytes, of the CLI process alone (0: not measured)
    stderr: str


def cli(*args: str) -> Ran:
    """Run ``torpor ARGS --json`` in a subprocess."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "host.cli", *args, "--json"], capture_output=True, timeout=120)
    seconds = time.perf_counter() - t0
    try:
        parsed = json.loads(proc.stdout) if proc.stdout.strip() else None
    except ValueError:
        parsed = proc.stdout.decode(errors="replace")
    return Ran(proc.returncode, parsed, seconds, 0, proc.stderr.decode(errors="replace"))


def cli_measured(*args: str) -> Ran:
    """Like :func:`cli`, with the child's own peak RSS (earlier children of this test process
    do not count)."""
    m = run_measured([sys.executable, "-m", "host.cli", *args, "--json"], timeout=120)
    out = m.stdout.decode(errors="replace")
    try:
        parsed = json.loads(out) if out.strip() else None
    except ValueError:
        parsed = out
    return Ran(m.returncode, parsed, m.seconds, m.peak_rss, m.stderr.decode(errors="replace"))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, bundles: BundleFactory) -> Path:
    """One store every hostile run of this file goes against (created by a hello run);
    :func:`test_the_store_still_resumes_and_runs_hello` checks it last."""
    s = tmp_path_factory.mktemp("hostile-store")
    first = cli("run", str(bundles.example("hello")), "--store", str(s), "--input", HELLO_INPUT)
    assert first.code == 0 and first.out["output"] == {"greeting": "hello, ada"}, first
    return s


HELLO_INPUT = '{"name":"ada"}'


def refused(store: Path, tmp_path: Path, raw: bytes, code: str, *fragments: str, resume: bool = False) -> Ran:
    """Run ``raw`` as a bundle: refused with ``code`` naming every fragment, never a signal or ``internal``.

    (``resume``: also check ``resume --all`` right away; every refusal is covered by the
    last test of the file, which resumes the shared store, at the price of one process.)
    """
    path = tmp_path / "hostile.torpor"
    path.write_bytes(raw)
    r = cli("run", str(path), "--store", str(store))
    assert r.code >= 0, f"killed by signal {-r.code}: {r.stderr[-2000:]}"
    assert r.code == 2, r
    assert isinstance(r.out, dict) and r.out["status"] == "error", r
    err = r.out["error"]
    assert err["code"] == code, err
    for fragment in fragments:
        assert fragment in err["message"], (fragment, err["message"])
    if resume:
        after = cli("resume", "--all", "--store", str(store))
        assert after.code == 0 and after.out == [], after  # nothing was left running, nothing crashes
    return r


# -- the control: the hand-made agent itself is accepted --------------------------------------


def test_the_hand_made_agent_runs(store: Path, tmp_path: Path) -> None:
    path = tmp_path / "ok.torpor"
    path.write_bytes(bundle_of(agent_wat()))
    r = cli("run", str(path), "--store", str(store))
    assert r.code == 0 and r.out["status"] == "completed", r
    assert r.out["tool_calls"] == 1


# -- modules: what the host calls, reads or snapshots, of the wrong kind or type --------------

WRONG_KIND: dict[str, tuple[bytes, tuple[str, ...]]] = {
    "start_unwind is a global": (
        agent_wat(asyncify_start_unwind='(global (export "asyncify_start_unwind") i32 (i32.const 0))'),
        ("asyncify_start_unwind", "global")),
    "stop_unwind is the memory": (
        agent_wat(memory='(memory (export "memory") (export "asyncify_stop_unwind") 1)', asyncify_stop_unwind=None),
        ("asyncify_stop_unwind", "memory")),
    "start_rewind takes i64s": (
        agent_wat(asyncify_start_rewind='(func (export "asyncify_start_rewind") (param i64 i64) (result f64) (f64.const 0))'),
        ("asyncify_start_rewind", "(i64, i64) -> (f64)")),
    "stop_rewind is a table": (
        agent_wat(asyncify_stop_rewind='(table (export "asyncify_stop_rewind") 1 funcref)'),
        ("asyncify_stop_rewind", "table")),
    "get_state returns i64": (
        agent_wat(asyncify_get_state='(func (export "asyncify_get_state") (result i64) (i64.const 0))'),
        ("asyncify_get_state", "-> (i64)")),
    "part of asyncify": (agent_wat(asyncify_get_state=None), ("asyncify_get_state",)),
    "entry is a global": (
        agent_wat(entry='(global (export "torpor_main") i32 (i32.const 0)) (func (drop (call $tc (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0))))'),
        ("torpor_main",)),
    "entry takes a parameter": (
        agent_wat(entry='(func (export "torpor_main") (param i32) (result i32) (call $tc (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)))'),
        ("torpor_main", "(i32) -> (i32)")),
    "entry returns f64": (
        agent_wat(entry='(func (export "torpor_main") (result f64) (drop (call $tc (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0))) (f64.const 0))'),
        ("torpor_main", "(f64)")),
    "memory is a function": (
        agent_wat(memory='(memory (export "mem") 1) (func (export "memory"))'), ("`memory`",)),
    "async buffer is a function": (agent_wat(async_buf='(func (export "__torpor_async"))'), ("__torpor_async", "func")),
    "async buffer is an f64": (agent_wat(async_buf='(global (export "__torpor_async") f64 (f64.const 0))'),
                               ("__torpor_async", "f64")),
    "stack pointer is a memory": (
        agent_wat(memory='(memory (export "memory") (export "__stack_pointer") 1)'), ("__stack_pointer", "memory")),
    "snapshotted global is a function": (agent_wat(g0='(func (export "torpor.g0"))'), ("torpor.g0", "func")),
    "v128 global": (agent_wat(g0='(global (export "torpor.g0") (mut v128) (v128.const i64x2 0 0))'),
                    ("torpor.g0", "v128")),
    "v128 async buffer": (agent_wat(async_buf='(global (export "__torpor_async") v128 (v128.const i64x2 0 0))'),
                          ("__torpor_async", "v128")),
    "externref global": (agent_wat(g0='(global (export "torpor.g0") (mut externref) (ref.null extern))'),
                         ("torpor.g0", "externref")),
    "funcref global, not exported": (agent_wat(extra='(global (mut funcref) (ref.null func))'), ("funcref",)),
    "initialize takes a parameter": (agent_wat(extra='(func (export "_initialize") (param i32))'), ("_initialize",)),
    "an ABI import with another signature": (
        agent_wat(imports='(import "torpor" "log" (func (param i64) (result i32)))'), ("torpor.log", "(i64) -> (i32)")),
    "an import of v128": (
        agent_wat(imports='(import "torpor" "x" (func (param v128)))'), ("torpor.x", "v128")),
    "an imported memory": (
        bytes(wasmtime.wat2wasm('(module (import "env" "memory" (memory 1)) (func (export "torpor_main") (result i32) (i32.const 0)))')),
        ("imports a memory", "env.memory")),
    "a start function": (agent_wat(extra="(func $s) (start $s)"), ("start function",)),
}


@pytest.mark.parametrize("case", sorted(WRONG_KIND))
def test_wrong_kind_or_type_is_refused(case: str, store: Path, tmp_path: Path) -> None:
    module, fragments = WRONG_KIND[case]
    # The case that used to crash the host at its first tool call also resumes the store at once.
    refused(store, tmp_path, bundle_of(module), "invalid_module", *fragments,
            resume=case == "start_unwind is a global")


# -- modules: memories, tables, code ---------------------------------------------------------

SHAPES: dict[str, tuple[bytes, str, tuple[str, ...]]] = {
    "no memory": (agent_wat(memory=None, extra='(func (export "memory"))'), "invalid_module", ("no memory",)),
    "two memories": (agent_wat(extra="(memory $second 1)"), "invalid_module", ("2 memories",)),
    "a table of millions": (agent_wat(extra="(table 5000000 funcref)"), "invalid_module",
                            ("table 0", "5000000 elements")),
    "a table with a huge maximum": (agent_wat(extra="(table 1 4000000000 funcref)"), "invalid_module",
                                    ("table 0", "4000000000 elements")),
    "too many tables": (agent_wat(extra=" ".join("(table 1 funcref)" for _ in range(5))), "invalid_module",
                        ("5 tables",)),
    "a declared function count of 4e9": (raw_module(functions=leb(4_000_000_000) + b"\x00"), "invalid_module",
                                         ("4000000000 functions",)),
    "100,001 functions": (raw_module(bodies=[b"\x00\x41\x00\x0b"] * 100_001), "invalid_module",
                          ("100001 functions",)),
    "a 2 MiB function": (raw_module(bodies=[b"\x00" + b"\x01" * (2 << 20) + b"\x41\x00\x0b"]), "invalid_module",
                         ("function 0", "bytes of code")),
    "data outside memory": (agent_wat(extra='(data (i32.const 65530) "0123456789")'), "invalid_module",
                            ("data segment 1",)),
    "memory over the wasm32 maximum": (raw_module(memory_pages=70_000), "memory_limit", ("70000 pages",)),
}


@pytest.mark.parametrize("case", sorted(SHAPES))
def test_module_shape_is_refused(case: str, store: Path, tmp_path: Path) -> None:
    module, code, fragments = SHAPES[case]
    refused(store, tmp_path, bundle_of(module), code, *fragments)


def test_huge_initial_memory_is_refused_fast_and_small(store: Path, tmp_path: Path, bundles: BundleFactory) -> None:
    """60,000 pages (3.7 GiB) against a 16 MiB budget: it used to take ~24 s and 8 GB."""
    module = with_abi(agent_wat(memory='(memory (export "memory") 60000)'))
    path = tmp_path / "huge.torpor"
    path.write_bytes(bundle_of(module))
    assert path.stat().st_size < 2000
    hello = cli_measured("run", str(bundles.example("hello")), "--store", str(store), "--input", HELLO_INPUT)
    assert hello.code == 0, hello
    r = cli_measured("run", str(path), "--store", str(store))
    assert r.code == 2 and r.out["error"]["code"] == "memory_limit", r
    assert "60000 pages" in r.out["error"]["message"] and "16 MiB" in r.out["error"]["message"]
    # Refused before allocating (memory, not time: a busy machine stretches time).
    assert r.maxrss < hello.maxrss + (64 << 20), (r.maxrss, hello.maxrss)


# -- the gate itself: every path into Wasmtime passes it --------------------------------------

ALL_MODULES = {**{k: (m, "invalid_module") for k, (m, _) in WRONG_KIND.items()},
               **{k: (m, c) for k, (m, c, _) in SHAPES.items()}}


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine()


@pytest.mark.parametrize("case", sorted(ALL_MODULES))
def test_engine_load_refuses_before_compiling(case: str, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    module, code = ALL_MODULES[case]
    monkeypatch.setattr(engine, "compile", lambda *a: pytest.fail("compiled a refused module"))
    with pytest.raises(ModuleError) as info:
        engine.load(with_abi(module), sha(module))
    assert info.value.code == code


def test_validator_accepts_the_hand_made_agent_and_reads_it() -> None:
    shape = validate.check_module(with_abi(agent_wat()))
    assert shape.suspendable and shape.entry_results == 1 and shape.memory_pages == (1, None)
    assert shape.snapshot_globals == (("torpor.g0", "i32"),)
    assert [(i.module, i.name) for i in shape.imports] == [("torpor", "tool_call")]


@pytest.mark.parametrize("value", [b"512", b"4096", b"100", b"65536", b"", b"x"])
def test_checkpoint_chunk_size_section_is_one_of_the_sizes(value: bytes) -> None:
    """A module may ask for finer checkpoint chunks (JS agents do); anything else is refused."""
    module = wasm_binary.add_custom_section(with_abi(agent_wat()), abi.CHUNK_SECTION, value)
    if value in (b"512", b"4096"):
        assert validate.check_module(module).chunk_size == int(value)
    else:
        with pytest.raises(ModuleError, match=r"torpor\.chunk holds"):
            validate.check_module(module)
    assert validate.check_module(with_abi(agent_wat())).chunk_size == 4096


def test_pack_refuses_before_binaryen(monkeypatch: pytest.MonkeyPatch) -> None:
    from host.sandbox import bundle as bundle_mod
    from host.sandbox import toolchain

    monkeypatch.setattr(toolchain, "prepare_module", lambda *a: pytest.fail("Binaryen saw a refused module"))
    module = agent_wat(g0='(global (export "torpor.g0") (mut v128) (v128.const i64x2 0 0))')
    with pytest.raises(ModuleError, match=r"torpor\.g0.*v128"):
        bundle_mod.pack(module, POLICY)


def test_memory_check_against_the_policy() -> None:
    shape = validate.check_module(agent_wat(memory='(memory (export "memory") 257)'))
    shape.check_memory(17 << 20)
    with pytest.raises(MemoryLimitError, match=r"257 pages .* 16 MiB"):
        shape.check_memory(16 << 20)


# -- archives ---------------------------------------------------------------------------------

GOOD_MODULE = with_abi(agent_wat())


def members(**extra: bytes) -> dict[str, bytes]:
    return {"agent.wasm": GOOD_MODULE, "policy.toml": POLICY.encode(), **extra}


def honest(ms: dict[str, bytes], **manifest_over: Any) -> list[Entry]:
    return [Entry("manifest.json", manifest_for(ms, **manifest_over)), *(Entry(n, d) for n, d in ms.items())]


@pytest.fixture(scope="module")
def zeros_stream() -> bytes:
    """256 MiB of zeros, deflated (about 250 KiB)."""
    c = zlib.compressobj(1, zlib.DEFLATED, -15)
    chunk = bytes(1 << 20)
    return b"".join(c.compress(chunk) for _ in range(256)) + c.flush()


def test_zip_bomb_inflating_past_its_declared_size(store: Path, tmp_path: Path, zeros_stream: bytes) -> None:
    # The module member's headers and manifest say 1 KiB-ish; its stream inflates to 256 MiB more.
    ms = members()
    c = zlib.compressobj(1, zlib.DEFLATED, -15)
    stream = c.compress(GOOD_MODULE)
    stream += b"".join(c.compress(bytes(1 << 20)) for _ in range(256)) + c.flush()
    entries = honest(ms)
    entries[1] = Entry("agent.wasm", GOOD_MODULE, stream=stream)
    # Refused while inflating, at the declared size ("inflates past"), not after 256 MiB.
    refused(store, tmp_path, zip_bytes(entries), "invalid_bundle", "agent.wasm", "inflates past")


def test_member_larger_in_the_archive_than_in_the_manifest(store: Path, tmp_path: Path, zeros_stream: bytes) -> None:
    # Honest zip headers for a 256 MiB member; the manifest declares it small. Refused from the headers.
    ms = members(**{"tools/big.py": b"x = 1\n"})
    entries = honest(ms)
    entries[3] = Entry("tools/big.py", b"x = 1\n", stream=zeros_stream, file_size=256 << 20)
    # Refused from the headers (the size they declare), before a byte is inflated.
    refused(store, tmp_path, zip_bytes(entries), "invalid_bundle", "tools/big.py", "268435456 bytes in the archive")


def test_manifest_declaring_a_huge_member(store: Path, tmp_path: Path, zeros_stream: bytes) -> None:
    ms = members(**{"tools/big.py": b""})
    manifest = json.loads(manifest_for(ms))
    manifest["files"]["tools/big.py"] = {"sha256": "0" * 64, "size": 256 << 20}
    raw = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    entries = [Entry("manifest.json", raw), *(Entry(n, d) for n, d in ms.items() if n != "tools/big.py"),
               Entry("tools/big.py", b"", stream=zeros_stream, file_size=256 << 20)]
    refused(store, tmp_path, zip_bytes(entries), "invalid_bundle", "tools/big.py", "declares 268435456 bytes")


def test_module_over_the_host_size_cap(store: Path, tmp_path: Path) -> None:
    module = wasm_binary.add_custom_section(agent_wat(), "padding", bytes(validate.HostLimits().max_module_bytes + (1 << 20)))
    refused(store, tmp_path, bundle_of(module), "invalid_bundle", "agent.wasm", "declares")


@pytest.mark.parametrize("bad", ["../x.py", "/abs/x.py", "tools/../../x.py", "C:/x.py", "tools\\..\\x.py"])
def test_member_names_outside_the_bundle(bad: str, store: Path, tmp_path: Path) -> None:
    ms = members()
    entries = [*honest(ms), Entry(bad, b"print('pwned')\n")]
    refused(store, tmp_path, zip_bytes(entries), "invalid_bundle", repr(bad))


def test_member_names_outside_the_bundle_in_the_manifest(store: Path, tmp_path: Path) -> None:
    ms = members()
    ms_bad = {**ms, "../escape.py": b"x"}
    entries = [Entry("manifest.json", manifest_for(ms_bad)), *(Entry(n, d) for n, d in ms.items())]
    refused(store, tmp_path, zip_bytes(entries), "invalid_bundle", "'../escape.py'")


def test_symlink_member(store: Path, tmp_path: Path) -> None:
    ms = members(**{"tools/link.py": b"/etc/passwd"})
    entries = honest(ms)
    entries[3] = Entry("tools/link.py", b"/etc/passwd", mode=stat.S_IFLNK | 0o777)
    refused(store, tmp_path, zip_bytes(entries), "invalid_bundle", "tools/link.py", "symlink")


def test_directory_member(store: Path, tmp_path: Path) -> None:
    entries = [*honest(members()), Entry("tools/", b"", mode=stat.S_IFDIR | 0o755)]
    refused(store, tmp_path, zip_bytes(entries), "invalid_bundle", "tools/", "directory")


def test_duplicate_member_names(store: Path, tmp_path: Path) -> None:
    # The manifest's digest matches the first policy.toml; the second would win in zipfile.
    ms = members()
    entries = [*honest(ms), Entry("policy.toml", POLICY.replace('memory = "16MiB"', 'memory = "4GiB"').encode())]
    refused(store, tmp_path, zip_bytes(entries), "invalid_bundle", "policy.toml", "appears twice")


def test_duplicate_manifest(store: Path, tmp_path: Path) -> None:
    ms = members()
    entries = [*honest(ms), Entry("manifest.json", manifest_for(ms, name="other"))]
    refused(store, tmp_path, zip_bytes(entries), "invalid_bundle", "manifest.json", "appears twice")


def test_manifest_size_mismatch(store: Path, tmp_path: Path) -> None:
    ms = members()
    manifest = json.loads(manifest_for(ms))
    manifest["files"]["policy.toml"]["size"] += 5
    raw = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    entries = [Entry("manifest.json", raw), *(Entry(n, d) for n, d in ms.items())]
    refused(store, tmp_path, zip_bytes(entries), "invalid_bundle", "policy.toml",
            f"{len(POLICY)} bytes in the archive but {len(POLICY) + 5}")


def test_member_not_in_the_manifest(store: Path, tmp_path: Path) -> None:
    entries = [*honest(members()), Entry("tools/extra.py", b"x = 1\n")]
    refused(store, tmp_path, zip_bytes(entries), "invalid_bundle", "tools/extra.py", "not listed in the manifest")


def test_manifest_naming_another_agent(store: Path, tmp_path: Path) -> None:
    refused(store, tmp_path, zip_bytes(honest(members(), name="root-agent")), "invalid_bundle",
            "'root-agent'", "'hostile'")


def test_the_name_comes_from_the_policy(tmp_path: Path) -> None:
    from host.sandbox import bundle as bundle_mod

    b = bundle_mod.load_bytes(zip_bytes(honest(members())))
    assert b.name == "hostile"
    nameless = json.loads(manifest_for(members()))
    del nameless["name"]
    raw = json.dumps(nameless).encode()
    b = bundle_mod.load_bytes(zip_bytes([Entry("manifest.json", raw), *honest(members())[1:]]))
    assert b.name == "hostile"


# -- last: the store every refusal above ran against ---------------------------------------------


def test_the_store_still_resumes_and_runs_hello(store: Path, bundles: BundleFactory) -> None:
    after = cli("resume", "--all", "--store", str(store))
    assert after.code == 0 and after.out == [], after  # nothing was left running, nothing crashes
    ps = cli("ps", "--store", str(store))
    assert ps.code == 0 and {a["name"] for a in ps.out} == {"hello", "hostile"}, ps
    hello = cli("run", str(bundles.example("hello")), "--store", str(store), "--input", HELLO_INPUT)
    assert hello.code == 0 and hello.out["output"] == {"greeting": "hello, ada"}, hello
