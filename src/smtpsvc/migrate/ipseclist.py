"""Decode IIS's IPSECLIST blobs (the metabase's RelayIpList and IPSecurity) into grant and deny networks.

Microsoft never documented the layout; it is known from its own source (the ADDRESS_CHECK_LIST structures
of IIS's rdns.hxx, published with the Windows Server 2003 sources) and from the byte arrays that published
scripts write (the "SMTP Relay IPGrant" PowerShell script, SaltStack's win_smtp_server module). What those
agree on, and all this decoder accepts, all numbers little-endian 32-bit words:

    offset 0   header: iDenyAddr, iGrantAddr, iDenyName, iGrantName  (offsets with bit 31 set)
               dwFlags (0 or 1, RDNS_FLAG_DODNS2IPCHECK), cRefSize (the end of the reference area)
    iDenyAddr, iGrantAddr   an address list: cEntries, cAddresses (addresses in all entries), then cEntries
               entries of 5 words: iFamily (2 = IPv4), cAddresses (the mask counts as one), cFullBytes
               (0xFF bytes at the start of the mask), LastByte (the mask's next byte), iFirstAddress
               (offset, bit 31 set, of the mask then the addresses, 4 bytes each, network order)
    iDenyName, iGrantName   a DNS name list: cEntries, cNames, then the entries (not decoded here)

"Grant by default" (the dialog's "All except the list below") is not stored: IIS's ADSI layer derives it
from the counts, true when the grant list (addresses and names) is not longer than the deny list; a grant
list holding only 0.0.0.0 with mask 255.255.255.255 is IIS's placeholder for "only the list below" with
nobody on it. Anything else (another address family, a mask that is not contiguous, counts or offsets that
do not add up) is refused with a message naming the property, never guessed.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from smtpsvc.migrate import ImportFailed

AF_INET = 2  # Windows' address family number for IPv4, as in sockaddr.sa_family
_REF = 0x80000000  # a SELFREFINDEX: bit 31 marks an offset inside the blob
_HEADER_WORDS = 6
_ENTRY_WORDS = 5
_KNOWN_FLAGS = 0x1  # RDNS_FLAG_DODNS2IPCHECK, set by IIS on every list it writes
_PLACEHOLDER = (ipaddress.IPv4Address("0.0.0.0"), ipaddress.IPv4Address("255.255.255.255"))


@dataclass(frozen=True)
class IpSecList:
    """A decoded list: networks granted and denied, the names (by DNS) counted, and the default."""

    grant: tuple[ipaddress.IPv4Network, ...]
    deny: tuple[ipaddress.IPv4Network, ...]
    grant_names: int
    deny_names: int
    grant_by_default: bool

    def describe(self) -> str:
        """One line for the report: 'only the list below: 192.0.2.0/24, ...' in the dialog's words."""
        if self.grant_by_default:
            listed = ", ".join(str(n) for n in self.deny) or "nobody"
            return f'"All except the list below" (denied: {listed})'
        listed = ", ".join(str(n) for n in self.grant) or "nobody"
        return f'"Only the list below" (granted: {listed})'


class _Reader:
    def __init__(self, blob: bytes, prop: str) -> None:
        self.blob = blob
        self.prop = prop

    def fail(self, what: str) -> ImportFailed:
        return ImportFailed(f"{self.prop}: unknown IPSECLIST layout ({what}); not imported")

    def word(self, offset: int) -> int:
        if offset < 0 or offset + 4 > len(self.blob):
            raise self.fail(f"a field at byte {offset} lies beyond its {len(self.blob)} bytes")
        value: int = struct.unpack_from("<I", self.blob, offset)[0]
        return value

    def ref(self, offset: int, field: str) -> int:
        value = self.word(offset)
        if not value & _REF:
            raise self.fail(f"{field} at byte {offset} is 0x{value:08X}, not an offset with bit 31 set")
        target = value & ~_REF
        if target % 4 or target + 8 > len(self.blob):
            raise self.fail(f"{field} points at byte {target}, outside its {len(self.blob)} bytes")
        return target


