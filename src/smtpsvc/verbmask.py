"""The IIS verb mask (SmtpInboundCommandSupportOptions, SPEC 2.2): decode it, merge it with [extensions].

The mask is a DWORD of feature bits. Seven bits are known; every other bit set in it is unknown, kept as is
and shown (never dropped). For an extension the mask controls, an explicit key in ``[extensions]`` wins over
the bit; otherwise the bit decides. Extensions the mask does not control take their ``[extensions]`` value
or its default. Everything here is pure: ints and dicts in, values and text out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "DEFAULT_MASK",
    "EHLO_KEYWORDS",
    "EXTENSION_DEFAULTS",
    "EXTENSION_NAMES",
    "KNOWN_VERBS",
    "MASK_CONTROLLED",
    "MAX_MASK",
    "MaskDecoding",
    "Verb",
    "decode",
    "effective_extensions",
    "mask_warnings",
    "render",
]

DEFAULT_MASK = 7697601  # 0x7574C1, the IIS default
MAX_MASK = 0xFFFFFFFF  # a registry/metabase DWORD


@dataclass(frozen=True, slots=True)
class Verb:
    """One known bit of the mask; ``key`` is the lower-case name (the [extensions] key when there is one)."""

    name: str
    bit: int
    key: str
    note_on: str = ""
    note_off: str = ""

    def why(self, mask: int) -> str:
        on = bool(mask & self.bit)
        note = self.note_on if on else self.note_off
        text = f"mask {mask} {'has' if on else 'lacks'} 0x{self.bit:X}"
        return f"{text} ({note})" if note else text


KNOWN_VERBS: tuple[Verb, ...] = (
    Verb("DSN", 0x40, "dsn"),
    Verb("ETRN", 0x80, "etrn"),
    # TURN/ATRN: decoded and shown for fidelity; smtpsvc never offers TURN (an open-relay hazard).
    Verb("TURN", 0x400, "turn", note_on="TURN/ATRN; never offered by smtpsvc"),
    # ENHANCEDSTATUSCODES = 0x1000 is OUR mapping: no public source confirms which bit IIS used for it.
    Verb("ENHANCEDSTATUSCODES", 0x1000, "enhancedstatuscodes", "bit unconfirmed", "bit unconfirmed"),
    Verb("CHUNKING", 0x100000, "chunking"),
    Verb("BINARYMIME", 0x200000, "binarymime"),
    # KB286673: clearing this bit (3503297) stops advertising 8BITMIME.
    Verb("8BITMIME", 0x400000, "8bitmime", note_off="KB286673"),
)
_KNOWN_BITS = sum(v.bit for v in KNOWN_VERBS)  # the bits are distinct, so the sum is their OR

# The [extensions] table: key → default, in the order SPEC 1.3 lists them.
EXTENSION_DEFAULTS: Mapping[str, bool] = {
    "pipelining": True,
    "8bitmime": True,
    "smtputf8": True,
    "chunking": True,
    "binarymime": True,
    "dsn": True,
    "enhancedstatuscodes": True,
    "etrn": True,
    "vrfy": False,
    "xexch50": False,
    "x_link2state": False,
}
EXTENSION_NAMES: tuple[str, ...] = tuple(EXTENSION_DEFAULTS)
# How each extension is called in EHLO (and in the rendered table).
EHLO_KEYWORDS: Mapping[str, str] = {
    "pipelining": "PIPELINING",
    "8bitmime": "8BITMIME",
    "smtputf8": "SMTPUTF8",
    "chunking": "CHUNKING",
    "binarymime": "BINARYMIME",
    "dsn": "DSN",
    "enhancedstatuscodes": "ENHANCEDSTATUSCODES",
    "etrn": "ETRN",
    "vrfy": "VRFY",
    "xexch50": "XEXCH50",
    "x_link2state": "X-LINK2STATE",
}
# Extensions whose default comes from a mask bit: [extensions] key → Verb.
MASK_CONTROLLED: Mapping[str, Verb] = {v.key: v for v in KNOWN_VERBS if v.key in EXTENSION_DEFAULTS}


@dataclass(frozen=True, slots=True)
class MaskDecoding:
    """What a mask says: each known verb on/off (in bit order) and the unknown bits set, lowest first."""

    mask: int
    verbs: tuple[tuple[Verb, bool], ...]
    unknown_bits: tuple[int, ...]

    def is_on(self, key: str) -> bool:
        for verb, on in self.verbs:
            if verb.key == key.lower():
                return on
        raise KeyError(f"unknown verb {key!r}; known: {', '.join(v.key for v in KNOWN_VERBS)}")

    def as_dict(self) -> dict[str, bool]:
        return {verb.key: on for verb, on in self.verbs}


def _check_mask(mask: int) -> None:
    if isinstance(mask, bool) or not isinstance(mask, int) or not 0 <= mask <= MAX_MASK:
        raise ValueError(f"verb mask must be an integer from 0 to {MAX_MASK} (a DWORD), got {mask!r}")


def decode(mask: int) -> MaskDecoding:
    """Split a mask into the known verbs' states and the unknown bits (kept, never dropped)."""
    _check_mask(mask)
    unknown = mask & ~_KNOWN_BITS
    unknown_bits = tuple(1 << i for i in range(unknown.bit_length()) if unknown >> i & 1)
    return MaskDecoding(mask, tuple((v, bool(mask & v.bit)) for v in KNOWN_VERBS), unknown_bits)


