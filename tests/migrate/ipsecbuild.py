"""Build IPSECLIST blobs the way IIS writes them (the layout of smtpsvc.migrate.ipseclist): addresses with
the same mask share one entry, the mask stored first. Used to make fixtures with several addresses and masks;
the published examples the layout was checked against are in test_ipseclist.py."""

from __future__ import annotations

import ipaddress
import struct

REF = 0x80000000


def build(grant: list[str], deny: list[str], *, flags: int = 1) -> bytes:
    """`grant` and `deny` are CIDR networks; the blob lists each as address + mask."""
    lists = [_entries(deny), _entries(grant)]
    deny_at = 24
    grant_at = deny_at + 8 + 20 * len(lists[0])
    deny_names_at = grant_at + 8 + 20 * len(lists[1])
    grant_names_at = deny_names_at + 8
    ref_size = grant_names_at + 8
    data = b""
    headers = b""
    for entries in lists:
        headers += struct.pack("<II", len(entries), sum(len(a) for _, a in entries))
        for mask, addresses in entries:
            mask_bytes = mask.packed
            full = sum(1 for b in mask_bytes if b == 0xFF)
            last = mask_bytes[full] if full < 4 else 0
            first = ref_size + len(data)
            headers += struct.pack("<IIIII", 2, len(addresses) + 1, full, last, first | REF)
            data += mask_bytes + b"".join(a.packed for a in addresses)
    head = struct.pack(
        "<IIIIII", deny_at | REF, grant_at | REF, deny_names_at | REF, grant_names_at | REF, flags, ref_size
    )
    names = struct.pack("<IIII", 0, 0, 0, 0)
    return head + headers + names + data


def _entries(networks: list[str]) -> list[tuple[ipaddress.IPv4Address, list[ipaddress.IPv4Address]]]:
    by_mask: dict[ipaddress.IPv4Address, list[ipaddress.IPv4Address]] = {}
    for text in networks:
        net = ipaddress.IPv4Network(text)
        by_mask.setdefault(net.netmask, []).append(net.network_address)
    return list(by_mask.items())
