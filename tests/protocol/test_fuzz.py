"""Hypothesis fuzzing of ServerConnection: arbitrary input never breaks it; chunking never changes events."""

from __future__ import annotations

import itertools
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smtpsvc.protocol import PARAMS_ALLOWANCE, ConnectionClosed, ServerOptions, ServerState, stuff
from smtpsvc.protocol.server import PARAMS_ALLOWANCE as SERVER_PARAMS_ALLOWANCE

from .drive import Session

REPLY_BYTES = re.compile(rb"(\d{3}[- ][^\r\n]*\r\n)+")

FRAGMENTS = [
    b"EHLO c.test\r\n",
    b"HELO c.test\r\n",
    b"MAIL FROM:<a@example.org>\r\n",
    b"MAIL FROM:<> SIZE=100 BODY=8BITMIME\r\n",
    "MAIL FROM:<jö@exämple.org> SMTPUTF8\r\n".encode(),
    b"RCPT TO:<b@example.com>\r\n",
    b"RCPT TO:<postmaster> NOTIFY=NEVER\r\n",
    b"RCPT TO:<@r.example:c@example.com>\r\n",
    b"DATA\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"HELP\r\n",
    b"VRFY x\r\n",
    b"QUIT\r\n",
    b"GET / HTTP/1.1\r\n",
    b".\r\n",
    b"..\r\n",
    b"\r\n.\r\n",
    b"\r\n",
    b"\r",
    b"\n",
    b".",
    b"\x00",
    b"x" * 700,
    b"y" * 70,
]

SMALL = ServerOptions(max_command_line=64, max_text_line=50, max_message_size=200, max_recipients=3)
OPTIONS = st.sampled_from(
    [ServerOptions(), SMALL, ServerOptions(enhanced_status_codes=False, smtputf8=False)]
)


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


PREFIXES = [
    b"",
    b"EHLO c.test\r\n",
    b"EHLO c.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\n",
    b"EHLO c.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n",
]


@st.composite
def noisy_input(draw: st.DrawFn) -> bytes:
    """SMTP-shaped noise: a prefix that reaches a deeper state, then fragments mixed with random bytes."""
    fragment = st.sampled_from(FRAGMENTS)
    parts = draw(st.lists(st.one_of(fragment, fragment, fragment, st.binary(max_size=30)), max_size=30))
    return draw(st.sampled_from(PREFIXES)) + b"".join(parts)


def test_params_allowance_is_exported() -> None:
    assert PARAMS_ALLOWANCE == SERVER_PARAMS_ALLOWANCE == 500


@given(noisy_input(), st.lists(st.integers(0, 10_000), max_size=12), OPTIONS, st.booleans())
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_arbitrary_input_in_arbitrary_chunks_never_breaks_the_server(
    data: bytes, cuts: list[int], options: ServerOptions, eof: bool
) -> None:
    s = Session.start(options)
    written = [bytes(s.output)]
    bound = options.max_command_line + PARAMS_ALLOWANCE
    for chunk in _chunks(data, cuts):
        before = len(s.output)
        s.feed(chunk)
        written.append(bytes(s.output[before:]))
        # Memory: what stays buffered after the app has taken every event is below one command line.
        assert s.max_buffered <= bound + len(chunk)
        assert s.conn.awaiting_reply is not None or s.conn.buffered < bound
        s.max_buffered = 0
    if eof:
        s.feed(b"")
        assert isinstance(s.events[-1], ConnectionClosed)
        assert s.conn.state is ServerState.CLOSED
    for piece in written:
        assert piece == b"" or REPLY_BYTES.fullmatch(piece), piece


@st.composite
def valid_session(draw: st.DrawFn) -> bytes:
    """A well-formed client conversation, pipelined as one byte string."""
    out = [draw(st.sampled_from([b"EHLO client.test\r\n", b"ehlo [192.0.2.7]\r\n"]))]
    for _ in range(draw(st.integers(0, 3))):
        sender = draw(st.sampled_from([b"<>", b"<a@example.org>", b'<"x y"@example.org>']))
        params = draw(st.sampled_from([b"", b" SIZE=10", b" BODY=8BITMIME RET=HDRS", b" ENVID=ab+2Bc"]))
        out.append(b"MAIL FROM:" + sender + params + b"\r\n")
        for i in range(draw(st.integers(1, 3))):
            out.append(
                b"RCPT TO:<r%d@example.com>%s\r\n" % (i, draw(st.sampled_from([b"", b" NOTIFY=NEVER"])))
            )
        if draw(st.booleans()):
            body = draw(st.binary(max_size=200))
            out.append(b"DATA\r\n" + stuff(body))
        else:
            out.append(b"RSET\r\n")
        out.append(draw(st.sampled_from([b"", b"NOOP\r\n", b"HELP\r\n"])))
    out.append(b"QUIT\r\n")
    return b"".join(out)


@given(valid_session(), st.lists(st.integers(0, 10_000), max_size=20))
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_valid_sessions_give_the_same_events_however_split(data: bytes, cuts: list[int]) -> None:
    whole = Session.start()
    whole.feed(data)
    split = Session.start()
    for chunk in _chunks(data, cuts):
        split.feed(chunk)
    assert split.merged_events() == whole.merged_events()
    assert split.output == whole.output
    assert whole.conn.state is ServerState.CLOSED
    assert not any(type(e).__name__ == "Rejected" for e in whole.events)


@given(valid_session())
@settings(max_examples=60, deadline=None)
def test_valid_sessions_fed_byte_by_byte_equal_one_shot(data: bytes) -> None:
    whole = Session.start()
    whole.feed(data)
    trickled = Session.start()
    for i in range(len(data)):
        trickled.feed(data[i : i + 1])
    assert trickled.merged_events() == whole.merged_events()
