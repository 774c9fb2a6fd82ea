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
    # Extensions (they only take effect under the options that switch them on).
    b"STARTTLS\r\n",
    b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n",
    b"AUTH PLAIN\r\n",
    b"AUTH LOGIN\r\n",
    b"AUTH LOGIN YWxpY2U=\r\n",
    b"YWxpY2U=\r\n",
    b"c2VjcmV0\r\n",
    b"*\r\n",
    b"MAIL FROM:<a@example.org> BODY=BINARYMIME\r\n",
    b"BDAT 5\r\n",
    b"BDAT 3 LAST\r\nabc",
    b"BDAT 0 LAST\r\n",
    b"BDAT 2 LAST\r\n\r\n",
    b"BDAT x\r\n",
    b"ETRN example.com\r\n",
    b"ETRN #q\r\n",
    b"XEXCH50 4 2\r\n",
    b"XEXCH50 0 2\r\n",
    b"X-LINK2STATE FIRST CHUNK=x\r\n",
]

SMALL = ServerOptions(max_command_line=64, max_text_line=50, max_message_size=200, max_recipients=3)
EXTENDED = ServerOptions(
    starttls=True,
    auth_mechanisms=("PLAIN", "LOGIN"),
    auth_plaintext_allowed=True,
    chunking=True,
    binarymime=True,
    etrn=True,
    vrfy=True,
    xexch50=True,
    xexch50_max=64,
    x_link2state=True,
    max_auth_line=600,
)
EXTENDED_SMALL = ServerOptions(
    max_command_line=64,
    max_message_size=20,
    max_recipients=3,
    starttls=True,
    require_tls=True,
    auth_mechanisms=("LOGIN",),
    auth_requires_tls=False,
    chunking=True,
    etrn=True,
    xexch50=True,
    xexch50_max=8,
    max_auth_line=40,
)
OPTIONS = st.sampled_from(
    [
        ServerOptions(),
        SMALL,
        ServerOptions(enhanced_status_codes=False, smtputf8=False),
        EXTENDED,
        EXTENDED,
        EXTENDED_SMALL,
    ]
)


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


PREFIXES = [
    b"",
    b"EHLO c.test\r\n",
    b"EHLO c.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\n",
    b"EHLO c.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n",
    b"EHLO c.test\r\nAUTH LOGIN\r\n",
    b"EHLO c.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nBDAT 3\r\nabc",
    b"EHLO c.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nBDAT 40 LAST\r\n",
    b"EHLO c.test\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\nMAIL FROM:<a@example.org>\r\n"
    b"RCPT TO:<b@example.com>\r\nXEXCH50 6 2\r\n",
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
    if options.auth_mechanisms:
        bound = max(bound, options.max_auth_line)
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


def _bdat_chunks(draw: st.DrawFn, body: bytes) -> list[bytes]:
    cuts = sorted(set(draw(st.lists(st.integers(0, len(body)), max_size=3))))
    points = [0, *cuts, len(body)]
    pieces = [body[a:b] for a, b in itertools.pairwise(points)]
    wire = [b"BDAT %d\r\n" % len(p) + p for p in pieces[:-1]]
    return [*wire, b"BDAT %d LAST\r\n" % len(pieces[-1]) + pieces[-1]]


@st.composite
def valid_extended_session(draw: st.DrawFn) -> bytes:
    """A well-formed conversation using AUTH, BDAT, BINARYMIME, XEXCH50, ETRN and X-LINK2STATE, pipelined
    as one byte string (STARTTLS is left out: what follows it in the same packet is dropped by design)."""
    out = [b"EHLO client.test\r\n"]
    auth = draw(st.sampled_from(["", "plain", "plain-334", "login", "login-initial"]))
    out.append(
        {
            "": b"",
            "plain": b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n",
            "plain-334": b"AUTH PLAIN\r\nAGFsaWNlAHNlY3JldA==\r\n",
            "login": b"AUTH LOGIN\r\nYWxpY2U=\r\nc2VjcmV0\r\n",
            "login-initial": b"AUTH LOGIN YWxpY2U=\r\nc2VjcmV0\r\n",
        }[auth]
    )
    for _ in range(draw(st.integers(0, 3))):
        binary = draw(st.booleans())
        out.append(b"MAIL FROM:<a@example.org>%s\r\n" % (b" BODY=BINARYMIME" if binary else b""))
        out.append(b"RCPT TO:<b@example.com>\r\n")
        if auth and draw(st.booleans()):
            blob = draw(st.binary(min_size=1, max_size=64))
            out.append(b"XEXCH50 %d 2\r\n" % len(blob) + blob)
        body = draw(st.binary(max_size=200))
        if binary or draw(st.booleans()):
            out.extend(_bdat_chunks(draw, body))
        else:
            out.append(b"DATA\r\n" + stuff(body))
        out.append(draw(st.sampled_from([b"", b"ETRN example.com\r\n", b"X-LINK2STATE LAST\r\n"])))
    out.append(b"QUIT\r\n")
    return b"".join(out)


@given(valid_extended_session(), st.lists(st.integers(0, 10_000), max_size=20))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_valid_extended_sessions_give_the_same_events_however_split(data: bytes, cuts: list[int]) -> None:
    whole = Session.start(EXTENDED)
    whole.feed(data)
    split = Session.start(EXTENDED)
    for chunk in _chunks(data, cuts):
        split.feed(chunk)
    assert split.merged_events() == whole.merged_events()
    assert split.output == whole.output
    assert whole.conn.state is ServerState.CLOSED
    assert not any(type(e).__name__ == "Rejected" for e in whole.events)
    # No 5xx from the application either, but for X-LINK2STATE before AUTH (504 5.7.4; after it, 250).
    authenticated = any(type(e).__name__ in ("Auth", "AuthResponse") for e in whole.events)
    refused = 0 if authenticated else sum(type(e).__name__ == "XLink2State" for e in whole.events)
    assert whole.output.count(b"\r\n5") == refused


@given(valid_extended_session())
@settings(max_examples=40, deadline=None)
def test_valid_extended_sessions_fed_byte_by_byte_equal_one_shot(data: bytes) -> None:
    whole = Session.start(EXTENDED)
    whole.feed(data)
    trickled = Session.start(EXTENDED)
    for i in range(len(data)):
        trickled.feed(data[i : i + 1])
    assert trickled.merged_events() == whole.merged_events()
