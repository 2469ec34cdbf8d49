"""``torpor bench fuzz``: the boundary's fuzz targets, run for minutes instead of CI's seconds.

Tested the way Wasmtime tests itself: each target is a Hypothesis strategy of hostile
input and a check of what the host must do with it. ``tests/test_fuzz_boundary.py`` runs
every target with a fixed seed and a small budget of examples (CI stays fast and
deterministic); this benchmark runs them with fresh seeds until its time is up and
reports the cases run and every finding with the target, the seed and the failing case.

The targets (one :class:`Target` each, over one long-lived :class:`FuzzRig`):

* ``imports``: a real guest (``bench/guests/fuzzops``, compiled from C by the project's
  toolchain) calls every ``torpor`` import with generated pointers, lengths and
  payloads; each return code is checked against ``guest_sdk/ABI.md`` by an oracle
  written here from the ABI text, not from the host's code;
* ``sdk_json``: the C SDK's JSON parser, in that guest in the sandbox, against Python's;
* ``validator``: generated and mutated bytes into :func:`host.sandbox.validate.check_module`;
* ``modules``: generated modules (a small wasm-smith: random functions over the imports,
  memory, globals and tables) and mutated real ones (flipped bytes, spliced, dropped and
  duplicated sections, padded or wrong LEB sizes) through the validator and the runtime;
* ``snapshots``: real checkpoints of a ``steps`` run, damaged raw or resealed, into the
  snapshot decoder (and what decodes, applied to a memory of its size);
* ``bundles``: damaged real bundles and hand-made archives into the bundle reader (and
  what loads, run);
* ``policies``: mutated and generated policy files into the policy loader (and what
  parses, packed with ``hello`` and run).

After every case the same host runs ``hello`` and must answer it correctly. A case may
end in a result or in a typed error (``host.errors``, ``snapshots.errors``,
``policies.PolicyError``); anything else, or a wrong return code, is a finding.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):  # `python bench/fuzz.py ...`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import ctypes
import io
import json
import math
import tempfile
import time
import traceback
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
from hypothesis import HealthCheck, Phase, given, note, seed, settings
from hypothesis import strategies as st

from bench.rig import EXAMPLES, load_bundle
from host.errors import TorporError
from host.runtime import Host, RunResult
from host.sandbox import abi, validate
from host.sandbox import bundle as bundle_mod
from policies import PolicyError, parse_policy
from snapshots.errors import SnapshotError, StoreError

#: The errors a case may end in: every deliberate error of the host, the store and the policies.
TYPED: tuple[type[BaseException], ...] = (TorporError, SnapshotError, StoreError, PolicyError)
#: How a run may fail (ABI.md section 5, run-level failures).
RUN_FAILURES = {"agent_error", "aborted", "memory_limit", "out_of_fuel", "deadline_exceeded", "stack_overflow", "trap"}

HELLO_POLICY = (EXAMPLES / "hello" / "policy.toml").read_text()


class Finding(AssertionError):
    """The host did what it must not: a wrong code, an untyped error, a broken host."""


# -- the rig -----------------------------------------------------------------------------------


class FuzzRig:
    """One host over one store for every case, and the bundles the targets start from."""

    def __init__(self, store: Path) -> None:
        self.host = Host(store)
        self.fuzzops = load_bundle("fuzzops")
        self.hello = load_bundle("hello")
        self.cases = 0
        self._checkpoints: list[bytes] | None = None
        self._steps_image: Any = None

    def close(self) -> None:
        self.host.close()

    def run(self, b: bundle_mod.Bundle, input: Any, fuel: int | None = None) -> RunResult:
        return anyio.run(lambda: self.host.run(b, input, fuel=fuel))

    def hello_ok(self) -> None:
        """The same host still runs ``hello`` and answers it correctly."""
        res = self.run(self.hello, {"name": "fuzz"})
        if res.status != "completed" or res.output != {"greeting": "hello, fuzz"}:
            raise Finding(f"hello no longer runs after the case: {res.status} {res.error} {res.output!r}")

    def checkpoints(self) -> tuple[list[bytes], Any]:
        """Real checkpoint records of a ``steps`` run, and its module's pristine image."""
        if self._checkpoints is None:
            steps = load_bundle("steps")
            res = self.run(steps, {"n": 4})
            with self.host.store.read() as txn:
                last = txn.latest_checkpoint(res.agent_id) or 0
                blobs = [txn.get_checkpoint(res.agent_id, i) for i in range(last + 1)]
            # A steps checkpoint is small: one zstd frame (formats 1 and 2), which the resealing
            # edits below decompress; format 3 (large records, payload in the store's chunks) is
            # not among them.
            self._checkpoints = [b for b in blobs if b and b[4] in (1, 2)]
            if not self._checkpoints:
                raise Finding("the steps run left no checkpoint of format 1 or 2 to start from")
            self._steps_image = self.host.load_module(steps)[0].image
        return self._checkpoints, self._steps_image


T = TypeVar("T")
#: How the cases ended (``"<stage>: <error code>"``, ``"ran: <status> <code>"``), for the report.
OUTCOMES: Counter[str] = Counter()


def typed(what: str, fn: Callable[[], T]) -> T | None:
    """``fn()``, or None when it ends in a typed error; anything else escaping is a finding."""
    try:
        result = fn()
    except TYPED as exc:
        OUTCOMES[f"{what}: {getattr(exc, 'code', type(exc).__name__)}"] += 1
        return None
    except Finding:
        raise
    except Exception as exc:
        raise Finding(f"{what} raised an untyped {type(exc).__name__}: {exc}\n{traceback.format_exc()}") from exc
    OUTCOMES[f"{what}: ok"] += 1
    return result


