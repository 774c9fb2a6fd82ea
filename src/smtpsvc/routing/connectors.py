"""Connector selection (SPEC 2.3, 2.4): a remote domain's next hops in order, with Exchange connector rules.

Pure: no DNS, no I/O, no clock. ``route_choices(domain, config, unavailable)`` lists the candidate routes for
a recipient domain, best first; the delivery stage tries them in that order. The rules:

1. A ``domains.remote`` entry for exactly this domain with ``route = "<connector>"`` forces that connector.
2. Else the ``[[connector]]`` tables whose address spaces match the domain: only the most specific matching
   address space counts (``*.partner.test`` beats ``*`` whatever the costs); among the connectors matching at
   that specificity, lowest cost first, ties in config order. Connectors named in ``unavailable`` (all their
   smart hosts failing, as the caller sees it) are left out so the next cost takes over; when that would
   leave nothing, all of them come back in cost order (the mail has to wait somewhere; the caller retries).
   A less specific connector never takes over from an unavailable more specific one (as in Exchange).
   A connector with ``transport = "graph"`` gives a route of kind "graph" (Microsoft Graph sendMail, whose
   settings the transport reads from the connector) instead of an SMTP one.
3. Else the default route: ``delivery.smart_host``, or MX for the domain. With ``smart_host_type =
   "after_direct"`` (IIS 1) both, MX first: the caller falls back to the smart host when DNS cannot find the
   domain; this module only orders them.

Local domains are not handled here: the categorizer routes them to Drop before it asks for connectors.
"""

from __future__ import annotations

from dataclasses import dataclass

from smtpsvc.config import Config, ConnectorAuth, ConnectorConfig, HostPort
from smtpsvc.model import Route

__all__ = ["NO_AUTH", "SMART_HOST_LINK", "RouteChoice", "address_space_matches", "route_choices"]

SMART_HOST_LINK = "smarthost"  # the link of the default smart host (same name as the categorizer's)
NO_AUTH = ConnectorAuth()


@dataclass(frozen=True, slots=True)
class RouteChoice:
    """One candidate next hop for a recipient; ``route_choices`` returns them in preference order."""

    route: Route  # kind "smtp" or "graph"; link = connector name, "smarthost", or the domain for default MX
    connector: str  # connector name, "" for the default smart host / MX
    cost: int  # the connector's cost; 0 for the default routes
    use_helo: bool
    tls: str  # "none" | "opportunistic" | "required" | "dane-or-mta-sts" (MTA-STS on MX routes)
    auth: ConnectorAuth  # outbound AUTH: the connector's `auth`, or `delivery.smart_host_auth`
    xexch50: bool


def _normalize(name: str) -> str:
    return name.strip().rstrip(".").lower()


def address_space_matches(space: str, domain: str) -> int | None:
    """How specifically an address space matches ``domain``; None when it does not match.

    ``"partner.test"`` matches exactly that domain; ``"*.partner.test"`` any subdomain of it (not
    partner.test itself); ``"*"`` everything. Case-insensitive, trailing dots ignored. The score is
    ``2 * labels`` (the labels after ``*.`` for a wildcard), plus 1 for an exact match: more labels are more
    specific, an exact match beats a wildcard of the same length, and ``"*"`` scores 0, the lowest.
    Scores compare matches of one domain; they mean nothing across domains.
    """
    pattern = _normalize(space)
    name = _normalize(domain)
    if not pattern or not name:
        return None
    if pattern == "*":
        return 0
    if pattern.startswith("*."):
        parent = pattern[2:]
        if parent and name.endswith("." + parent):
            return 2 * len(parent.split("."))
        return None
    if name == pattern:
        return 2 * len(pattern.split(".")) + 1
    return None


def route_choices(
    domain: str, config: Config, unavailable: frozenset[str] = frozenset()
) -> list[RouteChoice]:
    """The candidate routes for a remote ``domain``, best first (see the module docstring for the rules).

    Never empty. ``unavailable``: connector names to skip while another candidate of the same specificity is
    available; if every matching connector is unavailable they are all returned anyway, lowest cost first,
    and the caller retries. Local domains must be routed to Drop by the caller before this is asked.
    """
    name = _normalize(domain)
    forced = _forced_connector(name, config)
    if forced is not None:
        return [_connector_choice(forced, name, config)]
    matching = _most_specific(name, config.connectors)
    if matching:
        ordered = sorted(matching, key=lambda pair: (pair[1].cost, pair[0]))
        available = [pair for pair in ordered if pair[1].name not in unavailable]
        chosen = available or ordered
        return [_connector_choice(connector, name, config) for _, connector in chosen]
    return _default_choices(name, config)


def _forced_connector(domain: str, config: Config) -> ConnectorConfig | None:
    """The connector a ``domains.remote`` entry's ``route`` names for exactly this domain, if any."""
    by_name = {connector.name: connector for connector in config.connectors}
    for remote in config.domains.remote:
        if remote.route and _normalize(remote.name) == domain and remote.route in by_name:
            return by_name[remote.route]
    return None


def _most_specific(domain: str, connectors: tuple[ConnectorConfig, ...]) -> list[tuple[int, ConnectorConfig]]:
    """(config index, connector) of the connectors whose best address-space match is the best of all."""
    scored: list[tuple[int, int, ConnectorConfig]] = []
    for index, connector in enumerate(connectors):
        scores = [address_space_matches(space, domain) for space in connector.address_spaces]
        matched = [score for score in scores if score is not None]
        if matched:
            scored.append((max(matched), index, connector))
    if not scored:
        return []
    best = max(score for score, _, _ in scored)
    return [(index, connector) for score, index, connector in scored if score == best]


def _hosts(hosts: tuple[HostPort, ...], default_port: int) -> tuple[tuple[str, int], ...]:
    return tuple((h.host, h.port if h.port is not None else default_port) for h in hosts)


def _connector_choice(connector: ConnectorConfig, domain: str, config: Config) -> RouteChoice:
    port = config.delivery.remote_port
    if connector.transport == "graph":  # Microsoft Graph sendMail: no SMTP next hop, the connector says where
        route = Route(kind="graph", link=connector.name)
    elif connector.smart_hosts:
        route = Route(kind="smtp", link=connector.name, hosts=_hosts(connector.smart_hosts, port), port=port)
    else:
        route = Route(kind="smtp", link=connector.name, mx_domain=domain, port=port)
    return RouteChoice(
        route=route,
        connector=connector.name,
        cost=connector.cost,
        use_helo=connector.use_helo,
        tls=connector.tls,
        auth=connector.auth,
        xexch50=connector.xexch50,
    )


def _default_choice(route: Route, config: Config, auth: ConnectorAuth = NO_AUTH) -> RouteChoice:
    return RouteChoice(
        route=route,
        connector="",
        cost=0,
        use_helo=False,
        tls=config.delivery.tls,
        auth=auth,
        xexch50=False,
    )


def _default_choices(domain: str, config: Config) -> list[RouteChoice]:
    """No connector matches: the smart host, MX, or (``after_direct``) MX then the smart host."""
    delivery = config.delivery
    port = delivery.remote_port
    mx = _default_choice(Route(kind="smtp", link=domain, mx_domain=domain, port=port), config)
    if not delivery.smart_host:
        return [mx]
    hosts = _hosts(delivery.smart_host, port)
    smart_route = Route(kind="smtp", link=SMART_HOST_LINK, hosts=hosts, port=port)
    smart = _default_choice(smart_route, config, delivery.smart_host_auth)  # MX never gets the login
    if delivery.smart_host_type == "after_direct":
        return [mx, smart]
    return [smart]