def _toml_bool(value: bool) -> str:
    return "true" if value else "false"


def effective_extensions(mask: int, overrides: Mapping[str, bool]) -> dict[str, tuple[bool, str]]:
    """Each [extensions] name → (on, why). An explicit key beats the mask bit; the bit beats the default."""
    _check_mask(mask)
    unknown = sorted(set(overrides) - set(EXTENSION_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown extension(s) {', '.join(unknown)}; known: {', '.join(EXTENSION_NAMES)}")
    result: dict[str, tuple[bool, str]] = {}
    for name, default in EXTENSION_DEFAULTS.items():
        verb = MASK_CONTROLLED.get(name)
        if name in overrides:
            value = overrides[name]
            setting = f"[extensions] {name} = {_toml_bool(value)}"
            if verb is None:
                result[name] = (value, "[extensions]")
            elif value == bool(mask & verb.bit):
                result[name] = (value, f"{setting} (agrees with mask bit 0x{verb.bit:X})")
            else:
                result[name] = (value, f"{setting} overrides mask bit 0x{verb.bit:X}")
        elif verb is not None:
            result[name] = (bool(mask & verb.bit), verb.why(mask))
        else:
            result[name] = (default, "default")
    # What the EHLO reply really says: these keywords are never advertised without the one they build on.
    for name, needs, rfc in (("smtputf8", "8bitmime", "RFC 6531"), ("binarymime", "chunking", "RFC 3030")):
        if result[name][0] and not result[needs][0]:
            was = result[name][1]
            result[name] = (False, f"off because {EHLO_KEYWORDS[needs]} is off ({rfc}); would be: {was}")
    return result


# KB286673 gives 8BITMIME's bit as "41943040", a typo for 4194304 (0x400000); an administrator who copies it,
# or who enters the bit itself rather than the default minus the bit, turns off nearly every verb instead.
KB286673_TYPO = 41943040
_KB286673_MEANT = DEFAULT_MASK - MASK_CONTROLLED["8bitmime"].bit  # 3503297
# Bits no verb of ours decodes but that the IIS default sets: IIS's own, so not worth a warning.
_IIS_BITS = _KNOWN_BITS | DEFAULT_MASK


def mask_warnings(key: str, mask: int, overrides: Mapping[str, bool]) -> list[str]:
    """`config check` warnings about the verb mask `key` (its dotted name): bits that neither smtpsvc nor the
    IIS default know, most of the verbs it controls turned off (and not turned on again by [extensions]),
    and KB286673's typo, with the number the article meant."""
    _check_mask(mask)
    found: list[str] = []
    unknown = decode(mask & ~_IIS_BITS).unknown_bits
    if unknown:
        bits = ", ".join(f"0x{bit:X}" for bit in unknown)
        found.append(
            f"{key} = {mask} (0x{mask:X}) sets bit(s) {bits} that neither smtpsvc nor the IIS default "
            f"({DEFAULT_MASK}) uses; they change nothing here"
        )
    resolved = effective_extensions(mask, overrides)
    off = [EHLO_KEYWORDS[name] for name in MASK_CONTROLLED if not resolved[name][0] and name not in overrides]
    if len(off) * 2 > len(MASK_CONTROLLED):
        found.append(
            f"{key} = {mask} turns off {len(off)} of the {len(MASK_CONTROLLED)} verbs it controls "
            f"({', '.join(off)}); the IIS default is {DEFAULT_MASK}"
        )
    if mask in (KB286673_TYPO, MASK_CONTROLLED["8bitmime"].bit):
        typo = "KB286673's typo for 4194304" if mask == KB286673_TYPO else "8BITMIME's bit alone"
        found.append(
            f"{key} = {mask} is {typo}: did you mean {DEFAULT_MASK} - 4194304 = {_KB286673_MEANT} "
            '(stop advertising 8BITMIME only)? Clearer: [extensions] "8bitmime" = false'
        )
    return found


def render(mask: int, overrides: Mapping[str, bool]) -> str:
    """The table `config show` prints: one line per extension plus TURN, then the unknown bits."""
    decoding = decode(mask)
    rows = [
        (EHLO_KEYWORDS[name], on, why) for name, (on, why) in effective_extensions(mask, overrides).items()
    ]
    turn = next(v for v in KNOWN_VERBS if v.key == "turn")
    rows.append((turn.name, decoding.is_on("turn"), turn.why(mask)))
    width = max(len(name) for name, _, _ in rows) + 2
    lines = [f"inbound_command_support_options = {mask} (0x{mask:X})"]
    lines += [f"  {name:<{width}}{'on' if on else 'off':<5}{why}" for name, on, why in rows]
    if decoding.unknown_bits:
        bits = " ".join(f"0x{bit:X}" for bit in decoding.unknown_bits)
        lines.append(f"  {'unknown bits':<{width}}{bits} (kept as set; meaning not known)")
    else:
        lines.append(f"  {'unknown bits':<{width}}none")
    return "\n".join(lines) + "\n"
