"""Hop counting over a streamed header section."""

from __future__ import annotations

import pytest

from smtpsvc.headers import HopCounter

MESSAGE = (
    b"Received: from a\r\n\tby b; date\r\nreceived: from c\r\nSubject: x\r\nRECEIVED: from d\r\n"
    b"\r\nReceived: in the body, not a header\r\n"
)


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, len(MESSAGE)])
def test_counts_received_fields_of_the_header_section_only(size: int) -> None:
    counter = HopCounter()
    for i in range(0, len(MESSAGE), size):
        counter.feed(MESSAGE[i : i + size])
    assert counter.received == 3
    assert counter.done


def test_a_huge_header_line_does_not_grow_memory() -> None:
    counter = HopCounter()
    for _ in range(1000):
        counter.feed(b"X-Long: " + b"a" * 10_000)
    assert len(counter._partial) <= 1000  # the bound is the point of the test
    counter.feed(b"\r\nReceived: x\r\n\r\n")
    assert counter.received == 1
