"""Durations, sizes and rates as written in smtpsvc.toml: parse "30s" / "100MB" / "30/min" and back.

Durations are strings with a unit (``500ms``, ``30s``, ``15m``, ``12h``, ``2d``); a bare number is refused
because "30" could mean seconds or minutes (IIS mixed both). Sizes are integers (bytes) or strings with
``B``/``KB``/``MB``/``GB`` (1024-based, case-insensitive, optional space). Errors are ``ValueError`` with a
message fit to show an operator. A rate is "N/unit", messages per s, min, h or day (a connector's `rate`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = ["DAY", "Rate", "format_duration", "format_size", "parse_duration", "parse_rate", "parse_size"]

_DURATION_UNITS: dict[str, float] = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_UNITS: dict[str, int] = {"b": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3}

_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*", re.IGNORECASE)
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(b|kb|mb|gb)?\s*", re.IGNORECASE)
_NUMBER_RE = re.compile(r"\s*[-+]?\d+(?:\.\d+)?\s*")

_DURATION_HINT = 'expected a number with a unit: ms, s, m, h or d (e.g. "500ms", "30s", "15m", "12h", "2d")'
_SIZE_HINT = 'expected bytes as an integer, or a string with KB, MB or GB (e.g. "100MB"; 1KB = 1024 bytes)'


def parse_duration(text: object) -> float:
    """Seconds in a duration string such as ``"15m"``. Bare numbers (TOML ints/floats too) are refused."""
    if isinstance(text, bool) or not isinstance(text, int | float | str):
        raise ValueError(f"invalid duration {text!r}: {_DURATION_HINT}")
    if isinstance(text, int | float) or _NUMBER_RE.fullmatch(text):
        raise ValueError(f'duration {text} has no unit: add a unit, e.g. "30s"')
    match = _DURATION_RE.fullmatch(text)
    if match is None:
        raise ValueError(f'invalid duration "{text}": {_DURATION_HINT}')
    return float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()]


def parse_size(value: object) -> int:
    """Bytes in a size: an int (bytes) or a string like ``"2048KB"``, ``"100 MB"``, ``"1gb"``."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"invalid size {value!r}: {_SIZE_HINT}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"invalid size {value}: must not be negative")
        return value
    match = _SIZE_RE.fullmatch(value)
    if match is None:
        raise ValueError(f'invalid size "{value}": {_SIZE_HINT}')
    number, unit = str(match.group(1)), str(match.group(2) or "b").lower()
    factor = _SIZE_UNITS[unit]
    if "." in number:
        whole, _, frac = number.partition(".")
        numerator = int(whole + frac) * factor
        denominator: int = 10 ** len(frac)
        if numerator % denominator:
            raise ValueError(f'invalid size "{value}": not a whole number of bytes')
        return numerator // denominator
    return int(number) * factor


def format_duration(seconds: float) -> str:
    """The shortest exact form of a duration: 900 → "15m", 0.5 → "500ms"; parse_duration reads it back."""
    if isinstance(seconds, bool) or not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"cannot format duration {seconds!r}: expected a finite number of seconds >= 0")
    if seconds == 0:
        return "0s"
    for unit in ("d", "h", "m", "s"):
        count = seconds / _DURATION_UNITS[unit]
        if count >= 1 and math.isclose(count, round(count), rel_tol=0, abs_tol=1e-9):
            return f"{round(count)}{unit}"
    millis = seconds * 1000
    if millis >= 1 and math.isclose(millis, round(millis), rel_tol=0, abs_tol=1e-6):
        return f"{round(millis)}ms"
    return f"{seconds:.9f}".rstrip("0").rstrip(".") + "s"


def format_size(n: int) -> str:
    """The largest exact unit of a size: 2097152 → "2MB", 1000 → "1000B"; parse_size reads it back."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"cannot format size {n!r}: expected an integer number of bytes >= 0")
    for unit in ("gb", "mb", "kb"):
        factor = _SIZE_UNITS[unit]
        if n and n % factor == 0:
            return f"{n // factor}{unit.upper()}"
    return f"{n}B"


DAY = 86_400.0
_RATE_UNITS: dict[str, float] = {"s": 1.0, "min": 60.0, "h": 3600.0, "day": DAY}
_RATE_RE = re.compile(r"\s*(\d+)\s*/\s*([a-z]+)\s*", re.IGNORECASE)
_RATE_HINT = 'expected "N/unit" with unit s, min, h or day (e.g. "30/min")'


@dataclass(frozen=True, slots=True)
class Rate:
    """`count` messages in any `unit` (s, min, h, day)."""

    count: int
    unit: str

    @property
    def seconds(self) -> float:
        return _RATE_UNITS[self.unit]

    def __str__(self) -> str:
        return f"{self.count}/{self.unit}"


def parse_rate(text: object) -> Rate | None:
    """A rate such as ``"30/min"`` (``""``: no limit, None)."""
    if not isinstance(text, str):
        raise ValueError(f"invalid rate {text!r}: {_RATE_HINT}")
    if not text.strip():
        return None
    match = _RATE_RE.fullmatch(text)
    if match is None:
        raise ValueError(f'invalid rate "{text}": {_RATE_HINT}')
    count, unit = int(match.group(1)), match.group(2).lower()
    if unit not in _RATE_UNITS:
        raise ValueError(
            f'invalid rate "{text}": unknown unit "{unit}"; use s, min, h or day (e.g. "30/min")'
        )
    if count < 1:
        raise ValueError(
            f'invalid rate "{text}": it allows nothing; the count must be at least 1 ("" = no limit)'
        )
    return Rate(count, unit)
