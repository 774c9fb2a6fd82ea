"""A small authoritative DNS server on loopback for tests (a helper, not a test module).

It answers over UDP and TCP on 127.0.0.1 (one port, chosen by the OS) from a background thread, so sync and
async tests can both use it. Answers are built with dnspython's own message code:

* a name with records of the asked type → those records (AA set);
* a known name without records of that type → NOERROR, empty answer, SOA in authority (NODATA);
* an unknown name → NXDOMAIN with SOA (so negative answers are cached by their SOA minimum, as in real DNS);
* the SOA of those negative answers has MINIMUM ``negative_ttl`` and record TTL ``soa_ttl`` (by default the
  same); with ``negative_soa = False`` NXDOMAIN and NODATA come without any SOA (RFC 2308 §5: not cacheable).
  All three are attributes a test may change while the server runs;
* ``set_servfail(name)`` → SERVFAIL for every type; ``set_timeout(name)`` → no answer at all;
* ``add_txt`` and ``add_tlsa`` serve TXT (DKIM keys, ``_mta-sts``, ``_smtp._tls``) and TLSA records;
  ``sign_zone(zone)`` marks the answers for names at or under `zone` as validated: the AD flag is set, as a
  validating resolver sets it (RFC 4035 §3.2.3; no RRSIGs are served: clients trust the resolver's AD bit,
  as Postfix and smtpsvc do); ``unsign_zone(zone)`` takes the flag away again below a signed zone;
* an answer larger than the client's UDP size (512, or its EDNS payload) is truncated (TC), and the client
  retries over TCP, where the full answer is sent.

Names are case-insensitive and the trailing dot is optional. "Known" means the name itself has a record (or
a servfail/timeout setting); an empty non-terminal counts as unknown. Every query is recorded in
``queries`` as ``(qname, qtype)``, e.g. ``("example.test", "MX")`` (lower case, no trailing dot); the TCP ones
are also in ``tcp_queries``. ``query_count(name, qtype)`` counts those of one name and type.

    with DnsServer() as dns_server:
        dns_server.add_mx("example.test", 10, "mx.example.test")
        dns_server.add_a("mx.example.test", "127.0.0.1")
        resolver = MxResolver(nameservers=[dns_server.address])
"""

from __future__ import annotations

import contextlib
import errno
import selectors
import socket
import struct
import threading
from types import TracebackType

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.reversename
import dns.rrset

_HOST = "127.0.0.1"
_IN = dns.rdataclass.IN


def _name(text: str) -> dns.name.Name:
    return dns.name.from_text(text).canonicalize()


def _label(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True) if name != dns.name.root else "."


