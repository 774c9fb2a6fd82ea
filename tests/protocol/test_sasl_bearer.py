"""The client side of the bearer-token SASL mechanisms (protocol/sasl.py): XOAUTH2 and OAUTHBEARER (RFC 7628)
initial responses, and the server's base64 JSON error challenge."""

from __future__ import annotations

import base64

import pytest

from smtpsvc.protocol import SaslError, sasl

TOKEN = "eyJ0eXAiOiJKV1Qi.eyJhdWQiOiJodHRwcyJ9.c2lnbmF0dXJl-_~+/="


def raw(encoded: str) -> bytes:
    return base64.b64decode(encoded, validate=True)


@pytest.mark.parametrize(
    ("user", "token", "expected"),
    [
        ("relay@contoso.com", "abc", b"user=relay@contoso.com\x01auth=Bearer abc\x01\x01"),
        ("someuser@example.com", "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg", (
            b"user=someuser@example.com\x01auth=Bearer ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg\x01\x01"
        )),
        ("r@contoso.com", TOKEN, b"user=r@contoso.com\x01auth=Bearer " + TOKEN.encode() + b"\x01\x01"),
    ],
)  # fmt: skip
def test_xoauth2_initial_response(user: str, token: str, expected: bytes) -> None:
    assert raw(sasl.encode_xoauth2(user, token)) == expected


def test_xoauth2_matches_googles_documented_example() -> None:
    # https://developers.google.com/gmail/imap/xoauth2-protocol: the base64 string of its example
    assert sasl.encode_xoauth2("someuser@example.com", "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg") == (
        "dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5LnZGOWRmdDRxbVRjMk52YjNSbGNrQmhkSFJoZG1semRH"
        "RXVZMjl0Q2cBAQ=="
    )


@pytest.mark.parametrize(
    ("user", "host", "port", "expected"),
    [
        ("user@example.com", "server.example.com", 587,
         b"n,a=user@example.com,\x01host=server.example.com\x01port=587\x01auth=Bearer abc\x01\x01"),
        ("a,b=c@example.com", "smtp.gmail.com", 465,  # RFC 5801 escapes in the authzid
         b"n,a=a=2Cb=3Dc@example.com,\x01host=smtp.gmail.com\x01port=465\x01auth=Bearer abc\x01\x01"),
    ],
)  # fmt: skip
def test_oauthbearer_initial_response(user: str, host: str, port: int, expected: bytes) -> None:
    assert raw(sasl.encode_oauthbearer(user, "abc", host, port)) == expected


@pytest.mark.parametrize(
    ("user", "token"),
    [("relay@contoso.com", ""), ("relay@contoso.com", "a b"), ("relay@contoso.com", "a\x01b"), ("", "abc"),
     ("re\x01lay@contoso.com", "abc")],
)  # fmt: skip
def test_bearer_encoders_refuse_what_would_break_the_framing(user: str, token: str) -> None:
    with pytest.raises(ValueError) as caught:
        sasl.encode_xoauth2(user, token)
    assert token not in str(caught.value) or not token  # a refused token is never echoed


def test_the_answers_to_an_error_challenge_are_an_empty_line_and_a_control_a() -> None:
    assert sasl.XOAUTH2_ERROR_ANSWER == ""
    assert raw(sasl.OAUTHBEARER_ERROR_ANSWER) == b"\x01"


@pytest.mark.parametrize(
    ("challenge", "expected"),
    [
        ('{"status":"401","schemes":"bearer","scope":"https://mail.google.com/"}',
         sasl.BearerError("401", "https://mail.google.com/", "bearer")),
        ('{"status":"invalid_token","schemes":"bearer"}', sasl.BearerError("invalid_token", "", "bearer")),
        ("{}", sasl.BearerError("")),
    ],
)  # fmt: skip
def test_decode_bearer_error(challenge: str, expected: sasl.BearerError) -> None:
    assert sasl.decode_bearer_error(base64.b64encode(challenge.encode()).decode()) == expected


@pytest.mark.parametrize("challenge", ["not base64!", base64.b64encode(b"not json").decode(), "WzFd"])
def test_decode_bearer_error_refuses_anything_else(challenge: str) -> None:
    with pytest.raises(SaslError):
        sasl.decode_bearer_error(challenge)


def test_a_bearer_error_describes_itself_without_secrets() -> None:
    error = sasl.BearerError("401", "https://outlook.office365.com/.default")
    assert (
        error.describe()
        == "the server refused the token (status 401, scope https://outlook.office365.com/.default)"
    )