def decode(blob: bytes, prop: str) -> IpSecList:
    """Decode one IPSECLIST; `prop` names it in errors ("RelayIpList of /LM/SmtpSvc/1")."""
    r = _Reader(blob, prop)
    if len(blob) < _HEADER_WORDS * 4:
        raise r.fail(f"{len(blob)} bytes, shorter than its 24-byte header")
    deny_at, grant_at = r.ref(0, "the deny list offset"), r.ref(4, "the grant list offset")
    deny_names_at, grant_names_at = r.ref(8, "the deny names offset"), r.ref(12, "the grant names offset")
    flags, ref_size = r.word(16), r.word(20)
    if flags & ~_KNOWN_FLAGS:
        raise r.fail(f"flags 0x{flags:08X} has bits other than 0x1")
    if ref_size > len(blob) or ref_size < _HEADER_WORDS * 4:
        raise r.fail(f"its reference area size {ref_size} does not fit its {len(blob)} bytes")
    grant = _addresses(r, grant_at, "grant")
    deny = _addresses(r, deny_at, "deny")
    grant_names, deny_names = r.word(grant_names_at + 4), r.word(deny_names_at + 4)
    by_default = len(grant) + grant_names <= len(deny) + deny_names
    if len(grant) == 1 and not grant_names and grant[0] == _PLACEHOLDER:
        grant = []  # "only the list below", nobody listed: IIS stores this one entry to say so
    return IpSecList(
        grant=tuple(_network(r, a, m) for a, m in grant),
        deny=tuple(_network(r, a, m) for a, m in deny),
        grant_names=grant_names,
        deny_names=deny_names,
        grant_by_default=by_default,
    )


def _addresses(r: _Reader, at: int, which: str) -> list[tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]]:
    """The (address, mask) pairs of the address list at `at`."""
    entries, total = r.word(at), r.word(at + 4)
    if entries > len(r.blob) // (_ENTRY_WORDS * 4):
        raise r.fail(f"the {which} list claims {entries} entries")
    found: list[tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]] = []
    for index in range(entries):
        base = at + 8 + index * _ENTRY_WORDS * 4
        family, count, full, last = (r.word(base + 4 * i) for i in range(4))
        first = r.ref(base + 16, f"{which} entry {index + 1}'s address offset")
        if family != AF_INET:
            raise r.fail(f"{which} entry {index + 1} has address family {family}, not 2 (IPv4)")
        if count < 1 or first + 4 * count > len(r.blob):
            raise r.fail(f"{which} entry {index + 1} claims {count} addresses past the end of the list")
        mask = r.blob[first : first + 4]
        if full > 4 or last > 0xFF or mask != bytes([0xFF] * full + [last] + [0] * 4)[:4]:
            raise r.fail(
                f"{which} entry {index + 1}'s mask {ipaddress.IPv4Address(mask)} does not match its "
                f"{full} full bytes and last byte 0x{last:02X}"
            )
        for n in range(1, count):
            address = r.blob[first + 4 * n : first + 4 * n + 4]
            found.append((ipaddress.IPv4Address(address), ipaddress.IPv4Address(mask)))
    if total != len(found):
        raise r.fail(f"the {which} list counts {total} addresses but its entries hold {len(found)}")
    return found


def _network(
    r: _Reader, address: ipaddress.IPv4Address, mask: ipaddress.IPv4Address
) -> ipaddress.IPv4Network:
    try:
        # IIS compares (client & mask) with (address & mask): host bits in the stored address do not matter.
        return ipaddress.IPv4Network(f"{address}/{mask}", strict=False)
    except ValueError:
        raise r.fail(f"the mask {mask} of {address} is not contiguous (no CIDR equivalent)") from None
