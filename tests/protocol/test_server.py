"""ServerConnection: sequencing, syntax, limits, PIPELINING, DATA, EOF; fed bytes as a client sends them."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from smtpsvc.protocol import (
    NEED_DATA,
    TRANSITIONS,
    VERBS,
    Auth,
    AuthResponse,
    BdatEnd,
    ConnectionClosed,
    Data,
    DataChunk,
    DataEnd,
    Ehlo,
    Expn,
    Helo,
    Help,
    LocalProtocolError,
    Mail,
    Noop,
    Quit,
    Rcpt,
    Rejected,
    Rset,
    ServerConnection,
    ServerOptions,
    ServerState,
    StartTls,
    Vrfy,
    Xexch50Blob,
    render_transitions,
)
from smtpsvc.protocol import replies as R

from .drive import Session, greeted, in_data, in_transaction, one


def rejected(events: Sequence[object]) -> Rejected:
    assert len(events) == 1, events
    event = events[0]
    assert isinstance(event, Rejected), event
    return event


# --- A whole session ---------------------------------------------------------------------------------------


def test_full_session_gives_events_in_order_and_ends_closed() -> None:
    s = Session.start()
    s.feed(b"EHLO client.test\r\n")
    s.feed(b"MAIL FROM:<alice@example.org> SIZE=20\r\n")
    s.feed(b"RCPT TO:<bob@example.com>\r\n")
    s.feed(b"DATA\r\n")
    s.feed(b"Subject: hi\r\n\r\nHello\r\n.\r\n")
    s.feed(b"QUIT\r\n")
    assert s.merged_events() == [
        Ehlo("client.test"),
        Mail("alice@example.org", {"SIZE": "20"}),
        Rcpt("bob@example.com", {}),
        Data(),
        DataChunk(b"Subject: hi\r\n\r\nHello\r\n"),
        DataEnd(None),
        Quit(),
        ConnectionClosed(),  # after the 221 the session is over
    ]
    assert s.conn.state is ServerState.CLOSED
    assert s.replies()[0] == "250-mx.test Hello [192.0.2.1]"
    assert s.replies()[-3:] == [
        "354 Start mail input; end with <CRLF>.<CRLF>",
        "250 2.6.0 <0123456789AB> Queued mail for delivery",
        "221 2.0.0 mx.test Service closing transmission channel",
    ]


def test_helo_session_works_like_ehlo() -> None:
    s = greeted(hello=b"HELO client.test\r\n")
    assert s.events == [Helo("client.test")]
    assert s.conn.state is ServerState.GREETED
    assert not s.conn.esmtp


def test_state_follows_accepted_replies() -> None:
    s = Session.start()
    states = [s.conn.state]
    for line in [b"EHLO c\r\n", b"MAIL FROM:<>\r\n", b"RCPT TO:<b@example.com>\r\n", b"DATA\r\n", b".\r\n"]:
        s.feed(line)
        states.append(s.conn.state)
    S = ServerState
    assert states == [S.READY, S.GREETED, S.MAIL, S.RCPT, S.DATA, S.GREETED]


def test_negative_reply_leaves_state_unchanged() -> None:
    s = greeted()
    s.conn.receive_data(b"MAIL FROM:<a@example.org>\r\n")
    assert isinstance(s.conn.next_event(), Mail)
    s.conn.send(R.TEMP_FAILURE)
    assert s.conn.state is ServerState.GREETED
    s.conn.receive_data(b"RCPT TO:<b@example.com>\r\n")
    assert rejected([s.conn.next_event()]).reply == R.NEED_MAIL


def test_refused_rcpt_is_not_counted() -> None:
    s = greeted()
    s.feed(b"MAIL FROM:<a@example.org>\r\n")
    s.conn.receive_data(b"RCPT TO:<b@example.com>\r\n")
    assert isinstance(s.conn.next_event(), Rcpt)
    s.conn.send(R.RELAY_DENIED("b@example.com"))
    assert s.conn.recipients_accepted == 0
    assert s.conn.state is ServerState.MAIL


# --- The API contract (strict alternation) -----------------------------------------------------------------


def test_next_event_before_greeting_is_a_local_error() -> None:
    conn = ServerConnection(ServerOptions())
    with pytest.raises(LocalProtocolError):
        conn.next_event()


def test_greeting_twice_is_a_local_error() -> None:
    s = Session.start()
    with pytest.raises(LocalProtocolError):
        s.conn.greeting(R.GREETING("mx.test"))


def test_greeting_must_be_220_421_or_554() -> None:
    with pytest.raises(LocalProtocolError):
        ServerConnection().greeting(R.OK)


def test_greeting_421_closes_the_session() -> None:
    conn = ServerConnection()
    assert conn.greeting(R.TOO_MANY_CONNECTIONS) == b"421 4.7.0 Too many connections, try again later\r\n"
    assert conn.state is ServerState.CLOSED
    conn.receive_data(b"EHLO c\r\n")
    assert conn.next_event() == ConnectionClosed()


def test_greeting_554_allows_only_quit() -> None:
    conn = ServerConnection()
    conn.greeting(R.Reply(554, "", "mx.test No SMTP service here"))
    conn.receive_data(b"EHLO c\r\nQUIT\r\n")
    assert rejected([conn.next_event()]).reply == R.NO_SERVICE
    conn.send(R.NO_SERVICE)
    assert conn.next_event() == Quit()
    conn.send(R.QUIT_REPLY("mx.test"))
    assert conn.state is ServerState.CLOSED


def test_greeting_554_answers_verbs_that_are_not_offered_503_too() -> None:
    # AUTH without accounts, ETRN and VRFY switched off: 502 in a served session; after a 554 banner every
    # command but QUIT is the same 503, whatever is offered (a refused client learns nothing more).
    conn = ServerConnection(ServerOptions(auth_mechanisms=(), etrn=False, vrfy=False))
    conn.greeting(R.Reply(554, "5.7.1", "mx.test Access denied"))
    for line in (b"AUTH PLAIN\r\n", b"ETRN x.test\r\n", b"VRFY u\r\n", b"STARTTLS\r\n"):
        conn.receive_data(line)
        assert rejected([conn.next_event()]).reply == R.NO_SERVICE
        conn.send(R.NO_SERVICE)


def test_next_event_while_a_reply_is_owed_is_a_local_error() -> None:
    s = Session.start()
    s.conn.receive_data(b"EHLO c\r\nNOOP\r\n")
    assert s.conn.next_event() == Ehlo("c")
    with pytest.raises(LocalProtocolError):
        s.conn.next_event()


def test_send_without_an_owed_event_is_a_local_error() -> None:
    s = greeted()
    with pytest.raises(LocalProtocolError):
        s.conn.send(R.OK)


def test_data_chunk_needs_no_reply() -> None:
    s = in_data()
    s.conn.receive_data(b"text\r\nmore")
    assert s.conn.next_event() == DataChunk(b"text\r\nmore")
    assert s.conn.awaiting_reply is None
    assert s.conn.next_event() is NEED_DATA


def test_421_may_be_sent_at_any_time_and_closes() -> None:
    s = in_data()
    assert s.conn.send(R.SERVICE_CLOSING_TIMEOUT).startswith(b"421 4.4.2 ")
    assert s.conn.state is ServerState.CLOSED
    assert s.conn.next_event() == ConnectionClosed()


def test_421_in_reply_to_an_owed_event_closes() -> None:
    s = greeted()
    s.conn.receive_data(b"MAIL FROM:<a@example.org>\r\nNOOP\r\n")
    s.conn.next_event()
    s.conn.send(R.TOO_MANY_ERRORS)
    assert s.conn.next_event() == ConnectionClosed()


def test_enhanced_codes_are_stripped_when_switched_off() -> None:
    s = greeted(ServerOptions(enhanced_status_codes=False))
    s.feed(b"NOOP\r\n")
    assert s.replies()[-1] == "250 OK"
    assert "ENHANCEDSTATUSCODES" not in s.conn.ehlo_keywords()


# --- PIPELINING --------------------------------------------------------------------------------------------


def test_pipelined_mail_rcpt_rcpt_data_in_one_receive() -> None:
    s = greeted()
    s.feed(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nRCPT TO:<c@example.com>\r\nDATA\r\n")
    assert s.events[1:] == [
        Mail("a@example.org", {}),
        Rcpt("b@example.com", {}),
        Rcpt("c@example.com", {}),
        Data(),
    ]
    assert s.conn.recipients_accepted == 2
    assert s.conn.state is ServerState.DATA


def test_bytes_after_data_command_wait_for_the_354() -> None:
    s = in_transaction()
    s.conn.receive_data(b"DATA\r\nRSET\r\n.\r\n")
    assert s.conn.next_event() == Data()
    s.conn.send(R.START_DATA)
    # "RSET" is message content now, not a command.
    assert s.conn.next_event() == DataChunk(b"RSET\r\n")
    assert s.conn.next_event() == DataEnd(None)


def test_bytes_after_a_refused_data_are_commands() -> None:
    s = in_transaction()
    s.conn.receive_data(b"DATA\r\nRSET\r\n")
    assert s.conn.next_event() == Data()
    s.conn.send(R.TEMP_FAILURE)
    assert s.conn.next_event() == Rset()


def test_commands_pipelined_after_the_end_of_data_are_parsed() -> None:
    s = in_data()
    s.feed(b"body\r\n.\r\nMAIL FROM:<c@example.org>\r\nQUIT\r\n")
    assert s.merged_events()[-5:] == [
        DataChunk(b"body\r\n"),
        DataEnd(None),
        Mail("c@example.org", {}),
        Quit(),
        ConnectionClosed(),
    ]


def test_a_whole_session_in_one_packet() -> None:
    s = Session.start()
    s.feed(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\nx\r\n.\r\nQUIT\r\n")
    kinds = [type(e) for e in s.merged_events()]
    assert kinds == [Ehlo, Mail, Rcpt, Data, DataChunk, DataEnd, Quit, ConnectionClosed]


def test_input_after_quit_is_ignored() -> None:
    s = greeted()
    s.feed(b"QUIT\r\nNOOP\r\n")
    assert s.events[-2:] == [Quit(), ConnectionClosed()]
    assert s.conn.state is ServerState.CLOSED
    s.conn.receive_data(b"NOOP\r\n")
    assert s.conn.next_event() == ConnectionClosed()
    assert s.conn.buffered == 0


# --- Verbs and syntax --------------------------------------------------------------------------------------


@pytest.mark.parametrize("line", [b"ehlo c\r\n", b"EhLo c\r\n", b"EHLO c\r\n"])
def test_verbs_are_case_insensitive(line: bytes) -> None:
    assert one(Session.start().feed(line)) == Ehlo("c")


@pytest.mark.parametrize(
    "line",
    [b"MAIL FROM:<a@example.org>\r\n", b"MAIL FROM: <a@example.org>\r\n", b"mail from:<a@example.org>\r\n"],
)
def test_mail_from_spellings_accepted(line: bytes) -> None:
    assert one(greeted().feed(line)) == Mail("a@example.org", {})


def test_bare_lf_ends_a_command_line() -> None:
    assert one(Session.start().feed(b"EHLO c\n")) == Ehlo("c")


def test_trailing_spaces_are_ignored() -> None:
    assert one(greeted().feed(b"MAIL FROM:<a@example.org>  \r\n")) == Mail("a@example.org", {})


@pytest.mark.parametrize("line", [b"HELO\r\n", b"EHLO\r\n", b"EHLO   \r\n"])
def test_helo_and_ehlo_need_an_argument(line: bytes) -> None:
    assert rejected(Session.start().feed(line)).reply == R.SYNTAX


@pytest.mark.parametrize("line", [b"XYZZY\r\n", b"MAILFROM:<a@b.c>\r\n", b"\r\n", b" NOOP\r\n", b"TURN\r\n"])
def test_unknown_verb_is_500(line: bytes) -> None:
    r = rejected(greeted().feed(line))
    assert r.reply == R.UNRECOGNIZED
    assert str(r.reply) == "500 5.5.1 Unrecognized command"


def test_rejected_verb_never_carries_junk() -> None:
    assert rejected(greeted().feed(b"\x00\xffjunk arg\r\n")).verb == "?"


def test_awaiting_reply_names_the_owed_event() -> None:
    s = greeted()
    s.conn.receive_data(b"NOOP\r\n")
    event = s.conn.next_event()
    assert s.conn.awaiting_reply == event == Noop()
    s.conn.send(R.OK)
    assert s.conn.awaiting_reply is None


def test_rejected_carries_the_verb() -> None:
    assert rejected(greeted().feed(b"xyzzy now\r\n")).verb == "XYZZY"


@pytest.mark.parametrize(
    ("line", "event"),
    [
        (b"RSET\r\n", Rset()),
        (b"NOOP\r\n", Noop()),
        (b"NOOP whatever\r\n", Noop()),
        (b"HELP\r\n", Help("")),
        (b"HELP MAIL\r\n", Help("MAIL")),
        (b"VRFY bob\r\n", Vrfy("bob")),
        (b"EXPN staff\r\n", Expn("staff")),
    ],
)
def test_app_answered_verbs_become_events(line: bytes, event: object) -> None:
    assert one(greeted().feed(line)) == event


@pytest.mark.parametrize("line", [b"VRFY\r\n", b"EXPN\r\n"])
def test_vrfy_and_expn_need_an_argument(line: bytes) -> None:
    assert rejected(greeted().feed(line)).reply == R.SYNTAX


@pytest.mark.parametrize("line", [b"RSET now\r\n", b"QUIT now\r\n"])
def test_commands_without_arguments_refuse_one(line: bytes) -> None:
    assert rejected(greeted().feed(line)).reply == R.SYNTAX


def test_data_with_an_argument_is_501() -> None:
    assert rejected(in_transaction().feed(b"DATA now\r\n")).reply == R.SYNTAX


@pytest.mark.parametrize(
    "line",
    [
        b"MAIL\r\n",
        b"MAIL FROM\r\n",
        b"MAIL FROM <a@example.org>\r\n",
        b"MAIL TO:<a@example.org>\r\n",
        b"MAIL FROM:\r\n",
        b"MAIL FROM:<a@example.org>SIZE=1\r\n",
        b"MAIL FROM:<a@example.org\r\n",
    ],
)
def test_malformed_mail_is_501_syntax(line: bytes) -> None:
    assert rejected(greeted().feed(line)).reply == R.SYNTAX


@pytest.mark.parametrize(
    "line", [b"RCPT\r\n", b"RCPT TO\r\n", b"RCPT FROM:<b@example.com>\r\n", b"RCPT TO:\r\n"]
)
def test_malformed_rcpt_is_501_syntax(line: bytes) -> None:
    s = greeted()
    s.feed(b"MAIL FROM:<a@example.org>\r\n")
    assert rejected(s.feed(line)).reply == R.SYNTAX


# --- Sequencing (503) --------------------------------------------------------------------------------------


def test_mail_before_hello_is_503_send_hello_first() -> None:
    r = rejected(Session.start().feed(b"MAIL FROM:<a@example.org>\r\n"))
    assert str(r.reply) == "503 5.5.1 Send hello first"


@pytest.mark.parametrize("start", [Session.start, greeted])
def test_rcpt_before_mail_is_503_need_mail(start: object) -> None:
    s = start()  # type: ignore[operator]
    assert rejected(s.feed(b"RCPT TO:<b@example.com>\r\n")).reply == R.NEED_MAIL


@pytest.mark.parametrize("start", [Session.start, greeted])
def test_data_without_transaction_is_503_need_rcpt(start: object) -> None:
    s = start()  # type: ignore[operator]
    assert rejected(s.feed(b"DATA\r\n")).reply == R.NEED_RCPT


def test_data_after_mail_without_accepted_rcpt_is_554_no_valid_recipients() -> None:
    s = greeted()
    s.feed(b"MAIL FROM:<a@example.org>\r\n")
    r = rejected(s.feed(b"DATA\r\n"))
    assert str(r.reply) == "554 5.5.1 No valid recipients"


@pytest.mark.parametrize("rcpt", [b"", b"RCPT TO:<b@example.com>\r\n"])
def test_nested_mail_is_503(rcpt: bytes) -> None:
    s = greeted()
    s.feed(b"MAIL FROM:<a@example.org>\r\n" + rcpt)
    r = rejected(s.feed(b"MAIL FROM:<c@example.org>\r\n"))
    assert r.reply == R.NESTED_MAIL
    assert r.reply.code == 503


def test_sequence_check_comes_before_argument_syntax() -> None:
    assert rejected(Session.start().feed(b"MAIL FROM:<broken\r\n")).reply == R.NEED_HELO


def test_rset_ends_the_transaction() -> None:
    s = in_transaction()
    s.feed(b"RSET\r\n")
    assert s.conn.state is ServerState.GREETED
    assert s.conn.recipients_accepted == 0
    assert rejected(s.feed(b"DATA\r\n")).reply == R.NEED_RCPT


def test_rset_before_hello_stays_ready() -> None:
    s = Session.start()
    s.feed(b"RSET\r\n")
    assert s.conn.state is ServerState.READY


def test_ehlo_again_resets_the_transaction() -> None:
    s = in_transaction()
    s.feed(b"EHLO again\r\n")
    assert s.conn.state is ServerState.GREETED
    assert s.conn.recipients_accepted == 0


def test_noop_keeps_the_transaction() -> None:
    s = in_transaction()
    s.feed(b"NOOP\r\n")
    assert s.conn.state is ServerState.RCPT
    assert s.conn.recipients_accepted == 1


# --- The transition table ----------------------------------------------------------------------------------


def test_transition_table_renders_every_transition() -> None:
    text = render_transitions()
    assert "READY --Ehlo--> GREETED" in text
    assert "GREETED --Mail--> MAIL" in text
    assert "MAIL --Rcpt--> RCPT" in text
    assert "RCPT --Data--> DATA" in text
    assert "DATA --DataEnd--> GREETED" in text
    assert "RCPT --Rset--> GREETED" in text
    assert "GREETED --StartTls--> TLS" in text
    assert "GREETED --Auth--> AUTH" in text
    assert "AUTH --AuthResponse--> GREETED" in text
    assert "AUTH --Rejected--> GREETED" in text
    assert "RCPT --Bdat--> BDAT" in text
    assert "CHUNKING --Bdat--> BDAT" in text
    assert "BDAT --BdatEnd--> CHUNKING" in text
    assert "BDAT --BdatEnd[LAST]--> GREETED" in text
    assert "RCPT --Xexch50--> XEXCH50" in text
    assert "XEXCH50 --Xexch50Blob--> RCPT" in text
    assert "GREETED --Etrn--> GREETED" in text
    assert len(text.splitlines()) == sum(len(row) for row in TRANSITIONS.values())


def test_every_state_has_a_row() -> None:
    assert set(TRANSITIONS) == set(ServerState)


def test_transition_table_keeps_the_raw_reading_states_closed_to_commands() -> None:
    S = ServerState
    assert set(TRANSITIONS[S.BDAT]) == {BdatEnd, (BdatEnd, "LAST")}
    assert set(TRANSITIONS[S.XEXCH50]) == {Xexch50Blob}
    assert set(TRANSITIONS[S.AUTH]) == {AuthResponse, Rejected}
    assert TRANSITIONS[S.TLS] == {}
    assert Data not in TRANSITIONS[S.CHUNKING]
    assert all(Auth not in TRANSITIONS[s] for s in (S.MAIL, S.RCPT, S.CHUNKING))
    assert all(StartTls not in TRANSITIONS[s] for s in (S.MAIL, S.RCPT, S.CHUNKING))


def test_transition_table_is_honest_about_the_503_rules() -> None:
    assert Mail not in TRANSITIONS[ServerState.READY]
    assert Rcpt not in TRANSITIONS[ServerState.GREETED]
    assert Data not in TRANSITIONS[ServerState.MAIL]
    assert Mail not in TRANSITIONS[ServerState.RCPT]
    assert set(TRANSITIONS[ServerState.DATA]) == {DataEnd}
    assert TRANSITIONS[ServerState.CLOSED] == {}
    assert all(row[Quit] == ServerState.CLOSED for row in TRANSITIONS.values() if Quit in row)


def test_every_verb_is_in_sequence_somewhere() -> None:
    reachable = {event for row in TRANSITIONS.values() for event in row}
    assert {spec.event for spec in VERBS.values()} <= reachable


# --- Bad characters, HTTP ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        b"NO\x00OP\r\n",
        b"NOOP \x01\r\n",
        b"NOOP\tx\r\n",
        b"NOOP a\rb\r\n",
        b"NOOP \xff\r\n",
        b"HELP \xc3\xa9\r\n",
    ],
)
def test_control_or_non_ascii_bytes_are_500_5_5_2(line: bytes) -> None:
    r = rejected(greeted().feed(line))
    assert str(r.reply) == "500 5.5.2 Invalid character in command"


def test_nul_inside_mail_address_is_500_5_5_2() -> None:
    assert rejected(greeted().feed(b"MAIL FROM:<a\x00@example.org>\r\n")).reply == R.BAD_CHARS


def test_utf8_sender_allowed_with_smtputf8() -> None:
    event = one(greeted().feed("MAIL FROM:<jösé@exämple.org> SMTPUTF8\r\n".encode()))
    assert event == Mail("jösé@exämple.org", {"SMTPUTF8": None})


def test_utf8_sender_without_smtputf8_parameter_is_500() -> None:
    assert rejected(greeted().feed("MAIL FROM:<jösé@example.org>\r\n".encode())).reply == R.BAD_CHARS


def test_utf8_in_parameters_is_500() -> None:
    assert (
        rejected(greeted().feed("MAIL FROM:<a@example.org> SMTPUTF8 ENVID=é\r\n".encode())).reply
        == R.BAD_CHARS
    )


def test_utf8_sender_refused_when_smtputf8_is_off() -> None:
    s = greeted(ServerOptions(smtputf8=False))
    assert rejected(s.feed("MAIL FROM:<jösé@example.org> SMTPUTF8\r\n".encode())).reply == R.BAD_CHARS
    assert "SMTPUTF8" not in s.conn.ehlo_keywords()


def test_invalid_utf8_in_mail_is_500() -> None:
    assert rejected(greeted().feed(b"MAIL FROM:<j\xc3@example.org> SMTPUTF8\r\n")).reply == R.BAD_CHARS


def test_utf8_recipient_allowed_in_smtputf8_transaction() -> None:
    s = greeted()
    s.feed(b"MAIL FROM:<a@example.org> SMTPUTF8\r\n")
    assert one(s.feed("RCPT TO:<ünï@exämple.com>\r\n".encode())) == Rcpt("ünï@exämple.com", {})


def test_utf8_recipient_refused_without_smtputf8_transaction() -> None:
    s = greeted()
    s.feed(b"MAIL FROM:<a@example.org>\r\n")
    assert rejected(s.feed("RCPT TO:<ünï@example.com>\r\n".encode())).reply == R.BAD_CHARS


def test_smtputf8_flag_ends_with_the_transaction() -> None:
    s = greeted()
    s.feed(b"MAIL FROM:<a@example.org> SMTPUTF8\r\nRSET\r\nMAIL FROM:<a@example.org>\r\n")
    assert not s.conn.transaction_smtputf8
    assert rejected(s.feed("RCPT TO:<ünï@example.com>\r\n".encode())).reply == R.BAD_CHARS


@pytest.mark.parametrize(
    "line",
    [
        b"GET / HTTP/1.1\r\n",
        b"POST /index.php HTTP/1.0\r\n",
        b"HEAD / HTTP/1.1\r\n",
        b"PUT /x HTTP/1.1\r\n",
        b"CONNECT mx.test:25 HTTP/1.1\r\n",
        b"GET http://mx.test/ HTTP/1.1\r\n",
    ],
)
def test_http_request_is_rejected_with_close(line: bytes) -> None:
    s = Session.start()
    events = s.feed(line)
    assert events[1:] == [ConnectionClosed()]  # once the reply is sent, the session is over
    r = rejected(events[:1])
    assert r.reply == R.UNRECOGNIZED
    assert r.close
    assert s.conn.state is ServerState.CLOSED


def test_word_get_without_http_shape_is_a_plain_unknown_command() -> None:
    r = rejected(greeted().feed(b"GET mail\r\n"))
    assert r.reply == R.UNRECOGNIZED
    assert not r.close


# --- Command line length -----------------------------------------------------------------------------------


def test_command_line_at_the_limit_is_accepted() -> None:
    arg = b"x" * (512 - len(b"NOOP \r\n"))
    assert one(greeted().feed(b"NOOP " + arg + b"\r\n")) == Noop()


def test_command_line_over_the_limit_is_500_line_too_long() -> None:
    arg = b"x" * (513 - len(b"NOOP \r\n"))
    r = rejected(greeted().feed(b"NOOP " + arg + b"\r\n"))
    assert str(r.reply) == "500 5.5.2 Line too long"
    assert r.verb == "NOOP"


def test_long_command_line_is_drained_before_the_reply() -> None:
    s = greeted()
    assert s.feed(b"NOOP " + b"x" * 600) == []
    assert s.feed(b"y" * 5000) == []
    assert s.conn.buffered == 0
    r = rejected(s.feed(b"zzz\r\n"))
    assert r.reply == R.LINE_TOO_LONG
    assert one(s.feed(b"NOOP\r\n")) == Noop()


def test_long_command_line_trickled_keeps_the_buffer_bounded() -> None:
    s = greeted()
    for _ in range(3000):
        s.feed(b"ab")
    assert s.max_buffered < 512 + 2
    assert rejected(s.feed(b"\r\n")).reply == R.LINE_TOO_LONG


def test_rcpt_gets_room_for_parameters() -> None:
    s = greeted()
    s.feed(b"MAIL FROM:<a@example.org>\r\n")
    rcpt = (
        b"RCPT TO:<b@example.com> NOTIFY=SUCCESS,FAILURE,DELAY ORCPT=rfc822;"
        + b"o+2B" * 120
        + b"@example.com\r\n"
    )
    assert len(rcpt) > 512
    assert isinstance(one(s.feed(rcpt)), Rcpt)


def test_mail_gets_room_for_parameters() -> None:
    mail = b"MAIL FROM:<a@example.org> XFUTURE=" + b"x" * 600 + b"\r\n"
    assert rejected(greeted().feed(mail)).reply == R.PARAM_UNKNOWN  # parsed, not cut as too long


def test_other_commands_get_no_parameter_room() -> None:
    assert rejected(greeted().feed(b"VRFY " + b"x" * 600 + b"\r\n")).reply == R.LINE_TOO_LONG


def test_mail_line_over_its_larger_limit_is_too_long() -> None:
    line = b"MAIL FROM:<a@example.org> ENVID=" + b"E" * 1000 + b"\r\n"
    assert rejected(greeted().feed(line)).reply == R.LINE_TOO_LONG


# --- Addresses ---------------------------------------------------------------------------------------------


def test_null_sender_is_accepted() -> None:
    assert one(greeted().feed(b"MAIL FROM:<>\r\n")) == Mail("", {})


@pytest.mark.parametrize(
    "addr",
    [
        b"<a@>",
        b"<@example.org>",
        b"<a..b@example.org>",
        b"<a@-example.org>",
        b"<a b@example.org>",
        b"<a@b@c>",
    ],
)
def test_bad_sender_address_is_501_5_1_3(addr: bytes) -> None:
    r = rejected(greeted().feed(b"MAIL FROM:" + addr + b"\r\n"))
    assert str(r.reply) == "501 5.1.3 Invalid address"


def test_rcpt_without_domain_is_501_5_1_3() -> None:
    s = greeted()
    s.feed(b"MAIL FROM:<a@example.org>\r\n")
    assert rejected(s.feed(b"RCPT TO:<bob>\r\n")).reply == R.BAD_ADDRESS


@pytest.mark.parametrize("name", [b"postmaster", b"Postmaster", b"POSTMASTER"])
def test_rcpt_postmaster_without_domain_is_accepted(name: bytes) -> None:
    s = greeted()
    s.feed(b"MAIL FROM:<a@example.org>\r\n")
    assert one(s.feed(b"RCPT TO:<" + name + b">\r\n")) == Rcpt(name.decode(), {})


def test_null_recipient_is_501_5_1_3() -> None:
    s = greeted()
    s.feed(b"MAIL FROM:<a@example.org>\r\n")
    assert rejected(s.feed(b"RCPT TO:<>\r\n")).reply == R.BAD_ADDRESS


def test_rcpt_source_route_is_reported() -> None:
    s = greeted()
    s.feed(b"MAIL FROM:<a@example.org>\r\n")
    assert one(s.feed(b"RCPT TO:<@relay.example,@hop.example:b@example.com>\r\n")) == Rcpt(
        "b@example.com", {}, "@relay.example,@hop.example:"
    )


def test_quoted_local_part_with_space_and_bracket_is_kept_quoted() -> None:
    s = greeted()
    s.feed(b"MAIL FROM:<a@example.org>\r\n")
    event = one(s.feed(b'RCPT TO:<"b >x"@example.com> NOTIFY=NEVER\r\n'))
    assert event == Rcpt('"b >x"@example.com', {"NOTIFY": "NEVER"})


def test_address_literal_domain_is_accepted() -> None:
    s = greeted()
    assert one(s.feed(b"MAIL FROM:<a@[192.0.2.1]>\r\n")) == Mail("a@[192.0.2.1]", {})


def test_address_without_angle_brackets_is_tolerated() -> None:
    assert one(greeted().feed(b"MAIL FROM:a@example.org SIZE=5\r\n")) == Mail("a@example.org", {"SIZE": "5"})


# --- ESMTP parameters --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (b"SIZE=1000", {"SIZE": "1000"}),
        (b"BODY=7BIT", {"BODY": "7BIT"}),
        (b"body=8bitmime", {"BODY": "8bitmime"}),
        (b"SMTPUTF8", {"SMTPUTF8": None}),
        (b"RET=FULL", {"RET": "FULL"}),
        (b"RET=hdrs", {"RET": "hdrs"}),
        (b"ENVID=QQ+2B1", {"ENVID": "QQ+2B1"}),
        (b"SIZE=1  BODY=7BIT", {"SIZE": "1", "BODY": "7BIT"}),
    ],
)
def test_mail_parameters_accepted_with_upper_case_keys(
    params: bytes, expected: dict[str, str | None]
) -> None:
    assert one(greeted().feed(b"MAIL FROM:<a@example.org> " + params + b"\r\n")) == Mail(
        "a@example.org", expected
    )


@pytest.mark.parametrize(
    ("params", "options", "reply"),
    [
        (b"SIZE=abc", ServerOptions(), R.PARAM_SYNTAX),
        (b"SIZE", ServerOptions(), R.PARAM_SYNTAX),
        (b"SIZE=1001", ServerOptions(max_message_size=1000), R.TOO_BIG),
        (b"BODY=8BITMIME", ServerOptions(eightbitmime=False), R.PARAM_UNKNOWN),
        (b"BODY=BINARYMIME", ServerOptions(), R.PARAM_UNKNOWN),
        (b"BODY", ServerOptions(), R.PARAM_SYNTAX),
        (b"SMTPUTF8=yes", ServerOptions(), R.PARAM_SYNTAX),
        (b"SMTPUTF8", ServerOptions(smtputf8=False), R.PARAM_UNKNOWN),
        (b"RET=ALL", ServerOptions(), R.PARAM_SYNTAX),
        (b"RET=FULL", ServerOptions(dsn=False), R.PARAM_UNKNOWN),
        (b"ENVID=" + b"x" * 101, ServerOptions(), R.PARAM_SYNTAX),
        (b"ENVID=a+zz", ServerOptions(), R.PARAM_SYNTAX),
        (b"ENVID=abc", ServerOptions(dsn=False), R.PARAM_UNKNOWN),
        (b"FOO=bar", ServerOptions(), R.PARAM_UNKNOWN),
        (b"AUTH=<>", ServerOptions(), R.PARAM_UNKNOWN),
        (b"SIZE=1 SIZE=2", ServerOptions(), R.PARAM_SYNTAX),
        (b"SIZE=1 size=1", ServerOptions(), R.PARAM_SYNTAX),
        (b"=x", ServerOptions(), R.PARAM_SYNTAX),
        (b"SIZE=", ServerOptions(), R.PARAM_SYNTAX),
    ],
)
def test_bad_mail_parameters_are_refused(params: bytes, options: ServerOptions, reply: R.Reply) -> None:
    r = rejected(greeted(options).feed(b"MAIL FROM:<a@example.org> " + params + b"\r\n"))
    assert r.reply == reply


def test_unsupported_parameter_is_555_5_5_4() -> None:
    r = rejected(greeted().feed(b"MAIL FROM:<a@example.org> XFOO\r\n"))
    assert str(r.reply) == "555 5.5.4 Unsupported parameter"


def test_size_over_the_limit_is_552_at_mail() -> None:
    r = rejected(
        greeted(ServerOptions(max_message_size=1000)).feed(b"MAIL FROM:<a@example.org> SIZE=5000\r\n")
    )
    assert str(r.reply) == "552 5.3.4 Message size exceeds fixed maximum message size"


def test_size_at_the_limit_is_accepted() -> None:
    s = greeted(ServerOptions(max_message_size=1000))
    assert isinstance(one(s.feed(b"MAIL FROM:<a@example.org> SIZE=1000\r\n")), Mail)


def test_parameters_after_helo_are_refused() -> None:
    s = greeted(hello=b"HELO c\r\n")
    assert rejected(s.feed(b"MAIL FROM:<a@example.org> SIZE=10\r\n")).reply == R.PARAM_UNKNOWN


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (b"NOTIFY=NEVER", {"NOTIFY": "NEVER"}),
        (b"NOTIFY=success,Failure", {"NOTIFY": "success,Failure"}),
        (b"NOTIFY=SUCCESS,FAILURE,DELAY", {"NOTIFY": "SUCCESS,FAILURE,DELAY"}),
        (b"ORCPT=rfc822;b@example.com", {"ORCPT": "rfc822;b@example.com"}),
        (
            b"ORCPT=rfc822;b+2Bx@example.com NOTIFY=DELAY",
            {"ORCPT": "rfc822;b+2Bx@example.com", "NOTIFY": "DELAY"},
        ),
    ],
)
def test_rcpt_parameters_accepted(params: bytes, expected: dict[str, str | None]) -> None:
    s = greeted()
    s.feed(b"MAIL FROM:<a@example.org>\r\n")
    assert one(s.feed(b"RCPT TO:<b@example.com> " + params + b"\r\n")) == Rcpt("b@example.com", expected)


@pytest.mark.parametrize(
    ("params", "options", "reply"),
    [
        (b"NOTIFY=NEVER,SUCCESS", ServerOptions(), R.PARAM_SYNTAX),
        (b"NOTIFY=SOMETIMES", ServerOptions(), R.PARAM_SYNTAX),
        (b"NOTIFY=SUCCESS,SUCCESS", ServerOptions(), R.PARAM_SYNTAX),
        (b"NOTIFY", ServerOptions(), R.PARAM_SYNTAX),
        (b"ORCPT=b@example.com", ServerOptions(), R.PARAM_SYNTAX),
        (b"ORCPT=rfc822;", ServerOptions(), R.PARAM_SYNTAX),
        (b"ORCPT=rfc822;a+zz", ServerOptions(), R.PARAM_SYNTAX),
        (b"NOTIFY=NEVER", ServerOptions(dsn=False), R.PARAM_UNKNOWN),
        (b"SIZE=10", ServerOptions(), R.PARAM_UNKNOWN),
        (b"NOTIFY=NEVER NOTIFY=NEVER", ServerOptions(), R.PARAM_SYNTAX),
    ],
)
def test_bad_rcpt_parameters_are_refused(params: bytes, options: ServerOptions, reply: R.Reply) -> None:
    s = greeted(options)
    s.feed(b"MAIL FROM:<a@example.org>\r\n")
    assert rejected(s.feed(b"RCPT TO:<b@example.com> " + params + b"\r\n")).reply == reply


# --- Recipient limit ---------------------------------------------------------------------------------------


def test_rcpt_beyond_max_recipients_is_452() -> None:
    s = greeted(ServerOptions(max_recipients=2))
    s.feed(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nRCPT TO:<c@example.com>\r\n")
    r = rejected(s.feed(b"RCPT TO:<d@example.com>\r\n"))
    assert str(r.reply) == "452 4.5.3 Too many recipients"
    assert s.conn.recipients_accepted == 2


def test_recipient_limit_applies_per_transaction() -> None:
    s = greeted(ServerOptions(max_recipients=1))
    s.feed(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n.\r\n")
    s.feed(b"MAIL FROM:<a@example.org>\r\n")
    assert isinstance(one(s.feed(b"RCPT TO:<b@example.com>\r\n")), Rcpt)


def test_zero_max_recipients_means_unlimited() -> None:
    s = greeted(ServerOptions(max_recipients=0))
    s.feed(
        b"MAIL FROM:<a@example.org>\r\n" + b"".join(b"RCPT TO:<r%d@example.com>\r\n" % i for i in range(300))
    )
    assert s.conn.recipients_accepted == 300


# --- EHLO keywords -----------------------------------------------------------------------------------------


def test_default_ehlo_keywords() -> None:
    conn = ServerConnection(ServerOptions(max_message_size=2097152))
    assert conn.ehlo_keywords() == [
        "PIPELINING",
        "SIZE 2097152",
        "8BITMIME",
        "SMTPUTF8",
        "DSN",
        "ENHANCEDSTATUSCODES",
        "HELP",
    ]


def test_unlimited_size_is_advertised_bare() -> None:
    assert "SIZE" in ServerConnection(ServerOptions(max_message_size=0)).ehlo_keywords()


def test_switched_off_extensions_are_not_advertised() -> None:
    opts = ServerOptions(pipelining=False, eightbitmime=False, dsn=False, enhanced_status_codes=False)
    assert ServerConnection(opts).ehlo_keywords() == ["SIZE", "HELP"]


def test_options_refuse_negative_limits() -> None:
    with pytest.raises(ValueError):
        ServerOptions(max_message_size=-1)


# --- DATA --------------------------------------------------------------------------------------------------


def test_dot_stuffed_lines_are_unstuffed() -> None:
    s = in_data()
    s.feed(b"..leading dot\r\n...two\r\n..\r\nx.y\r\n.\r\n")
    assert s.content() == b".leading dot\r\n..two\r\n.\r\nx.y\r\n"


def test_unstuffed_leading_dot_is_removed_as_rfc_5321_says() -> None:
    s = in_data()
    s.feed(b".abc\r\n.\r\n")
    assert s.content() == b"abc\r\n"


def test_end_of_data_right_after_354_is_an_empty_message() -> None:
    s = in_data()
    assert s.feed(b".\r\n") == [DataEnd(None)]


def test_content_ends_with_the_crlf_before_the_dot() -> None:
    s = in_data()
    s.feed(b"line\r\n.\r\n")
    assert s.content() == b"line\r\n"


@pytest.mark.parametrize(
    "smuggle",
    [b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\r\n.\rX"],
)
def test_only_crlf_dot_crlf_ends_data(smuggle: bytes) -> None:
    s = in_data()
    s.feed(b"a" + smuggle + b"MAIL FROM:<evil@example.org>\r\n")
    assert not any(isinstance(e, DataEnd | Mail) for e in s.events[-3:])
    assert s.conn.state is ServerState.DATA
    s.feed(b"\r\n.\r\n")
    assert isinstance(s.events[-1], DataEnd)


@pytest.mark.parametrize(
    ("raw", "content"),
    [
        (b"a\nb\r\n", b"a\r\nb\r\n"),
        (b"a\rb\r\n", b"a\r\nb\r\n"),
        (b"a\n.\nb\r\n", b"a\r\n.\r\nb\r\n"),
        (b"a\r\n.\nb\r\n", b"a\r\n.\r\nb\r\n"),
        (b"a\r\r\nb\r\n", b"a\r\n\r\nb\r\n"),
        (b"a\n\rb\r\n", b"a\r\n\r\nb\r\n"),
    ],
)
def test_bare_cr_and_lf_are_normalised_to_crlf(raw: bytes, content: bytes) -> None:
    s = in_data()
    s.feed(raw + b".\r\n")
    assert s.content() == content
    assert isinstance(s.events[-1], DataEnd)


def _session_events_fed_in_pieces(data: bytes, size: int) -> list[object]:
    s = in_data()
    for i in range(0, len(data), size):
        s.feed(data[i : i + size])
    return s.merged_events()  # type: ignore[return-value]


def test_byte_at_a_time_equals_one_shot() -> None:
    data = b"Subject: x\r\n\r\n..dot\r\nbare\nlf\rcr\r\n.\nno\r\n.\r\nNOOP\r\nQUIT\r\n"
    assert _session_events_fed_in_pieces(data, 1) == _session_events_fed_in_pieces(data, len(data))


def test_big_buffer_gives_one_big_chunk() -> None:
    s = in_data()
    body = b"".join(b"line %06d of text\r\n" % i for i in range(20000))
    events = s.feed(body)
    assert events == [DataChunk(body[:-2])]  # the final CRLF waits: it may begin the end of data


def test_long_data_line_is_drained_then_500() -> None:
    s = in_data()
    s.feed(b"ok\r\n" + b"x" * 999 + b"\r\nmore\r\n")
    s.feed(b"y" * 100000)
    s.feed(b"\r\n.\r\n")
    assert s.events[-1] == DataEnd(R.LINE_TOO_LONG)
    assert s.conn.state is ServerState.GREETED
    assert s.replies()[-1] == "500 5.5.2 Line too long"


def test_data_line_of_exactly_1000_octets_is_accepted() -> None:
    s = in_data()
    s.feed(b"x" * 998 + b"\r\n.\r\n")
    assert s.events[-1] == DataEnd(None)


def test_stuffed_dot_does_not_count_towards_the_line_limit() -> None:
    s = in_data()
    s.feed(b"." + b"x" * 998 + b"\r\n.\r\n")
    assert s.events[-1] == DataEnd(None)


def test_oversized_message_is_drained_then_552() -> None:
    s = in_data(ServerOptions(max_message_size=100))
    s.feed(b"x" * 50 + b"\r\n")
    s.feed(b"y" * 50 + b"\r\n")
    s.feed(b"z" * 5000 + b"\r\n")
    assert len(s.content()) <= 100
    s.feed(b".\r\nNOOP\r\n")
    assert s.merged_events()[-2:] == [DataEnd(R.TOO_BIG), Noop()]
    assert "552 5.3.4 Message size exceeds fixed maximum message size" in s.replies()


def test_message_of_exactly_max_size_is_accepted() -> None:
    s = in_data(ServerOptions(max_message_size=10))
    s.feed(b"12345678\r\n.\r\n")
    assert s.events[-1] == DataEnd(None)


def test_eof_mid_data_gives_connection_closed_without_data_end() -> None:
    s = in_data()
    s.feed(b"partial message\r\n")
    assert s.feed(b"") == [ConnectionClosed()]
    assert not any(isinstance(e, DataEnd) for e in s.events)
    assert s.conn.state is ServerState.CLOSED


def test_data_end_reply_returns_to_greeted_whatever_the_code() -> None:
    s = in_data()
    s.conn.receive_data(b".\r\n")
    assert s.conn.next_event() == DataEnd(None)
    s.conn.send(R.TEMP_FAILURE)
    assert s.conn.state is ServerState.GREETED
    assert s.conn.recipients_accepted == 0


# --- EOF ---------------------------------------------------------------------------------------------------


def test_eof_delivers_buffered_commands_first() -> None:
    s = greeted()
    s.conn.receive_data(b"NOOP\r\nRSET\r\n")
    s.conn.receive_data(b"")
    assert s.pump() == [Noop(), Rset(), ConnectionClosed()]


def test_eof_discards_an_unfinished_line() -> None:
    s = greeted()
    assert s.feed(b"NOOP") == []
    assert s.feed(b"") == [ConnectionClosed()]


def test_connection_closed_repeats() -> None:
    s = greeted()
    s.feed(b"")
    assert s.conn.next_event() == ConnectionClosed()
    assert s.conn.next_event() == ConnectionClosed()


def test_receive_data_after_eof_is_a_local_error() -> None:
    s = greeted()
    s.conn.receive_data(b"")
    s.conn.receive_data(b"")  # a repeated EOF is harmless
    with pytest.raises(LocalProtocolError):
        s.conn.receive_data(b"NOOP\r\n")
