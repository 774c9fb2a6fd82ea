"""Connector selection (SPEC 2.3, 2.4): address-space specificity, cost, availability, overrides, defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from smtpsvc.config import Config, ConnectorAuth, load_config
from smtpsvc.model import Route
from smtpsvc.routing.connectors import RouteChoice, address_space_matches, route_choices


def config(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "c.toml"
    path.write_text(f'[server]\nhostname = "relay.corp.test"\n[domains]\nlocal = ["corp.test"]\n{text}')
    return load_config(str(path), env={})


CONNECTORS = """
remote = [{ name = "forced.partner.test", route = "partners-b" }]

[delivery]
remote_port = 2526
smart_host = "default.isp.test"

[[connector]]
name = "everything"
address_spaces = ["*"]
cost = 0

[[connector]]
name = "partners-b"
address_spaces = ["*.partner.test"]
cost = 5
smart_hosts = ["b.relay.test"]

[[connector]]
name = "partners-a"
address_spaces = ["*.partner.test", "partner.test"]
cost = 2
smart_hosts = ["a.relay.test:2525", "[192.0.2.7]"]
use_helo = true
tls = "required"
auth = { user = "relay-a", password_file = "a.secret" }
xexch50 = true

[[connector]]
name = "partners-tie"
address_spaces = ["*.partner.test"]
cost = 2
tls = "none"

[[connector]]
name = "deep-exact"
address_spaces = ["deep.sub.partner.test"]
cost = 9

