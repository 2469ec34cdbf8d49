"""The guest SDK's JSON parser, serializer, formatter and builder, compiled to wasm32
and driven case by case through the sdk_selftest guest's exports."""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from guest_sdk_mock import MockHost, built, strict_json


class Sdk:
    def __init__(self) -> None:
        self.s = MockHost().instantiate(built()["guests/sdk_selftest"])

    def _load(self, data: bytes, extra: bytes = b"") -> None:
        ptr = self.s.call("t_buf", len(data) + len(extra) + 1)
        self.s.write(ptr, data + extra + b"\0")

    def out(self, n: int) -> bytes | None:
        if n == -1:
            return None
        assert n >= 0, f"selftest error {n} (-2 = leak)"
        return self.s.read(self.s.call("t_out"), n)

    def parse(self, data: bytes | str) -> str | None:
        b = data.encode() if isinstance(data, str) else data
        self._load(b)
        out = self.out(self.s.call("t_parse", len(b)))
        return None if out is None else out.decode()

    def query(self, doc: str, path: str) -> dict[str, Any]:
        b = doc.encode()
        self._load(b, b"\0" + path.encode())
        out = self.out(self.s.call("t_query", len(b)))
        assert out is not None, doc
        return json.loads(out)

    def num(self, text: str) -> float:
        b = text.encode()
        self._load(b)
        return float(self.s.call("t_num", len(b)))

    def double(self, x: float) -> str:
        out = self.out(self.s.call("t_double", x))
        assert out is not None
        return out.decode()


@pytest.fixture(scope="module")
def sdk() -> Sdk:
    return Sdk()


def valid(data: bytes) -> bool:
    try:
        strict_json(data)
    except (ValueError, RecursionError):
        return False
    return True


ROUND_TRIP = [
    "{}",
    "[]",
    "null",
    "true",
    "false",
    "0",
    "-0",
    '""',
    '"x"',
    " \t\n\r[1 , 2]\n ",
    '{"a": {"b": [1, {"c": [null, true, false, "d"]}]}, "e": []}',
    '"é 😀 ∑ \u00e9"',
    r'"\" \\ \/ \b \f \n \r \t \u0041 \u00e9 \ud83d\ude00 \u0000 \u001f \u007f"',
    r'{"k\u0000ey": "v\u0000al"}',
    "9223372036854775807",
    "-9223372036854775808",
    "9223372036854775808",
    "-9223372036854775809",
    "123456789012345678901234567890",
    "1e2",
    "1E+2",
    "1.5",
    "-0.0",
    "1e-7",
    "0.1",
    "2.5e-308",
    "1e400",
    "-1.25E-3",
    '[1, 2.0, -3e1, "4"]',
    '{"a": 1, "a": 2}',
]


@pytest.mark.parametrize("doc", ROUND_TRIP)
def test_round_trip(sdk: Sdk, doc: str) -> None:
    dumped = sdk.parse(doc)
    assert dumped is not None, doc
    assert valid(dumped.encode()), dumped
    # same value; integers exact, other numbers exactly as written (no float round trip)
    assert json.loads(dumped, parse_float=str) == json.loads(doc, parse_float=str)
    assert sdk.parse(dumped) == dumped  # the dump is a fixed point


def test_round_trip_is_compact_and_escaped(sdk: Sdk) -> None:
    assert sdk.parse(' { "a" : [ 1 , "x\\ty" ] } ') == '{"a":[1,"x\\ty"]}'
    assert sdk.parse(r'"\u00e9\/\u0001"') == '"é/\\u0001"'
    assert sdk.parse(r'"\ud800 lone"') == '"\ufffd lone"'  # unpaired surrogate
    assert sdk.parse(r'"\udc00\ud800"') == '"\ufffd\ufffd"'