class DnsServer:
    """An in-process authoritative DNS server for tests; see the module docstring."""

    def __init__(
        self,
        *,
        ttl: int = 300,
        negative_ttl: int = 300,
        soa_ttl: int | None = None,
        negative_soa: bool = True,
    ) -> None:
        self.ttl = ttl  # default TTL of added records
        self.negative_ttl = negative_ttl  # SOA MINIMUM: how long NXDOMAIN/NODATA answers are cached
        self.soa_ttl = soa_ttl  # TTL of the SOA record itself; None = negative_ttl (RFC 2308 §3 caps by both)
        self.negative_soa = negative_soa  # False: negative answers carry no SOA at all
        self.queries: list[tuple[str, str]] = []
        self.tcp_queries: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._records: dict[dns.name.Name, dict[dns.rdatatype.RdataType, dns.rrset.RRset]] = {}
        self._servfail: set[dns.name.Name] = set()
        self._signed: set[dns.name.Name] = set()  # zones whose answers carry the AD flag
        self._unsigned: set[dns.name.Name] = set()  # unsigned zones under signed ones: never the AD flag
        self._timeout: set[dns.name.Name] = set()
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._connections: set[socket.socket] = set()

    # ---- life cycle -------------------------------------------------------------------------------

    def start(self) -> None:
        if self._udp is not None:
            raise RuntimeError("DnsServer already started")
        self._udp, self._tcp = self._bind_pair()
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping.clear()
        thread = threading.Thread(target=self._serve, name="DnsServer", daemon=True)
        self._threads = [thread]
        thread.start()

    def stop(self) -> None:
        if self._udp is None:
            return
        self._stopping.set()
        assert self._wake_w is not None
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._threads[0].join(timeout=5)  # the accept loop: no new connections after this
        with self._lock:
            connections = list(self._connections)
        for conn in connections:  # wakes their threads' recv()
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in self._threads[1:]:
            thread.join(timeout=5)
        for sock in (self._udp, self._tcp, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._udp = self._tcp = self._wake_r = self._wake_w = None
        self._threads = []

    def __enter__(self) -> DnsServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        if self._udp is None:
            raise RuntimeError("DnsServer not started")
        return (_HOST, self._udp.getsockname()[1])

    @property
    def nameserver(self) -> str:
        host, port = self.address
        return f"{host}:{port}"

    def query_count(self, name: str, qtype: str) -> int:
        """The number of queries received for `name` (any case, trailing dot optional) and `qtype` ("MX")."""
        return self.queries.count((_label(_name(name)), qtype.upper()))

    # ---- zone content ----------------------------------------------------------------------------

    def add_mx(self, domain: str, preference: int, exchange: str, *, ttl: int | None = None) -> None:
        """Add an MX record; ``exchange="."`` makes it a null MX (RFC 7505)."""
        target = dns.name.from_text(exchange).to_text()
        self._add(domain, dns.rdata.from_text(_IN, dns.rdatatype.MX, f"{preference} {target}"), ttl)

    def add_a(self, name: str, ip: str, *, ttl: int | None = None) -> None:
        self._add(name, dns.rdata.from_text(_IN, dns.rdatatype.A, ip), ttl)

    def add_aaaa(self, name: str, ip: str, *, ttl: int | None = None) -> None:
        self._add(name, dns.rdata.from_text(_IN, dns.rdatatype.AAAA, ip), ttl)

    def add_ptr(self, ip: str, name: str, *, ttl: int | None = None) -> None:
        """A PTR record for `ip` (the reverse name is derived: 1.0.0.127.in-addr.arpa)."""
        owner = dns.reversename.from_address(ip).to_text()
        target = dns.name.from_text(name).to_text()
        self._add(owner, dns.rdata.from_text(_IN, dns.rdatatype.PTR, target), ttl)

    def add_txt(self, name: str, *strings: str, ttl: int | None = None) -> None:
        """A TXT record of one or more character-strings (each at most 255 octets; a long DKIM key is split
        into several, as zone files do)."""
        quoted = " ".join('"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"' for s in strings)
        self._add(name, dns.rdata.from_text(_IN, dns.rdatatype.TXT, quoted), ttl)

    def add_tlsa(
        self, name: str, usage: int, selector: int, mtype: int, data: bytes, *, ttl: int | None = None
    ) -> None:
        """A TLSA record (RFC 6698) at e.g. ``_25._tcp.mx.example.test``: usage 3 DANE-EE / 2 DANE-TA,
        selector 0 full certificate / 1 SPKI, matching type 0 exact / 1 SHA-256 / 2 SHA-512."""
        self._add(
            name,
            dns.rdata.from_text(_IN, dns.rdatatype.TLSA, f"{usage} {selector} {mtype} {data.hex()}"),
            ttl,
        )

    def sign_zone(self, zone: str) -> None:
        """Answers for `zone` and the names under it get the AD flag (see the module docstring)."""
        with self._lock:
            self._signed.add(_name(zone))

    def unsign_zone(self, zone: str) -> None:
        """Answers for `zone` and the names under it never get the AD flag, even under a signed zone: an
        unsigned child zone (an insecure delegation), e.g. ``_tcp.mx.example.test`` under a signed parent."""
        with self._lock:
            self._unsigned.add(_name(zone))

    def set_servfail(self, name: str) -> None:
        with self._lock:
            self._servfail.add(_name(name))

    def set_timeout(self, name: str) -> None:
        with self._lock:
            self._timeout.add(_name(name))

    def remove(self, name: str) -> None:
        """Forget every record of `name` (a domain that stops publishing, say its ``_mta-sts`` TXT)."""
        with self._lock:
            self._records.pop(_name(name), None)

    def _add(self, owner: str, rdata: dns.rdata.Rdata, ttl: int | None) -> None:
        name = _name(owner)
        with self._lock:
            by_type = self._records.setdefault(name, {})
            rrset = by_type.get(rdata.rdtype)
            if rrset is None:
                rrset = by_type[rdata.rdtype] = dns.rrset.RRset(name, _IN, rdata.rdtype)
            rrset.add(rdata, self.ttl if ttl is None else ttl)

    # ---- serving ----------------------------------------------------------------------------------

    @staticmethod
    def _bind_pair() -> tuple[socket.socket, socket.socket]:
        """A UDP and a TCP socket on the same free loopback port."""
        for _ in range(50):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind((_HOST, 0))
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                tcp.bind((_HOST, udp.getsockname()[1]))
            except OSError as e:
                udp.close()
                tcp.close()
                if e.errno == errno.EADDRINUSE:
                    continue
                raise
            tcp.listen(16)
            return udp, tcp
        raise RuntimeError("no free port for both UDP and TCP")

    def _serve(self) -> None:
        assert self._udp is not None and self._tcp is not None and self._wake_r is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self._udp, selectors.EVENT_READ)
            selector.register(self._tcp, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping.is_set():
                for key, _ in selector.select():
                    if key.fileobj is self._udp:
                        self._serve_udp_datagram(self._udp)
                    elif key.fileobj is self._tcp:
                        self._accept_tcp(self._tcp)

    def _serve_udp_datagram(self, udp: socket.socket) -> None:
        try:
            wire, peer = udp.recvfrom(65535)
        except OSError:
            return
        reply = self._answer(wire, tcp=False)
        if reply is not None:
            with contextlib.suppress(OSError):
                udp.sendto(reply, peer)

    def _accept_tcp(self, tcp: socket.socket) -> None:
        try:
            conn, _ = tcp.accept()
        except OSError:
            return
        with self._lock:
            self._connections.add(conn)
        thread = threading.Thread(target=self._serve_tcp_connection, args=(conn,), daemon=True)
        self._threads.append(thread)
        thread.start()

    def _serve_tcp_connection(self, conn: socket.socket) -> None:
        """Length-prefixed queries until the client closes (or the server stops)."""
        try:
            self._serve_tcp_queries(conn)
        finally:
            with self._lock:
                self._connections.discard(conn)
            conn.close()

    def _serve_tcp_queries(self, conn: socket.socket) -> None:
        buffer = b""
        while not self._stopping.is_set():
            try:
                chunk = conn.recv(65537)
            except OSError:
                return
            if not chunk:
                return
            buffer += chunk
            while len(buffer) >= 2:
                (length,) = struct.unpack("!H", buffer[:2])
                if len(buffer) < 2 + length:
                    break
                wire, buffer = buffer[2 : 2 + length], buffer[2 + length :]
                reply = self._answer(wire, tcp=True)
                if reply is not None:
                    try:
                        conn.sendall(struct.pack("!H", len(reply)) + reply)
                    except OSError:
                        return

    def _answer(self, wire: bytes, *, tcp: bool) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if query.opcode() != dns.opcode.QUERY or len(query.question) != 1:
            response.set_rcode(dns.rcode.NOTIMP if len(query.question) == 1 else dns.rcode.FORMERR)
            return response.to_wire()
        question = query.question[0]
        qname = question.name.canonicalize()
        seen = (_label(qname), dns.rdatatype.to_text(question.rdtype))
        self.queries.append(seen)
        if tcp:
            self.tcp_queries.append(seen)
        with self._lock:
            if qname in self._timeout:
                return None
            if qname in self._servfail:
                response.set_rcode(dns.rcode.SERVFAIL)
            elif question.rdclass != _IN:
                response.set_rcode(dns.rcode.REFUSED)
            elif qname not in self._records:
                response.set_rcode(dns.rcode.NXDOMAIN)
                if self.negative_soa:
                    response.authority.append(self._soa(qname))
            else:
                by_type = self._records[qname]
                if question.rdtype == dns.rdatatype.ANY:
                    response.answer.extend(by_type.values())
                elif question.rdtype in by_type:
                    response.answer.append(by_type[question.rdtype])
                elif self.negative_soa:
                    response.authority.append(self._soa(qname))
            if (
                any(qname.is_subdomain(zone) for zone in self._signed)
                and not any(qname.is_subdomain(zone) for zone in self._unsigned)
                and response.rcode() != dns.rcode.SERVFAIL
            ):
                response.flags |= dns.flags.AD
        max_size = 65535 if tcp else (max(512, query.payload) if query.edns >= 0 else 512)
        return response.to_wire(max_size=max_size, prefer_truncation=True)

    def _soa(self, qname: dns.name.Name) -> dns.rrset.RRset:
        """The SOA of the (pretend) zone holding qname: its last two labels."""
        apex = dns.name.Name(qname.labels[-3:]) if len(qname.labels) > 3 else qname
        zone = apex.to_text() if apex != dns.name.root else ""
        soa = dns.rdata.from_text(
            _IN, dns.rdatatype.SOA, f"ns.{zone} hostmaster.{zone} 1 3600 600 86400 {self.negative_ttl}"
        )
        rrset = dns.rrset.RRset(apex, _IN, dns.rdatatype.SOA)
        rrset.add(soa, self.negative_ttl if self.soa_ttl is None else self.soa_ttl)
        return rrset
