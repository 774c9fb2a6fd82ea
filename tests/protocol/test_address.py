"""RFC 5321 path parsing, address splitting and relay-trick detection."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtpsvc.protocol import (
    AddressError,
    ParsedPath,
    is_postmaster,
    is_valid_address_literal,
    is_valid_domain,
    local_part_is_relay_trick,
    parse_path,
    split_address,
)
from smtpsvc.protocol.address import path_end


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("<user@example.com>", "user@example.com"),
        ("<User.Name+tag@Example.COM>", "User.Name+tag@Example.COM"),
        ("<!#$%&'*+-/=?^_`{|}~@example.com>", "!#$%&'*+-/=?^_`{|}~@example.com"),
        ('<"john doe"@example.com>', '"john doe"@example.com'),
        ('<"a\\"b"@example.com>', '"a\\"b"@example.com'),
        ('<""@example.com>', '""@example.com'),
        ("<a@[192.0.2.1]>", "a@[192.0.2.1]"),
        ("<a@[IPv6:2001:db8::1]>", "a@[IPv6:2001:db8::1]"),
        ("<a@[ipv6:::1]>", "a@[ipv6:::1]"),
        ("<a@[x-tag:stuff]>", "a@[x-tag:stuff]"),
        ("<a@localhost>", "a@localhost"),
        ("<a@1-2.example>", "a@1-2.example"),
        ("user@example.com", "user@example.com"),
    ],
)
def test_valid_paths_parse_to_local_at_domain(text: str, address: str) -> None:
    assert parse_path(text) == ParsedPath(address, "")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "<>",
        "<",
        "<a@example.com",
        "a@example.com>",
        "<a>",
        "<@example.com>",
        "<a@>",
        "<a.@example.com>",
        "<.a@example.com>",
        "<a..b@example.com>",
        "<a b@example.com>",
        "<a@exa mple.com>",
        "<a@-example.com>",
        "<a@example-.com>",
        "<a@example.com.>",
        "<a@example..com>",
        "<a@b@example.com>",
        '<"unterminated@example.com>',
        '<"a"b@example.com>',
        "<a@[300.1.1.1]>",
        "<a@[1.2.3]>",
        "<a@[IPv6:zz::1]>",
        "<a@[IPv6:fe80::1%eth0]>",
        "<a@[]>",
        "<a@[192.0.2.1>",
        "<jösé@example.com>",
        "<a@exämple.com>",
        "<a\x00@example.com>",
    ],
)
def test_invalid_paths_raise_address_error(text: str) -> None:
    with pytest.raises(AddressError):
        parse_path(text)


def test_address_error_is_a_value_error() -> None:
    assert issubclass(AddressError, ValueError)


def test_null_path_only_when_allowed() -> None:
    assert parse_path("<>", allow_null=True) == ParsedPath("", "")
    with pytest.raises(AddressError):
        parse_path("<>")
    with pytest.raises(AddressError):
        parse_path("", allow_null=True)


@pytest.mark.parametrize("name", ["postmaster", "Postmaster", "POSTMASTER"])
def test_bare_postmaster_only_when_allowed(name: str) -> None:
    assert parse_path(f"<{name}>", allow_postmaster=True) == ParsedPath(name, "")
    with pytest.raises(AddressError):
        parse_path(f"<{name}>")


def test_source_route_is_split_off() -> None:
    assert parse_path("<@a.example,@b.example:user@c.example>") == ParsedPath(
        "user@c.example", "@a.example,@b.example:"
    )
    assert parse_path("<@a.example:user@c.example>").source_route == "@a.example:"


@pytest.mark.parametrize(
    "text", ["<@a.example user@c.example>", "<@:user@c.example>", "<@a,b:user@c.example>"]
)
def test_malformed_source_route_raises(text: str) -> None:
    with pytest.raises(AddressError):
        parse_path(text)


def test_utf8_addresses_need_the_flag() -> None:
    assert parse_path("<jösé@exämple.com>", utf8=True).address == "jösé@exämple.com"
    assert parse_path('<"jö sé"@example.com>', utf8=True).address == '"jö sé"@example.com'


def test_local_part_limit_is_64_octets() -> None:
    assert parse_path("<" + "a" * 64 + "@example.com>")
    with pytest.raises(AddressError):
        parse_path("<" + "a" * 65 + "@example.com>")


def test_local_part_limit_counts_utf8_octets() -> None:
    with pytest.raises(AddressError):
        parse_path("<" + "é" * 33 + "@example.com>", utf8=True)


def test_label_limit_is_63_octets() -> None:
    assert parse_path("<a@" + "b" * 63 + ".example>")
    with pytest.raises(AddressError):
        parse_path("<a@" + "b" * 64 + ".example>")


def test_path_limit_is_256_octets_with_brackets() -> None:
    domain = ".".join(["d" * 60] * 4)  # 243 octets
    assert len(f"<{'a' * 10}@{domain}>") == 256
    assert parse_path(f"<{'a' * 10}@{domain}>")
    with pytest.raises(AddressError):
        parse_path(f"<{'a' * 11}@{domain}>")


def test_domain_limit_is_255_octets() -> None:
    assert is_valid_domain(".".join(["a" * 63] * 4)[:255].rstrip("."))
    assert not is_valid_domain(".".join(["a" * 63] * 5))


@pytest.mark.parametrize(
    ("literal", "valid"),
    [
        ("[127.0.0.1]", True),
        ("[IPv6:::1]", True),
        ("[IPv6:2001:db8::192.0.2.1]", True),
        ("[256.0.0.1]", False),
        ("[01.2.3.4]", False),
        ("127.0.0.1", False),
        ("[IPv6:1.2.3.4]", False),
        ("[tag:]", False),
    ],
)
def test_address_literals(literal: str, valid: bool) -> None:
    assert is_valid_address_literal(literal) is valid


@pytest.mark.parametrize(
    ("text", "end"),
    [
        ("<a@b> SIZE=1", 5),
        ('<"x>y"@b> SIZE=1', 9),
        ('<"x\\">y"@b> X', 11),
        ("a@b SIZE=1", 3),
        ("a@b", 3),
    ],
)
def test_path_end_skips_quoted_brackets(text: str, end: int) -> None:
    assert path_end(text) == end


def test_path_end_raises_on_unclosed_bracket() -> None:
    with pytest.raises(AddressError):
        path_end('<"a>"@b')


@pytest.mark.parametrize(
    ("address", "parts"),
    [
        ("user@example.com", ("user", "example.com")),
        ('"a@b"@example.com', ('"a@b"', "example.com")),
        ("postmaster", ("postmaster", "")),
        ("", ("", "")),
    ],
)
def test_split_address_splits_at_the_last_at(address: str, parts: tuple[str, str]) -> None:
    assert split_address(address) == parts


@pytest.mark.parametrize(
    ("local", "trick"),
    [
        ("user", False),
        ("user%other.example", True),
        ("host!user", True),
        ('"user@other.example"', True),
        ('"plain quoted"', False),
        ("first.last+tag", False),
    ],
)
def test_relay_tricks_are_detected(local: str, trick: bool) -> None:
    assert local_part_is_relay_trick(local) is trick


def test_is_postmaster_ignores_case() -> None:
    assert is_postmaster("PostMaster")
    assert not is_postmaster("postmaster@example.com")


_atom = st.text(alphabet="abcxyz0189!#$%&'*+-/=?^_`{|}~", min_size=1, max_size=8)
_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)


@given(st.lists(_atom, min_size=1, max_size=4), st.lists(_label, min_size=1, max_size=4))
@settings(max_examples=200, deadline=None)
def test_generated_valid_addresses_round_trip(atoms: list[str], labels: list[str]) -> None:
    address = ".".join(atoms) + "@" + ".".join(labels)
    parsed = parse_path(f"<{address}>")
    assert parsed.address == address
    assert split_address(parsed.address) == (".".join(atoms), ".".join(labels))


@given(st.text(max_size=80))
@settings(max_examples=300, deadline=None)
def test_any_text_parses_or_raises_address_error(text: str) -> None:
    with contextlib.suppress(AddressError):
        parse_path(text, allow_null=True, utf8=True, allow_postmaster=True)
