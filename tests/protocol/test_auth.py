"""AUTH (RFC 4954) in ServerConnection: the core's refusals, the 334 exchange, limits and redaction."""

from __future__ import annotations

import pytest

from smtpsvc.protocol import (
    Auth,
    AuthResponse,
    ConnectionClosed,
    Ehlo,
    LocalProtocolError,
    Noop,
    Rejected,
    ServerConnection,
    ServerOptions,
    ServerState,
)
from smtpsvc.protocol import replies as R

from .drive import Session, greeted, one, rejected

PLAIN_OK = b"AGFsaWNlAHNlY3JldA=="  # "\0alice\0secret"
PLAIN_BAD = b"AGFsaWNlAHdyb25n"  # "\0alice\0wrong"
USER_B64, PASSWORD_B64 = b"YWxpY2U=", b"c2VjcmV0"  # "alice", "secret"

AUTH = ServerOptions(auth_mechanisms=("PLAIN", "LOGIN"), auth_plaintext_allowed=True)


def authed(options: ServerOptions = AUTH) -> Session:
    s = greeted(options)
    s.feed(b"AUTH PLAIN " + PLAIN_OK + b"\r\n")
    assert s.conn.authenticated
    return s


# --- The exchange ------------------------------------------------------------------------------------------


def test_auth_plain_with_initial_response_authenticates() -> None:
    s = greeted(AUTH)
    assert s.feed(b"AUTH PLAIN " + PLAIN_OK + b"\r\n") == [Auth("PLAIN", PLAIN_OK.decode())]
    assert s.replies()[-1] == "235 2.7.0 Authentication successful"
    assert s.conn.authenticated
    assert s.conn.state is ServerState.GREETED


def test_auth_plain_without_initial_response_gets_a_challenge_then_the_response() -> None:
    s = greeted(AUTH)
    assert s.feed(b"AUTH PLAIN\r\n") == [Auth("PLAIN", None)]
    assert s.replies()[-1] == "334 "
    assert s.conn.state is ServerState.AUTH
    assert s.feed(PLAIN_OK + b"\r\n") == [AuthResponse(PLAIN_OK.decode())]
    assert s.conn.authenticated
    assert s.conn.state is ServerState.GREETED


def test_auth_login_takes_two_steps() -> None:
    s = greeted(AUTH)
    s.feed(b"AUTH LOGIN\r\n")
    assert s.replies()[-1] == "334 VXNlcm5hbWU6"
    assert s.feed(USER_B64 + b"\r\n") == [AuthResponse(USER_B64.decode())]
    assert s.replies()[-1] == "334 UGFzc3dvcmQ6"
    assert s.conn.state is ServerState.AUTH
    assert s.feed(PASSWORD_B64 + b"\r\n") == [AuthResponse(PASSWORD_B64.decode())]
    assert s.replies()[-1] == "235 2.7.0 Authentication successful"
    assert s.conn.authenticated


def test_auth_login_with_the_user_name_as_initial_response() -> None:
    s = greeted(AUTH)
    s.feed(b"AUTH LOGIN " + USER_B64 + b"\r\n")
    assert s.replies()[-1] == "334 UGFzc3dvcmQ6"
    s.feed(PASSWORD_B64 + b"\r\n")
    assert s.conn.authenticated


def test_pipelined_auth_response_is_read_after_the_334() -> None:
    s = greeted(AUTH)
    s.feed(b"AUTH LOGIN\r\n" + USER_B64 + b"\r\n" + PASSWORD_B64 + b"\r\nNOOP\r\n")
    assert s.conn.authenticated
    assert s.events[-1] == Noop()


def test_mechanism_is_upper_cased() -> None:
    assert one(greeted(AUTH).feed(b"auth plain\r\n", answer=False)) == Auth("PLAIN", None)


def test_equals_sign_is_an_empty_initial_response() -> None:
    assert one(greeted(AUTH).feed(b"AUTH PLAIN =\r\n", answer=False)) == Auth("PLAIN", "")


def test_star_cancels_the_exchange() -> None:
    s = greeted(AUTH)
    s.feed(b"AUTH LOGIN\r\n")
    event = one(s.feed(b"*\r\n"))
    assert isinstance(event, AuthResponse)
    assert event.cancelled
    assert s.replies()[-1] == "501 5.0.0 Authentication cancelled"
    assert not s.conn.authenticated
    assert s.conn.state is ServerState.GREETED


def test_wrong_credentials_are_535_and_not_authenticated() -> None:
    s = greeted(AUTH)
    s.feed(b"AUTH PLAIN " + PLAIN_BAD + b"\r\n")
    assert s.replies()[-1] == "535 5.7.8 Authentication credentials invalid"
    assert not s.conn.authenticated
    assert s.conn.state is ServerState.GREETED


def test_auth_may_be_tried_again_after_a_failure() -> None:
    s = greeted(AUTH)
    s.feed(b"AUTH PLAIN " + PLAIN_BAD + b"\r\n")
    s.feed(b"AUTH PLAIN " + PLAIN_OK + b"\r\n")
    assert s.conn.authenticated


