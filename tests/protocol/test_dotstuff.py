"""DotStuffer (client) and DotUnstuffer (server): stuffing, end of data, normalisation, limits, chunking."""

from __future__ import annotations

import re
import smtplib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtpsvc.protocol import DotStuffer, DotUnstuffer, normalise_line_ends, stuff, unstuff


def stuff_in_pieces(data: bytes, cuts: list[int]) -> bytes:
    stuffer = DotStuffer()
    out, last = [], 0
    for cut in [*sorted(cuts), len(data)]:
        out.append(stuffer.feed(data[last:cut]))
        last = cut
    return b"".join(out) + stuffer.finish()


def unstuff_in_pieces(data: bytes, size: int) -> tuple[bytes, DotUnstuffer, int]:
    unstuffer = DotUnstuffer()
    out, pos = [], 0
    while pos < len(data) and not unstuffer.done:
        piece = data[pos : pos + size]
        content, used = unstuffer.feed(piece)
        out.append(content)
        pos += used
    return b"".join(out), unstuffer, pos


# --- DotStuffer --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "wire"),
    [
        (b"", b".\r\n"),
        (b"a\r\n", b"a\r\n.\r\n"),
        (b"a", b"a\r\n.\r\n"),
        (b".", b"..\r\n.\r\n"),
        (b".a\r\n.\r\n..\r\n", b"..a\r\n..\r\n...\r\n.\r\n"),
        (b"a.b\r\n", b"a.b\r\n.\r\n"),
    ],
)
def test_stuffer_doubles_leading_dots_and_terminates(content: bytes, wire: bytes) -> None:
    assert stuff(content) == wire


@pytest.mark.parametrize(
    ("content", "wire"),
    [
        (b"a\n.b", b"a\r\n..b\r\n.\r\n"),
        (b"a\r.b", b"a\r\n..b\r\n.\r\n"),
        (b"a\n.\n", b"a\r\n..\r\n.\r\n"),
        (b"a\r", b"a\r\n.\r\n"),
    ],
)
def test_stuffer_normalises_bare_line_ends_and_stuffs_after_them(content: bytes, wire: bytes) -> None:
    assert stuff(content) == wire


def test_stuffer_keeps_state_across_a_crlf_split() -> None:
    assert stuff_in_pieces(b"a\r\n.b", [1, 2]) == b"a\r\n..b\r\n.\r\n"


def test_stuffer_keeps_state_across_a_dot_at_chunk_start() -> None:
    assert stuff_in_pieces(b"a\r\n.b", [3]) == b"a\r\n..b\r\n.\r\n"


def test_stuffer_refuses_use_after_finish() -> None:
    stuffer = DotStuffer()
    stuffer.finish()
    with pytest.raises(ValueError):
        stuffer.feed(b"x")
    with pytest.raises(ValueError):
        stuffer.finish()


@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=10))
@settings(max_examples=300, deadline=None)
def test_stuffer_output_is_independent_of_chunking(data: bytes, cuts: list[int]) -> None:
    cuts = [c for c in cuts if c <= len(data)]
    assert stuff_in_pieces(data, cuts) == stuff(data)


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_stuffer_output_has_only_crlf_line_ends_and_one_terminator(data: bytes) -> None:
    wire = stuff(data)
    assert normalise_line_ends(wire) == wire
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n"
    assert b"\r\n.\r\n" not in wire[:-3]


# --- Round trip --------------------------------------------------------------------------------------------


def _expected_content(data: bytes) -> bytes:
    norm = normalise_line_ends(data)
    return norm if norm.endswith(b"\r\n") or not norm else norm + b"\r\n"


@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=8), st.integers(1, 50))
@settings(max_examples=400, deadline=None)
def test_stuff_then_unstuff_gives_normalised_input(data: bytes, cuts: list[int], size: int) -> None:
    wire = stuff_in_pieces(data, [c for c in cuts if c <= len(data)])
    content, unstuffer, used = unstuff_in_pieces(wire + b"NEXT", size)
    assert unstuffer.done
    assert content == _expected_content(data)
    assert used == len(wire)


@given(st.lists(st.sampled_from([b"\r", b"\n", b".", b"x", b"\r\n", b"\r\n.\r\n"]), max_size=40))
@settings(max_examples=300, deadline=None)
def test_stuff_then_unstuff_round_trips_line_end_heavy_content(parts: list[bytes]) -> None:
    data = b"".join(parts)
    assert unstuff(stuff(data)) == _expected_content(data)


# --- DotUnstuffer ------------------------------------------------------------------------------------------


def test_unstuffer_reports_bytes_after_the_end() -> None:
    unstuffer = DotUnstuffer()
    content, used = unstuffer.feed(b"a\r\n.\r\nQUIT\r\n")
    assert (content, unstuffer.done) == (b"a\r\n", True)
    assert b"a\r\n.\r\nQUIT\r\n"[used:] == b"QUIT\r\n"


