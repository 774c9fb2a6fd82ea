"""Pickup file parsing: X-lines or header envelope, Bcc stripped, line ends normalised, invalid files."""

from __future__ import annotations

import io

import pytest

from smtpsvc.folders import pickup
from smtpsvc.folders.pickup import CrlfNormalizer, InvalidPickupFile, read_pickup_file


class Collector:
    id = "QID"

    def __init__(self) -> None:
        self.data = bytearray()

    @property
    def size(self) -> int:
        return len(self.data)

    def write(self, data: bytes) -> None:
        self.data += data

    def abort(self) -> None:
        self.data.clear()


def parse(content: bytes, max_size: int = 0) -> tuple[object, bytes]:
    writer = Collector()
    envelope = read_pickup_file(io.BytesIO(content), writer, "relay.test", max_size)
    message = bytes(writer.data)
    assert message.startswith(b"Received: from pickup")
    return envelope, message.split(b"\r\n\t", 2)[2].split(b"\r\n", 1)[1]


def test_envelope_lines_give_the_envelope_and_are_not_part_of_the_message() -> None:
    env, message = parse(
        b"x-sender: <a@x.test>\r\nX-Receiver: b@y.test\r\nX-RECEIVER: c@y.test\r\n"
        b"From: a@x.test\r\nSubject: s\r\n\r\nbody\r\n"
    )
    assert env.sender == "a@x.test"  # type: ignore[attr-defined]
    assert env.recipients == ("b@y.test", "c@y.test")  # type: ignore[attr-defined]
    assert message == b"From: a@x.test\r\nSubject: s\r\n\r\nbody\r\n"


def test_without_envelope_lines_recipients_come_from_to_cc_bcc_and_bcc_is_removed() -> None:
    env, message = parse(
        b"From: Alice <a@x.test>\r\nTo: b@y.test, Carol <c@y.test>\r\nCc: d@y.test\r\n"
        b"Bcc: secret@y.test,\r\n  other@y.test\r\nSubject: s\r\n\r\nbody\r\n"
    )
    assert env.sender == "a@x.test"  # type: ignore[attr-defined]
    assert env.recipients == (
        "b@y.test",
        "c@y.test",
        "d@y.test",
        "secret@y.test",  # type: ignore[attr-defined]
        "other@y.test",
    )
    assert b"secret" not in message and b"other@" not in message
    assert message.startswith(b"From: Alice <a@x.test>\r\nTo: b@y.test")


def test_sender_header_wins_over_from() -> None:
    env, _ = parse(b"From: a@x.test\r\nSender: s@x.test\r\nTo: b@y.test\r\n\r\nbody\r\n")
    assert env.sender == "s@x.test"  # type: ignore[attr-defined]


def test_unix_line_ends_are_normalised_to_crlf() -> None:
    _, message = parse(b"From: a@x.test\nTo: b@y.test\n\nline1\nline2\n")
    assert message == b"From: a@x.test\r\nTo: b@y.test\r\n\r\nline1\r\nline2\r\n"


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"To: b@y.test\r\n\r\nno from\r\n", "no From"),
        (b"From: a@x.test\r\nSubject: s\r\n\r\nnobody\r\n", "no recipients"),
        (b"", "no message headers"),
        (b"x\r\n", r"no message headers: line 1 is not a header field"),
        (b"X-Receiver: b@y.test\r\nnot a field\r\n\r\nbody\r\n", "line 2 is not a header field"),
        (
            b"X-Sender: a@x.test\r\nX-Sender: b@x.test\r\nX-Receiver: c@y.test\r\n\r\n",
            "more than one X-Sender",
        ),
        (b"X-Receiver: not an address\r\nFrom: a@x.test\r\n\r\nbody\r\n", "invalid address"),
    ],
)
def test_invalid_files_are_refused_with_a_reason(content: bytes, reason: str) -> None:
    with pytest.raises(InvalidPickupFile, match=reason):
        parse(content)


