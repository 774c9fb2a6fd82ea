"""Next-hop resolution for outbound delivery: a domain's MX hosts, or a smart host, as addresses to use.

`MxResolver.resolve_mx` does the RFC 5321 §5.1 lookup: MX records sorted by preference (equal preferences
shuffled), each exchange's A (and AAAA) addresses kept together; no MX records → the implicit MX (the
domain's own addresses); a null MX (RFC 7505) → permanent failure 5.1.10; an address literal ``[1.2.3.4]``
needs no DNS.
`MxResolver.resolve_host` turns a smart host (name or IP) into addresses without an MX lookup.

Every DNS problem comes out as one exception type, `DnsError`, naming its cause (SPEC 2.9: ``dns-nxdomain``,
``dns-servfail``, ``dns-timeout``, ``null-mx``, ``dns-no-address``), whether it is permanent, the enhanced
status for the DSN, and the IIS wording for event 4000. Lookups use dnspython's asyncio resolver with its
LRU cache and are bounded by one deadline per call.

The cache keeps a positive answer for its TTL. A negative one (NXDOMAIN, or NODATA: the name exists without
records of that type) is kept per RFC 2308: for min(SOA TTL, SOA MINIMUM) of the SOA in its authority
section, at most ``negative_cache_max`` (`negative_cache_ttl`), and not at all without an SOA (§5).
dnspython alone would keep an SOA-less negative answer for 5 minutes (``NEGATIVE_TTL_WITHOUT_SOA``), so a
domain whose zone was just fixed would go on bouncing mail with 5.4.4 for that long.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.rdtypes.ANY.MX
import dns.rdtypes.ANY.SOA
import dns.rdtypes.ANY.TLSA
import dns.resolver
import dns.reversename

CAUSE_NXDOMAIN = "dns-nxdomain"
CAUSE_SERVFAIL = "dns-servfail"
CAUSE_TIMEOUT = "dns-timeout"
CAUSE_NULL_MX = "null-mx"
CAUSE_NO_ADDRESS = "dns-no-address"

TEXT_NOT_IN_DNS = "Unable to bind to the destination server in DNS."
TEXT_INTERNAL_DNS_ERROR = "An internal DNS error caused a failure to find the remote server."
TEXT_NULL_MX = "The remote domain does not accept mail (null MX record, RFC 7505)."

# cause → (permanent, enhanced status, IIS text)
_CAUSES: dict[str, tuple[bool, str, str]] = {
    CAUSE_NXDOMAIN: (True, "5.4.4", TEXT_NOT_IN_DNS),
    CAUSE_NO_ADDRESS: (True, "5.4.4", TEXT_NOT_IN_DNS),
    CAUSE_NULL_MX: (True, "5.1.10", TEXT_NULL_MX),
    CAUSE_SERVFAIL: (False, "4.4.3", TEXT_INTERNAL_DNS_ERROR),
    CAUSE_TIMEOUT: (False, "4.4.3", TEXT_INTERNAL_DNS_ERROR),
}


DEFAULT_NEGATIVE_CACHE_MAX = 300.0  # resolver.negative_cache_max's default ("5m")


def negative_cache_ttl(soa: tuple[int, int] | None, cap: float) -> float:
    """Seconds to cache a negative answer (NXDOMAIN or NODATA); 0 means do not cache it.

    `soa` is ``(record TTL, MINIMUM)`` of the SOA in the answer's authority section, or None without one.
    RFC 2308 §5: without an SOA nothing says how long the answer holds, so it is not cached. §3/§5: with
    one, the negative TTL is the smaller of the SOA record's TTL and its MINIMUM field. `cap` bounds it (0
    turns negative caching off), so a zone with a long MINIMUM cannot keep a fixed domain bouncing for hours.
    """
    if soa is None or cap <= 0:
        return 0.0
    ttl, minimum = soa
    return float(max(0.0, min(ttl, minimum, cap)))


def _negative_soa(answer: dns.resolver.Answer) -> tuple[int, int] | None:
    """``(record TTL, MINIMUM)`` of the SOA a negative answer carries, or None.

    The same search as dnspython's own (``Message.resolve_chaining``): an SOA in the authority section whose
    owner is the (last CNAME target of the) query name or one of its parents; any other SOA does not count.
    """
    response = answer.response
    rdclass = response.question[0].rdclass  # an Answer exists only for a response with one question
    name = answer.chaining_result.canonical_name
    while True:
        try:
            rrset = response.find_rrset(response.authority, name, rdclass, dns.rdatatype.SOA)
        except KeyError:
            try:
                name = name.parent()
            except dns.name.NoParent:
                return None
            continue
        soa = rrset[0]
        assert isinstance(soa, dns.rdtypes.ANY.SOA.SOA)
        return (rrset.ttl, soa.minimum)


class _NegativeCache(dns.resolver.LRUCache):
    """dnspython's LRU cache, with negative answers kept only as RFC 2308 allows (`negative_cache_ttl`).

    dnspython puts every answer it gets through `put`: positive ones and NODATA under (name, type, class),
    NXDOMAIN under (name, ANY, class), each with an ``expiration`` from its TTLs (an SOA-less negative answer
    gets 300 s). The answers without an RRset are the negative ones; this trims their expiration, or drops
    them. Positive answers go in unchanged.
    """

    def __init__(self, negative_max: float) -> None:
        super().__init__()
        self._negative_max = negative_max

    def put(self, key: dns.resolver.CacheKey, value: dns.resolver.Answer) -> None:
        if value.rrset is not None:
            super().put(key, value)
            return
        ttl = negative_cache_ttl(_negative_soa(value), self._negative_max)
        if ttl <= 0:
            # Not cached. An entry a concurrent lookup may have put under this key is older than this
            # answer, so it goes too: the next lookup asks the server.
            self.flush(key)
            return
        # Only ever shorter: the expiration dnspython set also counts the TTLs of any CNAMEs on the way.
        value.expiration = min(value.expiration, time.time() + ttl)
        super().put(key, value)


@dataclass(frozen=True, slots=True)
class NextHop:
    """One address to try: `host` is the MX exchange (or the domain for an implicit MX, or the smart host)."""

    host: str
    address: str
    port: int
    preference: int
    # DNSSEC: every answer that led here (the MX, or its absence, and the address) came with the AD bit of
    # the resolver (RFC 7672 §2.2: only then may DANE apply to this host).
    secure: bool = field(default=False, compare=False)

    def __str__(self) -> str:
        """The transcript form, ``mx.example.test[192.0.2.1]:25``."""
        return f"{self.host}[{self.address}]:{self.port}"


@dataclass(frozen=True, slots=True)
class TlsaRecord:
    """One TLSA record (RFC 6698): certificate usage, selector, matching type, association data."""

    usage: int
    selector: int
    mtype: int
    data: bytes

    def __str__(self) -> str:
        """The zone-file form, ``3 1 1 ab12…`` (the data shortened: it is for people)."""
        data = self.data.hex()
        return f"{self.usage} {self.selector} {self.mtype} {data if len(data) <= 16 else data[:16] + '...'}"


@dataclass(frozen=True, slots=True)
class TlsaAnswer:
    """The TLSA records of ``_port._tcp.host``; `secure`: the answer came with the AD bit (a validating
    resolver authenticated it). An empty `records` means none are published (NXDOMAIN or NODATA)."""

    name: str
    records: tuple[TlsaRecord, ...]
    secure: bool


class DnsError(Exception):
    """A DNS lookup failed; `cause`, `permanent`, `status` and `text` say how (see the module docstring).

    `name` is the DNS name whose lookup failed; ``str(error)`` is ``"<cause>: <detail>"``.
    """

    def __init__(self, cause: str, name: str, detail: str) -> None:
        permanent, status, text = _CAUSES[cause]
        super().__init__(f"{cause}: {detail}")
        self.cause = cause
        self.name = name
        self.detail = detail
        self.permanent = permanent
        self.status = status
        self.text = text

    def __reduce__(self) -> tuple[type[DnsError], tuple[str, str, str]]:
        return (DnsError, (self.cause, self.name, self.detail))


class MxResolver:
    """Resolves domains (MX) and smart hosts (A/AAAA) to ordered `NextHop` lists; see the module docstring.

    ``nameservers`` empty means the system resolver (/etc/resolv.conf); otherwise only the given
    ``(ip, port)`` servers are asked. ``timeout`` bounds each `resolve_mx`/`resolve_host` call as a whole.
    With ``use_ipv6`` the AAAA addresses follow the A addresses of the same host. ``rng`` makes the shuffle
    of equal MX preferences reproducible in tests. ``negative_cache_max`` caps how long a negative answer
    is cached, in seconds (0: never); see the module docstring.
    """

    def __init__(
        self,
        nameservers: Sequence[tuple[str, int]] = (),
        timeout: float = 10.0,
        use_ipv6: bool = True,
        rng: random.Random | None = None,
        negative_cache_max: float = DEFAULT_NEGATIVE_CACHE_MAX,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"DNS timeout must be positive, not {timeout}")
        if negative_cache_max < 0:
            raise ValueError(f"negative cache limit must not be negative, not {negative_cache_max}")
        self._timeout = timeout
        self._use_ipv6 = use_ipv6
        self._rng = rng if rng is not None else random.Random()
        self._config_error = ""
        if nameservers:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = [_nameserver(ip, port) for ip, port in nameservers]
        else:
            try:
                self._resolver = dns.asyncresolver.Resolver()
            except dns.exception.DNSException as e:  # no /etc/resolv.conf, or no nameserver in it
                self._resolver = dns.asyncresolver.Resolver(configure=False)
                self._config_error = f"no usable system resolver configuration ({e})"
        self._resolver.lifetime = timeout
        self._resolver.use_edns(0, 0, 1232)  # the DNS flag day 2020 size: large answers go to TCP
        # The AD bit in the query asks a validating resolver to say whether it authenticated the answer
        # (RFC 6840 §5.7), without the DO bit's RRSIGs: DANE trusts that bit, as Postfix does.
        self._resolver.flags = dns.flags.RD | dns.flags.AD
        self._resolver.cache = _NegativeCache(negative_cache_max)

    async def resolve_mx(self, domain: str, port: int) -> list[NextHop]:
        """The hosts to try for mail to `domain`, best first; raises `DnsError`."""
        literal = _address_literal(domain, allow_name=False)
        if literal is not None:
            return [NextHop(literal, literal, port, 0)]
        qname = self._name(domain)
        deadline = self._deadline()
        answer, mx_secure = await self._query_secure(qname, dns.rdatatype.MX, deadline)
        if answer is None or answer.rrset is None:  # no MX records: the implicit MX (RFC 5321 §5.1)
            host = _text(qname)
            addresses, secure = await self._addresses_secure(qname, deadline)
            return [NextHop(host, address, port, 0, mx_secure and secure) for address in addresses]
        exchanges = self._ordered_exchanges(answer.rrset)
        if not exchanges:
            raise DnsError(CAUSE_NULL_MX, _text(qname), f"{_text(qname)} has a null MX: it accepts no mail")
        results = await asyncio.gather(
            *(self._addresses_secure(exchange, deadline) for _, exchange in exchanges), return_exceptions=True
        )
        hops: list[NextHop] = []
        seen: set[str] = set()
        failures: list[DnsError] = []
        for (preference, exchange), result in zip(exchanges, results, strict=True):
            if isinstance(result, DnsError):
                failures.append(result)
            elif isinstance(result, BaseException):
                raise result
            else:
                addresses, secure = result
                hops.extend(
                    NextHop(_text(exchange), a, port, preference, mx_secure and secure)
                    for a in addresses
                    if a not in seen
                )
                seen.update(addresses)
        if hops:
            return hops
        transient = [failure for failure in failures if not failure.permanent]
        if transient:
            raise transient[0]
        names = ", ".join(failure.name for failure in failures)
        raise DnsError(
            CAUSE_NO_ADDRESS, _text(qname), f"no MX host of {_text(qname)} has an address ({names})"
        )

    async def resolve_host(self, host: str, port: int) -> list[NextHop]:
        """The addresses of a smart host (``name``, ``1.2.3.4``, ``[1.2.3.4]``, ``[name]``), no MX lookup."""
        literal = _address_literal(host, allow_name=True)
        if literal is not None:
            return [NextHop(literal, literal, port, 0)]
        bare = host.strip()
        if bare.startswith("[") and bare.endswith("]"):
            bare = bare[1:-1]
        qname = self._name(bare)
        name = _text(qname)
        # The name is the configuration's, not DNS's: only its addresses need to be authenticated for DANE.
        addresses, secure = await self._addresses_secure(qname, self._deadline())
        return [NextHop(name, address, port, 0, secure) for address in addresses]

    async def resolve_tlsa(self, host: str, port: int) -> TlsaAnswer:
        """The TLSA records of ``_port._tcp.host`` (RFC 7672 §2.2) and whether they are authenticated.

        NXDOMAIN and NODATA are an empty answer (none published: DANE does not apply); SERVFAIL and timeouts
        raise `DnsError` (the caller must not take them for "none": RFC 7672 §2.2.1). Positive answers are
        cached for their TTL, negative ones per RFC 2308, as every lookup here.
        """
        qname = self._name(f"_{port}._tcp.{host.strip().rstrip('.')}")
        name = _text(qname)
        try:
            answer, secure = await self._query_secure(qname, dns.rdatatype.TLSA, self._deadline())
        except DnsError as exc:
            if exc.cause == CAUSE_NXDOMAIN:
                return TlsaAnswer(name, (), False)
            raise
        if answer is None or answer.rrset is None:
            return TlsaAnswer(name, (), secure)
        records: list[TlsaRecord] = []
        for rdata in answer.rrset:
            assert isinstance(rdata, dns.rdtypes.ANY.TLSA.TLSA)
            records.append(TlsaRecord(rdata.usage, rdata.selector, rdata.mtype, bytes(rdata.cert)))
        return TlsaAnswer(name, tuple(records), secure)

    # ---- lookups -----------------------------------------------------------------------------------

    def _deadline(self) -> float:
        if self._config_error:
            raise DnsError(CAUSE_SERVFAIL, "", self._config_error)
        return asyncio.get_running_loop().time() + self._timeout

    def _name(self, text: str) -> dns.name.Name:
        """An absolute DNS name for `text`, or a permanent `DnsError` if it cannot be one."""
        try:
            name = dns.name.from_text(text.strip())
        except (dns.exception.DNSException, UnicodeError, ValueError) as e:
            raise DnsError(CAUSE_NXDOMAIN, text, f"{text!r} is not a valid domain name ({e})") from e
        if name == dns.name.root:
            raise DnsError(CAUSE_NXDOMAIN, text, f"{text!r} is not a valid domain name")
        return name

    def _ordered_exchanges(self, rrset: dns.rrset.RRset) -> list[tuple[int, dns.name.Name]]:
        """Usable exchanges, by preference, equal preferences shuffled; a name listed twice keeps its best."""
        best: dict[dns.name.Name, int] = {}
        for rdata in rrset:
            assert isinstance(rdata, dns.rdtypes.ANY.MX.MX)
            if rdata.exchange == dns.name.root:  # null MX; ignored when mixed with real ones
                continue
            exchange = rdata.exchange.canonicalize()
            best[exchange] = min(rdata.preference, best.get(exchange, rdata.preference))
        ordered: list[tuple[int, dns.name.Name]] = []
        for preference in sorted(set(best.values())):
            group = sorted(name for name, pref in best.items() if pref == preference)
            self._rng.shuffle(group)
            ordered.extend((preference, name) for name in group)
        return ordered

    async def _addresses_secure(self, qname: dns.name.Name, deadline: float) -> tuple[list[str], bool]:
        """A then AAAA addresses of `qname`, and whether every answer that gave addresses was authenticated
        (AD); raises `DnsError` when there are none."""
        rdtypes = [dns.rdatatype.A, dns.rdatatype.AAAA] if self._use_ipv6 else [dns.rdatatype.A]
        results = await asyncio.gather(
            *(self._query_secure(qname, rdtype, deadline) for rdtype in rdtypes), return_exceptions=True
        )
        addresses: list[str] = []
        failures: list[DnsError] = []
        secure = True
        for result in results:
            if isinstance(result, DnsError):
                failures.append(result)
            elif isinstance(result, BaseException):
                raise result
            elif result[0] is not None and result[0].rrset is not None:
                secure = secure and result[1]
                addresses.extend(
                    a for a in (rdata.to_text() for rdata in result[0].rrset) if a not in addresses
                )
        if addresses:
            return addresses, secure
        for failure in failures:
            if not failure.permanent:
                raise failure
        if failures and len(failures) == len(rdtypes):
            raise failures[0]  # NXDOMAIN
        families = "A/AAAA" if self._use_ipv6 else "A"
        raise DnsError(CAUSE_NO_ADDRESS, _text(qname), f"{_text(qname)} has no {families} records")

    async def txt_records(self, name: str) -> list[str]:
        """The TXT records of `name`, each one's strings joined (RFC 7208 §3.3 style); [] for NODATA.
        Raises `DnsError` (NXDOMAIN is permanent). For MTA-STS and TLS-RPT (``_mta-sts``, ``_smtp._tls``)."""
        answer = await self._query(self._name(name), dns.rdatatype.TXT, self._deadline())
        if answer is None or answer.rrset is None:
            return []
        return [b"".join(rdata.strings).decode("utf-8", "replace") for rdata in answer.rrset]

    async def reverse_names(self, ip: str) -> list[str]:
        """The PTR names of an address (lower case, no trailing dot); [] when there are none or DNS fails.

        For the `server.reverse_dns` check, which only annotates the Received header: a DNS failure there
        must never refuse mail, so errors are an empty answer, not a `DnsError`.
        """
        try:
            qname = dns.reversename.from_address(ip.split("%", 1)[0])
            deadline = asyncio.get_running_loop().time() + self._timeout
            answer = await self._query(qname, dns.rdatatype.PTR, deadline)
        except (DnsError, ValueError, dns.exception.DNSException):
            return []
        if answer is None:
            return []
        return [_text(rdata.target).lower() for rdata in answer]

    async def _query(
        self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType, deadline: float
    ) -> dns.resolver.Answer | None:
        """One lookup; None for NODATA; every failure as a `DnsError`."""
        answer, _ = await self._query_secure(qname, rdtype, deadline)
        return answer

    async def _query_secure(
        self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType, deadline: float
    ) -> tuple[dns.resolver.Answer | None, bool]:
        """`_query`, and whether the answer (NODATA too) carried the resolver's AD bit."""
        name, kind = _text(qname), dns.rdatatype.to_text(rdtype)
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise DnsError(CAUSE_TIMEOUT, name, f"{name} {kind}: no answer within {self._timeout:g}s")
        try:
            answer = await self._resolver.resolve(qname, rdtype, lifetime=remaining, search=False)
            return answer, _authenticated(answer.response)
        except dns.resolver.NoAnswer as e:
            return None, _authenticated(e.kwargs.get("response"))
        except (dns.resolver.NXDOMAIN, dns.resolver.YXDOMAIN) as e:
            raise DnsError(CAUSE_NXDOMAIN, name, f"{name} {kind}: the domain does not exist") from e
        except dns.exception.Timeout as e:
            raise DnsError(CAUSE_TIMEOUT, name, f"{name} {kind}: no answer within {self._timeout:g}s") from e
        except dns.resolver.NoNameservers as e:
            raise DnsError(CAUSE_SERVFAIL, name, f"{name} {kind}: {e}") from e
        except (dns.exception.DNSException, OSError, EOFError) as e:
            raise DnsError(CAUSE_SERVFAIL, name, f"{name} {kind}: {type(e).__name__}: {e}") from e