def run_typed(rig: FuzzRig, b: bundle_mod.Bundle, input: Any) -> None:
    """Run a bundle: it ends in a result of a known status and code, or in a typed error."""
    res = typed("running the bundle", lambda: rig.run(b, input))
    if res is not None:
        OUTCOMES[f"ran: {res.status} {(res.error or {}).get('code', '')}".rstrip()] += 1
        if res.status == "failed":
            if res.error is None or res.error.get("code") not in RUN_FAILURES:
                raise Finding(f"a run failed with an unknown error {res.error!r}")
        elif res.status not in ("completed", "waiting_approval"):
            raise Finding(f"a run ended {res.status!r} ({res.error!r})")


# -- imports: the oracle of ABI.md ----------------------------------------------------------

FAULT, INVALID_JSON, TOO_LARGE, UNKNOWN_TOOL, INVALID_ARGS = -1, -2, -3, -4, -5
TOOL_FAILED, DENIED, RATE_LIMITED, TIMEOUT, UNAVAILABLE = -6, -7, -9, -10, -11
MAX_OUTPUT, MAX_LOG, MAX_TOOL_NAME, MAX_ARGS = 1 << 20, 64 << 10, 128, 1 << 20
GRANTED = {"kv.get", "kv.set"}  # bench/guests/fuzzops/policy.toml
SKIPPED = 1000  # the guest would have written over itself
IMPORTS = ("input_len", "input_read", "output_write", "log", "tool_call", "response_len", "response_read", "abort")
I32 = st.integers(-(2**31), 2**31 - 1)
U32 = st.integers(0, 2**32 - 1)
EDGE_LENGTHS = [0, 1, -1, 7, 8, MAX_TOOL_NAME, MAX_TOOL_NAME + 1, MAX_LOG, MAX_LOG + 1, MAX_OUTPUT, MAX_OUTPUT + 1,
                2**31 - 1, -(2**31), 4096, 4097]
EDGE_POINTERS = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32 - 8, 0xFFFFFF00, 65536, 1 << 20]


