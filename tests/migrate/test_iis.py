"""The mapping of IIS properties to smtpsvc keys (smtpsvc.migrate.iis), table by table, without files.

The values follow the Metabase Property Reference (Windows Server 2003): "unlimited" is 4294967295 (WMI's
SINT32 shows it as -1); RelayForAuth is -1 when checked; SmartHostType 0/1/2; AuthFlags' MD_AUTH_* bits;
RouteAction's SMTP_* bits (see iis.py for the source of each table); the empty-RelayIpList meanings are
those SaltStack's win_smtp_server documents (None: "Only the list below", nobody; empty: "All except").
"""

from __future__ import annotations

from typing import Any

import pytest

from smtpsvc.migrate import ImportFailed
from smtpsvc.migrate.iis import Conversion, convert
from smtpsvc.migrate.metabase import Properties, VirtualServer, read_export
from tests.migrate.ipsecbuild import build


def run(props: dict[str, Any], domains: dict[str, dict[str, Any]] | None = None) -> Conversion:
    server = VirtualServer(
        "1",
        "/LM/SmtpSvc/1",
        Properties(props),
        {name: Properties(p) for name, p in (domains or {}).items()},
    )
    return convert(server, lambda label: f"/etc/smtpsvc/{label}.password")


def keys(conv: Conversion) -> dict[str, Any]:
    return {f"{s.section}.{s.key}": s.value for s in conv.settings}


def why(conv: Conversion, prop: str) -> str:
    return " | ".join(s.why for s in conv.shortfalls if s.prop == prop)


@pytest.mark.parametrize(
    ("props", "expected"),
    [
        ({"ServerBindings": ":25:"}, {"server.listen": ["0.0.0.0:25"]}),
        (
            {"ServerBindings": [{"IP": "192.0.2.1", "Port": "25", "Hostname": ""}]},
            {"server.listen": ["192.0.2.1:25"]},
        ),
        ({"MaxMessageSize": "0"}, {"server.max_message_size": 0}),
        ({"MaxSessionSize": -1}, {"server.max_session_size": 0}),
        (
            {"SmartHost": "relay.isp.test", "SmartHostType": 2},
            {"delivery.smart_host": "relay.isp.test", "delivery.smart_host_type": "always"},
        ),
        ({"RelayForAuth": "0"}, {"relay.allow_authenticated": False}),
        ({"RelayForAuth": -1}, {"relay.allow_authenticated": True}),
        ({"AuthFlags": "AuthAnonymous"}, {"auth.mechanisms": []}),
        ({"AuthFlags": 3}, {"auth.mechanisms": ["PLAIN", "LOGIN"]}),
        ({"AlwaysUseSsl": "FALSE"}, {}),
        ({"SmtpRemoteDelayExpireMinutes": 60}, {"delivery.delay_notification": "60m"}),
        ({"MasqueradeDomain": "Example.COM"}, {"server.masquerade_domain": "example.com"}),
        ({"ShouldPipelineIn": False}, {"extensions.pipelining": False}),
        ({"RelayIpList": None}, {"relay.allow": []}),
        ({"RelayIpList": []}, {"relay.allow": ["0.0.0.0/0", "::/0"]}),
        (
            {"RelayIpList": list(build(["192.0.2.0/24"], ["192.0.2.9/32", "192.0.2.10/32"]))},
            {"relay.allow": ["0.0.0.0/0", "::/0"], "relay.deny": ["192.0.2.9/32", "192.0.2.10/32"]},
        ),
        # IPSecurity, the Connection dialog: "Only the list below" is connection.allow, "All except the
        # list below" connection.deny; nobody in either: IIS's default, everyone (no key).
        (
            {"IPSecurity": list(build(["127.0.0.1/32", "192.0.2.0/24", "198.51.100.0/22"], []))},
            {"connection.allow": ["127.0.0.1/32", "192.0.2.0/24", "198.51.100.0/22"]},
        ),
        (
            {"IPSecurity": build([], ["203.0.113.0/24", "198.51.100.7/32"]).hex()},
            {"connection.deny": ["203.0.113.0/24", "198.51.100.7/32"]},
        ),
        ({"IPSecurity": list(build([], []))}, {}),
        ({"IPSecurity": list(build(["0.0.0.0/32"], []))}, {"connection.deny": ["0.0.0.0/0", "::/0"]}),
        (
            {"IPGrant": ["192.0.2.0, 255.255.255.0", "127.0.0.1"], "GrantByDefault": False},
            {"connection.allow": ["192.0.2.0/24", "127.0.0.1/32"]},
        ),
        (
            {"IPDeny": ["203.0.113.9, 255.255.255.0"], "GrantByDefault": True},
            {"connection.deny": ["203.0.113.0/24"]},
        ),
        ({"IPGrant": ["10.0.0.0, 255.0.0.0"]}, {"connection.allow": ["10.0.0.0/8"]}),
    ],
)
def test_server_properties_map_to_keys(props: dict[str, Any], expected: dict[str, Any]) -> None:
    assert keys(run(props)) == expected


