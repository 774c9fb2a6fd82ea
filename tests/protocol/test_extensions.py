"""EHLO keywords by options and session state, require_tls, ETRN, VRFY, XEXCH50 and X-LINK2STATE."""

from __future__ import annotations

import pytest

from smtpsvc.protocol import (
    Etrn,
    Noop,
    ServerConnection,
    ServerOptions,
    ServerState,
    Vrfy,
    Xexch50,
    Xexch50Blob,
    XLink2State,
)
from smtpsvc.protocol import replies as R

from .drive import Session, greeted, in_transaction, one, rejected

PLAIN_OK = b"AGFsaWNlAHNlY3JldA=="  # "\0alice\0secret"


# --- EHLO keywords -----------------------------------------------------------------------------------------

EVERYTHING = ServerOptions(
    starttls=True,
    auth_mechanisms=("PLAIN", "LOGIN"),
    chunking=True,
    binarymime=True,
    etrn=True,
    vrfy=True,
    xexch50=True,
    x_link2state=True,
)


def test_new_options_default_to_off() -> None:
    opts = ServerOptions()
    assert not (opts.starttls or opts.require_tls or opts.auth_mechanisms or opts.chunking or opts.binarymime)
    assert not (opts.etrn or opts.vrfy or opts.xexch50 or opts.x_link2state or opts.auth_plaintext_allowed)
    assert opts.auth_requires_tls
    assert opts.xexch50_max == 1_048_576


def test_every_keyword_in_order_before_tls() -> None:
    assert ServerConnection(EVERYTHING).ehlo_keywords() == [
        "PIPELINING",
        "SIZE",
        "8BITMIME",
        "SMTPUTF8",
        "DSN",
        "ENHANCEDSTATUSCODES",
        "STARTTLS",
        "CHUNKING",
        "BINARYMIME",
        "ETRN",
        "VRFY",
        "XEXCH50",
        "X-LINK2STATE",
        "HELP",
    ]


def test_auth_is_advertised_inside_tls_and_starttls_no_more() -> None:
    s = greeted(EVERYTHING)
    s.feed(b"STARTTLS\r\n")
    keywords = s.conn.ehlo_keywords()
    assert "AUTH PLAIN LOGIN" in keywords
    assert "STARTTLS" not in keywords


def test_auth_is_advertised_without_tls_when_plaintext_is_allowed() -> None:
    opts = ServerOptions(auth_mechanisms=("PLAIN", "LOGIN"), auth_plaintext_allowed=True)
    assert "AUTH PLAIN LOGIN" in ServerConnection(opts).ehlo_keywords()


def test_auth_is_advertised_without_tls_when_tls_is_not_required_for_it() -> None:
    opts = ServerOptions(auth_mechanisms=("LOGIN",), auth_requires_tls=False)
    assert "AUTH LOGIN" in ServerConnection(opts).ehlo_keywords()


def test_auth_is_not_advertised_without_mechanisms() -> None:
    assert not any(
        k.startswith("AUTH") for k in ServerConnection(ServerOptions(starttls=True)).ehlo_keywords()
    )


def test_xexch50_is_advertised_before_and_after_authentication() -> None:
    # Exchange 2000/2003 lists XEXCH50 to anonymous clients too (KB279616's telnet check looks for it)
    opts = ServerOptions(auth_mechanisms=("PLAIN",), auth_plaintext_allowed=True, xexch50=True)
    s = greeted(opts)
    assert "XEXCH50" in s.conn.ehlo_keywords()
    s.feed(b"AUTH PLAIN " + PLAIN_OK + b"\r\n")
    keywords = s.conn.ehlo_keywords()
    assert "XEXCH50" in keywords
    assert not any(k.startswith("AUTH") for k in keywords)


def test_vrfy_keyword_only_when_on() -> None:
    assert "VRFY" in ServerConnection(ServerOptions(vrfy=True)).ehlo_keywords()
    assert "VRFY" not in ServerConnection().ehlo_keywords()


def test_vrfy_stays_an_event_whatever_the_option() -> None:
    assert one(greeted().feed(b"VRFY bob\r\n")) == Vrfy("bob")


def test_default_keywords_are_unchanged() -> None:
    assert ServerConnection().ehlo_keywords() == [
        "PIPELINING",
        "SIZE",
        "8BITMIME",
        "SMTPUTF8",
        "DSN",
        "ENHANCEDSTATUSCODES",
        "HELP",
    ]


@pytest.mark.parametrize("name", ["xexch50_max", "max_auth_line"])
def test_options_refuse_unusable_new_limits(name: str) -> None:
    with pytest.raises(ValueError):
        ServerOptions(**{name: 0})  # type: ignore[arg-type]


# --- require_tls -------------------------------------------------------------------------------------------

REQUIRE = ServerOptions(
    starttls=True,
    require_tls=True,
    auth_mechanisms=("PLAIN",),
    chunking=True,
    etrn=True,
    xexch50=True,
)


