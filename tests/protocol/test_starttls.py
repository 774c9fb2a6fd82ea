"""STARTTLS (RFC 3207) in ServerConnection: refusals, the plaintext-injection defence, the session restart."""

from __future__ import annotations

import pytest

from smtpsvc.protocol import (
    NEED_DATA,
    ConnectionClosed,
    LocalProtocolError,
    Mail,
    Noop,
    Rejected,
    ServerConnection,
    ServerOptions,
    ServerState,
    StartTls,
)
from smtpsvc.protocol import replies as R

from .drive import Session, greeted, one, rejected

TLS = ServerOptions(starttls=True)


def awaiting_handshake(data: bytes = b"STARTTLS\r\n") -> Session:
    """Greeted with EHLO, STARTTLS answered 220, the handshake not done yet."""
    s = greeted(TLS)
    s.handshake = False
    s.feed(data)
    assert s.conn.state is ServerState.TLS
    return s


def test_starttls_becomes_an_event() -> None:
    s = greeted(TLS)
    assert one(s.feed(b"STARTTLS\r\n", answer=False)) == StartTls()


def test_starttls_is_allowed_before_ehlo() -> None:
    s = Session.start(TLS)
    assert one(s.feed(b"STARTTLS\r\n", answer=False)) == StartTls()


def test_starttls_when_switched_off_is_502() -> None:
    r = rejected(greeted().feed(b"STARTTLS\r\n"))
    assert r.reply == R.NOT_IMPLEMENTED
    assert str(r.reply) == "502 5.5.1 Command not implemented"


def test_starttls_with_an_argument_is_501() -> None:
    assert rejected(greeted(TLS).feed(b"STARTTLS now\r\n")).reply.code == 501


@pytest.mark.parametrize("rcpt", [b"", b"RCPT TO:<b@example.com>\r\n"])
def test_starttls_inside_a_transaction_is_503(rcpt: bytes) -> None:
    s = greeted(TLS)
    s.feed(b"MAIL FROM:<a@example.org>\r\n" + rcpt)
    assert rejected(s.feed(b"STARTTLS\r\n")).reply == R.BAD_SEQUENCE


def test_starttls_when_already_in_tls_is_503() -> None:
    s = greeted(TLS)
    s.feed(b"STARTTLS\r\n")
    s.feed(b"EHLO again\r\n")
    assert s.conn.tls
    r = rejected(s.feed(b"STARTTLS\r\n"))
    assert r.reply == R.TLS_ACTIVE
    assert str(r.reply) == "503 5.5.1 TLS already active"


def test_220_waits_for_the_handshake() -> None:
    s = awaiting_handshake()
    assert s.replies()[-1] == "220 2.0.0 Ready to start TLS"
    assert s.conn.next_event() is NEED_DATA
    assert not s.conn.tls


def test_commands_pipelined_after_starttls_are_discarded() -> None:
    # CVE-2011-0411: plaintext injected behind STARTTLS must never run inside the TLS session.
    s = greeted(TLS)
    s.handshake = False
    s.feed(b"STARTTLS\r\nMAIL FROM:<x@y>\r\n")
    assert s.conn.buffered == 0
    s.conn.tls_established()
    s.feed(b"EHLO client.test\r\n")
    s.feed(b"")
    assert not any(isinstance(e, Mail) for e in s.events)
    assert s.events[-1] == ConnectionClosed()


def test_bytes_received_before_the_handshake_completes_are_discarded() -> None:
    s = awaiting_handshake()
    s.feed(b"MAIL FROM:<x@y>\r\n")
    assert s.conn.buffered == 0
    s.conn.tls_established()
    s.feed(b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\n")
    assert [type(e).__name__ for e in s.events[-2:]] == ["Ehlo", "Mail"]
    assert [e for e in s.events if isinstance(e, Mail)] == [Mail("a@example.org", {})]


def test_a_half_line_injected_before_the_220_does_not_join_the_next_command() -> None:
    s = greeted(TLS)
    s.handshake = False
    s.feed(b"STARTTLS\r\nRCPT TO:<x@")
    s.conn.tls_established()
    events = s.feed(b"EHLO c\r\n")
    assert [type(e).__name__ for e in events] == ["Ehlo"]


def test_tls_established_restarts_the_session_at_ehlo() -> None:
    s = greeted(TLS)
    s.feed(b"STARTTLS\r\n")
    assert s.conn.tls
    assert s.conn.state is ServerState.READY
    assert not s.conn.esmtp
    assert rejected(s.feed(b"MAIL FROM:<a@example.org>\r\n")).reply == R.NEED_HELO


def test_tls_established_forgets_the_authentication() -> None:
    opts = ServerOptions(starttls=True, auth_mechanisms=("PLAIN",), auth_plaintext_allowed=True)
    s = greeted(opts)
    s.feed(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n")
    assert s.conn.authenticated
    s.feed(b"STARTTLS\r\n")
    assert not s.conn.authenticated


def test_tls_established_without_a_220_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        greeted(TLS).conn.tls_established()


def test_refused_starttls_keeps_the_pipelined_commands() -> None:
    s = greeted(TLS)
    s.conn.receive_data(b"STARTTLS\r\nNOOP\r\n")
    assert s.conn.next_event() == StartTls()
    s.conn.send(R.TLS_NOT_AVAILABLE)
    assert s.conn.state is ServerState.GREETED
    assert s.conn.next_event() == Noop()


def test_eof_while_waiting_for_the_handshake_closes() -> None:
    s = awaiting_handshake()
    assert s.feed(b"") == [ConnectionClosed()]


def test_starttls_keyword_is_advertised_until_tls_is_active() -> None:
    conn = ServerConnection(TLS)
    assert "STARTTLS" in conn.ehlo_keywords()
    s = greeted(TLS)
    s.feed(b"STARTTLS\r\n")
    assert "STARTTLS" not in s.conn.ehlo_keywords()


def test_starttls_keyword_is_absent_when_switched_off() -> None:
    assert "STARTTLS" not in ServerConnection().ehlo_keywords()


def test_421_during_the_handshake_wait_closes() -> None:
    s = awaiting_handshake()
    s.conn.send(R.SHUTTING_DOWN)
    assert s.conn.state is ServerState.CLOSED


def test_starttls_after_refused_banner_is_503_no_service() -> None:
    conn = ServerConnection(TLS)
    conn.greeting(R.Reply(554, "5.3.2", "no service"))
    conn.receive_data(b"STARTTLS\r\n")
    event = conn.next_event()
    assert isinstance(event, Rejected)
    assert event.reply == R.NO_SERVICE