def acceptable_json(data: bytes) -> bool:
    """What ABI.md says the host takes as JSON from a guest, written from the text:
    UTF-8, exactly one RFC 8259 value, no NaN/Infinity, numbers a double or 64-bit
    integer can hold, nesting at most 64 deep, no lone surrogates."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return False

    def no_constant(name: str) -> Any:
        raise ValueError(name)

    def finite(text: str) -> float:
        value = float(text)
        if math.isinf(value):
            raise ValueError(text)
        return value

    def int64(text: str) -> int:
        if len(text) > 21 or not -(2**63) <= int(text) <= 2**64 - 1:
            raise ValueError(text)
        return int(text)

    try:
        value = json.loads(text, parse_constant=no_constant, parse_float=finite, parse_int=int64)
    except (ValueError, RecursionError):
        return False
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict | list):
            if depth > 64:
                return False
            items = list(v.items()) if isinstance(v, dict) else [(None, x) for x in v]
            for k, x in items:
                if k is not None and any(0xD800 <= ord(c) <= 0xDFFF for c in k):
                    return False
                stack.append((x, depth + 1))
        elif isinstance(v, str) and any(0xD800 <= ord(c) <= 0xDFFF for c in v):
            return False
    return True


def _json_values() -> st.SearchStrategy[Any]:
    scalars = st.none() | st.booleans() | st.integers(-(2**64), 2**65) | st.floats(allow_nan=False) | st.text(
        alphabet=st.characters(codec="utf-8") | st.sampled_from(["\ud800", "\udfff", '"', "\\", "\x00"]), max_size=12)
    return st.recursive(scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
        st.text(max_size=6), kids, max_size=4), max_leaves=12)


POISON_TEXTS = [
    "[" * 50_000 + "]" * 50_000, '{"a":' * 200 + "1" + "}" * 200, "[" * 65 + "]" * 65, "[" * 64 + "]" * 64,
    '{"key": "\\ud800"}', '{"\\udfff": 1}', "1e400", "-1e999", "18446744073709551616", "18446744073709551615",
    "-9223372036854775809", "9" * 5000, "NaN", "Infinity", "", "  ", "\ufeff{}", "{} {}", "[1,]",
]


def json_payloads() -> st.SearchStrategy[bytes]:
    dumped = st.builds(lambda v, a: json.dumps(v, ensure_ascii=a).encode("utf-8", "surrogatepass"),
                       _json_values(), st.booleans())
    return st.one_of(dumped, st.sampled_from(POISON_TEXTS).map(lambda s: s.encode("utf-8", "surrogatepass")),
                     st.binary(max_size=64), mutated(dumped))


def mutated(base: st.SearchStrategy[bytes], alphabet: bytes = b'{}[]":,\\-+.eE0123456789 \t\n\x0b\xff\xc3\xa9') \
        -> st.SearchStrategy[bytes]:
    """Bytes of ``base`` with a few bytes flipped, inserted or deleted."""

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        b = bytearray(draw(base))
        for _ in range(draw(st.integers(1, 4))):
            pos = draw(st.integers(0, len(b)))
            op = draw(st.sampled_from(["del", "ins", "set", "flip"]))
            if op == "ins":
                b.insert(pos, draw(st.sampled_from(alphabet)))
            elif pos < len(b):
                if op == "del":
                    del b[pos]
                elif op == "set":
                    b[pos] = draw(st.sampled_from(alphabet))
                else:
                    b[pos] ^= draw(st.integers(1, 255))
        return bytes(b)

    return build()


TOOL_NAMES = [b"kv.get", b"kv.set", b"no.such.tool", b"clock.now", b"kv.get\x00", b"\xff\xfe", b"", b"x" * 129,
              b"k\xc3\xa9", b"\xed\xa0\x80"]
TOOL_ARGS = [b'{"key": "k"}', b'{"key": "k", "value": [1, 2]}', b"{}", b"", b"  \t\r\n", b"\x0b", b"\x0c",
             b'{"key": 1}', b"[]", b"null", b'{"key": "k", "extra": 1}', b'{"key": "k", "namespace": "other"}',
             b'{"key": "\\ud800"}', b"\xff"]


@dataclass(frozen=True)
class Ptr:
    """How the guest resolves a pointer: 0 scratch + val, 1 end of memory + val, 2 val."""

    mode: int
    val: int


def pointers(payload_at_zero: bool) -> st.SearchStrategy[Ptr]:
    near = st.integers(-64, 4200) | st.sampled_from([0, MAX_OUTPUT, MAX_OUTPUT - 8])
    return st.one_of(
        st.just(Ptr(0, 0)) if payload_at_zero else st.builds(Ptr, st.just(0), near),
        st.builds(Ptr, st.just(0), near),
        st.builds(Ptr, st.just(1), st.integers(-256, 256) | st.sampled_from([-MAX_OUTPUT, 2**31, 2**32 - 1])),
        st.builds(Ptr, st.just(2), st.sampled_from(EDGE_POINTERS) | U32),
    )


def lengths(natural: int) -> st.SearchStrategy[int]:
    return st.one_of(st.just(natural), st.sampled_from(EDGE_LENGTHS), st.integers(-16, natural + 16), I32)


@st.composite
def one_op(draw: st.DrawFn, last: bool = False) -> list[Any]:
    """One import call: [imp, amode, aval, alen, bmode, bval, blen, arg, hex]."""
    imp = 7 if last else draw(st.integers(0, 6))
    arg = 0
    b_ptr, blen = Ptr(0, 0), 0
    if imp == 4:  # tool_call: the name at the scratch's start, the arguments after it
        name = draw(st.sampled_from(TOOL_NAMES) | st.binary(max_size=12))
        args = draw(st.sampled_from(TOOL_ARGS) | json_payloads())
        payload = name + args
        a_ptr = draw(pointers(True))
        alen = draw(lengths(len(name)))
        b_ptr = draw(st.just(Ptr(0, len(name))) | pointers(False))
        blen = draw(lengths(len(args)))
    else:
        payload = draw(json_payloads()) if imp == 2 else draw(st.binary(max_size=64)) if imp in (3, 7) else b""
        a_ptr = draw(pointers(True))
        alen = draw(lengths(len(payload) if payload else draw(st.sampled_from([0, 16, 4096]))))
        if imp == 3:
            arg = draw(st.integers(0, 3) | I32)
        elif imp == 7:
            arg = draw(st.sampled_from([0, 1, 2, -1]) | I32)
    return [imp, a_ptr.mode, a_ptr.val, alen, b_ptr.mode, b_ptr.val, blen, arg, payload.hex()]


@st.composite
def ops_cases(draw: st.DrawFn) -> dict[str, Any]:
    ops = draw(st.lists(one_op(), min_size=1, max_size=12))
    if draw(st.integers(0, 9)) == 0:
        ops.append(draw(one_op(last=True)))
    # The scratch holds every payload (the guest copies each to its start).
    largest = max(len(op[8]) // 2 for op in ops)
    scratch = max(largest + 64, draw(st.sampled_from([4096, 4096, 4096, MAX_OUTPUT + 4096])))
    return {"mode": "ops", "scratch": scratch, "ops": ops}


def _in_bounds(ptr: int, length: int, mem: int) -> bool:
    return length >= 0 and ptr + length <= mem


def _tool_call_code(name: bytes, args: bytes) -> int | set[int]:
    """The code ABI.md's table gives a tool_call whose bytes are known (bounds and sizes passed)."""
    try:
        tool = name.decode("utf-8")
    except UnicodeDecodeError:
        return UNKNOWN_TOOL
    if args.strip(b" \t\r\n"):
        if not acceptable_json(args):
            return INVALID_JSON
        value = json.loads(args)
    else:
        value = {}
    if tool not in GRANTED:
        return DENIED
    if not isinstance(value, dict):
        return INVALID_ARGS
    if tool == "kv.get" and set(value) == {"key"} and isinstance(value["key"], str):
        return 0
    if tool == "kv.set" and set(value) == {"key", "value"} and isinstance(value["key"], str):
        return 0
    return {0, INVALID_ARGS, DENIED, TOOL_FAILED}


