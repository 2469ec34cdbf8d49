"""The recycling linear-memory pool of the ``dense`` engine (host/sandbox/memory_pool.c), with real guests.

What must hold: an agent never sees a byte of the agent whose buffer it inherits;
growth keeps contents whether it stays in place or moves; the pool keeps no more than
its cap resident; the memory limit still stops growth; many threads can spawn and drop
at once; and without the native helper (``TORPOR_NATIVE=0``) the engine allocates as
Wasmtime does by itself, with the same guest results.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import random
import subprocess
import sys
import threading
from typing import Any

import pytest
import wasmtime
from conftest import GUESTS, ROOT, BundleFactory

from bench.rig import Rig, make_rig
from host.errors import ConfigError
from host.sandbox import memory_pool
from host.sandbox.engine import Engine, EngineConfig
from host.sandbox.execution import PAGE, Completed, Execution, Failed

MASK = (1 << 64) - 1


def canary_of(seed: int) -> int:
    """The guest's canary word for ``seed`` (splitmix64, low bit set; see guests/scrubcheck)."""
    x = (seed + 0x9E3779B97F4A7C15) & MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return (x ^ (x >> 31)) | 1


def pooled_engine(**kw: Any) -> Engine:
    engine = Engine(EngineConfig(**kw))
    if engine.memory_pool is None:
        pytest.skip(f"native memory pool unavailable: {memory_pool.status()}")
    return engine


def pool_of(engine: Engine) -> memory_pool.MemoryPool:
    assert engine.memory_pool is not None
    return engine.memory_pool


@pytest.fixture(scope="module")
def engine() -> Engine:
    return pooled_engine()


@pytest.fixture(scope="module")
def rig(engine: Engine, bundles: BundleFactory) -> Rig:
    return make_rig(engine, bundles.load(GUESTS / "scrubcheck"))


def run(rig: Rig, payload: dict[str, Any]) -> tuple[Any, Execution]:
    ex = rig.execution(json.dumps(payload).encode())
    out = ex.start()
    assert isinstance(out, Completed), out
    return out.output, ex


