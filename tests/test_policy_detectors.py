"""Detectors for personal data and secrets, including their negatives."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policies.detectors import card_network, find, luhn_valid, scan, shannon_entropy


def kinds(text: str, detector: str) -> list[str]:
    return [h.kind for h in find(text, [detector])]


def luhn_complete(prefix: str) -> str:
    """Append the check digit that makes ``prefix`` Luhn-valid."""
    for d in "0123456789":
        if luhn_valid(prefix + d):
            return prefix + d
    raise AssertionError("unreachable")


# --- Luhn ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "number",
    ["4111111111111111", "5555555555554444", "378282246310005", "6011111111111117", "79927398713"],
)
def test_luhn_valid(number: str) -> None:
    assert luhn_valid(number)


@pytest.mark.parametrize(
    "number", ["4111111111111112", "1234567812345678", "79927398710", "", "abc", "7"]
)
def test_luhn_invalid(number: str) -> None:
    assert not luhn_valid(number)


@given(st.text("0123456789", min_size=2, max_size=19))
def test_luhn_matches_reference(digits: str) -> None:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d // 10 + d % 10
    assert luhn_valid(digits) == (total % 10 == 0)


# --- cards ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "network"),
    [
        ("pay with 4111 1111 1111 1111 today", "visa"),
        ("4111-1111-1111-1111", "visa"),
        ("4111111111111111", "visa"),
        ("amex 378282246310005", "amex"),
        ("mc 5555555555554444", "mastercard"),
        ("mc2 2223003122003222", "mastercard"),
        ("disc 6011111111111117", "discover"),
        ("jcb 3530111333300000", "jcb"),
        ("diners 30569309025904", "diners"),
        ("card:4111111111111111.", "visa"),
    ],
)
def test_cards_found(text: str, network: str) -> None:
    assert kinds(text, "card") == [network]


@pytest.mark.parametrize(
    "text",
    [
        "4111111111111112",  # Luhn fails
        "1234567812345678",  # Luhn fails
        "order 12345678901234567890123",  # longer digit run: no card inside
        "94111111111111111",  # a card's digits inside a longer number
        "0000000000000000",  # Luhn-valid but no network
        "1111111111111117",  # Luhn-valid, prefix 1 is no card network
        "phone 415-555-0134",
        "2024-01-15 10:30",
    ],
)
def test_cards_not_found(text: str) -> None:
    assert kinds(text, "card") == []


def test_card_hidden_behind_a_reference_number_is_found() -> None:
    assert kinds("ref 1234 4111 1111 1111 1111 end", "card") == ["visa"]


def test_random_non_luhn_16_digit_numbers_are_not_cards() -> None:
    rng = random.Random(7)
    checked = 0
    while checked < 2000:
        n = "4" + "".join(rng.choice("0123456789") for _ in range(15))
        if luhn_valid(n):
            continue
        checked += 1
        assert find(n, ["card"]) == [], n


def test_card_network() -> None:
    assert card_network("4111111111111111") == "visa"
    assert card_network("411111111111") is None  # too short


def test_card_mask_keeps_only_last_four() -> None:
    (hit,) = find("4111 1111 1111 1111", ["card"])
    assert hit.masked == "…1111"


# --- phones, e-mail, national ids -------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "call 415-555-0134",
        "(415) 555-0134",
        "415.555.0134",
        "+1 415 555 0134",
        "+44 20 7946 0958",
        "+4930901820",
    ],
)
def test_phones_found(text: str) -> None:
    assert kinds(text, "phone") == ["phone"]


@pytest.mark.parametrize(
    "text",
    [
        "order 4155550134",
        "2024-01-15",
        "version 1.2.3",
        "+12345",
        "pi 3.14159265",
        "123-45-6789",
        "4111 1111 1111 1111",
    ],
)
def test_phones_not_found(text: str) -> None:
    assert kinds(text, "phone") == []


@pytest.mark.parametrize(
    "text", ["mail jane.doe+x@example.co.uk", "a@b.io", "<x_y@sub.example.com>"]
)
def test_emails_found(text: str) -> None:
    assert kinds(text, "email") == ["email"]


@pytest.mark.parametrize("text", ["user at example dot com", "@handle", "x@localhost", "a@b.c"])
def test_emails_not_found(text: str) -> None:
    assert kinds(text, "email") == []


def test_email_mask() -> None:
    (hit,) = find("jane.doe@example.com", ["email"])
    assert hit.masked == "j***@***.com"
    assert "jane" not in hit.masked


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("ssn 123-45-6789", "us_ssn"),
        ("123 45 6789", "us_ssn"),
        ("AB 12 34 56 C", "uk_nino"),
        ("AB123456C", "uk_nino"),
    ],
)
def test_national_ids_found(text: str, kind: str) -> None:
    assert kinds(text, "national_id") == [kind]


@pytest.mark.parametrize(
    "text",
    [
        "000-12-3456",
        "666-12-3456",
        "912-34-5678",
        "123-00-4567",
        "123-45-0000",
        "123456789",
        "123-45-67890",
        "GB123456A",
        "QQ123456C",
    ],
)
def test_national_ids_not_found(text: str) -> None:
    assert kinds(text, "national_id") == []


# --- secrets ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("key AKIAIOSFODNN7EXAMPLE", "aws_access_key_id"),
        (
            "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            "aws_secret_access_key",
        ),
        ("sk-ant-api03-abcdefghijklmnopqrstuvwxyz012345", "api_key"),
        ("sk-proj-abcdefghijklmnopqrstuvwxyz", "api_key"),
        ("ghp_" + "A1b2" * 9, "github_token"),
        ("github_pat_" + "a1B2c3" * 5, "github_token"),
        ("glpat-abcdefghij0123456789", "gitlab_token"),
        ("xoxb-123456789012-abcdefghij", "slack_token"),
        ("AIzaSyA-1234567890abcdefghijklmnopqrstu", "google_api_key"),
        ("sk_live_abcdefghijklmnop1234", "stripe_key"),
        ("-----BEGIN RSA PRIVATE KEY-----\nMIIE", "private_key"),
        ("-----BEGIN PRIVATE KEY-----", "private_key"),
        ("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N", "jwt"),
        ("Authorization: Bearer 8f3Kq9zL2mX7vB1nR4tY6wE0", "bearer_token"),
        ("password: hunter2hunter2", "password"),
        ('{"api_key": "9f8a7b6c5d4e3f2a1b0c9d8e"}', "credential"),
    ],
)
def test_secrets_found(text: str, kind: str) -> None:
    assert kinds(text, "secret") == [kind]


@pytest.mark.parametrize(
    "text",
    [
        "Bearer aaaaaaaaaaaaaaaaaaaaaaaaaaaa",  # no entropy
        "the token: is here",
        "sk-short",
        "ask-me-anything-please",
        "AKIA-not-a-key",
        "api_key = aaaaaaaaaaaaaaaaaaaa",
        "a perfectly ordinary sentence about secrets and tokens",
    ],
)
def test_secrets_not_found(text: str) -> None:
    assert kinds(text, "secret") == []


def test_secret_is_masked() -> None:
    secret = "sk-ant-api03-abcdefghijklmnopqrstuvwxyz012345"
    (hit,) = find(f"use {secret}", ["secret"])
    assert secret not in hit.masked
    assert hit.masked.startswith("sk-a")


def test_entropy() -> None:
    assert shannon_entropy("aaaa") == 0
    assert shannon_entropy("abcd") == 2


# --- scanning JSON ------------------------------------------------------------------------


def test_scan_walks_nested_json_with_paths() -> None:
    doc = {
        "to": ["ok", "bob@corp.io"],
        "meta": {"card": 4111111111111111, "note": "ssn 123-45-6789"},
        "jane@example.com": 1,
        "flag": True,
        "ratio": 4111111111111111.0,
    }
    found = {(f.detector, f.path, f.in_key) for f in scan(doc)}
    assert found == {
        ("email", "$.to[1]", False),
        ("card", "$.meta.card", False),
        ("national_id", "$.meta.note", False),
        ("email", '$["jane@example.com"]', True),
    }


def test_scan_only_named_detectors() -> None:
    assert scan({"x": "bob@corp.io 4111111111111111"}, ["card"])[0].detector == "card"
    assert len(scan({"x": "bob@corp.io 4111111111111111"}, ["card"])) == 1


def test_scan_unknown_detector() -> None:
    with pytest.raises(ValueError, match="unknown detector 'crad'"):
        scan("x", ["crad"])


def test_finding_describe_never_contains_the_secret() -> None:
    (f,) = scan({"msg": "card 4111 1111 1111 1111"}, ["card"])
    assert "4111 1111" not in f.describe()
    assert f.describe() == "payment card number (visa) at $.msg: …1111"


# --- property: Luhn-valid cards with a network prefix are always found ---------------------

prefixes = st.sampled_from(["4", "51", "55", "2221", "34", "37", "6011", "65", "3530", "36", "62"])
lengths = {"34": 15, "37": 15, "36": 14}


@st.composite
def cards(draw: st.DrawFn) -> str:
    prefix = draw(prefixes)
    length = lengths.get(prefix, 16)
    body = draw(
        st.text("0123456789", min_size=length - len(prefix) - 1, max_size=length - len(prefix) - 1)
    )
    return luhn_complete(prefix + body)


@given(
    cards(),
    st.sampled_from(["", " ", "-"]),
    st.text(alphabet="abc xyz:,.", max_size=10),
    st.text(alphabet="abc xyz:,.", max_size=10),
)
def test_luhn_valid_cards_are_always_found(card: str, sep: str, before: str, after: str) -> None:
    written = sep.join(card[i : i + 4] for i in range(0, len(card), 4))
    assert kinds(before + written + after, "card") != []