def expected_code(op: list[Any], res: list[int], scratch: int, input_len: int) -> int | set[int]:
    """What ABI.md says the import returns, from the op and what the guest reports."""
    imp, payload = op[0], bytes.fromhex(op[8])
    _, a, alen, b, blen, mem, aux = res
    known_a = a == scratch and 0 <= alen <= len(payload)  # the bytes at a are the payload's
    if imp == 0:
        return input_len
    if imp in (1, 6):
        if not _in_bounds(a, alen, mem):
            return FAULT
        return min(alen, input_len if imp == 1 else aux)
    if imp == 2:
        if not _in_bounds(a, alen, mem):
            return FAULT
        if alen > MAX_OUTPUT:
            return TOO_LARGE
        if known_a:
            return 0 if acceptable_json(payload[:alen]) else INVALID_JSON
        return {0, INVALID_JSON}
    if imp == 3:
        if not 0 <= op[7] <= 3:
            return INVALID_ARGS
        if not _in_bounds(a, alen, mem):
            return FAULT
        return TOO_LARGE if alen > MAX_LOG else 0
    if imp == 4:
        if not (_in_bounds(a, alen, mem) and _in_bounds(b, blen, mem)):
            return FAULT
        if alen > MAX_TOOL_NAME or blen > MAX_ARGS:
            return TOO_LARGE
        known_b = scratch <= b and b - scratch + blen <= len(payload)
        if known_a and known_b:
            return _tool_call_code(payload[:alen], payload[b - scratch : b - scratch + blen])
        return {0, INVALID_JSON, UNKNOWN_TOOL, INVALID_ARGS, TOOL_FAILED, DENIED}
    if imp == 5:
        return res[0] if res[0] >= 0 else set()
    raise Finding(f"unknown op {imp}")


def check_imports(rig: FuzzRig, case: dict[str, Any]) -> None:
    res = rig.run(rig.fuzzops, case)
    last = case["ops"][-1]
    if last[0] == 7:
        code = "memory_limit" if last[7] == abi.ABORT_OOM else "aborted"
        if res.status != "failed" or res.error is None or res.error.get("code") != code:
            raise Finding(f"abort(kind={last[7]}) ended the agent {res.status} {res.error!r}, not {code}")
        return
    if res.status != "completed" or not isinstance(res.output, dict):
        raise Finding(f"the guest did not complete: {res.status} {res.error!r}")
    scratch, input_len = res.output["scratch"], res.output["input_len"]
    for op, got in zip(case["ops"], res.output["results"], strict=True):
        rc = got[0]
        if rc == SKIPPED:
            continue
        want = expected_code(op, got, scratch, input_len)
        ok = rc in want if isinstance(want, set) else rc == want
        if not ok:
            raise Finding(f"{IMPORTS[op[0]]}: got {rc}, ABI.md says {want} (op {op!r}, guest saw {got!r})")
        if op[0] == 1 and rc >= 0 and got[6] != 1:
            raise Finding(f"input_read copied {rc} bytes that are not the input's first {rc} (op {op!r})")
        if op[0] == 4 and got[6] <= 0:
            raise Finding(f"after tool_call (rc {rc}) there is no response (op {op!r})")


# -- the C SDK's JSON parser, in the sandbox -----------------------------------------------


def sdk_accepts(data: bytes) -> bool:
    """The SDK parser's contract (guest_sdk/c/torpor.h): RFC 8259 from UTF-8, nesting at
    most 64 deep; numbers of any size are kept as written."""
    try:
        value = json.loads(data.decode("utf-8"), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)),
                           parse_int=str, parse_float=str)
    except (ValueError, RecursionError):
        return False
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict | list):
            if depth > 64:
                return False
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
    return True


def _same(a: Any, b: Any) -> bool:
    """Equal JSON values, numbers compared as numbers, lone surrogates as U+FFFD (the SDK's rule)."""
    if isinstance(a, str) and isinstance(b, str):
        return a == "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == [k if not any(0xD800 <= ord(c) <= 0xDFFF for c in k) else
                           "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in k) for k in b] and all(
            _same(x, y) for x, y in zip(a.values(), b.values(), strict=True))
    if isinstance(a, str | dict | list) or isinstance(b, str | dict | list):
        return False
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isclose(a, b, rel_tol=1e-15))


def _loads(data: bytes) -> Any:
    # Integers of any length, as numbers while Python converts them quickly, else as written.
    return json.loads(data.decode("utf-8"), parse_int=lambda t: int(t) if len(t) < 400 else t.lstrip("+"))


@st.composite
def json_docs(draw: st.DrawFn) -> dict[str, Any]:
    docs = draw(st.lists(json_payloads() | st.binary(max_size=32), min_size=1, max_size=8))
    return {"mode": "json", "docs": [d.hex() for d in docs]}


def check_sdk_json(rig: FuzzRig, case: dict[str, Any]) -> None:
    res = rig.run(rig.fuzzops, case)
    if res.status != "completed" or not isinstance(res.output, list):
        raise Finding(f"the SDK parser's guest did not complete: {res.status} {res.error!r}")
    for doc_hex, got in zip(case["docs"], res.output, strict=True):
        doc = bytes.fromhex(doc_hex)
        accepts = sdk_accepts(doc)
        if (got is not None) != accepts:
            raise Finding(f"the SDK parser {'took' if got is not None else 'refused'} {doc!r}; "
                          f"RFC 8259 says {'yes' if accepts else 'no'}")
        if got is not None:
            dumped = bytes.fromhex(got)
            if not _same(_loads(dumped), _loads(doc)):
                raise Finding(f"the SDK parser read {doc!r} as {dumped!r}")


# -- modules ------------------------------------------------------------------------------


def sections(wasm: bytes) -> list[tuple[int, bytes]]:
    """The sections of a valid module, as (id, payload)."""
    out, pos = [], 8
    while pos < len(wasm):
        sid = wasm[pos]
        size, shift, pos = 0, 0, pos + 1
        while True:
            byte = wasm[pos]
            pos += 1
            size |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        out.append((sid, wasm[pos : pos + size]))
        pos += size
    return out


