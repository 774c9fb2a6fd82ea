"""Durations and sizes: what smtpsvc.toml accepts, what it refuses, and the human forms printed back."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpsvc.units import format_duration, format_size, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("30s", 30.0),
        ("15m", 900.0),
        ("12h", 43200.0),
        ("2d", 172800.0),
        ("240m", 14400.0),
        ("1.5h", 5400.0),
        (" 10 m ", 600.0),
        ("10M", 600.0),
        ("0s", 0.0),
    ],
)
def test_parse_duration_reads_a_number_with_a_unit(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("value", [30, 1.5, "30", " 30 "])
def test_parse_duration_refuses_a_bare_number_and_asks_for_a_unit(value: object) -> None:
    with pytest.raises(ValueError, match=r'add a unit, e\.g\. "30s"'):
        parse_duration(value)


@pytest.mark.parametrize("value", ["", "s", "10x", "ten minutes", "-5s", "1e3s", "5 mins", True, None, [1]])
def test_parse_duration_refuses_what_is_not_a_duration(value: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (0, 0),
        (2097152, 2097152),
        ("2048KB", 2097152),
        ("100MB", 104857600),
        ("1GB", 1073741824),
        ("100 mb", 104857600),
        ("2kb", 2048),
        ("512B", 512),
        ("1024", 1024),
        ("1.5MB", 1572864),
    ],
)
def test_parse_size_reads_bytes_or_a_1024_based_unit(value: object, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize("value", ["2XB", "MB", "", "-1MB", "1.0000001KB", -1, 1.5, True, None])
def test_parse_size_refuses_what_is_not_a_size(value: object) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(value)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.5, "500ms"),
        (30, "30s"),
        (900, "15m"),
        (3600, "1h"),
        (14400, "4h"),
        (172800, "2d"),
        (90, "90s"),
        (0, "0s"),
    ],
)
def test_format_duration_picks_the_largest_exact_unit(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("size", "text"), [(2097152, "2MB"), (10485760, "10MB"), (104857600, "100MB"), (1000, "1000B"), (0, "0B")]
)
def test_format_size_picks_the_largest_exact_unit(size: int, text: str) -> None:
    assert format_size(size) == text


@pytest.mark.parametrize("value", [-1, float("nan"), float("inf")])
def test_format_duration_refuses_negative_or_infinite(value: float) -> None:
    with pytest.raises(ValueError):
        format_duration(value)


@given(st.integers(min_value=0, max_value=10**7), st.sampled_from(["ms", "s", "m", "h", "d"]))
def test_format_duration_reads_back_to_the_same_seconds(count: int, unit: str) -> None:
    seconds = parse_duration(f"{count}{unit}")
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, rel=1e-12, abs=1e-9)


@given(st.integers(min_value=0, max_value=2**40))
def test_format_size_reads_back_to_the_same_bytes(size: int) -> None:
    assert parse_size(format_size(size)) == size
