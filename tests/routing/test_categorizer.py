"""Relay decision (SPEC 2.3, in order) and routing, as plain tables over a real Config."""

from __future__ import annotations

from pathlib import Path

import pytest

from smtpsvc.config import Config, IPNetwork, load_config, parse_network
from smtpsvc.model import Route
from smtpsvc.routing.categorizer import connection_allowed, relay_decision, route_for


def config(tmp_path: Path, text: str, remote: str = "[]") -> Config:
    path = tmp_path / "c.toml"
    path.write_text(
        f'[server]\nhostname = "relay.corp.test"\n[domains]\nlocal = ["corp.test", "alias.test"]\n'
        f"remote = {remote}\n{text}"
    )
    return load_config(str(path), env={})


RULES = """
[relay]
allow = ["127.0.0.1/32", "10.0.0.0/8", "2001:db8::/32"]
deny = ["10.66.0.0/16"]
"""
PARTNER = '[{ name = "partner.test", relay = true }]'


@pytest.mark.parametrize(
    ("client", "rcpt", "allowed", "rule"),
    [
        ("192.0.2.9", "user@corp.test", True, "local-domain"),  # 1 local domain, from anywhere
        ("192.0.2.9", "user@CORP.test.", True, "local-domain"),  # case and trailing dot
        (
            "192.0.2.9",
            "user@partner.test",
            True,
            "remote-domain:partner.test",
        ),  # 2 relay-enabled remote domain
        ("10.66.1.1", "user@elsewhere.test", False, "deny-list:10.66.0.0/16"),  # 3 deny beats allow
        ("10.1.2.3", "user@elsewhere.test", True, "allow-list:10.0.0.0/8"),  # 4 allow list
        ("::ffff:10.1.2.3", "user@elsewhere.test", True, "allow-list:10.0.0.0/8"),  # v4-mapped client
        ("2001:db8::5", "user@elsewhere.test", True, "allow-list:2001:db8::/32"),
        ("192.0.2.9", "user@elsewhere.test", False, "default-deny"),  # 6 refuse
        ("192.0.2.9", "user@[10.0.0.1]", False, "default-deny"),  # an IP literal is never local
        ("192.0.2.9", "user@corp.test.evil.test", False, "default-deny"),
    ],
)
def test_relay_rules_in_order(tmp_path: Path, client: str, rcpt: str, allowed: bool, rule: str) -> None:
    decision = relay_decision(client, rcpt, config(tmp_path, RULES, remote=PARTNER))
    assert (decision.allowed, decision.rule) == (allowed, rule)


def test_authenticated_clients_relay_only_when_allowed(tmp_path: Path) -> None:
    cfg = config(tmp_path, "[relay]\nallow = []\n")
    assert relay_decision("192.0.2.9", "u@x.test", cfg, authenticated=True).rule == "authenticated"
    cfg = config(tmp_path, "[relay]\nallow = []\nallow_authenticated = false\n")
    assert not relay_decision("192.0.2.9", "u@x.test", cfg, authenticated=True).allowed


def test_local_domains_route_to_drop(tmp_path: Path) -> None:
    assert route_for("u@Alias.Test", config(tmp_path, "")) == Route(kind="drop", link="drop")


def test_remote_domains_route_by_mx_on_the_remote_port(tmp_path: Path) -> None:
    cfg = config(tmp_path, "[delivery]\nremote_port = 2525\n")
    assert route_for("u@remote.test", cfg) == Route(
        kind="smtp", link="remote.test", mx_domain="remote.test", port=2525
    )


def test_smart_host_takes_every_remote_recipient(tmp_path: Path) -> None:
    cfg = config(tmp_path, '[delivery]\nsmart_host = "[192.0.2.1]:587;relay.isp.test"\n')
    route = route_for("u@remote.test", cfg)
    assert route.link == "smarthost"
    assert route.hosts == (("192.0.2.1", 587), ("relay.isp.test", 25))
    assert route_for("u@corp.test", cfg).kind == "drop"


def _nets(*texts: str) -> tuple[IPNetwork, ...]:
    return tuple(parse_network(t) for t in texts)


# IIS's Connection dialog: nobody listed = everyone; "Only the list below" = allow; "All except the list
# below" = deny; deny wins over allow; loopback gets no exemption; dual-stack IPv4-mapped clients are IPv4.
CONNECTION_RULES = [
    ((), (), "203.0.113.9", True),  # the default: everyone may connect
    ((), (), "not-an-ip", True),
    (("10.0.0.0/8",), (), "10.1.2.3", True),
    (("10.0.0.0/8",), (), "192.0.2.1", False),
    (("10.0.0.0/8",), (), "127.0.0.1", False),  # loopback too must be listed
    (("10.0.0.0/8", "127.0.0.1"), (), "127.0.0.1", True),
    (("10.0.0.0/8",), (), "::ffff:10.0.0.5", True),
    (("10.0.0.0/8",), (), "2001:db8::1", False),
    (("2001:db8::/32",), (), "2001:db8::1", True),
    (("10.0.0.0/8",), (), "", False),  # no address cannot be in the list
    ((), ("198.51.100.0/24",), "198.51.100.7", False),
    ((), ("198.51.100.0/24",), "198.51.101.7", True),
    ((), ("198.51.100.0/24",), "::ffff:198.51.100.7", False),
    ((), ("198.51.100.0/24",), "", True),
    (("198.51.100.0/24",), ("198.51.100.7",), "198.51.100.7", False),  # deny wins over allow
    (("198.51.100.0/24",), ("198.51.100.7",), "198.51.100.8", True),
    (("0.0.0.0/0",), (), "::1", False),  # an IPv4 network never admits an IPv6 client
]


@pytest.mark.parametrize(("allow", "deny", "client", "allowed"), CONNECTION_RULES)
def test_connection_allowed(
    allow: tuple[str, ...], deny: tuple[str, ...], client: str, allowed: bool
) -> None:
    assert connection_allowed(client, _nets(*allow), _nets(*deny)) is allowed