MALFORMED = [
    b"",
    b" ",
    b"{",
    b"[",
    b"[1,",
    b"[1,]",
    b'{"a"}',
    b'{"a":}',
    b'{"a":1,}',
    b"{a:1}",
    b"{'a':1}",
    b'"abc',
    b'"\\',
    b'"\\x"',
    b'"\\u12"',
    b'"\\u12G4"',
    b"01",
    b"-01",
    b"1.",
    b".5",
    b"-",
    b"+1",
    b"1e",
    b"1e+",
    b"tru",
    b"nul",
    b"falsey",
    b"NaN",
    b"Infinity",
    b"-Infinity",
    b"[1 2]",
    b'{"a" 1}',
    b'"\x01"',
    b'"\t"',
    b'"\n"',
    b"[1]]",
    b"[1] x",
    b"\x00",
    b'"a\x00b"',
    b'"\xff"',
    b'"\xc0\xaf"',
    b'"\xed\xa0\x80"',
    b'"\xe2\x82"',
    b'"\xf4\x90\x80\x80"',
    b"\xef\xbb\xbf{}",
    b"{} {}",
    b"[,1]",
    b'{"a":1 "b":2}',
    b"1 2",
    b"[-]",
    b"[1e5.5]",
    b"0x10",
    b'"\\U0041"',
    b'"\\\'"',
]


@pytest.mark.parametrize("doc", MALFORMED, ids=[repr(m)[:40] for m in MALFORMED])
def test_malformed_returns_null(sdk: Sdk, doc: bytes) -> None:
    assert not valid(doc)  # the reference agrees it is malformed
    assert sdk.parse(doc) is None


def test_every_truncation(sdk: Sdk) -> None:
    doc = json.dumps(
        {"order": [{"sku": "é😀", "qty": -12, "x": 1.5e-3}], "ok": True, "n": None, "s": 'a"\\\n'},
        ensure_ascii=False,
    ).encode()
    for i in range(len(doc)):
        got = sdk.parse(doc[:i])
        assert (got is not None) == valid(doc[:i]), doc[:i]


def test_depth_limit(sdk: Sdk) -> None:
    assert sdk.parse("[" * 64 + "]" * 64) is not None
    assert sdk.parse("[" * 65 + "]" * 65) is None
    assert sdk.parse('{"a":' * 64 + "1" + "}" * 64) is not None
    assert sdk.parse('{"a":' * 65 + "1" + "}" * 65) is None
    assert sdk.parse("[" * 100_000) is None  # no stack overflow, no trap
    assert sdk.parse("[" * 50_000 + "]" * 50_000) is None


def test_mutation_fuzz_agrees_with_reference(sdk: Sdk) -> None:
    rng = random.Random(1234)
    base = json.dumps(
        {"a": [1, -2, 3.25, "x\u00e9", None, True], "b": {"c": 'd\\"e', "f": []}, "g": 1e-9},
        ensure_ascii=False,
    ).encode()
    alphabet = b'{}[]":,\\-+.eE0123456789 \t\nabcdefnrtu\x00\x1f\x7f\xc3\xa9\xff'
    for _ in range(1500):
        b = bytearray(base)
        for _ in range(rng.randint(1, 3)):
            op = rng.randrange(3)
            pos = rng.randrange(len(b) + 1)
            if op == 0 and pos < len(b):
                del b[pos]
            elif op == 1:
                b.insert(pos, rng.choice(alphabet))
            elif pos < len(b):
                b[pos] = rng.choice(alphabet)
        data = bytes(b)
        got = sdk.parse(data)
        assert (got is not None) == valid(data), data
        if got is not None:
            assert strict_json(got.encode()) == strict_json(data) or _nan_free_equal(got, data)


def _nan_free_equal(a: str, b: bytes) -> bool:
    # lone surrogate escapes become U+FFFD in the SDK; everything else must match
    return "\ufffd" in a


