"""The categorizer and router: who is local, may this client relay, and where does a recipient go next.

Pure functions of (address, client, config) so they can be re-run at any time (`queue recategorize`,
ResetMessageStatus) and tested with plain tables. No DNS here: an MX route names the domain to look up;
the delivery stage resolves it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from smtpsvc.config import Config
from smtpsvc.model import Route, domain_of

DROP_LINK = "drop"
SMART_HOST_LINK = "smarthost"


@dataclass(frozen=True, slots=True)
class RelayDecision:
    allowed: bool
    rule: str  # which rule of SPEC 2.3 decided: "local-domain", "remote-domain:<name>", "deny-list:<net>",
    # "allow-list:<net>", "authenticated", "default-deny"


def is_local_domain(domain: str, config: Config) -> bool:
    return domain.rstrip(".").lower() in config.local_domains


def relay_decision(
    client_ip: str, recipient: str, config: Config, authenticated: bool = False
) -> RelayDecision:
    """SPEC 2.3, in order: local domain, relay-enabled remote domain, deny list, allow list, AUTH, refuse.

    Only the recipient's domain and the client's address (or identity) count; the sender never does.
    """
    domain = domain_of(recipient)
    if domain and not domain.startswith("[") and is_local_domain(domain, config):
        return RelayDecision(True, "local-domain")
    for remote in config.domains.remote:
        if remote.relay and remote.name == domain:
            return RelayDecision(True, f"remote-domain:{remote.name}")
    address = _parse_ip(client_ip)
    if address is not None:
        for net in config.relay.deny:
            if address.version == net.version and address in net:
                return RelayDecision(False, f"deny-list:{net}")
        for net in config.relay.allow:
            if address.version == net.version and address in net:
                return RelayDecision(True, f"allow-list:{net}")
    if authenticated and config.relay.allow_authenticated:
        return RelayDecision(True, "authenticated")
    return RelayDecision(False, "default-deny")


def route_for(recipient: str, config: Config) -> Route:
    """The next hop for one recipient: Drop for local domains, else the smart host, else MX."""
    domain = domain_of(recipient)
    if domain and not domain.startswith("[") and is_local_domain(domain, config):
        return Route(kind="drop", link=DROP_LINK)
    delivery = config.delivery
    if delivery.smart_host:
        hosts = tuple(
            (h.host, h.port if h.port is not None else delivery.remote_port) for h in delivery.smart_host
        )
        return Route(kind="smtp", link=SMART_HOST_LINK, hosts=hosts, port=delivery.remote_port)
    return Route(kind="smtp", link=domain, mx_domain=domain, port=delivery.remote_port)


def _parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # "::ffff:10.0.0.1" from a dual-stack listener is the IPv4 client
    return address