def write_then_scan(rig: Rig, seed: int, kib: int) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """Agent A fills memory with its canary and is released; agent B, created in A's size
    class, scans all of A's extent. Returns both outputs and whether B got A's buffer."""
    a_out, a = run(rig, {"mode": "write", "seed": seed, "kib": kib})
    base_a, size_a = a._mem_base_len()
    a.release()
    pool_of(rig.engine).hint(size_a)
    b_out, b = run(rig, {"mode": "scan", "seed": seed, "pages": size_a // PAGE})
    same = b._mem_base_len()[0] == base_a
    b.release()
    return a_out, b_out, same


# -- isolation ---------------------------------------------------------------------------
def test_a_recycled_buffer_carries_nothing_of_its_previous_owner(rig: Rig) -> None:
    pool = pool_of(rig.engine)
    before = pool.stats()
    a_out, b_out, same = write_then_scan(rig, seed=1234, kib=600)
    after = pool.stats()
    # The control: A's scanner finds every canary it wrote (heap, static array, stack).
    assert a_out["hits"] == 600 * 128 + 1024 + 512
    # B really was handed A's buffer, hot from the pool...
    assert same
    assert after["reused_hot"] > before["reused_hot"]
    # ... and reads it as a fresh memory: no canary anywhere, the grown part all zeros,
    # its .bss zeros (only data segments are copied in; .bss relies on the zeros).
    assert b_out == {"pages": a_out["pages"], "hits": 0, "nonzero_grown": 0, "static_nonzero": 0}


@pytest.mark.parametrize("kib", [8, 100, 300, 1500, 3000, 12_000])  # 12 MB: a buffer of its own
def test_isolation_holds_for_every_size_class(rig: Rig, kib: int) -> None:
    for round_ in range(3):
        a_out, b_out, same = write_then_scan(rig, seed=kib * 10 + round_, kib=kib)
        assert a_out["hits"] >= kib * 128
        assert same
        assert b_out["hits"] == 0 and b_out["nonzero_grown"] == 0 and b_out["static_nonzero"] == 0
    if kib > 8 << 10:  # above 8 MiB buffers are mapped one by one, not carved from an arena
        assert pool_of(rig.engine).stats()["mapped"] > 0


def test_a_restore_into_a_recycled_buffer_sees_only_its_snapshot(bundles: BundleFactory, engine: Engine) -> None:
    """Suspend/restore cycles of a real 1 MiB agent through recycled buffers give the same answer."""
    from bench.rig import load_bundle

    r = make_rig(engine, load_bundle("mib"))
    ex = r.execution(json.dumps({"n": 6}).encode())
    out = ex.start()
    for k in range(1, 7):
        cap = ex.capture()
        pending = ex.pending
        assert pending is not None
        ex.release()
        ex = Execution.restore(r.loaded, r.pre, r.limits, b"", cap, fuel_used=ex.fuel_used, call_seq=pending.seq,
                               pending=pending)
        out = ex.resume(0, b'{"value":%d}' % k)
    assert isinstance(out, Completed)
    assert out.output["sum"] == 21
    ex.release()


# -- growth --------------------------------------------------------------------------------
def test_growth_in_place_and_by_moving_keeps_contents(rig: Rig) -> None:
    pool = pool_of(rig.engine)
    seed = 99
    ex = rig.execution(json.dumps({"mode": "scan", "seed": seed, "pages": 0}).encode())
    ex._instantiate(capacity=6 * PAGE)  # room for 6 pages: class 6
    base0, size0 = ex._mem_base_len()
    image = ctypes.string_at(base0, size0)  # the data segments: left as they are, for the guest

    s0 = pool.stats()
    assert ex._mem.grow(ex._store, 1) == size0 // PAGE
    base1, size1 = ex._mem_base_len()
    assert base1 == base0 and size1 == size0 + PAGE  # in place
    assert pool.stats()["grow_in_place"] == s0["grow_in_place"] + 1
    assert ctypes.string_at(base1, size0) == image
    assert ctypes.string_at(base1 + size0, PAGE) == bytes(PAGE)

    # A pattern in the page just grown, with canaries the guest must find wherever the
    # memory goes.
    rnd = random.Random(5)
    word = canary_of(seed).to_bytes(8, "little")
    page = word * 16 + bytes(rnd.getrandbits(8) | 1 for _ in range(PAGE - 128))
    ctypes.memmove(base1 + size0, page, PAGE)
    contents = image + page

    assert ex._mem.grow(ex._store, 30) == size1 // PAGE  # beyond 6 pages: moves
    base2, size2 = ex._mem_base_len()
    assert base2 != base1 and size2 == size1 + 30 * PAGE
    assert pool.stats()["grow_moved"] == s0["grow_moved"] + 1
    assert ctypes.string_at(base2, size1) == contents
    assert ctypes.string_at(base2 + size1, size2 - size1) == bytes(size2 - size1)

    # The guest's own code sees the moved memory (Wasmtime reloaded the base).
    out = ex._call_entry()
    assert isinstance(out, Completed), out
    assert out.output["hits"] == 16 and out.output["pages"] == size2 // PAGE
    ex.release()


def test_bytes_past_the_size_trap_even_inside_the_buffer(engine: Engine) -> None:
    """The buffer may be bigger than the memory; the guest still sees only its size."""
    wat = """(module (memory (export "memory") 1)
      (func (export "load") (param i32) (result i32) local.get 0 i32.load))"""
    module = wasmtime.Module(engine.wasmtime, wat)
    store = wasmtime.Store(engine.wasmtime)
    store.set_fuel(1 << 30)
    store.set_epoch_deadline(1 << 30)
    hinted = pool_of(engine).stats()["hinted"]
    pool_of(engine).hint(16 * PAGE)  # a 1 MiB buffer for a 64 KiB memory
    load = wasmtime.Instance(store, module, []).exports(store)["load"]
    assert isinstance(load, wasmtime.Func)
    assert pool_of(engine).stats()["hinted"] == hinted + 1
    assert load(store, PAGE - 4) == 0
    with pytest.raises(wasmtime.Trap, match="out of bounds"):
        load(store, PAGE - 3)
    with pytest.raises(wasmtime.Trap, match="out of bounds"):
        load(store, 8 * PAGE)


def test_memory_limit_still_stops_growth(engine: Engine, bundles: BundleFactory) -> None:
    r = make_rig(engine, bundles.load(GUESTS / "grow"))
    ex = r.execution(b"{}")
    out = ex.start()
    assert isinstance(out, Failed) and out.code == "memory_limit", out
    # The host's own grow past the limit fails too, and leaves the memory as it was.
    size = ex.memory_size()
    with pytest.raises(wasmtime.WasmtimeError):
        ex._mem.grow(ex._store, (r.limits.memory_bytes // PAGE) + 1)
    assert ex.memory_size() == size
    ex.release()


def _present_pages(base: int, size: int) -> int:
    from snapshots.delta import _pagemap

    fd = _pagemap()
    if fd is None:
        pytest.skip("/proc/self/pagemap is not available or not truthful here")
    raw = os.pread(fd, 8 * (size // 4096), 8 * (base // 4096))
    return sum(1 for i in range(0, len(raw), 8) if int.from_bytes(raw[i : i + 8], sys.byteorder) >> 62)


def test_pages_left_zero_go_back_to_the_kernel_and_pages_with_data_stay(rig: Rig) -> None:
    """A scanner reads all of a 2 MiB memory (every page then maps the kernel's zero
    page) and writes nothing: at release those pages are dropped, so that whoever gets
    the buffer next is not made to read them at each capture. A writer's pages stay,
    zeroed, for the next agent of its size to write into without faulting."""
    _, scanner = run(rig, {"mode": "scan", "seed": 7, "pages": 32})
    base, size = scanner._mem_base_len()
    assert _present_pages(base, size) >= size // 4096 - 2  # the scan touched every page
    scanner.release()
    assert _present_pages(base, size) <= 8  # only pages that held data (stack, statics)
    _, writer = run(rig, {"mode": "write", "seed": 8, "kib": 600})
    base, size = writer._mem_base_len()
    writer.release()
    assert _present_pages(base, size) >= 600 // 4  # its heap pages stay for reuse


# -- the cap -------------------------------------------------------------------------------
def test_the_pool_keeps_at_most_its_cap_resident(bundles: BundleFactory) -> None:
    cap = 512 << 10
    engine = pooled_engine(memory_pool_max_free=cap)
    r = make_rig(engine, bundles.load(GUESTS / "scrubcheck"))
    pool = pool_of(engine)
    live = [run(r, {"mode": "write", "seed": i, "kib": 300})[1] for i in range(12)]
    pages = live[0].memory_size() // PAGE
    for ex in live:
        ex.release()
    st = pool.stats()
    assert st["live"] == 0 and st["max_free_bytes"] == cap
    assert 0 < st["hot_resident_bytes"] <= cap
    assert st["dropped"] > 0 and st["cold_buffers"] > 0  # the rest went back to the kernel
    # Cold buffers are reused (their address ranges), and read as zeros: twelve live
    # scanners need more buffers than are hot.
    held = []
    for i in range(12):
        out, ex = run(r, {"mode": "scan", "seed": i, "pages": pages})
        assert out["hits"] == 0 and out["nonzero_grown"] == 0
        held.append(ex)
    assert pool.stats()["reused_cold"] > 0
    for ex in held:
        ex.release()
    for i in range(4):
        _, b_out, _ = write_then_scan(r, seed=100 + i, kib=300)
        assert b_out["hits"] == 0 and b_out["nonzero_grown"] == 0
    pool.set_max_free(0)
    st = pool.stats()
    assert st["hot_buffers"] == 0 and st["hot_resident_bytes"] == 0


def test_the_cap_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(memory_pool.ENV_MAX_FREE, "3MiB")
    assert pool_of(pooled_engine()).stats()["max_free_bytes"] == 3 << 20
    monkeypatch.setenv(memory_pool.ENV_MAX_FREE, "0")
    assert memory_pool.default_max_free() == 0
    monkeypatch.setenv(memory_pool.ENV_MAX_FREE, "lots")
    with pytest.raises(ConfigError, match="TORPOR_MEMORY_POOL_MAX"):
        memory_pool.default_max_free()


# -- configuration ---------------------------------------------------------------------------
def test_only_the_dense_profile_uses_the_pool() -> None:
    assert EngineConfig.for_profile("dense").uses_memory_pool()
    for name in ("dense-cow", "fast", "pooled"):
        assert not EngineConfig.for_profile(name).uses_memory_pool(), name
    assert not EngineConfig(memory_pool=False).uses_memory_pool()


def test_the_pool_can_be_switched_off_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(memory_pool.ENV_ENABLED, "0")
    assert not EngineConfig.for_profile("dense").uses_memory_pool()
    assert Engine(EngineConfig.for_profile("dense")).memory_pool is None


def test_the_pool_is_not_part_of_the_compile_cache_key() -> None:
    base = EngineConfig.for_profile("dense").fingerprint()
    assert EngineConfig(memory_pool=False).fingerprint() == base
    assert EngineConfig(memory_pool_max_free=1 << 20).fingerprint() == base


def test_the_pool_is_freed_with_its_engine_memories_and_handle() -> None:
    """The creator's finalizer (engine dropped), the memories' (store dropped) and the handle's.

    (A Torpor Engine lives as long as its epoch ticker, that is the process, once it has
    run a guest; a bare Wasmtime engine shows the finalizers at work.)
    """
    pool = memory_pool.create(1 << 20)
    if pool is None:
        pytest.skip(f"native memory pool unavailable: {memory_pool.status()}")
    freed = pool.watch()
    cfg = EngineConfig().wasmtime_config()
    pool.install(cfg)
    eng = wasmtime.Engine(cfg)
    module = wasmtime.Module(eng, '(module (memory (export "memory") 2))')
    store = wasmtime.Store(eng)
    mem = wasmtime.Instance(store, module, []).exports(store)["memory"]
    assert isinstance(mem, wasmtime.Memory)
    mem.write(store, b"secret", 100)
    assert pool.stats()["live"] == 1
    del mem, store
    gc.collect()
    assert pool.stats()["live"] == 0 and pool.stats()["hot_buffers"] == 1
    del module, eng, cfg
    gc.collect()
    assert freed.value == 0  # the handle still holds it
    assert pool.stats()["hot_buffers"] == 1
    del pool
    gc.collect()
    assert freed.value == 1


# -- threads ---------------------------------------------------------------------------------
def test_many_threads_spawn_and_drop_at_once(rig: Rig) -> None:
    pool = pool_of(rig.engine)
    threads, rounds = 8, 60
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def worker(t: int) -> None:
        try:
            rnd = random.Random(t)
            start.wait()
            for i in range(rounds):
                kib = rnd.choice([8, 64, 300, 900])
                a_out, b_out, _ = write_then_scan(rig, seed=t * 10_000 + i, kib=kib)
                assert a_out["hits"] >= kib * 128
                assert b_out["hits"] == 0 and b_out["nonzero_grown"] == 0 and b_out["static_nonzero"] == 0
        except BaseException as exc:  # reported below, on the main thread
            errors.append(exc)

    ts = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in ts:
        th.start()
    for th in ts:
        th.join()
    assert not errors, errors[0]
    if rig.loaded.shelves is not None:  # idle instances kept for the next agent (recycle.py) hold theirs
        rig.loaded.shelves.clear()
    gc.collect()
    st = pool.stats()
    assert st["live"] == 0
    assert st["reused_hot"] >= threads * rounds


# -- fallback --------------------------------------------------------------------------------
_FALLBACK_SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from host.sandbox import bundle as bundle_mod
from bench.rig import load_bundle, make_engine, make_rig
from host.sandbox.execution import Completed, Execution
from pathlib import Path

engine = make_engine("dense")
result = {"pool": engine.memory_pool is not None, "fingerprint": engine.fingerprint, "runs": []}
guests = Path(sys.argv[2])
check = make_rig(engine, bundle_mod.load_bytes(bundle_mod.build_dir(guests / "scrubcheck"), source="scrubcheck"))
for kib in (8, 300, 1500):
    a = check.execution(json.dumps({"mode": "write", "seed": kib, "kib": kib}).encode())
    out_a = a.start()
    size = a.memory_size()
    a.release()
    b = check.execution(json.dumps({"mode": "scan", "seed": kib, "pages": size // 65536}).encode())
    result["runs"].append([repr(out_a), repr(b.start())])
    b.release()
grow = make_rig(engine, bundle_mod.load_bytes(bundle_mod.build_dir(guests / "grow"), source="grow"))
result["runs"].append(repr(grow.execution(b"{}").start()))
mib = make_rig(engine, load_bundle("mib"))
ex = mib.execution(b'{"n": 4}')
out = ex.start()
for k in range(1, 5):
    cap = ex.capture()
    pending = ex.pending
    ex.release()
    ex = Execution.restore(mib.loaded, mib.pre, mib.limits, b"", cap, fuel_used=ex.fuel_used, call_seq=pending.seq,
                           pending=pending)
    out = ex.resume(0, b'{"value":%d}' % k)
result["runs"].append([repr(out), ex.fuel_used, ex.memory_size()])
print(json.dumps(result))
"""


def _run_script(env_extra: dict[str, str]) -> dict[str, Any]:
    env = {**os.environ, **env_extra}
    proc = subprocess.run([sys.executable, "-c", _FALLBACK_SCRIPT, str(ROOT), str(GUESTS)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_without_the_native_helper_the_engine_falls_back_with_the_same_results() -> None:
    pooled = _run_script({"TORPOR_NATIVE": "1"})
    plain = _run_script({"TORPOR_NATIVE": "0"})
    if not pooled["pool"]:
        pytest.skip(f"native memory pool unavailable: {memory_pool.status()}")
    assert plain["pool"] is False
    assert plain["fingerprint"] == pooled["fingerprint"]
    assert plain["runs"] == pooled["runs"]
    assert "memory_limit" in plain["runs"][3]