def test_random_documents(sdk: Sdk) -> None:
    rng = random.Random(99)

    def gen(depth: int) -> Any:
        k = rng.randrange(8 if depth < 6 else 5)
        if k == 0:
            return None
        if k == 1:
            return rng.random() < 0.5
        if k == 2:
            return rng.choice([0, -1, 2**63 - 1, -(2**63), rng.randint(-(10**12), 10**12)])
        if k == 3:
            return rng.choice([0.5, -1e-300, 1.7976931348623157e308, rng.uniform(-1e6, 1e6)])
        if k == 4:
            return "".join(rng.choice('aé😀"\\\n\x00 ∑/') for _ in range(rng.randrange(12)))
        if k in (5, 6):
            return [gen(depth + 1) for _ in range(rng.randrange(5))]
        return {gen_key(): gen(depth + 1) for _ in range(rng.randrange(5))}

    def gen_key() -> str:
        return "".join(rng.choice('ab"é\x01') for _ in range(rng.randrange(4)))

    for _ in range(300):
        value = gen(0)
        text = json.dumps(value, ensure_ascii=rng.random() < 0.5)
        dumped = sdk.parse(text)
        assert dumped is not None, text
        assert json.loads(dumped) == value


INT64_CASES = [
    ("9223372036854775807", True, 2**63 - 1),
    ("-9223372036854775808", True, -(2**63)),
    ("9223372036854775808", False, 2**63 - 1),  # clamped
    ("-9223372036854775809", False, -(2**63)),
    ("-0", True, 0),
    ("1e2", False, 100),
    ("1.9", False, 1),
    ("-1.9", False, -1),
    ("1e300", False, 2**63 - 1),
    ('"12"', False, 0),
    ("null", False, 0),
]


@pytest.mark.parametrize(("doc", "is_int", "value"), INT64_CASES)
def test_int64_edges(sdk: Sdk, doc: str, is_int: bool, value: int) -> None:
    q = sdk.query(doc, "")
    assert q["is_int"] is is_int
    assert int(q["int"]) == value


def test_accessors(sdk: Sdk) -> None:
    doc = '{"a": {"b": [10, {"c": "x\\u0000y"}, [true]]}, "n": null, "a2": 1, "a2": 2}'
    assert sdk.query(doc, "a.b.0")["int"] == "10"
    q = sdk.query(doc, "a.b[1].c")
    assert q["type"] == "string" and q["str"] == "x\u0000y" and q["len"] == 3
    assert sdk.query(doc, "a.b.2.0")["bool"] is True
    assert sdk.query(doc, "a.b[2][0]")["type"] == "bool"
    assert sdk.query(doc, "a.b.3")["type"] == "missing"
    assert sdk.query(doc, "a.x")["type"] == "missing"
    assert sdk.query(doc, "a.b.c")["type"] == "missing"  # key on an array
    assert sdk.query(doc, "n")["is_null"] is True
    assert sdk.query(doc, "missing")["is_null"] is False
    assert sdk.query(doc, "a2")["int"] == "2"  # duplicate key: the last wins
    root = sdk.query(doc, "")
    assert root["type"] == "object" and root["len"] == 4 and root["key0"] == "a"
    assert root["first"] == {"b": [10, {"c": "x\u0000y"}, [True]]}
    assert sdk.query('[{"a": 5}]', "")["first"] == {"a": 5}
    assert sdk.query('{"a": [1]}', "")["get_a"] == [1]
    assert sdk.query("[]", "0")["type"] == "missing"
    assert sdk.query('"str"', "")["len"] == 3
    assert sdk.query("3.5", "")["num"] == 3.5
    assert sdk.query("true", "x")["type"] == "missing"


