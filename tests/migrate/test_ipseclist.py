"""The IPSECLIST decoder (RelayIpList, IPSecurity): the published examples decode as their authors said,
lists with several addresses and masks become networks, and every other layout is refused by name.

Where the fixtures come from:
- SALT_GUI_127: SaltStack's salt/modules/win_smtp_server.py, set_relay_ip_list's docstring: "setting
  '127.0.0.1' as an allowed relay IP through the GUI would generate" this list (written there as dotted
  quads of four bytes each).
- POWERSHELL_IPGRANT: the "SMTP Relay IPGrant Script" (PowerShell, public on GitHub): its base array, then
  `$ipblock[36] += 2; $ipblock[44] += 2` and two addresses appended (127.0.0.1 and the host's address,
  192.0.2.10 here).
- The layout itself: ADDRESS_CHECK_LIST and ADDRESS_LIST_ENTRY in IIS's rdns.hxx and ADDRESS_CHECK::LocateAddr
  ("1st entry is mask") in the Windows Server 2003 sources; "grant by default" as IIS's ADSI layer derives
  it (CIPSecurity::InitFromBinaryBlob: the grant list not longer than the deny list; a lone 0.0.0.0 /
  255.255.255.255 grant is the placeholder for an empty "only the list below").
- The lists with several masks are built by ipsecbuild.py in that layout.
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Network

import pytest

from smtpsvc.migrate import ImportFailed
from smtpsvc.migrate.ipseclist import decode
from tests.migrate.ipsecbuild import build

SALT_GUI_127 = bytes(
    [
        *(24, 0, 0, 128, 32, 0, 0, 128, 60, 0, 0, 128, 68, 0, 0, 128, 1, 0, 0, 0, 76, 0, 0, 0),
        *(0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 4, 0, 0, 0),
        *(0, 0, 0, 0, 76, 0, 0, 128, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
        *(255, 255, 255, 255, 127, 0, 0, 1),
    ]
)


def _powershell_ipgrant() -> bytes:
    block = [24, 0, 0, 128, 32, 0, 0, 128, 60, 0, 0, 128, 68, 0, 0, 128, 1, 0, 0, 0, 76, 0, 0, 0]
    block += [0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 4, 0, 0, 0]
    block += [0, 0, 0, 0, 76, 0, 0, 128, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 255, 255, 255, 255]
    block[36] += 2
    block[44] += 2
    return bytes([*block, 127, 0, 0, 1, 192, 0, 2, 10])


def nets(*texts: str) -> tuple[IPv4Network, ...]:
    return tuple(IPv4Network(t) for t in texts)


@pytest.mark.parametrize(
    ("blob", "grant", "deny", "by_default"),
    [
        pytest.param(SALT_GUI_127, nets("127.0.0.1/32"), (), False, id="salt-gui-127.0.0.1"),
        pytest.param(
            _powershell_ipgrant(), nets("127.0.0.1/32", "192.0.2.10/32"), (), False, id="powershell-ipgrant"
        ),
        pytest.param(
            build(["127.0.0.1/32", "192.0.2.0/24", "198.51.100.0/22", "192.0.2.77/32"], []),
            nets("127.0.0.1/32", "192.0.2.77/32", "192.0.2.0/24", "198.51.100.0/22"),
            (),
            False,
            id="grant-several-masks",
        ),
        pytest.param(
            build([], ["203.0.113.0/24", "198.51.100.7/32", "10.0.0.0/8"]),
            (),
            nets("203.0.113.0/24", "198.51.100.7/32", "10.0.0.0/8"),
            True,
            id="deny-several-masks-grant-by-default",
        ),
        pytest.param(build(["0.0.0.0/32"], []), (), (), False, id="placeholder-only-the-list-below-empty"),
        pytest.param(build([], []), (), (), True, id="both-empty-grant-by-default"),
        pytest.param(
            build(["10.1.0.0/16"], ["10.1.2.0/24", "10.1.3.0/24"]),
            nets("10.1.0.0/16"),
            nets("10.1.2.0/24", "10.1.3.0/24"),
            True,
            id="deny-list-longer-than-grant",
        ),
        pytest.param(build(["10.1.0.0/16"], [], flags=0), nets("10.1.0.0/16"), (), False, id="flags-0"),
    ],
)
def test_published_and_built_lists_decode_into_networks(
    blob: bytes, grant: tuple[IPv4Network, ...], deny: tuple[IPv4Network, ...], by_default: bool
) -> None:
    decoded = decode(blob, "RelayIpList")
    assert decoded.grant == grant
    assert decoded.deny == deny
    assert decoded.grant_by_default is by_default


def test_the_description_uses_the_dialogs_words() -> None:
    assert decode(SALT_GUI_127, "RelayIpList").describe() == '"Only the list below" (granted: 127.0.0.1/32)'
    denied = decode(build([], ["10.0.0.0/8"]), "IPSecurity").describe()
    assert denied == '"All except the list below" (denied: 10.0.0.0/8)'


def _patch(blob: bytes, offset: int, value: int) -> bytes:
    return blob[:offset] + struct.pack("<I", value) + blob[offset + 4 :]


@pytest.mark.parametrize(
    ("blob", "problem"),
    [
        pytest.param(SALT_GUI_127[:20], "shorter than its 24-byte header", id="short"),
        pytest.param(SALT_GUI_127[:-4], "outside its 80 bytes", id="truncated-addresses"),
        pytest.param(
            _patch(SALT_GUI_127, 4, 32), "not an offset with bit 31 set", id="offset-without-bit-31"
        ),
        pytest.param(_patch(SALT_GUI_127, 4, 0x80000400), "outside its", id="offset-past-the-end"),
        pytest.param(_patch(SALT_GUI_127, 40, 23), "address family 23, not 2 (IPv4)", id="ipv6-family"),
        pytest.param(_patch(SALT_GUI_127, 16, 0x10), "flags 0x00000010", id="unknown-flag"),
        pytest.param(
            _patch(SALT_GUI_127, 36, 5), "counts 5 addresses but its entries hold 1", id="bad-total"
        ),
        pytest.param(_patch(SALT_GUI_127, 48, 3), "does not match its 3 full bytes", id="mask-vs-count"),
        pytest.param(
            _patch(_patch(_patch(SALT_GUI_127, 48, 1), 52, 0x0F), 76, 0x00000FFF),
            "mask 255.15.0.0 of 127.0.0.1 is not contiguous",
            id="non-contiguous-mask",
        ),
    ],
)
def test_any_other_layout_is_refused_naming_the_property(blob: bytes, problem: str) -> None:
    with pytest.raises(ImportFailed) as caught:
        decode(blob, "RelayIpList of /LM/SmtpSvc/1")
    message = str(caught.value)
    assert message.startswith("RelayIpList of /LM/SmtpSvc/1: unknown IPSECLIST layout (")
    assert problem in message
    assert "\n" not in message
