"""`smtpsvc probe HOST[:PORT]`: the KB279616 telnet check, automated. Connects, reads the banner, sends
EHLO (or HELO), lists the keywords, optionally upgrades with STARTTLS and reports the certificate, and names
the problems this relay would run into with that peer (the failures of the KB articles). With an `OAuthLogin`
(`--auth PROFILE`) it also fetches the profile's token and logs in with it, step by step, as delivery would:
the check an administrator runs before switching a relay to Microsoft 365 with OAuth."""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass, field

from smtpsvc.delivery.authcauses import OAUTH_TOKEN_REFUSED, TOKEN_REFUSED_ADVICE, diagnose
from smtpsvc.delivery.dane import check as dane_check
from smtpsvc.delivery.dane import usable_records
from smtpsvc.delivery.smtp_session import peer_chain
from smtpsvc.protocol import NEED_DATA, Capabilities, ClientConnection, ConnectionClosed, Reply, ServerReply
from smtpsvc.protocol.sasl import SaslError, decode_bearer_error, encode_oauthbearer, encode_xoauth2
from smtpsvc.routing.mx import TlsaAnswer
from smtpsvc.tokens import AccessToken, TokenError, TokenSource


@dataclass(frozen=True, slots=True)
class OAuthLogin:
    """`--auth PROFILE`: log in as `user` with a token of `profile` from `tokens`, by `mechanism`."""

    tokens: TokenSource
    profile: str
    user: str
    mechanism: str = "xoauth2"  # or "oauthbearer"


@dataclass(frozen=True, slots=True)
class DaneProbe:
    """`--dane`: the host's TLSA answer and whether its address answer was DNSSEC-authenticated too."""

    tlsa: TlsaAnswer
    address_secure: bool


@dataclass(slots=True)
class ProbeReport:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


class _Probe:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float) -> None:
        self.reader, self.writer, self.timeout = reader, writer, timeout
        self.conn = ClientConnection()

    async def reply(self) -> Reply:
        while True:
            event = self.conn.next_event()
            if isinstance(event, ServerReply):
                return event.reply
            if isinstance(event, ConnectionClosed):
                raise ConnectionError("the server closed the connection")
            assert event is NEED_DATA
            await self.writer.drain()
            self.conn.receive_data(await asyncio.wait_for(self.reader.read(65536), self.timeout))

    async def command(self, verb: str, arg: str = "") -> Reply:
        self.writer.write(self.conn.send_command(verb, arg))
        return await self.reply()


async def probe(
    host: str,
    port: int,
    *,
    hostname: str,
    starttls: bool = False,
    helo: bool = False,
    xexch50_expected: bool = False,
    timeout: float = 15.0,
    login: OAuthLogin | None = None,
    dane: DaneProbe | None = None,
    address: str | None = None,
) -> ProbeReport:
    """`address`: where to connect, when not `host` itself (`--dane` uses the configured resolver's answer;
    `host` stays the name TLS and DANE check)."""
    report = ProbeReport()
    out = report.lines.append
    token = await _fetch_token(login, report) if login is not None else None
    starttls = starttls or login is not None  # a provider offers AUTH only inside TLS
    if dane is not None:
        starttls = _report_tlsa(dane, report) or starttls
    reader, writer = await asyncio.wait_for(asyncio.open_connection(address or host, port), timeout)
    p = _Probe(reader, writer, timeout)
    try:
        banner = await p.reply()
        out(f"banner:   {banner}")
        if not banner.is_positive:
            report.problems.append(f"the server refuses connections: {banner}")
            return report
        hello = await p.command("HELO" if helo else "EHLO", hostname)
        caps = Capabilities.from_ehlo(hello) if hello.is_positive and not helo else None
        out(f"{'HELO' if helo else 'EHLO'}:     {str(hello).splitlines()[0]}")
        if not hello.is_positive:
            report.problems.append(
                f"EHLO is refused ({hello}): smtpsvc falls back to HELO, without extensions "
                "(KB818222 method 2)"
            )
        if caps is not None:
            for line in str(hello).splitlines()[1:]:
                out(f"          {line[4:]}")
            _judge(caps, report, xexch50_expected)
            if starttls and caps.has("STARTTLS"):
                secured = await _starttls(p, host, hostname, report, dane)
                if login is not None and token is not None and secured is not None:
                    await _login(p, secured, login, token, host, port, report)
            elif starttls:
                report.problems.append(
                    'STARTTLS is not offered: tls = "required" routes to it will not deliver'
                    + (
                        " and, under DANE, neither will MX delivery (dane-tls-required)"
                        if _enforced(dane)
                        else ""
                    )
                )
        await p.command("QUIT")
    except (ConnectionError, TimeoutError, OSError) as exc:
        report.problems.append(f"the conversation broke off: {exc or type(exc).__name__}")
    finally:
        writer.close()
    return report


