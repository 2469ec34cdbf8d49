"""Warm instances recycled from one agent to the next (host/sandbox/recycle.py): exact or not at all.

Agent A writes everywhere it can (every word of its memory but its callers' stack frames)
and ends, or parks at a tool call and is captured; its instance is put back and handed to
agent B, which must find it as instantiation makes one: the host compares every byte of
B's memory and every mutable global with a fresh instance's before B runs, and B itself
finds none of A's canaries. The limits hold in a recycled instance as in a fresh one.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import wasmtime
from conftest import GUESTS, BundleFactory

from bench.rig import Rig, make_rig
from host.sandbox import recycle, validate, write_watch
from host.sandbox.engine import Engine, EngineConfig
from host.sandbox.execution import (
    Completed,
    Execution,
    Failed,
    Limits,
    MemoryAt,
    Suspended,
    _global_get,
)
from snapshots.delta import diff_memory

pytestmark = pytest.mark.skipif(recycle._lib() is None, reason=f"native helper unavailable: {recycle.status()}")


@pytest.fixture(scope="module", params=["dense", "pooled"])
def rig(request: pytest.FixtureRequest, bundles: BundleFactory) -> Rig:
    # dense: memories from the memory pool, the data copied in (every page written); pooled:
    # Wasmtime's copy-on-write image, the written pages told apart by pagemap.
    engine = Engine(EngineConfig.for_profile(request.param))
    return make_rig(engine, bundles.load(GUESTS / "scribble"))


def execution(rig: Rig, payload: dict[str, Any], **limits: Any) -> Execution:
    lim = Limits(**{"fuel": rig.limits.fuel, "memory_bytes": rig.limits.memory_bytes,
                    "deadline_s": rig.limits.deadline_s, **limits})
    return Execution(rig.loaded, rig.pre, lim, json.dumps(payload).encode())


def globals_of(ex: Execution) -> list[int | float]:
    shelves = ex.loaded.shelves
    assert shelves is not None
    return [_global_get(ex._store, ex._exports.raw(g.name), g.kind) for g in shelves.plan.initial]


def assert_pristine(rig: Rig, ex: Execution) -> None:
    """``ex`` holds a recycled instance exactly as a fresh one: memory and every mutable global."""
    assert ex.recycled
    assert bytes(ex._buffer()) == rig.loaded.pristine
    shelves = rig.loaded.shelves
    assert shelves is not None
    assert globals_of(ex) == [g.value for g in shelves.plan.initial]


def test_the_module_is_recycled_with_every_mutable_global_reachable(rig: Rig) -> None:
    shelves = rig.loaded.shelves
    assert shelves is not None, rig.loaded.recycle_note
    shape = rig.loaded.shape
    mutable = [i for i, g in enumerate(shape.globals) if g.mutable]
    # the shadow stack pointer is exported for captures; Asyncify's two globals are not,
    # and are reached through the exports the host compiles in
    assert len(shelves.plan.globals) == len(mutable) >= 3
    assert any(name.startswith(recycle.RESET_EXPORT_PREFIX) for name, _ in shelves.plan.globals)


def test_an_agent_that_wrote_everywhere_leaves_nothing_to_the_next(rig: Rig) -> None:
    a = execution(rig, {"mode": "fill", "seed": 77})
    out = a.start()
    assert isinstance(out, Completed), out
    size = a.memory_size()
    assert out.output == {"pages": size // 65536}
    # the control: A's canary is in (nearly) every word of its memory
    buf = bytes(a._buffer())
    assert buf.count(buf[8:16]) * 8 >= size - 32 * 1024
    a.release()
    b = execution(rig, {"mode": "scan", "seed": 77})
    b.prepare()
    assert_pristine(rig, b)
    b.release()  # nothing ran: put back as it is
    c = execution(rig, {"mode": "scan", "seed": 77})
    out = c.start()
    assert c.recycled
    assert out == Completed({"hits": 0, "static_nonzero": 0}), out
    c.release()


def test_a_parked_agent_captured_then_released_leaves_nothing(rig: Rig) -> None:
    a = execution(rig, {"mode": "park", "seed": 5})
    assert isinstance(a.start(), Suspended)
    captured = a.capture()
    assert captured.memory.index_bytes  # its canaries are in the capture...
    a.release()  # ... and the reset copies back exactly the captured chunks
    b = execution(rig, {"mode": "scan", "seed": 5})
    b.prepare()
    assert_pristine(rig, b)
    b.release()
    # A resumed into a recycled instance finds its own state, exactly
    assert a.pending is not None
    r = Execution.restore(rig.loaded, rig.pre, rig.limits, b"", captured, fuel_used=a.fuel_used,
                          call_seq=a.call_seq, pending=a.pending)
    assert r.recycled
    out = r.resume(0, b'{"value": 41}')
    assert out == Completed({"hits": 512 + 1024, "value": 41}), out
    r.release()
    d = execution(rig, {"mode": "scan", "seed": 5})
    assert d.start() == Completed({"hits": 0, "static_nonzero": 0})
    assert d.recycled
    d.release()


def test_limits_hold_in_a_recycled_instance(rig: Rig) -> None:
    warm = execution(rig, {"mode": "scan", "seed": 1})
    warm.start()
    warm.release()
    spin = execution(rig, {"mode": "spin"}, fuel=2_000_000)
    out = spin.start()
    assert spin.recycled
    assert isinstance(out, Failed) and out.code == "out_of_fuel", out
    spin.release()  # a trap: the instance is dropped, not kept
    warm = execution(rig, {"mode": "scan", "seed": 1})
    warm.start()
    warm.release()
    slow = execution(rig, {"mode": "spin"}, fuel=1 << 60, deadline_s=0.05)
    out = slow.start()
    assert slow.recycled
    assert isinstance(out, Failed) and out.code == "deadline_exceeded", out
    slow.release()
    warm = execution(rig, {"mode": "scan", "seed": 1})
    warm.start()
    warm.release()
    image = len(rig.loaded.pristine)
    grow = execution(rig, {"mode": "grow", "pages": 2}, memory_bytes=image + 65536)
    assert grow.start() == Completed({"grew": 0})  # the budget, not the previous agent's
    assert grow.recycled
    grow.release()
    roomy = execution(rig, {"mode": "grow", "pages": 2})
    assert roomy.start() == Completed({"grew": 1})
    roomy.release()  # grown past the image: dropped, never handed on


def test_a_module_that_can_change_a_table_is_not_recycled() -> None:
    def plan_of(body: str) -> tuple[recycle.Plan | None, str]:
        wasm = wasmtime.wat2wasm(f"""(module (memory (export "memory") 1) (table 2 funcref)
            (global $g (mut i32) (i32.const 7)) (elem declare func $m) (elem $e func $m) (data $d "x")
            (func $m (export "torpor_main") (result i32) {body} (i32.const 0)))""")
        shape = validate.check_module(bytes(wasm))
        return recycle.plan(bytes(wasm), "x", shape)

    # reads of tables and segments, SIMD with its immediates: proven unchanged
    plan, why = plan_of("(global.set $g (i32.const 1)) (drop (table.get 0 (i32.const 0))) "
                        "(memory.init $d (i32.const 0) (i32.const 0) (i32.const 1)) (drop (table.size 0)) "
                        "(drop (i8x16.extract_lane_u 3 (i8x16.shuffle 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 "
                        "(v128.const i64x2 -1 38) (v128.load offset=4 (i32.const 0)))))")
    assert plan is not None, why
    assert plan.globals == (("torpor.r0", "i32"),)  # exported for the reset, nothing else changed
    exports = wasmtime.Module(wasmtime.Engine(), plan.wasm).exports
    assert [e.name for e in exports] == ["memory", "torpor_main", "torpor.r0"]
    for body in ("(table.set 0 (i32.const 0) (ref.func $m))", "(drop (table.grow 0 (ref.null func) (i32.const 1)))",
                 "(table.fill 0 (i32.const 0) (ref.null func) (i32.const 1))", "(elem.drop $e)", "(data.drop $d)",
                 "(table.copy (i32.const 0) (i32.const 1) (i32.const 1))",
                 "(table.init $e (i32.const 0) (i32.const 0) (i32.const 1))"):
        plan, why = plan_of(body)
        assert plan is None and "table" in why, body


def test_a_recycled_instance_keeps_tracking_its_writes(bundles: BundleFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """With write tracking (dense, ``TORPOR_WRITE_WATCH=1``) the registration outlives the
    agent: the reset protects every page again, and each next agent's capture, comparing
    only the pages written since it took the instance, equals the full comparison."""
    monkeypatch.setenv(write_watch.ENV_ENABLED, "1")
    monkeypatch.setattr(write_watch, "MIN_BYTES", write_watch.PAGE)
    monkeypatch.setattr(write_watch, "_state", {})
    if not write_watch.available():
        pytest.skip("userfaultfd with asynchronous write-protection is not available here")
    rig = make_rig(Engine(EngineConfig.for_profile("dense")), bundles.load(GUESTS / "scribble"))
    a = execution(rig, {"mode": "fill", "seed": 3})
    assert isinstance(a.start(), Completed)
    assert a._watch is not None
    a.release()  # no capture: the chunks to copy back are found among the pages tracked as written
    p = execution(rig, {"mode": "scan", "seed": 3})
    p.prepare()
    assert p._watch is not None
    assert_pristine(rig, p)
    p.release()
    for seed in range(4):
        b = execution(rig, {"mode": "park", "seed": seed})
        assert isinstance(b.start(), Suspended)
        assert b.recycled and b._watch is not None
        base, size = b._mem_base_len()
        assert b.capture().memory == diff_memory(rig.loaded.pristine, MemoryAt(base, size), rig.loaded.chunk_size)
        b.release()
    c = execution(rig, {"mode": "scan", "seed": 3})
    assert c.start() == Completed({"hits": 0, "static_nonzero": 0})
    assert c.recycled
    c.release()


def test_dropped_shelves_give_their_budget_back(bundles: BundleFactory) -> None:
    rig = make_rig(Engine(EngineConfig.for_profile("dense")), bundles.load(GUESTS / "scribble"))
    held = recycle._budget.held
    a = execution(rig, {"mode": "scan", "seed": 1})
    a.start()
    a.release()
    assert rig.loaded.shelves is not None and rig.loaded.shelves.idle() == 1
    assert recycle._budget.held == held + len(rig.loaded.pristine)
    rig.loaded.shelves.__del__()  # what collecting the module does
    assert recycle._budget.held == held and rig.loaded.shelves.idle() == 0