def leb(n: int, pad: int = 0) -> bytes:
    """Unsigned LEB128, with ``pad`` redundant continuation bytes (still the same number)."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if n or pad:
            out.append(byte | 0x80)
            if not n:
                pad -= 1
                while pad > 0:
                    out.append(0x80)
                    pad -= 1
                out.append(0)
                return bytes(out)
        else:
            out.append(byte)
            return bytes(out)


def assemble(secs: list[tuple[int, bytes]], pads: dict[int, int] | None = None,
             skew: dict[int, int] | None = None) -> bytes:
    out = bytearray(b"\0asm\x01\0\0\0")
    for i, (sid, payload) in enumerate(secs):
        out.append(sid & 0xFF)
        out += leb(max(0, len(payload) + (skew or {}).get(i, 0)), (pads or {}).get(i, 0))
        out += payload
    return bytes(out)


@st.composite
def mutated_modules(draw: st.DrawFn, bases: list[bytes]) -> bytes:
    """A real module, damaged the ways a fuzzer damages one."""
    base = draw(st.sampled_from(bases))
    secs = sections(base)
    pads: dict[int, int] = {}
    skew: dict[int, int] = {}
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "drop", "dup", "swap", "splice", "insert", "pad", "skew", "trunc"]))
        i = draw(st.integers(0, len(secs) - 1)) if secs else 0
        if op == "flip" and secs:
            sid, payload = secs[i]
            if payload:
                b = bytearray(payload)
                b[draw(st.integers(0, len(b) - 1))] ^= draw(st.integers(1, 255))
                secs[i] = (sid, bytes(b))
        elif op == "drop" and secs:
            del secs[i]
        elif op == "dup" and secs:
            secs.insert(i, secs[i])
        elif op == "swap" and len(secs) > 1:
            j = draw(st.integers(0, len(secs) - 1))
            secs[i], secs[j] = secs[j], secs[i]
        elif op == "splice" and secs:  # the same section of another real module
            other = [s for s in sections(draw(st.sampled_from(bases))) if s[0] == secs[i][0]]
            if other:
                secs[i] = other[0]
        elif op == "insert":
            secs.insert(i, (draw(st.integers(0, 15) | st.integers(0, 255)), draw(st.binary(max_size=24))))
        elif op == "pad":
            pads[i] = draw(st.integers(1, 5))
        elif op == "skew":
            skew[i] = draw(st.integers(-4, 4))
    wasm = assemble(secs, pads, skew)
    if draw(st.integers(0, 7)) == 0:
        wasm = wasm[: draw(st.integers(0, len(wasm)))]
    return wasm


IMPORT_SIGS = {"input_len": (0, 1), "input_read": (2, 1), "output_write": (2, 1), "log": (3, 1),
               "response_len": (0, 1), "response_read": (2, 1), "tool_call": (4, 1), "abort": (3, 0)}
INTS = [0, 1, -1, 7, 8, 16, 1024, 4096, 65535, 65536, 2**31 - 1, -(2**31), 0x7FFF0000]


@st.composite
def smith_modules(draw: st.DrawFn) -> bytes:
    """A valid module from a small grammar (in the spirit of wasm-smith): random imports of
    the ``torpor`` module, one memory, i32 globals, maybe a table, and functions whose
    bodies load, store, grow, call and loop at random, under an ABI-shaped export list."""
    import wasmtime

    imports = sorted(draw(st.sets(st.sampled_from(sorted(IMPORT_SIGS)), max_size=5)))
    pages = draw(st.integers(1, 64) | st.sampled_from([0, 65, 1024, 65536]))
    maximum = draw(st.none() | st.integers(pages, pages + 64))
    nglobals = draw(st.integers(0, 3))
    table = draw(st.none() | st.integers(0, 70_000))
    nfuncs = draw(st.integers(1, 3))
    calls = [n for n in imports if IMPORT_SIGS[n][1] == 1 and n != "abort"]

    def expr(depth: int) -> str:
        k = draw(st.integers(0, 11 if depth < 4 else 2))
        if k == 0:
            return f"(i32.const {draw(st.sampled_from(INTS) | st.integers(-(2**31), 2**31 - 1))})"
        if k == 1:
            return f"(local.get {draw(st.integers(0, 1))})"
        if k == 2:
            return f"(global.get {draw(st.integers(0, nglobals - 1))})" if nglobals else "(memory.size)"
        if k in (3, 4):
            op = draw(st.sampled_from(["add", "sub", "mul", "div_s", "div_u", "rem_u", "and", "xor", "shl", "shr_s"]))
            return f"(i32.{op} {expr(depth + 1)} {expr(depth + 1)})"
        if k == 5:
            return f"(i32.load{draw(st.sampled_from(['', '8_u', '16_s']))} offset={draw(st.integers(0, 70000))} " \
                   f"{expr(depth + 1)})"
        if k == 6:
            return f"(memory.grow {expr(depth + 1)})"
        if k == 7 and calls:
            name = draw(st.sampled_from(calls))
            return f"(call ${name} {' '.join(expr(depth + 1) for _ in range(IMPORT_SIGS[name][0]))})"
        if k == 8:
            return f"(call $f{draw(st.integers(0, nfuncs - 1))} {expr(depth + 1)})"
        if k == 9 and table is not None:
            return f"(table.grow $t (ref.null func) {expr(depth + 1)})"
        if k == 10:
            return f"(i32.eqz {expr(depth + 1)})"
        return "(memory.size)"

    def stmt(depth: int) -> str:
        k = draw(st.integers(0, 8 if depth < 3 else 3))
        if k == 0:
            return f"(drop {expr(0)})"
        if k == 1:
            return f"(i32.store{draw(st.sampled_from(['', '8']))} {expr(1)} {expr(1)})"
        if k == 2:
            return f"(local.set 1 {expr(0)})"
        if k == 3 and nglobals:
            return f"(global.set {draw(st.integers(0, nglobals - 1))} {expr(0)})"
        if k == 4:
            return f"(if {expr(1)} (then {stmts(depth + 1)}) (else {stmts(depth + 1)}))"
        if k == 5:
            return f"(block $b (loop $l {stmts(depth + 1)} (br_if $l {expr(1)})))"
        if k == 6:
            return f"(memory.fill {expr(1)} {expr(1)} {expr(1)})"
        if k == 7 and "abort" in imports:
            return f"(call $abort {expr(1)} {expr(1)} {expr(1)})"
        if k == 8:
            return "(unreachable)" if draw(st.integers(0, 9)) == 0 else f"(memory.copy {expr(1)} {expr(1)} {expr(1)})"
        return "(nop)"

    def stmts(depth: int) -> str:
        return " ".join(stmt(depth) for _ in range(draw(st.integers(0, 3))))

    parts = [f'(import "torpor" "{n}" (func ${n} (param {"i32 " * IMPORT_SIGS[n][0]}) '
             f'{"(result i32)" if IMPORT_SIGS[n][1] else ""}))' for n in imports]
    parts.append(f'(memory (export "memory") {pages}{"" if maximum is None else f" {maximum}"})')
    parts += [f'(global (export "torpor.g{i}") (mut i32) (i32.const {i}))' for i in range(nglobals)]
    parts.append('(global (export "__torpor_async") i32 (i32.const 1024))')
    if table is not None:
        parts.append(f"(table $t {table} funcref)")
    for i in range(nfuncs):
        parts.append(f"(func $f{i} (param i32) (result i32) (local i32) {stmts(0)} {expr(0)})")
    parts.append(f'(func (export "torpor_main") (result i32) (local i32 i32) {stmts(0)} '
                 f'(call $f0 {expr(0)}))')
    wasm = wasmtime.wat2wasm("(module " + " ".join(parts) + ")")
    return bytes(wasm) + b"\0" + leb(len(b"torpor.abi") + 2) + leb(len(b"torpor.abi")) + b"torpor.abi1"


def check_validator(rig: FuzzRig, wasm: bytes) -> None:
    typed("the module validator", lambda: validate.check_module(wasm))


def check_module_run(rig: FuzzRig, wasm: bytes) -> None:
    """Through the validator, the bundle and the runtime, under hello's policy."""
    b = typed("validating and packing the module", lambda: bundle_mod.load_bytes(bundle_mod.pack(wasm, HELLO_POLICY)))
    if b is not None:
        run_typed(rig, b, {"name": "x"})