@pytest.mark.parametrize("reply", [R.AUTH_TEMP_FAILURE, R.AUTH_BAD_RESPONSE, R.AUTH_FAILED])
def test_any_reply_but_334_ends_the_exchange(reply: R.Reply) -> None:
    s = greeted(AUTH)
    s.feed(b"AUTH LOGIN\r\n")
    s.conn.receive_data(USER_B64 + b"\r\nNOOP\r\n")
    assert isinstance(s.conn.next_event(), AuthResponse)
    s.conn.send(reply)
    assert s.conn.state is ServerState.GREETED
    assert not s.conn.authenticated
    assert s.conn.next_event() == Noop()


def test_lines_in_the_exchange_are_not_commands() -> None:
    s = greeted(AUTH)
    s.feed(b"AUTH PLAIN\r\n")
    assert one(s.feed(b"QUIT\r\n", answer=False)) == AuthResponse("QUIT")


def test_421_during_the_exchange_closes() -> None:
    s = greeted(AUTH)
    s.feed(b"AUTH LOGIN\r\n")
    s.conn.send(R.AUTH_TOO_MANY_FAILURES)
    assert s.conn.state is ServerState.CLOSED


def test_eof_during_the_exchange_closes() -> None:
    s = greeted(AUTH)
    s.feed(b"AUTH LOGIN\r\n")
    assert s.feed(b"") == [ConnectionClosed()]


def test_authentication_survives_rset_and_ehlo() -> None:
    s = authed()
    s.feed(b"RSET\r\nEHLO again\r\n")
    assert s.conn.authenticated


# --- Limits ------------------------------------------------------------------------------------------------


def test_too_long_response_line_is_500_5_5_6_and_ends_the_exchange() -> None:
    s = greeted(ServerOptions(auth_mechanisms=("LOGIN",), auth_plaintext_allowed=True, max_auth_line=100))
    s.feed(b"AUTH LOGIN\r\n")
    r = rejected(s.feed(b"A" * 99 + b"\r\n"))
    assert str(r.reply) == "500 5.5.6 Authentication Exchange line is too long"
    assert r.verb == "AUTH"
    assert s.conn.state is ServerState.GREETED
    assert one(s.feed(b"NOOP\r\n")) == Noop()


def test_response_line_at_the_limit_is_accepted() -> None:
    s = greeted(ServerOptions(auth_mechanisms=("LOGIN",), auth_plaintext_allowed=True, max_auth_line=100))
    s.feed(b"AUTH LOGIN\r\n")
    assert one(s.feed(b"A" * 98 + b"\r\n", answer=False)) == AuthResponse("A" * 98)


def test_default_response_limit_is_12288_octets() -> None:
    assert ServerOptions().max_auth_line == 12288
    s = greeted(AUTH)
    s.feed(b"AUTH LOGIN\r\n")
    assert isinstance(one(s.feed(b"A" * 12286 + b"\r\n", answer=False)), AuthResponse)


def test_too_long_response_trickled_keeps_the_buffer_bounded() -> None:
    s = greeted(ServerOptions(auth_mechanisms=("LOGIN",), auth_plaintext_allowed=True, max_auth_line=100))
    s.feed(b"AUTH LOGIN\r\n")
    for _ in range(50):
        assert s.feed(b"B" * 40) == []
        assert s.conn.buffered <= 100
    assert rejected(s.feed(b"\r\n")).reply == R.AUTH_LINE_TOO_LONG


def test_auth_command_may_carry_a_long_initial_response() -> None:
    s = greeted(AUTH)
    event = one(s.feed(b"AUTH PLAIN " + b"A" * 4000 + b"\r\n", answer=False))
    assert event == Auth("PLAIN", "A" * 4000)


@pytest.mark.parametrize("junk", [b"YWx\x00pY2U=", b"\xffYWxpY2U=", b"YW\tx"])
def test_response_with_control_or_non_ascii_bytes_is_501(junk: bytes) -> None:
    s = greeted(AUTH)
    s.feed(b"AUTH LOGIN\r\n")
    r = rejected(s.feed(junk + b"\r\n"))
    assert str(r.reply) == "501 5.5.2 Cannot decode response"
    assert r.verb == "AUTH"
    assert s.conn.state is ServerState.GREETED


# --- Refusals by the core ----------------------------------------------------------------------------------


def test_auth_without_mechanisms_is_502() -> None:
    assert rejected(greeted().feed(b"AUTH PLAIN\r\n")).reply == R.NOT_IMPLEMENTED


def test_auth_before_ehlo_is_503() -> None:
    r = rejected(Session.start(AUTH).feed(b"AUTH PLAIN\r\n"))
    assert r.reply.code == 503


def test_auth_after_helo_is_503() -> None:
    s = greeted(AUTH, hello=b"HELO client.test\r\n")
    assert rejected(s.feed(b"AUTH PLAIN\r\n")).reply == R.BAD_SEQUENCE