@pytest.mark.parametrize(
    ("x", "text"),
    [
        (0.1, "0.1"),
        (-2.5, "-2.5"),
        (1e21, "1e21"),
        (1.0 / 3.0, "0.333333333333333"),
        (123456789.125, "123456789.125"),
        (1e-7, "1e-7"),
        (100.0, "100"),
        (0.0, "0"),
        (1e14, "100000000000000"),
        (1e15, "1e15"),
        (0.00001, "0.00001"),
        (float("nan"), "null"),
        (float("inf"), "null"),
        (-float("inf"), "null"),
    ],
)
def test_double_format(sdk: Sdk, x: float, text: str) -> None:
    assert sdk.double(x) == text


def test_double_format_precision(sdk: Sdk) -> None:
    rng = random.Random(5)
    values = [5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, 9007199254740993.0]
    values += [rng.uniform(-1, 1) * 10 ** rng.randint(-320, 305) for _ in range(2000)]
    for x in values:
        t = sdk.double(x)
        assert valid(t.encode()), t
        y = float(t)
        assert y == x or math.isclose(y, x, rel_tol=2e-14) or abs(x) < 1e-307, (x, t)


def test_format_and_builder(sdk: Sdk) -> None:
    out = sdk.out(sdk.s.call("t_format"))
    assert out is not None
    got = json.loads(out)
    expect = {
        "s_escape": '{"k": "q\\"b\\\\s/n\\nt\\tc\\u0001 \x7f é 😀"}',
        "s_null": "[null]",
        "S_splice": '"hello, a\\"b!"',
        "s_len": '"abc"',
        "s_len_nul": '"a\\u0000b"',
        "s_bad_utf8": '"x\\ufffd\\ufffd(y\\ufffd\\ufffd\\ufffdz\\ufffd\\ufffd\\ufffd"',
        "ints": "[-5, 7, 4000000000, -123456, -9223372036854775808, 18446744073709551615, 42,"
        " ff, deadbeefcafe]",
        "int64_max": "9223372036854775807",
        "bools": "[true, false]",
        "raw": '{"a": [1, {"x": null}], "b": null}',
        "percent": "100% sure x",
        "text_s": '<a"b|xy|(null)>',
        "doubles": "[0.1, -2.5, 1e21, 0.333333333333333, 0]",
        "nonfinite_json": "[null, null]",
        "nonfinite_text": "-inf nan",
        "value": '{"v": [1,2.50,"s"], "missing": null}',
        "builder": '{"name":"tab\\there","n":-42,"x":2.5,"ok":true,"nothing":null,'
        '"list":[0,1,2,{},[],{"r":1},{"f": "v"},"a\\u0000b"],"k\\"ey":null}',
        "builder_no_key": None,
        "builder_unclosed": None,
        "builder_two_values": None,
        "builder_key_in_array": None,
        "builder_dangling_key": None,
        "builder_empty": None,
        "builder_too_deep": None,
        "builder_max_depth_len": "128",
    }
    assert got == expect
    for k, v in got.items():
        if v is not None and not k.startswith(("percent", "text", "nonfinite_text", "ints")):
            assert valid(v.encode()), (k, v)


def test_number_parse_precision(sdk: Sdk) -> None:
    rng = random.Random(7)
    texts = [
        "0.1",
        "1e23",
        "2.2250738585072014e-308",
        "1.7976931348623157e308",
        "5e-324",
        "123456789012345678901234567890",
        "-0.000001234",
        "9007199254740993",
        "1e400",
    ]
    texts += [repr(rng.uniform(-1, 1) * 10 ** rng.randint(-300, 300)) for _ in range(2000)]
    texts += [f"{rng.randint(1, 10**6)}e{rng.randint(-20, 20)}" for _ in range(500)]
    for t in texts:
        want, got = float(t), sdk.num(t)
        # exact on the fast path (<= 15 digits, |exp| <= 22), else within a few ulp
        assert got == want or math.isclose(got, want, rel_tol=1e-15) or abs(want) < 1e-300, t
    assert sdk.num("0.1") == 0.1 and sdk.num("1e22") == 1e22 and sdk.num("-2.5e-3") == -2.5e-3
