"""The verb mask (SPEC 2.2): decoding, unknown bits kept, [extensions] keys beating bits, the table."""

from __future__ import annotations

import re

import pytest

from smtpsvc import verbmask
from smtpsvc.verbmask import DEFAULT_MASK, decode, effective_extensions, render

KB286673_MASK = 3503297  # 7697601 - 0x400000
DEFAULT_UNKNOWN = (0x1, 0x2000, 0x4000, 0x10000, 0x40000)


def test_default_mask_is_the_iis_default() -> None:
    assert DEFAULT_MASK == 7697601 == 0x7574C1


def test_default_mask_turns_all_seven_known_verbs_on() -> None:
    decoding = decode(DEFAULT_MASK)
    assert decoding.as_dict() == {
        "dsn": True,
        "etrn": True,
        "turn": True,
        "enhancedstatuscodes": True,
        "chunking": True,
        "binarymime": True,
        "8bitmime": True,
    }


def test_default_mask_lists_its_unknown_bits() -> None:
    assert decode(DEFAULT_MASK).unknown_bits == DEFAULT_UNKNOWN


@pytest.mark.parametrize(
    ("key", "bit"),
    [
        ("dsn", 0x40),
        ("etrn", 0x80),
        ("turn", 0x400),
        ("enhancedstatuscodes", 0x1000),
        ("chunking", 0x100000),
        ("binarymime", 0x200000),
        ("8bitmime", 0x400000),
    ],
)
def test_each_known_bit_controls_exactly_its_verb(key: str, bit: int) -> None:
    decoding = decode(bit)
    assert decoding.is_on(key)
    assert [k for k, on in decoding.as_dict().items() if on] == [key]
    assert decoding.unknown_bits == ()


def test_kb286673_mask_turns_only_8bitmime_off() -> None:
    decoding = decode(KB286673_MASK)
    assert {k for k, on in decoding.as_dict().items() if not on} == {"8bitmime"}
    assert decoding.unknown_bits == DEFAULT_UNKNOWN


def test_zero_mask_has_every_verb_off_and_no_unknown_bits() -> None:
    decoding = decode(0)
    assert not any(decoding.as_dict().values())
    assert decoding.unknown_bits == ()


@pytest.mark.parametrize("mask", [-1, 2**32, True, "7697601"])
def test_decode_refuses_what_is_not_a_dword(mask: object) -> None:
    with pytest.raises(ValueError, match="DWORD"):
        decode(mask)  # type: ignore[arg-type]


def test_effective_extensions_names_every_extensions_key() -> None:
    assert list(effective_extensions(DEFAULT_MASK, {})) == [
        "pipelining",
        "8bitmime",
        "smtputf8",
        "chunking",
        "binarymime",
        "dsn",
        "enhancedstatuscodes",
        "etrn",
        "vrfy",
        "xexch50",
        "x_link2state",
    ]


def test_effective_extensions_follow_the_mask_bit_when_no_key_is_set() -> None:
    result = effective_extensions(KB286673_MASK, {})
    assert result["8bitmime"] == (False, "mask 3503297 lacks 0x400000 (KB286673)")
    assert result["dsn"] == (True, "mask 3503297 has 0x40")


def test_an_extensions_key_overrides_the_mask_bit() -> None:
    result = effective_extensions(DEFAULT_MASK, {"8bitmime": False})
    assert result["8bitmime"] == (False, "[extensions] 8bitmime = false overrides mask bit 0x400000")


def test_an_extensions_key_can_turn_on_what_the_mask_lacks() -> None:
    on, why = effective_extensions(KB286673_MASK, {"8bitmime": True})["8bitmime"]
    assert on
    assert why.startswith("[extensions] 8bitmime = true")


def test_extensions_without_a_mask_bit_take_the_key_or_its_default() -> None:
    result = effective_extensions(0, {"vrfy": True})
    assert result["vrfy"] == (True, "[extensions]")
    assert result["pipelining"] == (True, "default")
    assert result["xexch50"] == (False, "default")


