"""The guest SDK's allocator, compiled to wasm32: stress, reuse, misuse, exhaustion."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from guest_sdk_mock import GuestAbort, MockHost, built


def session(memory_limit: int | None = None):  # type: ignore[no-untyped-def]
    return MockHost().instantiate(built()["guests/sdk_selftest"], memory_limit=memory_limit)


@pytest.mark.parametrize("seed", [1, 2])
def test_stress_small_and_large(seed: int) -> None:
    s = session()
    assert s.call("t_alloc_stress", seed, 10_000, 40_000) == 0
    reserved = s.call("t_heap_reserved")
    # many more rounds reuse the freed blocks: the heap does not keep growing
    for k in range(2):
        assert s.call("t_alloc_stress", seed * 100 + k, 10_000, 40_000) == 0
    assert s.call("t_heap_reserved") <= reserved * 2
    assert s.call("t_heap_reserved") < 32 << 20


def test_alignment_distinctness_and_realloc() -> None:
    s = session()
    ptrs = [s.call("t_alloc", n) for n in [0, 1, 7, 8, 9, 15, 16, 17, 100, 248, 249, 4096, 100_000]]
    assert all(p % 8 == 0 and p > 0 for p in ptrs)
    assert len(set(ptrs)) == len(ptrs)
    p = s.call("t_alloc", 10)
    s.write(p, b"0123456789")
    q = s.call("t_realloc", p, 5000)
    assert s.read(q, 10) == b"0123456789"
    assert s.call("t_realloc", q, 3) == q  # shrinking stays in place
    assert s.call("t_realloc", q, 0) == 0  # realloc(p, 0) frees
    r = s.call("t_realloc", 0, 40)  # realloc(NULL, n) allocates
    assert r % 8 == 0
    used = s.call("t_heap_used")
    s.call("t_free", r)
    for p in ptrs:
        s.call("t_free", p)
    assert s.call("t_heap_used") < used
    s.call("t_free", 0)  # free(NULL) is fine


def test_freed_block_is_reused() -> None:
    s = session()
    p = s.call("t_alloc", 200)
    s.call("t_free", p)
    assert s.call("t_alloc", 190) == p


@pytest.mark.parametrize("bad", ["double", "wild", "interior"])
def test_invalid_free_panics(bad: str) -> None:
    s = session()
    p = s.call("t_alloc", 64)
    if bad == "double":
        s.call("t_free", p)
        target = p
    elif bad == "wild":
        target = 12345 * 8
    else:
        target = p + 8
    with pytest.raises(GuestAbort) as e:
        s.call("t_free", target)
    assert e.value.kind == 0 and "not a live block" in e.value.message


def test_out_of_memory_aborts_with_kind_1() -> None:
    s = session(memory_limit=4 << 20)
    with pytest.raises(GuestAbort) as e:
        for _ in range(100):
            s.call("t_alloc", 256 << 10)
    assert e.value.kind == 1 and "out of memory" in e.value.message
    with pytest.raises(GuestAbort) as e:
        session().call("t_alloc", 0xFFFFFFF0)  # absurd size: no wrap-around, a clean abort
    assert e.value.kind == 1
