"""The SASL PLAIN/LOGIN helpers (sasl.py): strict base64, PLAIN decoding, client-side encoding."""

from __future__ import annotations

import base64

import pytest

from smtpsvc.protocol import SaslError, sasl


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def test_login_challenges_are_username_and_password_in_base64() -> None:
    assert base64.b64decode(sasl.LOGIN_USERNAME_CHALLENGE) == b"Username:"
    assert base64.b64decode(sasl.LOGIN_PASSWORD_CHALLENGE) == b"Password:"


def test_sasl_error_is_a_value_error() -> None:
    assert issubclass(SaslError, ValueError)


@pytest.mark.parametrize(("text", "raw"), [("", b""), ("YQ==", b"a"), ("YWI=", b"ab"), ("YWJj", b"abc")])
def test_b64decode_strict_decodes_padded_base64(text: str, raw: bytes) -> None:
    assert sasl.b64decode_strict(text) == raw


@pytest.mark.parametrize("text", ["YQ", "YQ=", "Y", "YW Jj", "YWJj\n", "YW*j", "YQ==YQ==", "=", "YWJj=", "é"])
def test_b64decode_strict_refuses_anything_else(text: str) -> None:
    with pytest.raises(SaslError):
        sasl.b64decode_strict(text)


def test_decode_plain_gives_authzid_authcid_password() -> None:
    assert sasl.decode_plain(b64(b"admin\0alice\0secret")) == ("admin", "alice", "secret")


def test_decode_plain_without_authzid() -> None:
    assert sasl.decode_plain(b64(b"\0alice\0secret")) == ("", "alice", "secret")


def test_decode_plain_keeps_utf8() -> None:
    assert sasl.decode_plain(b64("\0jösé\0pässword".encode())) == ("", "jösé", "pässword")


@pytest.mark.parametrize(
    "raw",
    [b"alice\0secret", b"\0alice\0secret\0", b"alicesecret", b"\0\0secret", b"\0alice\0", b"\0al\xffice\0pw"],
)
def test_decode_plain_refuses_wrong_shapes(raw: bytes) -> None:
    with pytest.raises(SaslError):
        sasl.decode_plain(b64(raw))


def test_decode_plain_refuses_bad_base64() -> None:
    with pytest.raises(SaslError):
        sasl.decode_plain("not base64!")


def test_decode_plain_error_does_not_carry_the_password() -> None:
    with pytest.raises(SaslError) as info:
        sasl.decode_plain(b64(b"\0alice\0hunter2\0"))
    assert "hunter2" not in str(info.value)


def test_decode_login() -> None:
    assert sasl.decode_login("YWxpY2U=") == "alice"
    with pytest.raises(SaslError):
        sasl.decode_login(b64(b"al\0ice"))
    with pytest.raises(SaslError):
        sasl.decode_login(b64(b"\xff"))


def test_encode_plain_round_trips() -> None:
    assert sasl.encode_plain("alice", "secret") == "AGFsaWNlAHNlY3JldA=="
    assert sasl.decode_plain(sasl.encode_plain("jösé", "pw", authzid="admin")) == ("admin", "jösé", "pw")


@pytest.mark.parametrize(("user", "password"), [("a\0b", "pw"), ("alice", "p\0w"), ("", "pw"), ("alice", "")])
def test_encode_plain_refuses_what_cannot_be_sent(user: str, password: str) -> None:
    with pytest.raises(ValueError):
        sasl.encode_plain(user, password)


def test_encode_login() -> None:
    assert sasl.encode_login("alice") == "YWxpY2U="
    assert sasl.decode_login(sasl.encode_login("pässword")) == "pässword"