# -- snapshots, bundles, policies --------------------------------------------------------------


@st.composite
def raw_damage(draw: st.DrawFn, records: list[bytes]) -> bytes:
    """A real checkpoint with its bytes damaged as a disk or a hand would."""
    body = bytearray(draw(st.sampled_from(records)))
    for op, pos, byte in draw(EDITS):
        pos %= max(1, len(body))
        if op == "flip" and body:
            body[pos] ^= byte
        elif op == "insert":
            body[pos:pos] = bytes([byte])
        elif op == "delete" and body:
            del body[pos]
        elif op == "truncate":
            del body[pos:]
        elif op == "splice":
            other = draw(st.sampled_from(records))
            body[pos:] = other[pos % max(1, len(other)) :]
    return bytes(body)


EDITS = st.lists(st.tuples(st.sampled_from(["flip", "insert", "delete", "truncate", "splice"]),
                           st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=4)


def _reseal(record: bytes, edits: list[tuple[str, int, int]], image: Any) -> bytes:
    import hashlib

    from snapshots import format as fmt

    version, flags = record[4], record[5]
    zdict = fmt._dictionary(image if flags & 1 else None) if version >= 2 else None
    payload = bytearray(fmt._decompressor(zdict).decompress(record[fmt._PREFIX_LEN : -16]))
    for op, pos, byte in edits:
        pos %= max(1, len(payload))
        if op == "flip" and payload:
            payload[pos] ^= byte
        elif op == "insert":
            payload[pos:pos] = bytes([byte])
        elif op in ("delete", "splice") and payload:
            del payload[pos]
        elif op == "truncate":
            del payload[pos:]
    body = record[: fmt._PREFIX_LEN] + fmt._compressor(3, zdict).compress(bytes(payload))
    return body + hashlib.blake2b(body, digest_size=16).digest()


def snapshot_cases(records: list[bytes]) -> st.SearchStrategy[tuple[bytes, bool, list[tuple[str, int, int]]]]:
    """Raw damage (the checksum's job), or a payload altered and resealed (what a bug or an
    attacker with write access to the store writes: the parsers' job)."""
    return st.one_of(st.tuples(raw_damage(records), st.just(False), st.just([])),
                     st.tuples(st.sampled_from(records), st.just(True), EDITS))


def check_snapshot(rig: FuzzRig, case: tuple[bytes, bool, list[tuple[str, int, int]]]) -> None:
    from snapshots.delta import apply_delta
    from snapshots.format import decode_snapshot

    _, image = rig.checkpoints()
    record, reseal, edits = case
    if reseal:
        record = _reseal(record, edits, image)

    def decode_and_apply() -> None:
        snap = decode_snapshot(record, pristine=image)
        size = snap.memory.memory_size
        if len(image) <= size <= 64 << 20:  # a host refuses to grow a fresh instance further
            target = bytearray(size)
            target[: len(image)] = bytes(image)
            apply_delta(snap.memory, (ctypes.c_ubyte * size).from_buffer(target))

    typed("the snapshot decoder", decode_and_apply)


def _zip(members: list[tuple[str, bytes]], *, symlink: str | None = None) -> bytes:
    buf = io.BytesIO()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are the point
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name, data in members:
                info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                if name == symlink:
                    info.external_attr = (0o120777 << 16)
                zf.writestr(info, data)
    return buf.getvalue()


MEMBER_NAMES = ["manifest.json", "agent.wasm", "policy.toml", "tools/x.py", "../evil", "/abs", "a/../../b",
                "tools/", "agent.wasm", "C:\\x", "tools/../policy.toml", "\u00e9", ""]


@st.composite
def bundle_cases(draw: st.DrawFn, raw_bundles: list[bytes]) -> bytes:
    """A real bundle damaged, or an archive made up member by member with a manifest that
    mostly tells the truth."""
    import hashlib

    if draw(st.booleans()):
        return draw(mutated(st.sampled_from(raw_bundles), alphabet=b"PK\x03\x04\x01\x02\x05\x06\x00\xff\x08"))
    base = bundle_mod.load_bytes(draw(st.sampled_from(raw_bundles)))
    real = {"agent.wasm": base.module, "policy.toml": base.policy_text.encode()}
    members: list[tuple[str, bytes]] = []
    for _ in range(draw(st.integers(0, 5))):
        name = draw(st.sampled_from(MEMBER_NAMES) | st.text(max_size=8))
        members.append((name, real.get(name) or draw(st.binary(max_size=64))))
    names = {n for n, _ in members} | ({"agent.wasm", "policy.toml"} if draw(st.booleans()) else set())
    files = {}
    for n in names:
        data = dict(members).get(n, real.get(n, b""))
        size = len(data) if draw(st.integers(0, 4)) else draw(st.sampled_from([0, 2**31, 2**64, -1, len(data) + 1]))
        digest = hashlib.sha256(data).hexdigest() if draw(st.integers(0, 4)) else draw(st.sampled_from(["", "0" * 64]))
        files[n] = {"sha256": digest, "size": size}
    for n in ("agent.wasm", "policy.toml"):
        if n in files and n not in dict(members):
            members.append((n, real[n]))
    manifest = {"format": draw(st.sampled_from([bundle_mod.BUNDLE_FORMAT, "torpor-bundle/2"])),
                "name": draw(st.sampled_from([base.name, "other"])), "abi_version": draw(st.sampled_from([1, 2, "1"])),
                "files": files}
    members.insert(draw(st.integers(0, len(members))), ("manifest.json", json.dumps(manifest).encode()))
    return _zip(members, symlink=draw(st.none() | st.sampled_from([n for n, _ in members])))


def check_bundle(rig: FuzzRig, raw: bytes) -> None:
    b = typed("the bundle reader", lambda: bundle_mod.load_bytes(raw))
    if b is not None:
        run_typed(rig, b, {"name": "x"})


def policy_texts() -> list[str]:
    """Every policy file of the project: the examples' and the guests'."""
    root = EXAMPLES.parents[1]
    return sorted({p.read_text() for p in [*root.glob("guest_sdk/examples/*/policy.toml"),
                                           *root.glob("bench/guests/*/policy.toml")]})


TOML_BITS = ['[agent]\nname = "x"\n', "[budgets]\n", 'memory = "1GiB"\n', "fuel = -1\n", "fuel = 1e400\n",
             'wall_clock = "0s"\n', '[tools."kv.get"]\n', '[tools."kv.incr".args]\n', "rate = \"1/s\"\n",
             "fuell = 100\n", 'memory = "99999999999TiB"\n', "[[validators]]\n", '"\\ud800" = 1\n', "a.b.c = 1\n",
             "[wasi]\nallow = [\"fd_write\", 1]\n", "x = [" * 40 + "]" * 40 + "\n",
             "x = " + "[" * 3000 + "]" * 3000 + "\n", "x = " + "{a = " * 2000 + "1" + "}" * 2000 + "\n", 'memory = "4 MiB"\n',
             "tool_calls = 18446744073709551616\n", "[tools]\n", '[tools."http.fetch"]\nhosts = ["*"]\n']


@st.composite
def policy_cases(draw: st.DrawFn, texts: list[str]) -> str:
    if draw(st.booleans()):
        lines = draw(st.sampled_from(texts)).splitlines(keepends=True)
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(lines)))
            op = draw(st.sampled_from(["insert", "delete", "dup", "edit"]))
            if op == "insert":
                lines.insert(i, draw(st.sampled_from(TOML_BITS)))
            elif i < len(lines):
                if op == "delete":
                    del lines[i]
                elif op == "dup":
                    lines.insert(i, lines[i])
                else:
                    line = lines[i]
                    j = draw(st.integers(0, len(line)))
                    lines[i] = line[:j] + draw(st.text(alphabet='[]"=.\\ 0123456789aeuMiBks_-#\n', max_size=3)) \
                        + line[j + draw(st.integers(0, 2)) :]
        return "".join(lines)
    return "".join(draw(st.lists(st.sampled_from(TOML_BITS) | st.text(max_size=20), max_size=8)))