def test_unstuffer_refuses_input_after_the_end() -> None:
    unstuffer = DotUnstuffer()
    unstuffer.feed(b".\r\n")
    with pytest.raises(ValueError):
        unstuffer.feed(b"x")


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_unstuffer_result_is_independent_of_chunking(size: int) -> None:
    wire = b"..a\r\nb\nc\r.\r\r\n\r\n..\r\n.x\n.\r\n.\n\r\n.\r\ntail"
    content, unstuffer, used = unstuff_in_pieces(wire, size)
    assert unstuffer.done
    assert content == b".a\r\nb\r\nc\r\n.\r\n\r\n\r\n.\r\nx\r\n.\r\n.\r\n\r\n"
    assert wire[used:] == b"tail"


@pytest.mark.parametrize("tail", [b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n", b"\r\n.\r", b".\n"])
def test_unstuffer_ends_only_at_crlf_dot_crlf(tail: bytes) -> None:
    unstuffer = DotUnstuffer()
    unstuffer.feed(b"x" + tail)
    assert not unstuffer.done


def test_unstuffer_line_limit_counts_content_plus_crlf() -> None:
    ok = DotUnstuffer(max_line=10)
    ok.feed(b"12345678\r\n" + b"." * 9 + b"\r\n.\r\n")
    assert ok.error is None
    too_long = DotUnstuffer(max_line=10)
    too_long.feed(b"123456789\r\n.\r\n")
    assert (too_long.error, too_long.done) == ("line", True)


def test_unstuffer_line_limit_finds_a_long_line_in_the_middle_of_a_chunk() -> None:
    unstuffer = DotUnstuffer(max_line=10)
    content, _ = unstuffer.feed(b"a\r\n" + b"b" * 20 + b"\r\nc\r\n")
    assert unstuffer.error == "line"
    assert content == b""


def test_unstuffer_line_limit_spans_chunks() -> None:
    unstuffer = DotUnstuffer(max_line=10)
    for _ in range(9):
        unstuffer.feed(b"x")
    assert unstuffer.error == "line"


def test_unstuffer_size_limit_stops_content() -> None:
    unstuffer = DotUnstuffer(max_size=5)
    assert unstuffer.feed(b"abc")[0] == b"abc"
    assert unstuffer.feed(b"\r\nde")[0] == b""
    assert unstuffer.error == "size"
    unstuffer.feed(b"\r\n.\r\n")
    assert unstuffer.done


def test_unstuffer_carries_at_most_four_bytes() -> None:
    unstuffer = DotUnstuffer()
    content, used = unstuffer.feed(b"abc\r\n.\r")
    assert (content, used) == (b"abc", 7)  # "\r\n.\r" held back: maybe the end
    assert unstuffer.feed(b"\n") == (b"\r\n", 1)
    assert unstuffer.done


def test_unstuff_requires_a_complete_payload() -> None:
    with pytest.raises(ValueError):
        unstuff(b"no end\r\n")


def _reference_unstuff(raw: bytes) -> tuple[bytes, int]:
    """The DATA rules spelt out line by line (slow and obvious), to check the fast DotUnstuffer against."""
    stream = b"\r\n" + raw  # the start of data counts as following a CRLF
    end = stream.find(b"\r\n.\r\n")
    assert end >= 0
    body = stream[2 : end + 2]
    lines = re.findall(rb"([^\r\n]*)(\r\n|\r|\n)", body)
    assert b"".join(text + eol for text, eol in lines) == body
    out = []
    for text, _eol in lines:
        out.append((text[1:] if text.startswith(b".") and len(text) > 1 else text) + b"\r\n")
    return b"".join(out), end + 3


@given(
    st.lists(st.sampled_from([b"\r", b"\n", b".", b"x", b"\r\n", b".."]), max_size=40),
    st.binary(max_size=5),
    st.integers(1, 9),
)
@settings(max_examples=1000, deadline=None)
def test_unstuffer_agrees_with_the_line_by_line_rules(parts: list[bytes], tail: bytes, size: int) -> None:
    raw = b"".join(parts) + b"\r\n.\r\n" + tail
    content, unstuffer, used = unstuff_in_pieces(raw, size)
    assert unstuffer.done
    assert (content, used) == _reference_unstuff(raw)


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_stuffer_matches_the_standard_library_smtplib(data: bytes) -> None:
    # An independent implementation: smtplib.SMTP.data() quotes with quotedata(), then adds CRLF "." CRLF.
    quoted = smtplib.quotedata(data.decode("latin-1")).encode("latin-1")
    if quoted and not quoted.endswith(b"\r\n"):
        quoted += b"\r\n"
    assert stuff(data) == quoted + b".\r\n"