def _judge(caps: Capabilities, report: ProbeReport, xexch50_expected: bool) -> None:
    wanted = {
        "8BITMIME": "8-bit mail is converted to 7-bit MIME for this peer (KB286673 would have dropped it)",
        "PIPELINING": "each command waits for its reply (slower, not wrong)",
        "SIZE": "the message size is not declared; a peer limit is found only after the data",
        "ENHANCEDSTATUSCODES": "replies carry no enhanced status codes; NDRs show generic ones",
        "DSN": "NOTIFY/RET requests are not passed on; smtpsvc reports success as relayed",
        "CHUNKING": "BINARYMIME messages cannot go to this peer (NDR 5.6.3)",
    }
    for keyword, consequence in wanted.items():
        if not caps.has(keyword):
            report.problems.append(f"{keyword} missing: {consequence}")
    if xexch50_expected:
        # KB279616's telnet check: an Exchange 2000/2003 transport lists both verbs to anyone who says EHLO
        for verb in ("XEXCH50", "X-LINK2STATE"):
            if not caps.has(verb):
                report.problems.append(
                    f"{verb} missing: this is not an Exchange 2000/2003 transport, or it offers "
                    f"{verb} only after AUTH (KB279616's telnet check)"
                )


class TargetError(ValueError):
    """A `HOST[:PORT]` argument that cannot be used; the text is one line for the administrator."""


def split_target(target: str) -> tuple[str, int | None]:
    """`HOST[:PORT]` as `probe` takes it: `host`, `host:25`, `192.0.2.1:25`, `[::1]:2525`, `[::1]` and a bare
    `::1` (more than one colon without brackets is an IPv6 address, no port). The port is None when not
    given. Raises TargetError for an empty host or a port that is not a number in 1-65535."""
    text = target.strip()
    port_text: str | None = None
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise TargetError(f"{target!r}: an IPv6 address with a port is written [ADDRESS]:PORT")
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host = text
    if not host:
        raise TargetError(f"{target!r}: no host name or address")
    if port_text is None:
        return host, None
    if not port_text.isascii() or not port_text.isdigit():
        raise TargetError(f"{target!r}: the port must be a number from 1 to 65535")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise TargetError(f"{target!r}: the port must be a number from 1 to 65535, not {port}")
    return host, port