def test_effective_extensions_refuses_an_unknown_name() -> None:
    with pytest.raises(ValueError, match="bitmime8"):
        effective_extensions(DEFAULT_MASK, {"bitmime8": True})


def test_render_shows_8bitmime_off_for_the_kb286673_mask() -> None:
    table = render(KB286673_MASK, {})
    assert re.search(r"^\s*8BITMIME\s+off\s+mask 3503297 lacks 0x400000 \(KB286673\)$", table, re.M)
    assert re.search(r"^\s*DSN\s+on\s+mask 3503297 has 0x40$", table, re.M)


def test_render_keeps_unknown_bits_visible() -> None:
    line = next(line for line in render(DEFAULT_MASK, {}).splitlines() if "unknown bits" in line)
    assert "0x1 0x2000 0x4000 0x10000 0x40000" in line


def test_render_shows_the_override_and_why() -> None:
    table = render(DEFAULT_MASK, {"8bitmime": False})
    assert re.search(r"^\s*8BITMIME\s+off\s+\[extensions\] 8bitmime = false overrides", table, re.M)


def test_render_has_a_line_per_extension_plus_turn() -> None:
    table = render(DEFAULT_MASK, {})
    for keyword in [*verbmask.EHLO_KEYWORDS.values(), "TURN"]:
        assert re.search(rf"^\s*{re.escape(keyword)}\s+(on|off)\s", table, re.M), keyword


def test_keywords_that_need_another_are_shown_off_without_it() -> None:
    found = verbmask.effective_extensions(3503297, {})  # KB286673: 8BITMIME off
    assert found["smtputf8"][0] is False and "8BITMIME is off" in found["smtputf8"][1]
    found = verbmask.effective_extensions(7697601, {"chunking": False})
    assert found["binarymime"][0] is False and "CHUNKING is off" in found["binarymime"][1]
    assert verbmask.effective_extensions(7697601, {})["smtputf8"][0] is True


# ------------------------------------------------------------------------------- warnings (KB286673's typo)

KEY = "server.inbound_command_support_options"


@pytest.mark.parametrize(
    ("mask", "overrides", "expected"),
    [
        (DEFAULT_MASK, {}, []),
        (3503297, {}, []),  # what KB286673 meant: 8BITMIME alone off
        (0x3574C1 & ~0x40, {}, []),  # DSN off too: two of six is not "most"
        (0, {}, ["turns off 6 of the 6"]),
        (
            4194304,
            {},
            ["turns off 5 of the 6", "8BITMIME's bit alone: did you mean 7697601 - 4194304 = 3503297"],
        ),
        (
            41943040,
            {},
            [
                "sets bit(s) 0x800000, 0x2000000 that neither smtpsvc nor the IIS default",
                "turns off 6 of the 6 verbs it controls (DSN, ETRN, ENHANCEDSTATUSCODES, CHUNKING,",
                "KB286673's typo for 4194304: did you mean 7697601 - 4194304 = 3503297",
            ],
        ),
        (DEFAULT_MASK | 0x800000, {}, ["sets bit(s) 0x800000 that"]),
        # the verbs [extensions] turns on again are not "turned off by the mask"
        (0, {"dsn": True, "etrn": True, "chunking": True, "binarymime": True}, []),
        # nor are those it turns off itself: the administrator said so by name
        (0, {"dsn": False, "etrn": False, "chunking": False, "enhancedstatuscodes": False}, []),
    ],
)
def test_mask_warnings(mask: int, overrides: dict[str, bool], expected: list[str]) -> None:
    found = verbmask.mask_warnings(KEY, mask, overrides)
    assert len(found) == len(expected), found
    for line, part in zip(found, expected, strict=True):
        assert line.startswith(f"{KEY} = {mask}") and part in line, line
