"""Pickup file parsing: X-lines or header envelope, Bcc stripped, line ends normalised, invalid files."""

from __future__ import annotations

import io

import pytest

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
        parse(b"From: a@x.test\r\nTo: b@y.test\r\n\r\n" + b"x" * 5000 + b"\r\n", max_size=1000)


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