[[connector]]
name = "sub"
address_spaces = ["*.sub.partner.test"]
cost = 1
"""
ALL_PARTNERS = frozenset({"partners-a", "partners-b", "partners-tie"})


@pytest.mark.parametrize(
    ("space", "domain", "score"),
    [
        ("partner.test", "partner.test", 5),
        ("*.partner.test", "x.partner.test", 4),
        ("*.partner.test", "a.b.partner.test", 4),
        ("*", "partner.test", 0),
        ("*.partner.test", "partner.test", None),  # a wildcard does not match its parent domain
        ("partner.test", "x.partner.test", None),
        ("*.partner.test", "notpartner.test", None),  # label boundary, not a string suffix
        ("partner.test", "other.test", None),
        ("x.partner.test", "x.partner.test", 7),  # exact beats the wildcard of the same length (4)
        ("Partner.TEST.", "partner.test", 5),  # case and trailing dots ignored, on both sides
        ("*.PARTNER.test", "X.partner.TEST.", 4),
    ],
)
def test_address_space_matches(space: str, domain: str, score: int | None) -> None:
    assert address_space_matches(space, domain) == score


@pytest.mark.parametrize(
    ("domain", "unavailable", "connectors"),
    [
        # lowest cost first, ties in config order; the cheaper "*" connector is less specific
        ("x.partner.test", frozenset(), ["partners-a", "partners-tie", "partners-b"]),
        ("partner.test", frozenset(), ["partners-a"]),  # exact space; "*.partner.test" does not match it
        ("elsewhere.test", frozenset(), ["everything"]),  # only "*" matches, though a smart host is set
        ("notpartner.test", frozenset(), ["everything"]),
        ("deep.sub.partner.test", frozenset(), ["deep-exact"]),  # exact beats the cheaper wildcard
        ("other.sub.partner.test", frozenset(), ["sub"]),  # more labels beat "*.partner.test"
        ("X.Partner.TEST.", frozenset(), ["partners-a", "partners-tie", "partners-b"]),  # case, trailing dot
        ("x.partner.test", frozenset({"partners-a"}), ["partners-tie", "partners-b"]),  # next cost takes over
        ("x.partner.test", frozenset({"partners-a", "partners-tie"}), ["partners-b"]),
        ("x.partner.test", frozenset({"partners-tie", "everything"}), ["partners-a", "partners-b"]),
        ("x.partner.test", ALL_PARTNERS, ["partners-a", "partners-tie", "partners-b"]),  # all down: all
        ("forced.partner.test", frozenset(), ["partners-b"]),  # domains.remote route beats cost
        ("FORCED.partner.test.", frozenset(), ["partners-b"]),
        ("forced.partner.test", frozenset({"partners-b"}), ["partners-b"]),  # forced, even when down
        ("y.forced.partner.test", frozenset(), ["partners-a", "partners-tie", "partners-b"]),  # exact only
    ],
)
def test_connector_order(
    tmp_path: Path, domain: str, unavailable: frozenset[str], connectors: list[str]
) -> None:
    choices = route_choices(domain, config(tmp_path, CONNECTORS), unavailable)
    assert [c.connector for c in choices] == connectors
    assert [c.route.link for c in choices] == connectors


def test_connector_choice_carries_its_settings(tmp_path: Path) -> None:
    cfg = config(tmp_path, CONNECTORS)
    a, tie, b = route_choices("x.partner.test", cfg)
    hosts_a = (("a.relay.test", 2525), ("192.0.2.7", 2526))  # a host without a port gets remote_port
    assert a == RouteChoice(
        route=Route(kind="smtp", link="partners-a", hosts=hosts_a, port=2526),
        connector="partners-a",
        cost=2,
        use_helo=True,
        tls="required",
        auth=ConnectorAuth("relay-a", "a.secret"),
        xexch50=True,
    )
    assert b.route == Route(kind="smtp", link="partners-b", hosts=(("b.relay.test", 2526),), port=2526)
    assert (b.cost, b.use_helo, b.tls, b.auth.user, b.xexch50) == (5, False, "opportunistic", "", False)
    # a connector without smart hosts routes by MX for the recipient's domain, on its own link
    assert tie.route == Route(kind="smtp", link="partners-tie", mx_domain="x.partner.test", port=2526)
    assert tie.tls == "none"


def test_mx_connector_uses_the_normalized_domain(tmp_path: Path) -> None:
    cfg = config(tmp_path, '[[connector]]\nname = "all"\naddress_spaces = ["*"]\n')
    (choice,) = route_choices("Foo.Example.TEST.", cfg)
    assert choice.route == Route(kind="smtp", link="all", mx_domain="foo.example.test", port=25)


UNRELATED_CONNECTOR = '[[connector]]\nname = "p"\naddress_spaces = ["partner.test"]\n'
MX = Route(kind="smtp", link="elsewhere.test", mx_domain="elsewhere.test", port=25)


@pytest.mark.parametrize(
    ("delivery", "routes"),
    [
        ("", [MX]),
        ('smart_host_type = "after_direct"', [MX]),  # after_direct without a smart host: MX only
        (
            'smart_host = "relay.isp.test;[192.0.2.1]:587"',
            [Route(kind="smtp", link="smarthost", hosts=(("relay.isp.test", 25), ("192.0.2.1", 587)))],
        ),
        (
            'smart_host = "relay.isp.test"\nremote_port = 2525',
            [Route(kind="smtp", link="smarthost", hosts=(("relay.isp.test", 2525),), port=2525)],
        ),
        (  # DNS first, then the smart host
            'smart_host = "relay.isp.test"\nsmart_host_type = "after_direct"',
            [MX, Route(kind="smtp", link="smarthost", hosts=(("relay.isp.test", 25),), port=25)],
        ),
    ],
)
def test_default_route_without_a_matching_connector(
    tmp_path: Path, delivery: str, routes: list[Route]
) -> None:
    text = f'[delivery]\ntls = "required"\n{delivery}\n{UNRELATED_CONNECTOR}'
    choices = route_choices("Elsewhere.Test.", config(tmp_path, text))
    assert [c.route for c in choices] == routes
    assert {(c.connector, c.cost, c.tls, c.use_helo, c.auth.user, c.xexch50) for c in choices} == {
        ("", 0, "required", False, "", False)
    }


def test_the_smart_host_route_carries_smart_host_auth_and_mx_does_not(tmp_path: Path) -> None:
    text = (
        '[delivery]\nsmart_host = "smtp.office365.com:587"\nsmart_host_type = "after_direct"\n'
        'smart_host_auth = { mechanism = "xoauth2", user = "relay@contoso.com", oauth = "m365" }\n\n'
        '[oauth.m365]\nprovider = "microsoft"\ntenant = "contoso.onmicrosoft.com"\n'
        'client_id = "11111111-1111-1111-1111-111111111111"\nclient_secret_file = "m365.secret"\n'
    )
    mx, smart = route_choices("elsewhere.test", config(tmp_path, text))
    assert smart.auth == ConnectorAuth("relay@contoso.com", "", "xoauth2", "m365")
    assert mx.auth == ConnectorAuth()  # the login is for the smart host only, never for an MX host