def test_oversize_file_is_refused() -> None:
    with pytest.raises(InvalidPickupFile, match="larger than the maximum"):
        parse(b"From: a@x.test\r\nTo: b@y.test\r\n\r\n" + (b"x" * 50 + b"\r\n") * 100, max_size=1000)


@pytest.mark.parametrize("split", range(1, 12))
def test_normaliser_handles_any_split(split: int) -> None:
    data = b"a\r\nb\nc\rd\r\n\re"
    n = CrlfNormalizer()
    out = n.feed(data[:split]) + n.feed(data[split:]) + n.finish()
    assert out == b"a\r\nb\r\nc\r\nd\r\n\r\ne"


def test_a_looping_file_with_too_many_received_headers_is_refused() -> None:
    looped = b"Received: from a\r\n" * 16 + b"From: a@x.test\r\nTo: b@y.test\r\n\r\nbody\r\n"
    writer = Collector()
    with pytest.raises(InvalidPickupFile, match=r"5\.4\.6 too many hops"):
        read_pickup_file(io.BytesIO(looped), writer, "relay.test", 0, max_hops=15)
    ok = b"Received: from a\r\n" * 15 + b"From: a@x.test\r\nTo: b@y.test\r\n\r\nbody\r\n"
    read_pickup_file(io.BytesIO(ok), Collector(), "relay.test", 0, max_hops=15)


def test_cr_only_line_ends_in_the_envelope_lines_and_headers_are_read_as_line_ends() -> None:
    env, message = parse(
        b"X-Sender: a@x.test\rX-Receiver: b@y.test\rFrom: a@x.test\rSubject: s\r\rbody\rmore\r"
    )
    assert env.sender == "a@x.test" and env.recipients == ("b@y.test",)  # type: ignore[attr-defined]
    assert message == b"From: a@x.test\r\nSubject: s\r\n\r\nbody\r\nmore\r\n"


@pytest.mark.parametrize("size", [1, 2, 3, 997, 4095, 4096, 4097])
def test_line_ends_split_across_reads_are_one_line_end(size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pickup, "LINE_CHUNK", size)
    content = b"X-Receiver: b@y.test\r\nFrom: a@x.test\r\n" + b"X-Pad: " + b"p" * 900 + b"\r\n\r\nbody\n"
    _, message = parse(content)
    assert message == content.split(b"\r\n", 1)[1].replace(b"body\n", b"body\r\n")


@pytest.mark.parametrize(
    ("content", "line"),
    [
        (b"From: a@x.test\r\nTo: b@y.test\r\nSubject: " + b"s" * 100_000 + b"\r\n\r\nbody\r\n", 3),
        (b"X-Receiver: <" + b"b" * 2000 + b"@y.test>\r\nFrom: a@x.test\r\n\r\nbody\r\n", 1),
        (b"From: a@x.test\r\nTo: b@y.test\r\n\r\nok\r\n" + b"b" * 999 + b"\r\nok\r\n", 5),
        (b"From: a@x.test\nTo: b@y.test\n\n" + b"ok\n" * 3000 + b"b" * 100_000, 3004),
        (b"From: a@x.test\rTo: b@y.test\r\r" + b"b" * 400_000 + b"\r", 4),
    ],
    ids=["100 kB header line", "X-Receiver line", "body line of 999", "last body line", "CR-only body"],
)
def test_a_line_longer_than_smtp_allows_is_refused_naming_the_line_and_the_limit(
    content: bytes, line: int
) -> None:
    with pytest.raises(
        InvalidPickupFile, match=rf"^line {line} of the file is longer than 1000 octets .*4\.5\.3\.1\.6"
    ):
        parse(content)


def test_a_line_of_998_octets_and_crlf_is_accepted() -> None:
    header = b"Subject: " + b"s" * 989
    body = b"b" * 998
    _, message = parse(b"From: a@x.test\r\nTo: b@y.test\r\n" + header + b"\r\n\r\n" + body + b"\r\n")
    assert header in message and body in message