def check_policy(rig: FuzzRig, text: str) -> None:
    if typed("the policy loader", lambda: parse_policy(text, source="fuzz.toml")) is None:
        return
    b = typed("packing hello under the policy", lambda: bundle_mod.load_bytes(bundle_mod.pack(rig.hello.module, text)))
    if b is not None:
        run_typed(rig, b, {"name": "x"})


# -- the targets -------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    strategy: Callable[[FuzzRig], st.SearchStrategy[Any]]
    check: Callable[[FuzzRig, Any], None]


def _module_bases(rig: FuzzRig) -> list[bytes]:
    return [rig.hello.module, rig.fuzzops.module]


TARGETS: dict[str, Target] = {t.name: t for t in [
    Target("imports", lambda rig: ops_cases(), check_imports),
    Target("sdk_json", lambda rig: json_docs(), check_sdk_json),
    Target("validator", lambda rig: st.one_of(mutated_modules(_module_bases(rig)), smith_modules(),
                                              st.binary(max_size=64).map(lambda b: b"\0asm\x01\0\0\0" + b)),
           check_validator),
    Target("modules", lambda rig: smith_modules() | mutated_modules(_module_bases(rig)), check_module_run),
    Target("snapshots", lambda rig: snapshot_cases(rig.checkpoints()[0]), check_snapshot),
    Target("bundles", lambda rig: bundle_cases([rig.hello.raw, rig.fuzzops.raw]), check_bundle),
    Target("policies", lambda rig: policy_cases(policy_texts()), check_policy),
]}