@pytest.mark.parametrize(
    ("props", "prop", "reason"),
    [
        ({"MaxRecipients": 4294967295}, "MaxRecipients", "means no limit in IIS"),
        ({"MaxOutConnections": 0}, "MaxOutConnections", "keeps its default"),
        ({"SmartHost": "relay.isp.test", "SmartHostType": 0}, "SmartHost", "IIS does not use it either"),
        ({"RouteUserName": "me"}, "RouteUserName", "this server has no smart host"),
        ({"AuthFlags": 2}, "AuthFlags", "anonymous access is off in IIS"),
        ({"RelayIpList": []}, "RelayIpList", "an open relay"),
        ({"RelayIpList": ""}, "RelayIpList", "an open relay"),
        ({"DomainGrant": ["mail.partner.test"], "GrantByDefault": False}, "IPSecurity", "by DNS name"),
        (
            {"IPSecurity": list(build(["10.1.0.0/16"], ["10.1.2.0/24", "10.1.3.0/24"]))},
            "IPSecurity",
            'granted 10.1.0.0/16 in an "All except the list below" list: not imported',
        ),
        ({"SaslLogonDomain": "CONTOSO"}, "SaslLogonDomain", "not Windows accounts"),
        ({"NameResolutionType": 1}, "other properties", "NameResolutionType"),
    ],
)
def test_what_has_no_equivalent_is_reported(props: dict[str, Any], prop: str, reason: str) -> None:
    conv = run(props)
    assert reason in why(conv, prop)


def test_names_in_an_ip_list_are_reported_not_dropped_silently() -> None:
    blob = bytearray(build(["192.0.2.0/24"], []))
    grant_names_at = int.from_bytes(blob[12:16], "little") & 0x7FFFFFFF
    blob[grant_names_at + 4 : grant_names_at + 8] = (2).to_bytes(4, "little")
    conv = run({"RelayIpList": blob.hex()})
    assert "2 computer(s) granted by DNS name" in why(conv, "RelayIpList")


def test_only_the_list_below_without_loopback_says_local_programs_cannot_connect() -> None:
    conv = run({"IPSecurity": list(build(["192.0.2.0/24"], []))})
    [setting] = conv.settings
    assert setting.source == (
        'IPSecurity "Only the list below" (granted: 192.0.2.0/24); 127.0.0.1 is not listed: programs on '
        "this computer may not connect either"
    )
    with_loopback = run({"IPSecurity": list(build(["127.0.0.0/8", "192.0.2.0/24"], []))})
    assert "not listed" not in with_loopback.settings[0].source


def test_an_ipsecurity_entry_that_is_not_address_and_mask_fails_the_import() -> None:
    with pytest.raises(ImportFailed, match=r'IPGrant of /LM/SmtpSvc/1: .* is not "address, mask"'):
        run({"IPGrant": ["192.0.2.0, 255.0.255.0"], "GrantByDefault": False})


def test_remote_domains_become_connectors_and_local_ones_local_domains() -> None:
    conv = run(
        {"DefaultDomain": "example.com"},
        {
            "example.com": {"RouteAction": 0},
            "drop.example.com": {"RouteAction": 1},
            "partner.test": {
                "RouteAction": 2 | 4 | 0x100,
                "RouteActionString": "relay.partner.test:2525",
                "RouteUserName": "u",
            },
            "*.partners.test": {"RouteAction": 0x400000},
            "odd.test": {"RouteAction": 0x80000000},
            "plain.test": {"RouteAction": 0, "RelayIpList": list(build(["10.0.0.0/8"], []))},
        },
    )
    assert keys(conv)["domains.local"] == ["example.com", "drop.example.com"]
    assert keys(conv)["domains.remote"] == [{"name": "partner.test", "relay": False, "route": "partner.test"}]
    connectors = {c.domain: {s.key: s.value for s in c.settings} for c in conv.connectors}
    assert connectors["partner.test"] == {
        "name": "partner.test",
        "address_spaces": ["partner.test"],
        "smart_hosts": ["relay.partner.test:2525"],
        "tls": "required",
        "auth": {"user": "u", "password_file": "/etc/smtpsvc/partner.test.password"},
    }
    assert connectors["*.partners.test"] == {
        "name": "any.partners.test",
        "address_spaces": ["*.partners.test"],
        "use_helo": True,
    }
    assert "unknown bits 0x80000000" in why(conv, "RouteAction of odd.test")
    assert "goes by MX" in why(conv, "IIsSmtpDomain plain.test")
    assert "a relay list of one domain" in why(conv, "RelayIpList of plain.test")
    assert [(c.key, c.user) for c in conv.credentials] == [('connector "partner.test" auth', "u")]


def test_a_server_inherits_from_the_service_what_it_does_not_set() -> None:
    xml = b"""<configuration><MBProperty>
    <IIsSmtpService Location="/LM/SmtpSvc" MaxRecipients="100" HopCount="15"/>
    <IIsSmtpServer Location="/LM/SmtpSvc/1" HopCount="30"/>
    </MBProperty></configuration>"""
    from smtpsvc.migrate.metabase import choose_server

    server = choose_server(read_export(xml), None)
    assert keys(convert(server, str)) == {"server.max_recipients": 100, "server.max_hop_count": 30}


def test_an_unknown_flag_name_fails_the_import() -> None:
    with pytest.raises(ImportFailed, match="AuthFlags of /LM/SmtpSvc/1 has an unknown flag 'AuthKerberos'"):
        run({"AuthFlags": "AuthBasic | AuthKerberos"})