@pytest.mark.parametrize(
    "line",
    [
        b"MAIL FROM:<a@example.org>\r\n",
        b"RCPT TO:<b@example.com>\r\n",
        b"DATA\r\n",
        b"AUTH PLAIN\r\n",
        b"ETRN example.com\r\n",
        b"VRFY bob\r\n",
        b"EXPN staff\r\n",
        b"XEXCH50 10 2\r\n",
    ],
)
def test_commands_before_starttls_are_530_when_tls_is_required(line: bytes) -> None:
    r = rejected(greeted(REQUIRE).feed(line))
    assert str(r.reply) == "530 5.7.0 Must issue a STARTTLS command first"


def test_bdat_before_starttls_drains_its_octets_then_530() -> None:
    events = greeted(REQUIRE).feed(b"BDAT 6\r\nQUIT\r\nNOOP\r\n")
    assert rejected(events[:1]).reply == R.MUST_STARTTLS
    assert events[1:] == [Noop()]


@pytest.mark.parametrize(
    "line", [b"EHLO c\r\n", b"HELO c\r\n", b"NOOP\r\n", b"RSET\r\n", b"HELP\r\n", b"QUIT\r\n"]
)
def test_session_commands_are_allowed_before_starttls(line: bytes) -> None:
    event = greeted(REQUIRE).feed(line)[0]
    assert type(event).__name__ != "Rejected"


def test_starttls_is_allowed_when_tls_is_required() -> None:
    s = greeted(REQUIRE)
    s.feed(b"STARTTLS\r\n")
    assert s.conn.tls


def test_mail_is_accepted_inside_tls_when_tls_is_required() -> None:
    s = greeted(REQUIRE)
    s.feed(b"STARTTLS\r\n")
    s.feed(b"EHLO again\r\nMAIL FROM:<a@example.org>\r\n")
    assert s.conn.state is ServerState.MAIL


def test_require_tls_without_tls_does_not_outrank_no_service() -> None:
    conn = ServerConnection(REQUIRE)
    conn.greeting(R.Reply(554, "5.3.2", "no service"))
    conn.receive_data(b"MAIL FROM:<a@example.org>\r\n")
    event = conn.next_event()
    assert getattr(event, "reply", None) == R.NO_SERVICE


# --- ETRN --------------------------------------------------------------------------------------------------

ETRN = ServerOptions(etrn=True)


@pytest.mark.parametrize("arg", ["example.com", "@example.com", "#queue-1", "mail.example.co.uk"])
def test_etrn_becomes_an_event(arg: str) -> None:
    s = greeted(ETRN)
    assert one(s.feed(b"ETRN " + arg.encode() + b"\r\n")) == Etrn(arg)
    assert s.replies()[-1] == f"250 2.0.0 Queuing for node {arg} started"


def test_etrn_when_switched_off_is_502() -> None:
    assert rejected(greeted().feed(b"ETRN example.com\r\n")).reply == R.NOT_IMPLEMENTED


@pytest.mark.parametrize(
    "line", [b"ETRN\r\n", b"ETRN @\r\n", b"ETRN #\r\n", b"ETRN exa mple.com\r\n", b"ETRN -bad-.com\r\n"]
)
def test_etrn_with_a_missing_or_invalid_argument_is_501(line: bytes) -> None:
    r = rejected(greeted(ETRN).feed(line))
    assert str(r.reply) == "501 5.5.2 Syntax error in parameters or arguments"


@pytest.mark.parametrize("rcpt", [b"", b"RCPT TO:<b@example.com>\r\n"])
def test_etrn_inside_a_transaction_is_503(rcpt: bytes) -> None:
    s = greeted(ETRN)
    s.feed(b"MAIL FROM:<a@example.org>\r\n" + rcpt)
    assert rejected(s.feed(b"ETRN example.com\r\n")).reply.code == 503


def test_etrn_before_hello_is_503() -> None:
    assert rejected(Session.start(ETRN).feed(b"ETRN example.com\r\n")).reply == R.NEED_HELO


def test_etrn_keyword_only_when_on() -> None:
    assert "ETRN" in ServerConnection(ETRN).ehlo_keywords()
    assert "ETRN" not in ServerConnection().ehlo_keywords()


# --- XEXCH50 -----------------------------------------------------------------------------------------------

EXCH = ServerOptions(xexch50=True, auth_mechanisms=("PLAIN",), auth_plaintext_allowed=True, xexch50_max=100)


