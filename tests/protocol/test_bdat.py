"""CHUNKING/BDAT and BINARYMIME (RFC 3030) in ServerConnection: exact octets, sequencing, limits, refusals."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytest

from smtpsvc.protocol import (
    Bdat,
    BdatEnd,
    ConnectionClosed,
    Data,
    DataChunk,
    Mail,
    Noop,
    Rejected,
    ServerConnection,
    ServerOptions,
    ServerState,
)
from smtpsvc.protocol import replies as R

from .drive import Session, greeted, in_transaction, one, rejected

CHUNK = ServerOptions(chunking=True)
BINARY = ServerOptions(chunking=True, binarymime=True)
NASTY = b"\r\n.\r\n..\r\n.\n\r\x00\xff\r\rQUIT\r\nMAIL FROM:<x@y>\r\n.\r\n"


def kinds(events: Sequence[object]) -> list[str]:
    return [type(e).__name__ for e in events]


def closing(events: Sequence[object]) -> Rejected:
    """A Rejected that closes the session (the driver then sees ConnectionClosed): nothing more is read."""
    assert list(events[1:]) == [ConnectionClosed()], events
    r = rejected(events[:1])
    assert r.close
    return r


# --- The happy paths ---------------------------------------------------------------------------------------


def test_bdat_last_gives_bdat_chunks_and_end() -> None:
    s = in_transaction(CHUNK)
    events = s.feed(b"BDAT 5 LAST\r\nhello")
    assert events == [Bdat(5, True), DataChunk(b"hello"), BdatEnd(True, None)]
    assert s.replies()[-1] == "250 2.6.0 <0123456789AB> Queued mail for delivery"
    assert s.conn.state is ServerState.GREETED


def test_bdat_needs_no_reply() -> None:
    s = in_transaction(CHUNK)
    s.conn.receive_data(b"BDAT 5 LAST\r\n")
    assert s.conn.next_event() == Bdat(5, True)
    assert s.conn.awaiting_reply is None
    assert s.conn.state is ServerState.BDAT


def test_chunks_of_one_message_are_answered_one_by_one() -> None:
    s = in_transaction(CHUNK)
    s.feed(b"BDAT 3\r\nabc")
    assert s.replies()[-1] == "250 2.0.0 3 octets received"
    assert s.conn.state is ServerState.CHUNKING
    s.feed(b"BDAT 2 LAST\r\nde")
    assert s.content() == b"abcde"
    assert s.conn.state is ServerState.GREETED


def test_pipelined_bdats_in_one_packet() -> None:
    s = in_transaction(CHUNK)
    events = s.feed(b"BDAT 3\r\nabcBDAT 0\r\nBDAT 2 LAST\r\ndeNOOP\r\n")
    assert kinds(events) == [
        "Bdat",
        "DataChunk",
        "BdatEnd",
        "Bdat",
        "BdatEnd",
        "Bdat",
        "DataChunk",
        "BdatEnd",
        "Noop",
    ]
    assert s.content() == b"abcde"


def test_whole_transaction_pipelined_with_bdat() -> None:
    s = greeted(CHUNK)
    s.feed(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nBDAT 4 LAST\r\nbodyQUIT\r\n")
    assert s.content() == b"body"
    assert s.conn.state is ServerState.CLOSED


def test_chunk_ending_in_the_middle_of_a_read_leaves_the_rest_as_commands() -> None:
    s = in_transaction(CHUNK)
    events = s.feed(b"BDAT 4\r\nabcdNOOP\r\n")
    assert events[-1] == Noop()
    assert s.content() == b"abcd"


def test_chunk_split_across_reads_is_streamed() -> None:
    s = in_transaction(CHUNK)
    assert s.feed(b"BDAT 6 LAST\r\nab") == [Bdat(6, True), DataChunk(b"ab")]
    assert s.feed(b"cd") == [DataChunk(b"cd")]
    assert s.feed(b"efNOOP\r\n") == [DataChunk(b"ef"), BdatEnd(True, None), Noop()]


def test_bdat_zero_last_is_an_empty_last_chunk() -> None:
    s = in_transaction(CHUNK)
    assert s.feed(b"BDAT 0 LAST\r\n") == [Bdat(0, True), BdatEnd(True, None)]
    assert s.conn.state is ServerState.GREETED


def test_bdat_zero_then_last() -> None:
    s = in_transaction(CHUNK)
    s.feed(b"BDAT 0\r\n")
    assert s.replies()[-1] == "250 2.0.0 0 octets received"
    s.feed(b"BDAT 1 LAST\r\nx")
    assert s.content() == b"x"


def test_bdat_is_case_insensitive() -> None:
    s = in_transaction(CHUNK)
    assert s.feed(b"bdat 1 last\r\nx")[0] == Bdat(1, True)


def test_binary_content_is_passed_through_untouched() -> None:
    s = in_transaction(CHUNK)
    s.feed(b"BDAT %d LAST\r\n" % len(NASTY) + NASTY)
    assert s.content() == NASTY
    assert not any(isinstance(e, Mail | Rejected) for e in s.events[3:])


@pytest.mark.parametrize("cuts", [[], [1], [5, 6, 7], [13, 14], list(range(0, 80, 3))])
def test_chunk_octets_are_exact_whatever_the_split(cuts: list[int]) -> None:
    wire = b"BDAT 10\r\n" + NASTY[:10] + b"BDAT %d LAST\r\n" % (len(NASTY) - 10) + NASTY[10:] + b"NOOP\r\n"
    s = in_transaction(CHUNK)
    points = sorted({0, len(wire), *(c for c in cuts if c < len(wire))})
    for a, b in itertools.pairwise(points):
        s.feed(wire[a:b])
    assert s.content() == NASTY
    assert s.events[-1] == Noop()


def test_byte_at_a_time_equals_one_shot() -> None:
    wire = b"BDAT 7\r\n\r\n.\r\n\x00X" + b"BDAT 2 LAST\r\n.."
    whole = in_transaction(CHUNK)
    whole.feed(wire)
    trickled = in_transaction(CHUNK)
    for i in range(len(wire)):
        trickled.feed(wire[i : i + 1])
    assert trickled.merged_events() == whole.merged_events()
    assert trickled.content() == whole.content() == b"\r\n.\r\n\x00X.."


def test_a_big_chunk_is_never_held_in_the_buffer() -> None:
    s = in_transaction(CHUNK)
    s.feed(b"BDAT 100000 LAST\r\n")
    for _ in range(100):
        s.feed(b"z" * 1000)
        assert s.conn.buffered == 0
    assert len(s.content()) == 100000
    assert s.conn.state is ServerState.GREETED


def test_chunk_size_is_exposed_for_the_reply() -> None:
    s = in_transaction(CHUNK)
    s.feed(b"BDAT 3\r\nabc")
    assert s.conn.chunk_size == 3
    assert s.conn.message_octets == 3


def test_eof_in_the_middle_of_a_chunk_closes_without_bdat_end() -> None:
    s = in_transaction(CHUNK)
    s.feed(b"BDAT 10 LAST\r\nabc")
    assert s.feed(b"") == [ConnectionClosed()]
    assert not any(isinstance(e, BdatEnd) for e in s.events)


def test_reply_to_the_last_chunk_ends_the_transaction_whatever_its_code() -> None:
    s = in_transaction(CHUNK)
    s.conn.receive_data(b"BDAT 1 LAST\r\nx")
    while not isinstance(s.conn.next_event(), BdatEnd):
        pass
    s.conn.send(R.TEMP_FAILURE)
    assert s.conn.state is ServerState.GREETED
    assert s.conn.recipients_accepted == 0


# --- Sequencing --------------------------------------------------------------------------------------------


def test_bdat_outside_a_transaction_drains_its_octets_then_is_503() -> None:
    s = greeted(CHUNK)
    events = s.feed(b"BDAT 12\r\nQUIT\r\nNOOP\r\nRSET\r\n")
    r = rejected(events[:1])
    assert r.reply == R.NEED_RCPT
    assert r.reply.code == 503
    assert kinds(events) == ["Rejected", "Rset"]  # "QUIT\r\nNOOP\r\n" was chunk content, never a command
    assert s.conn.state is ServerState.GREETED


def test_refused_bdat_octets_are_drained_across_reads() -> None:
    s = greeted(CHUNK)
    assert s.feed(b"BDAT 6\r\nQUI") == []
    assert s.conn.awaiting_reply is None
    events = s.feed(b"T\r\nNOOP\r\n")
    assert kinds(events) == ["Rejected", "Noop"]


def test_bdat_before_hello_drains_then_503() -> None:
    s = Session.start(CHUNK)
    events = s.feed(b"BDAT 6\r\nQUIT\r\n")
    assert rejected(events).reply.code == 503
    assert s.conn.state is ServerState.READY


def test_bdat_after_mail_without_accepted_rcpt_is_554() -> None:
    s = greeted(CHUNK)
    s.feed(b"MAIL FROM:<a@example.org>\r\n")
    assert rejected(s.feed(b"BDAT 2 LAST\r\nxx")).reply == R.NO_VALID_RCPT


def test_bdat_after_the_last_chunk_drains_then_503() -> None:
    s = in_transaction(CHUNK)
    s.feed(b"BDAT 1 LAST\r\nx")
    assert rejected(s.feed(b"BDAT 4\r\nNOOP")).reply.code == 503


def test_data_after_bdat_is_503() -> None:
    s = in_transaction(CHUNK)
    s.feed(b"BDAT 3\r\nabc")
    r = rejected(s.feed(b"DATA\r\n"))
    assert str(r.reply) == "503 5.5.1 Bad sequence of commands"


def test_rcpt_after_bdat_is_503() -> None:
    s = in_transaction(CHUNK)
    s.feed(b"BDAT 3\r\nabc")
    assert rejected(s.feed(b"RCPT TO:<c@example.com>\r\n")).reply.code == 503


def test_mail_after_bdat_is_503_nested() -> None:
    s = in_transaction(CHUNK)
    s.feed(b"BDAT 3\r\nabc")
    assert rejected(s.feed(b"MAIL FROM:<c@example.org>\r\n")).reply == R.NESTED_MAIL


def test_rset_after_a_partial_bdat_sequence_resets_everything() -> None:
    s = in_transaction(ServerOptions(chunking=True, max_message_size=10))
    s.feed(b"BDAT 8\r\n12345678")
    s.feed(b"RSET\r\n")
    assert s.conn.state is ServerState.GREETED
    assert s.conn.recipients_accepted == 0
    assert s.conn.message_octets == 0
    assert rejected(s.feed(b"BDAT 1 LAST\r\nx")).reply.code == 503
    s.feed(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\n")
    assert s.feed(b"BDAT 8 LAST\r\nabcdefgh")[-1] == BdatEnd(True, None)  # the size count started over


def test_ehlo_after_a_partial_bdat_sequence_resets_the_transaction() -> None:
    s = in_transaction(CHUNK)
    s.feed(b"BDAT 3\r\nabc")
    s.feed(b"EHLO again\r\n")
    assert s.conn.state is ServerState.GREETED
    assert s.conn.recipients_accepted == 0


def test_noop_keeps_the_chunking_transaction() -> None:
    s = in_transaction(CHUNK)
    s.feed(b"BDAT 3\r\nabcNOOP\r\n")
    assert s.conn.state is ServerState.CHUNKING


# --- Syntax and switched off -------------------------------------------------------------------------------


@pytest.mark.parametrize("line", [b"BDAT\r\n", b"BDAT abc\r\n", b"BDAT -1\r\n", b"BDAT 1.5 LAST\r\n"])
def test_bdat_without_a_usable_size_is_501_and_closes(line: bytes) -> None:
    s = in_transaction(CHUNK)
    r = closing(s.feed(line + b"NOOP\r\n"))
    assert r.reply.code == 501
    assert r.close
    assert s.conn.state is ServerState.CLOSED


@pytest.mark.parametrize("line", [b"BDAT 3 FIRST\r\n", b"BDAT 3 LAST LAST\r\n", b"BDAT 3  LAST x\r\n"])
def test_bdat_with_a_size_but_bad_syntax_drains_then_501(line: bytes) -> None:
    s = in_transaction(CHUNK)
    events = s.feed(line + b"abcNOOP\r\n")
    assert kinds(events) == ["Rejected", "Noop"]
    assert events[0].reply == R.SYNTAX  # type: ignore[union-attr]
    assert not events[0].close  # type: ignore[union-attr]


def test_bdat_when_chunking_is_off_is_502_and_closes() -> None:
    s = in_transaction()
    r = closing(s.feed(b"BDAT 5 LAST\r\nhello"))
    assert r.reply == R.NOT_IMPLEMENTED
    assert r.close
    assert s.conn.state is ServerState.CLOSED


def test_bdat_line_with_control_characters_closes() -> None:
    r = closing(in_transaction(CHUNK).feed(b"BDAT 5\x00\r\n"))
    assert r.reply == R.BAD_CHARS
    assert r.close


def test_over_long_bdat_line_closes() -> None:
    r = closing(in_transaction(CHUNK).feed(b"BDAT 5 " + b"x" * 600 + b"\r\n"))
    assert r.reply == R.LINE_TOO_LONG
    assert r.close


def test_bdat_after_refused_banner_drains_then_no_service() -> None:
    conn = ServerConnection(CHUNK)
    conn.greeting(R.Reply(554, "5.3.2", "no service"))
    conn.receive_data(b"BDAT 6\r\nQUIT\r\n")
    event = conn.next_event()
    assert isinstance(event, Rejected)
    assert event.reply == R.NO_SERVICE
    assert conn.buffered == 0


def test_chunking_keyword_is_advertised_when_on() -> None:
    assert "CHUNKING" in ServerConnection(CHUNK).ehlo_keywords()
    assert "CHUNKING" not in ServerConnection().ehlo_keywords()


# --- Size limit across chunks ------------------------------------------------------------------------------

LIMIT = ServerOptions(chunking=True, max_message_size=10)


def test_message_of_exactly_max_size_over_chunks_is_accepted() -> None:
    s = in_transaction(LIMIT)
    s.feed(b"BDAT 6\r\n123456BDAT 4 LAST\r\n7890")
    assert s.events[-1] == BdatEnd(True, None)
    assert s.content() == b"1234567890"


def test_message_over_max_size_is_refused_552_and_its_octets_drained() -> None:
    s = in_transaction(LIMIT)
    s.feed(b"BDAT 6\r\n123456")
    events = s.feed(b"BDAT 6 LAST\r\nabcdefNOOP\r\n")
    assert events == [Bdat(6, True), BdatEnd(True, R.TOO_BIG), Noop()]
    assert s.replies()[-2] == "552 5.3.4 Message size exceeds fixed maximum message size"
    assert s.conn.state is ServerState.GREETED


def test_later_chunks_of_a_too_big_message_get_the_same_error() -> None:
    s = in_transaction(LIMIT)
    s.feed(b"BDAT 11\r\n" + b"x" * 11)
    assert s.events[-1] == BdatEnd(False, R.TOO_BIG)
    assert s.conn.state is ServerState.CHUNKING
    events = s.feed(b"BDAT 2\r\nyyBDAT 1 LAST\r\nz")
    assert events == [Bdat(2, False), BdatEnd(False, R.TOO_BIG), Bdat(1, True), BdatEnd(True, R.TOO_BIG)]
    assert s.content() == b""
    assert s.conn.state is ServerState.GREETED


def test_next_message_after_a_too_big_one_is_accepted() -> None:
    s = in_transaction(LIMIT)
    s.feed(b"BDAT 11 LAST\r\n" + b"x" * 11)
    s.feed(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nBDAT 3 LAST\r\nabc")
    assert s.events[-1] == BdatEnd(True, None)


def test_a_refused_chunk_refuses_the_rest_of_the_message() -> None:
    s = in_transaction(CHUNK)
    s.conn.receive_data(b"BDAT 2\r\nabBDAT 2 LAST\r\ncd")
    while not isinstance(event := s.conn.next_event(), BdatEnd):
        pass
    s.conn.send(R.TEMP_FAILURE)  # e.g. the spool could not be written
    assert s.conn.state is ServerState.CHUNKING
    events = s.pump()
    assert events == [Bdat(2, True), BdatEnd(True, R.TEMP_FAILURE)]
    assert event == BdatEnd(False, None)


# --- BINARYMIME ------------------------------------------------------------------------------------------


def test_body_binarymime_is_accepted_with_binarymime_on() -> None:
    s = greeted(BINARY)
    assert s.feed(b"MAIL FROM:<a@example.org> BODY=BINARYMIME\r\n") == [
        Mail("a@example.org", {"BODY": "BINARYMIME"})
    ]
    assert s.conn.state is ServerState.MAIL
    assert s.conn.transaction_binarymime


@pytest.mark.parametrize("options", [CHUNK, ServerOptions(binarymime=True), ServerOptions()])
def test_body_binarymime_is_555_unless_binarymime_and_chunking_are_on(options: ServerOptions) -> None:
    r = rejected(greeted(options).feed(b"MAIL FROM:<a@example.org> BODY=BINARYMIME\r\n"))
    assert r.reply == R.PARAM_UNKNOWN


def test_data_in_a_binarymime_transaction_is_503() -> None:
    s = in_transaction(BINARY, mail=b"MAIL FROM:<a@example.org> BODY=BINARYMIME\r\n")
    r = rejected(s.feed(b"DATA\r\n"))
    assert str(r.reply) == "503 5.5.1 BINARYMIME requires BDAT"


def test_bdat_in_a_binarymime_transaction_is_accepted() -> None:
    s = in_transaction(BINARY, mail=b"MAIL FROM:<a@example.org> BODY=BINARYMIME\r\n")
    s.feed(b"BDAT 3 LAST\r\n\x00\xff\r")
    assert s.content() == b"\x00\xff\r"


def test_binarymime_ends_with_its_transaction() -> None:
    s = in_transaction(BINARY, mail=b"MAIL FROM:<a@example.org> BODY=BINARYMIME\r\n")
    s.feed(b"BDAT 0 LAST\r\n")
    assert not s.conn.transaction_binarymime
    s.feed(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\n")
    assert one(s.feed(b"DATA\r\n")) == Data()


def test_binarymime_keyword_needs_chunking() -> None:
    assert "BINARYMIME" in ServerConnection(BINARY).ehlo_keywords()
    assert "BINARYMIME" not in ServerConnection(ServerOptions(binarymime=True)).ehlo_keywords()