def _authenticated(response: object) -> bool:
    """The response carries the AD bit: the (validating) resolver authenticated it with DNSSEC."""
    return isinstance(response, dns.message.Message) and bool(response.flags & dns.flags.AD)


def _nameserver(ip: str, port: int) -> dns.nameserver.Do53Nameserver:
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        raise ValueError(f"resolver nameserver must be an IP address, not {ip!r}") from None
    if not 0 < port < 65536:
        raise ValueError(f"resolver nameserver port out of range: {port}")
    return dns.nameserver.Do53Nameserver(ip, port)


def _address_literal(text: str, *, allow_name: bool) -> str | None:
    """The IP of an address literal (``[1.2.3.4]``, ``[IPv6:2001:db8::1]``; a bare IP when `allow_name`).

    None when `text` is a name; a permanent `DnsError` for a bracketed non-address (unless `allow_name`).
    """
    text = text.strip()
    bracketed = text.startswith("[") and text.endswith("]")
    inner = text[1:-1] if bracketed else text
    if inner[:5].lower() == "ipv6:":
        inner = inner[5:]
        try:
            return str(ipaddress.IPv6Address(inner))
        except ValueError:
            raise DnsError(CAUSE_NXDOMAIN, text, f"{text!r} is not a valid IPv6 address literal") from None
    try:
        address = ipaddress.ip_address(inner)
    except ValueError:
        if bracketed and not allow_name:
            raise DnsError(CAUSE_NXDOMAIN, text, f"{text!r} is not a valid address literal") from None
        return None
    if not bracketed and not allow_name:
        return None  # a domain that looks like an address is looked up as a name (it will not exist)
    return str(address)


def _text(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True).lower()