def exchange_peer() -> Session:
    """Authenticated, inside a transaction with one accepted RCPT."""
    s = greeted(EXCH)
    s.feed(b"AUTH PLAIN " + PLAIN_OK + b"\r\n")
    s.feed(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\n")
    return s


def test_xexch50_becomes_an_event() -> None:
    s = exchange_peer()
    assert one(s.feed(b"XEXCH50 4 2\r\n", answer=False)) == Xexch50(4, 2)


def test_xexch50_blob_is_read_exactly() -> None:
    blob = b"\r\n.\r\nQUIT\r\n\x00\xff"
    s = exchange_peer()
    s.feed(b"XEXCH50 %d 2\r\n" % len(blob))
    assert s.replies()[-1] == "354 Send binary data"
    assert s.conn.state is ServerState.XEXCH50
    events = s.feed(blob + b"NOOP\r\n")
    assert events == [Xexch50Blob(blob), Noop()]
    assert s.replies()[-2] == "250 2.0.0 OK"
    assert s.conn.state is ServerState.RCPT


def test_xexch50_blob_split_across_reads() -> None:
    s = exchange_peer()
    s.feed(b"XEXCH50 6 2\r\n")
    assert s.feed(b"ab") == []
    assert s.conn.buffered == 0
    assert s.feed(b"cd") == []
    assert s.feed(b"efDATA\r\n")[0] == Xexch50Blob(b"abcdef")


def test_xexch50_blob_then_data_completes_the_transaction() -> None:
    s = exchange_peer()
    s.feed(b"XEXCH50 2 2\r\n")
    s.feed(b"xyDATA\r\nhello\r\n.\r\n")
    assert s.content() == b"hello\r\n"
    assert s.conn.state is ServerState.GREETED


def test_eof_inside_the_blob_closes() -> None:
    s = exchange_peer()
    s.feed(b"XEXCH50 6 2\r\nabc")
    assert [type(e).__name__ for e in s.feed(b"")] == ["ConnectionClosed"]


def test_unauthenticated_xexch50_is_answered_504_by_the_app_and_reads_no_blob() -> None:
    s = in_transaction(EXCH)
    s.feed(b"XEXCH50 4 2\r\n")
    assert s.replies()[-1] == "504 5.7.4 Need to authenticate first"
    assert s.conn.state is ServerState.RCPT
    assert one(s.feed(b"NOOP\r\n")) == Noop()


def test_xexch50_when_switched_off_is_an_unknown_command() -> None:
    r = rejected(in_transaction().feed(b"XEXCH50 4 2\r\n"))
    assert str(r.reply) == "500 5.5.1 Unrecognized command"


@pytest.mark.parametrize("mail", [b"", b"MAIL FROM:<a@example.org>\r\n"])
def test_xexch50_without_an_accepted_rcpt_is_503(mail: bytes) -> None:
    s = greeted(EXCH)
    if mail:
        s.feed(mail)
    r = rejected(s.feed(b"XEXCH50 4 2\r\n"))
    assert r.reply.code == 503
    assert r.reply.enhanced == "5.5.1"


def test_xexch50_after_bdat_is_503() -> None:
    s = greeted(ServerOptions(xexch50=True, chunking=True))
    s.feed(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nBDAT 1\r\nx")
    assert rejected(s.feed(b"XEXCH50 4 2\r\n")).reply.code == 503


@pytest.mark.parametrize(
    "args", [b"0 2", b"-4 2", b"101 2", b"4", b"4 x", b"x 2", b"4 2 3", b"", b"99999999999999999999 2"]
)
def test_xexch50_with_bad_size_or_version_is_501(args: bytes) -> None:
    r = rejected(exchange_peer().feed(b"XEXCH50 " + args + b"\r\n"))
    assert r.reply == R.SYNTAX


def test_xexch50_at_the_cap_is_accepted() -> None:
    s = exchange_peer()
    s.feed(b"XEXCH50 100 2\r\n" + b"b" * 100)
    assert s.events[-1] == Xexch50Blob(b"b" * 100)


def test_xexch50_blob_repr_does_not_dump_the_blob() -> None:
    assert repr(Xexch50Blob(b"\x00" * 1000)) == "Xexch50Blob(<1000 octets>)"


# --- X-LINK2STATE ------------------------------------------------------------------------------------------


def test_x_link2state_becomes_an_event_when_on() -> None:
    s = greeted(ServerOptions(x_link2state=True))
    assert one(s.feed(b"X-LINK2STATE FIRST CHUNK=abc\r\n")) == XLink2State("FIRST CHUNK=abc")
    assert s.replies()[-1] == "504 5.7.4 Need to authenticate first"
    assert s.conn.state is ServerState.GREETED


def test_x_link2state_is_an_unknown_command_when_off() -> None:
    r = rejected(greeted().feed(b"X-LINK2STATE FIRST CHUNK=abc\r\n"))
    assert r.reply == R.UNRECOGNIZED
    assert r.verb == "X-LINK2STATE"


def test_x_link2state_keyword_only_when_on() -> None:
    assert "X-LINK2STATE" in ServerConnection(ServerOptions(x_link2state=True)).ehlo_keywords()