def test_auth_when_already_authenticated_is_503() -> None:
    r = rejected(authed().feed(b"AUTH PLAIN " + PLAIN_OK + b"\r\n"))
    assert str(r.reply) == "503 5.5.1 Already authenticated"


@pytest.mark.parametrize("rcpt", [b"", b"RCPT TO:<b@example.com>\r\n"])
def test_auth_inside_a_transaction_is_503(rcpt: bytes) -> None:
    s = greeted(AUTH)
    s.feed(b"MAIL FROM:<a@example.org>\r\n" + rcpt)
    assert rejected(s.feed(b"AUTH PLAIN\r\n")).reply == R.BAD_SEQUENCE


def test_unknown_mechanism_is_504() -> None:
    r = rejected(greeted(AUTH).feed(b"AUTH CRAM-MD5\r\n"))
    assert str(r.reply) == "504 5.5.4 Unrecognized authentication type"


@pytest.mark.parametrize("line", [b"AUTH\r\n", b"AUTH PLAIN a b\r\n", b"AUTH PL@IN\r\n"])
def test_malformed_auth_is_501(line: bytes) -> None:
    assert rejected(greeted(AUTH).feed(line)).reply == R.SYNTAX


def test_auth_without_tls_is_538_when_encryption_is_required() -> None:
    opts = ServerOptions(auth_mechanisms=("PLAIN",))
    r = rejected(greeted(opts).feed(b"AUTH PLAIN " + PLAIN_OK + b"\r\n"))
    assert str(r.reply) == "538 5.7.11 Encryption required for requested authentication mechanism"


def test_auth_without_tls_is_allowed_when_plaintext_is_allowed() -> None:
    assert authed(ServerOptions(auth_mechanisms=("PLAIN",), auth_plaintext_allowed=True)).conn.authenticated


def test_auth_without_tls_is_allowed_when_tls_is_not_required_for_it() -> None:
    assert authed(ServerOptions(auth_mechanisms=("PLAIN",), auth_requires_tls=False)).conn.authenticated


def test_auth_inside_tls_needs_no_plaintext_permission() -> None:
    s = greeted(ServerOptions(auth_mechanisms=("PLAIN",), starttls=True))
    s.feed(b"STARTTLS\r\n")
    s.feed(b"EHLO again\r\n")
    s.feed(b"AUTH PLAIN " + PLAIN_OK + b"\r\n")
    assert s.conn.authenticated


def test_mechanism_options_are_normalised_and_checked() -> None:
    assert ServerOptions(auth_mechanisms=("plain",)).auth_mechanisms == ("PLAIN",)
    with pytest.raises(ValueError):
        ServerOptions(auth_mechanisms=("NOT A MECH",))


# --- Credentials never show --------------------------------------------------------------------------------


def test_auth_repr_redacts_the_initial_response() -> None:
    event = Auth("PLAIN", PLAIN_OK.decode())
    assert PLAIN_OK.decode() not in repr(event)
    assert PLAIN_OK.decode() not in str(event)
    assert repr(event) == "Auth(mechanism='PLAIN', initial=<redacted>)"
    assert repr(Auth("LOGIN")) == "Auth(mechanism='LOGIN', initial=None)"


def test_auth_response_repr_redacts_the_data() -> None:
    event = AuthResponse(PASSWORD_B64.decode())
    assert PASSWORD_B64.decode() not in repr(event)
    assert PASSWORD_B64.decode() not in str(event)
    assert PASSWORD_B64.decode() not in repr([event])
    assert repr(event) == "AuthResponse(data=<redacted>)"


def test_redacted_events_still_compare_by_value() -> None:
    assert AuthResponse("a") == AuthResponse("a") != AuthResponse("b")
    assert Auth("PLAIN", "x") != Auth("PLAIN", "y")


def test_owed_reply_error_does_not_leak_credentials() -> None:
    conn = ServerConnection(AUTH)
    conn.greeting(R.GREETING("mx.test"))
    conn.receive_data(b"EHLO c\r\nAUTH PLAIN " + PLAIN_OK + b"\r\n")
    assert isinstance(conn.next_event(), Ehlo)
    conn.send(R.EHLO_REPLY("mx.test", "192.0.2.1", conn.ehlo_keywords()))
    assert isinstance(conn.next_event(), Auth)
    with pytest.raises(LocalProtocolError) as info:
        conn.next_event()
    assert PLAIN_OK.decode() not in str(info.value)


def test_rejected_auth_line_never_names_its_content() -> None:
    s = greeted(ServerOptions(auth_mechanisms=("LOGIN",), auth_plaintext_allowed=True, max_auth_line=20))
    s.feed(b"AUTH LOGIN\r\n")
    r = rejected(s.feed(b"SECRETWORD" * 5 + b"\r\n"))
    assert isinstance(r, Rejected)
    assert "SECRET" not in repr(r)
