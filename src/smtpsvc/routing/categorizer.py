"""The categorizer and router: who is local, may this client relay, and where does a recipient go next.

Pure functions of (address, client, config) so they can be re-run at any time (`queue recategorize`,
ResetMessageStatus) and tested with plain tables. No DNS here: an MX route names the domain to look up;
the delivery stage resolves it.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass

from smtpsvc.config import Config
from smtpsvc.model import Route, domain_of
from smtpsvc.protocol import local_part_is_relay_trick, split_address
from smtpsvc.routing.connectors import NO_AUTH, RouteChoice, route_choices

DROP_LINK = "drop"


@dataclass(frozen=True, slots=True)
class RelayDecision:
    allowed: bool
    rule: str  # which rule of SPEC 2.3 decided: "local-domain", "remote-domain:<name>", "deny-list:<net>",
    # "allow-list:<net>", "authenticated", "default-deny"


def is_local_domain(domain: str, config: Config) -> bool:
    return domain.rstrip(".").lower() in config.local_domains


RULE_EXPLANATIONS = {
    "local-domain": "the recipient's domain is local (domains.local): always accepted, delivered to Drop",
    "remote-domain": "the recipient's domain is a domains.remote entry with relay = true",
    "deny-list": "the client's address is in relay.deny, which is checked before relay.allow",
    "allow-list": "the client's address is in relay.allow",
    "authenticated": "the client authenticated and relay.allow_authenticated is true",
    "default-deny": "the client is not in relay.allow and has not authenticated (or may not relay if it has)",
    "relay-trick": "the local part uses %, !, a quoted @ or a source route: a relay trick, never relayed",
}


def explain(rule: str) -> str:
    """One line for an operator: why this rule decided (used by `smtpsvc relay check`)."""
    return RULE_EXPLANATIONS.get(rule.split(":", 1)[0], rule)


def postmaster_address(address: str, config: Config) -> str:
    """RFC 5321 §4.1.1.3: <postmaster> without a domain is this server's postmaster (the first local domain);
    any other address is returned as it is."""
    local, domain = split_address(address)
    return f"{local}@{config.local_domains[0]}" if not domain else address


def check_recipient(
    client_ip: str, address: str, config: Config, *, authenticated: bool = False, source_route: str = ""
) -> RelayDecision:
    """The whole RCPT-time decision: relay tricks first (whatever the domain), then the SPEC 2.3 rules."""
    local, _ = split_address(address)
    if source_route or local_part_is_relay_trick(local):
        return RelayDecision(False, "relay-trick")
    return relay_decision(client_ip, address, config, authenticated)


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
                return RelayDecision(False, _rule("deny-list", net))
        for net in config.relay.allow:
            if address.version == net.version and address in net:
                return RelayDecision(True, _rule("allow-list", net))
    if authenticated and config.relay.allow_authenticated:
        return RelayDecision(True, "authenticated")
    return RelayDecision(False, "default-deny")


def connection_allowed(
    client_ip: str,
    allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...],
    deny: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...],
) -> bool:
    """IIS's Connection control (`[connection]`): may this client connect at all? Both lists empty: everyone
    ("All except the list below" with nobody listed, IIS's default); a client in `deny` is refused even if it
    is also in `allow`; a non-empty `allow` admits only its networks. Loopback is not exempt, as in IIS.

    An address that cannot be parsed (none: a local submission) matches no list."""
    if not allow and not deny:
        return True  # the default, checked first: every connection asks
    address = _parse_ip(client_ip)
    if address is not None and any(address.version == n.version and address in n for n in deny):
        return False
    if not allow:
        return True
    return address is not None and any(address.version == n.version and address in n for n in allow)


DROP_CHOICE = RouteChoice(
    route=Route(kind="drop", link=DROP_LINK),
    connector="",
    cost=0,
    use_helo=False,
    tls="none",
    auth=NO_AUTH,
    xexch50=False,
)


def choices_for(
    recipient: str, config: Config, unavailable: frozenset[str] = frozenset()
) -> list[RouteChoice]:
    """Where one recipient may go, best first: Drop for local domains; else connectors by address space and
    cost, the smart host, or MX (see routing.connectors). Connectors in `unavailable` are passed over."""
    domain = domain_of(recipient)
    if domain and not domain.startswith("[") and is_local_domain(domain, config):
        return [DROP_CHOICE]
    return route_choices(domain, config, unavailable)


def route_for(recipient: str, config: Config) -> Route:
    """The next hop for one recipient (the first of `choices_for`)."""
    return choices_for(recipient, config)[0].route


@functools.lru_cache(maxsize=1024)  # every allowed RCPT names its rule: str() of a network is not cheap
def _rule(kind: str, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
    return f"{kind}:{net}"


@functools.lru_cache(maxsize=4096)  # every RCPT asks about its client's address; the answer never changes
def _parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # "::ffff:10.0.0.1" from a dual-stack listener is the IPv4 client
    return address