def case_runner(rig: FuzzRig, target: Target) -> Callable[[Any], None]:
    """One case of a target, then hello on the same host: what CI and the bench both run."""

    def one(case: Any) -> None:
        note(f"case: {case!r}"[:4000])
        rig.cases += 1
        target.check(rig, case)
        rig.hello_ok()

    return one


@dataclass
class Outcome:
    cases: int = 0
    findings: list[dict[str, Any]] = field(default_factory=list)


def fuzz(rig: FuzzRig, target: Target, *, examples: int, seed_: int) -> Outcome:
    """Run ``examples`` generated cases of ``target`` from ``seed_``; a failure (after
    Hypothesis shrinks it) is a finding, with the case that shows it."""
    out = Outcome()
    last_failing: list[Any] = []
    one = case_runner(rig, target)

    def recording(case: Any) -> None:
        try:
            one(case)
        except Exception:
            last_failing[:] = [case]
            raise

    before = rig.cases
    prop = settings(max_examples=examples, deadline=None, database=None, derandomize=False, print_blob=False,
                    suppress_health_check=list(HealthCheck), phases=[Phase.generate, Phase.shrink])(
        seed(seed_)(given(target.strategy(rig))(recording)))
    try:
        prop()
    except Exception as exc:
        case = last_failing[0] if last_failing else None
        errors = exc.exceptions if isinstance(exc, BaseExceptionGroup) else [exc]
        for err in errors:
            out.findings.append({"target": target.name, "seed": seed_, "error": f"{type(err).__name__}: {err}"[:3000],
                                 "case": repr(case)[:3000]})
    out.cases = rig.cases - before
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    minutes = args.minutes if args.minutes is not None else (0.2 if args.quick else 10.0)
    names = args.target or list(TARGETS)
    budget_s = minutes * 60
    chunk = 50
    seed_ = args.seed if args.seed is not None else int(time.time())
    per_target: dict[str, dict[str, Any]] = {n: {"cases": 0, "seconds": 0.0, "findings": 0} for n in names}
    findings: list[dict[str, Any]] = []
    OUTCOMES.clear()
    with tempfile.TemporaryDirectory(prefix="torpor-fuzz-") as tmp:
        rig = FuzzRig(Path(tmp) / "store")
        try:
            start = time.monotonic()
            i = 0
            while time.monotonic() - start < budget_s:
                name = names[i % len(names)]
                t0 = time.monotonic()
                out = fuzz(rig, TARGETS[name], examples=chunk, seed_=seed_ + i)
                per_target[name]["cases"] += out.cases
                per_target[name]["seconds"] += time.monotonic() - t0
                per_target[name]["findings"] += len(out.findings)
                findings += out.findings
                i += 1
                if args.progress:
                    done = sum(t["cases"] for t in per_target.values())
                    print(f"\rfuzz: {done} cases, {len(findings)} findings, "
                          f"{time.monotonic() - start:.0f}/{budget_s:.0f} s", end="", file=sys.stderr)
            rig.hello_ok()
            hello_runs = rig.cases
        finally:
            rig.close()
    if args.progress:
        print(file=sys.stderr)
    for t in per_target.values():
        t["seconds"] = round(t["seconds"], 1)
    return {"bench": "fuzz", "minutes": minutes, "seed": seed_, "chunk": chunk,
            "cases": sum(t["cases"] for t in per_target.values()), "hello_runs": hello_runs + 1,
            "per_target": per_target, "findings": findings,
            "outcomes": dict(OUTCOMES.most_common())}


def show(r: dict[str, Any]) -> None:
    print(f"fuzz: {r['cases']:,} cases in {r['minutes']} min (seeds from {r['seed']}, {r['chunk']} cases a seed), "
          f"hello correct after every one ({r['hello_runs']:,} runs); {len(r['findings'])} findings")
    for name, t in r["per_target"].items():
        print(f"  {name:<10} {t['cases']:>7,} cases  {t['seconds']:>7.1f} s  {t['findings']} findings")
    print("how the cases ended: " + ", ".join(f"{k} {v:,}" for k, v in r["outcomes"].items()))
    for f in r["findings"]:
        print(f"finding in {f['target']} (seed {f['seed']}): {f['error'][:400]}\n  case: {f['case'][:400]}")


if __name__ == "__main__":
    from bench.cli import main

    sys.exit(main(["fuzz", *sys.argv[1:]]))