async def _fetch_token(login: OAuthLogin, report: ProbeReport) -> AccessToken | None:
    """Step 1 of `--auth`: the profile's token, as delivery gets it (the token itself is never shown)."""
    try:
        token = await login.tokens.token(login.profile)
    except TokenError as exc:
        report.problems.append(f"no token for [oauth.{login.profile}] (cause {exc.cause}): {exc}")
        return None
    minutes = max(0, int((token.expires_at - time.time()) // 60))
    report.lines.append(f"token:    [oauth.{login.profile}]: a token valid for {minutes} more minute(s)")
    return token


async def _login(
    p: _Probe,
    caps: Capabilities,
    login: OAuthLogin,
    token: AccessToken,
    host: str,
    port: int,
    report: ProbeReport,
) -> None:
    """Step 2 of `--auth`: AUTH XOAUTH2 (or OAUTHBEARER) with the token, the peer's answer explained."""
    mechanism = login.mechanism.upper()
    if mechanism not in caps.auth_mechanisms:
        offered = " ".join(caps.auth_mechanisms) or "no AUTH at all"
        report.problems.append(f"AUTH {mechanism} is not offered after STARTTLS (it offers {offered})")
        return
    if mechanism == "XOAUTH2":
        initial = encode_xoauth2(login.user, token.value)
    else:
        initial = encode_oauthbearer(login.user, token.value, host, port)
    reply = await p.command("AUTH", f"{mechanism} {initial}")
    refused = ""
    if reply.code == 334:  # the SASL error challenge (RFC 7628 §3.2.3; XOAUTH2 alike): answer, then the reply
        try:
            refused = decode_bearer_error(reply.text).describe()
        except SaslError:
            refused = "the server refused the token"
        p.writer.write(p.conn.send_auth_response("" if mechanism == "XOAUTH2" else "AQ=="))
        reply = await p.reply()
    if reply.code == 235:
        report.lines.append(f"AUTH:     {mechanism} as {login.user}: accepted ({reply})")
        return
    named = diagnose(str(reply))
    if named is not None:
        report.problems.append(f"AUTH {mechanism} as {login.user} refused: {named.explain(str(reply))}")
    else:
        why = f"{refused}: " if refused else ""
        report.problems.append(
            f"AUTH {mechanism} as {login.user} refused ({reply}): {why}"
            f"[{OAUTH_TOKEN_REFUSED}: {TOKEN_REFUSED_ADVICE}]"
        )


def _enforced(dane: DaneProbe | None) -> bool:
    """Delivery would apply DANE to this host (given an authenticated MX): authenticated TLSA records."""
    return dane is not None and dane.tlsa.secure and dane.address_secure and bool(dane.tlsa.records)


def _report_tlsa(dane: DaneProbe, report: ProbeReport) -> bool:
    """The TLSA lines of `--dane`; True when DANE would apply (STARTTLS then has to be checked)."""
    out = report.lines.append
    answer = dane.tlsa
    if not answer.records:
        out(f"TLSA:     {answer.name}: none published: DANE does not apply (opportunistic TLS)")
        return False
    for record in answer.records:
        out(f"TLSA:     {answer.name} {record}")
    if answer.secure:
        out("DNSSEC:   the TLSA answer is authenticated (the resolver set the AD bit)")
    else:
        out("DNSSEC:   the TLSA answer is NOT authenticated (no AD bit): delivery ignores it")
        report.problems.append(
            "the TLSA records are not DNSSEC-authenticated: use a validating resolver (resolver.nameservers, "
            "e.g. a local unbound) or sign the zone; until then DANE does not apply"
        )
        return False
    if not dane.address_secure:
        out("DNSSEC:   the host's address answer is NOT authenticated: DANE does not apply (RFC 7672 §2.2)")
        return False
    if not usable_records(answer.records):
        out("DANE:     no usable record (PKIX-TA/PKIX-EE are ignored for SMTP): TLS required, not checked")
    out('DANE:     applies when the domain\'s MX answer is authenticated too (tls = "dane-or-mta-sts")')
    return True


async def _starttls(
    p: _Probe, host: str, hostname: str, report: ProbeReport, dane: DaneProbe | None = None
) -> Capabilities | None:
    """Upgrade as an opportunistic sender does (any certificate), then say whether a `tls = "required"`
    route would accept the certificate (system CAs, host name). Returns the keywords offered inside TLS."""
    answer = await p.command("STARTTLS")
    if answer.code != 220:
        report.problems.append(f"STARTTLS is advertised but refused: {answer}")
        return None
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    await p.writer.start_tls(context, server_hostname=host)
    p.conn.tls_established()
    cipher = p.writer.get_extra_info("cipher")
    report.lines.append(f"TLS:      {cipher[1]} {cipher[0]}" if cipher else "TLS:      established")
    tls = p.writer.get_extra_info("ssl_object")
    der = tls.getpeercert(binary_form=True) if tls is not None else None
    report.lines.append(f"cert:     {len(der)} bytes presented" if der else "cert:     none presented")
    if dane is not None and dane.tlsa.records:
        result = dane_check(dane.tlsa.records, peer_chain(tls), [host])
        if result.ok:
            report.lines.append(f"DANE:     {result.detail}")
        elif _enforced(dane):
            report.problems.append(
                f"DANE: {result.detail}: MX delivery to this host is deferred (dane-mismatch)"
            )
        else:
            report.lines.append(
                f"DANE:     {result.detail} (not enforced: the records are not authenticated)"
            )
    verdict = await _verifies(host, p.writer.get_extra_info("peername"), hostname)
    if verdict:
        report.problems.append(f'the certificate would not pass tls = "required": {verdict}')
    else:
        report.lines.append("cert:     verifies against the system CAs for this host name")
    hello = await p.command("EHLO", hostname)
    report.lines.append(f"EHLO/TLS: {len(str(hello).splitlines()) - 1} keywords")
    return Capabilities.from_ehlo(hello) if hello.is_positive else None


async def _verifies(host: str, peer: object, hostname: str) -> str:
    """A second, verifying STARTTLS handshake; "" when the certificate verifies, else the reason."""
    address = peer[0] if isinstance(peer, tuple) else host
    port = peer[1] if isinstance(peer, tuple) else 25
    reader, writer = await asyncio.wait_for(asyncio.open_connection(address, port), 15)
    q = _Probe(reader, writer, 15)
    try:
        await q.reply()
        await q.command("EHLO", hostname)
        if (await q.command("STARTTLS")).code != 220:
            return "STARTTLS refused on the second connection"
        await writer.start_tls(ssl.create_default_context(), server_hostname=host)
        return ""
    except ssl.SSLCertVerificationError as exc:
        return exc.verify_message or str(exc)
    except (ssl.SSLError, ConnectionError, TimeoutError, OSError) as exc:
        return str(exc) or type(exc).__name__
    finally:
        writer.close()
