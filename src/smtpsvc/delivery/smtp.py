"""The SMTP transport: one route group of a message to its next hop (smart host, connector or MX).

It asks the route's destination (`delivery/destination.py`) for a session: a cached one, carried over from
the previous message, or a grant to open a connection. With a grant it resolves the hosts (`routing/mx.py`)
and tries them in order: a host that refuses, does not answer, never greets, or fails EHLO, STARTTLS or AUTH
passes the attempt to the next one (event 4006); the first one that is ready carries the transaction
(`delivery/smtp_session.py`). A cached session that turns out dead is replaced by a new connection in the
same attempt. Replies to MAIL, RCPT and the data are answers, not host failures: the attempt ends there.

What it reports besides the per-recipient results: events 4006 (a host skipped), 7004 (a command refused)
and 3010 (a self-healing fact learned), the transcript, and for the scheduler's decisions whether no host
could be reached (`unreachable`) or DNS cannot find the destination (`not_found`).
"""

from __future__ import annotations

import dataclasses
import functools
import random
import ssl
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from pathlib import Path

from smtpsvc import events
from smtpsvc.config import Config, LiveConfig
from smtpsvc.delivery import dkim
from smtpsvc.delivery.authcauses import OAUTH_TOKEN_FAILED, diagnose
from smtpsvc.delivery.dane import DANE_LOOKUP_FAILED
from smtpsvc.delivery.destination import Destination, DestinationDead, Destinations
from smtpsvc.delivery.healing import ACTIONS, CHOKED_ON, PeerMemory
from smtpsvc.delivery.schedule import retry_delay
from smtpsvc.delivery.smtp_session import (
    CONNECTION_DROPPED,
    DROPPED,
    REPLY_TIMEOUT,
    TRANSIENT_REPLY,
    Dropped,
    HopFailure,
    Rejection,
    SessionPolicy,
    SmtpSession,
    Stalled,
    Timeouts,
    TlsFailed,
    TokenLogin,
    connect,
    diagnose_drop,
    hop_label,
    prepare,
    send_message,
    status_of,
)
from smtpsvc.delivery.tlsrpt import (
    CERTIFICATE_EXPIRED,
    CERTIFICATE_HOST_MISMATCH,
    CERTIFICATE_NOT_TRUSTED,
    STARTTLS_NOT_SUPPORTED,
    VALIDATION_FAILURE,
    TlsCounts,
)
from smtpsvc.delivery.transport import MessageSource, Outcome
from smtpsvc.events import EventLog
from smtpsvc.model import DeliveryResult, Envelope, Recipient, Route
from smtpsvc.protolog import ProtocolLog
from smtpsvc.routing.connectors import RouteChoice
from smtpsvc.routing.mtasts import MtaSts, Policy, mx_allowed
from smtpsvc.routing.mx import DnsError, MxResolver, NextHop, TlsaAnswer
from smtpsvc.tokens import TokenError, TokenSource
from smtpsvc.units import format_duration

DANE_OR_MTA_STS = "dane-or-mta-sts"  # the TLS policy under which DANE applies (config delivery.tls)
DNS_NOT_FOUND = frozenset({"dns-nxdomain", "dns-no-address"})
LITERAL_HOPS_KEPT = 256  # entries of SmtpTransport._literal_hops
HEADER_READ = 256 * 1024  # what is read of a message to find its From: header (DKIM key choice)

# Causes of a hop refused by the domain's MTA-STS policy (docs/delivery.md "MTA-STS").
MTA_STS_MX_MISMATCH = "mta-sts-mx-mismatch"
MTA_STS_TLS_REQUIRED = "mta-sts-tls-required"
MTA_STS_CERTIFICATE = "mta-sts-certificate"
MTA_STS_POLICY_UNAVAILABLE = "mta-sts-policy-unavailable"  # published, but not fetched (warning only)
_VERIFY_HOSTNAME_MISMATCH = 62  # OpenSSL X509_V_ERR_HOSTNAME_MISMATCH
_VERIFY_CERT_HAS_EXPIRED = 10  # OpenSSL X509_V_ERR_CERT_HAS_EXPIRED

LinkSlot = Callable[[str, int], AbstractAsyncContextManager[None]]


def timeouts_of(config: Config) -> Timeouts:
    cfg = config.delivery
    return Timeouts(
        connect=cfg.connect_timeout,
        greeting=cfg.greeting_timeout,
        command=cfg.timeout,
        mail=cfg.mail_timeout,
        rcpt=cfg.rcpt_timeout,
        data=cfg.data_timeout,
        data_block=cfg.data_block_timeout,
        final=cfg.final_timeout,
    )


class SmtpTransport:
    def __init__(
        self,
        live: LiveConfig,
        resolver: MxResolver,
        event_log: EventLog,
        link_slot: LinkSlot | None = None,
        rng: random.Random | None = None,
        tokens: TokenSource | None = None,
    ) -> None:
        self.live = live
        self.tokens = tokens  # OAuth 2.0 tokens for XOAUTH2/OAUTHBEARER logins; None: no [oauth.NAME] profile
        self.resolver = resolver
        self.events = event_log
        self.memory = PeerMemory()  # self-healing facts per next hop (SPEC 2.9)
        self.rng = rng or random.Random()
        self._link_slot = link_slot  # a cluster's connection slots per link, shared by every node
        self.destinations: Destinations[RouteChoice, SmtpSession] = Destinations(self._destination)
        self.dkim_keys = dkim.KeyFiles()  # [[dkim]] keys, parsed once per file version
        self.protocol_log: ProtocolLog | None = None  # [protocol_log] enabled: set by the composition root
        # Smart hosts given as address literals -> their next hops (see _next_hops). Bounded.
        self._literal_hops: dict[tuple[tuple[str, int], ...], list[NextHop]] = {}
        # MTA-STS (RFC 8461) for MX routes with tls = "dane-or-mta-sts", and TLS-RPT counting (RFC 8460):
        # set by the service (app.py); None: not applied (opportunistic).
        self.mta_sts: MtaSts | None = None
        self.tls_counts: TlsCounts | None = None

    def _destination(self) -> Destination[SmtpSession]:
        cfg = self.live.current.delivery
        return Destination(
            cfg.initial_connections_per_domain,
            cfg.max_connections_per_domain,
            cfg.max_messages_per_connection,
            clock=time.time,
        )

    def revive(self, links: set[str] | frozenset[str] | None) -> None:
        """The operator forced a retry: destinations of these links (None: all) may be tried now."""
        for route, destination in self.destinations.items():
            if links is None or route.route.link in links:
                destination.revive()

    async def close(self) -> None:
        await self.destinations.close()

    @property
    def connections_opened(self) -> int:
        """Connections opened so far, every destination (statistics, tests)."""
        return sum(destination.opened_total for _, destination in self.destinations.items())

    def idle_sessions(self) -> list[SmtpSession]:
        """The sessions cached for the next message, every destination (diagnosis, tests)."""
        return [session for _, destination in self.destinations.items() for session in destination.sessions()]

    # -- one route group -----------------------------------------------------------------------------
    async def deliver(
        self, route: RouteChoice, envelope: Envelope, recipients: Sequence[Recipient], message: MessageSource
    ) -> Outcome:
        destination = self.destinations.get(route)
        attempt = _Attempt(self, route, envelope, recipients, message)
        unusable = await attempt.choose_dkim_keys()
        if unusable is not None:  # before any connection: nothing to send without its signature
            return unusable
        try:
            grant = await destination.acquire()
            if grant.session is not None:
                results = await attempt.on_cached(destination, grant.session)
                if results is not None:
                    return attempt.finish(results)
            outcome = await attempt.on_new_connection(destination)
            if outcome is not None:
                return outcome
            if destination.working:
                # Every host failed for this message while other sessions of the destination work (one
                # connection hit the peer's limit, say): wait for one of them rather than a retry interval.
                grant = await destination.acquire()
                if grant.session is None:
                    destination.unused()
                else:
                    results = await attempt.on_cached(destination, grant.session)
                    if results is not None:
                        return attempt.finish(results)
                    destination.unused()
            return attempt.unreachable()
        except DestinationDead as dead:
            if attempt.failures:  # it died while this message waited its second turn
                return attempt.unreachable()
            return Outcome(postponed_until=dead.until, reason=dead.reason, cause=dead.cause)
        finally:
            attempt.report()

    # -- helpers the attempt uses --------------------------------------------------------------------
    async def next_hops(self, route: Route) -> list[NextHop]:
        if route.hosts:
            known = self._literal_hops.get(route.hosts)
            if known is not None:
                return list(known)
            hops: list[NextHop] = []
            last_error: DnsError | None = None
            for host, port in route.hosts:
                try:
                    hops.extend(await self.resolver.resolve_host(host, port))
                except DnsError as exc:
                    last_error = exc
            if not hops and last_error is not None:
                raise last_error
            if last_error is None and all(hop.host == hop.address for hop in hops):
                # Speed: every host is an address literal (such as "[127.0.0.1]"), whose one hop, named
                # after the address, resolve_host() makes without DNS, the same every time: kept instead
                # of parsing the address again for every message. A name's hops are looked up afresh.
                if len(self._literal_hops) >= LITERAL_HOPS_KEPT:
                    self._literal_hops.clear()
                self._literal_hops[route.hosts] = list(hops)
            return hops
        return await self.resolver.resolve_mx(route.mx_domain, route.port)

    def xexch50_allowed(self, route: RouteChoice, recipients: Sequence[Recipient]) -> bool:
        """SPEC 2.5: only on routes with xexch50 = true and, with suppress_xexch50_external
        (SuppressExternal), only to internal domains: our local domains and the domains.remote entries."""
        if not route.xexch50:
            return False
        config = self.live.current
        if not config.delivery.suppress_xexch50_external:
            return True
        internal = set(config.local_domains) | {r.name for r in config.domains.remote}
        return {r.domain for r in recipients} <= internal  # every recipient of this transaction is internal

    async def hold_slot(self, link: str, stack: AsyncExitStack) -> None:
        """Take the cluster-wide connection slot of `link` into `stack` (nothing with one node)."""
        if self._link_slot is not None:
            limit = self.live.current.delivery.max_connections_per_domain
            await stack.enter_async_context(self._link_slot(link, limit))


class _Attempt:
    """One route group's delivery: the sessions it uses, what it learns, the events it owes."""

    def __init__(
        self,
        transport: SmtpTransport,
        route: RouteChoice,
        envelope: Envelope,
        recipients: Sequence[Recipient],
        message: MessageSource,
    ) -> None:
        self.transport = transport
        self.config = transport.live.current
        self.route = route
        self.envelope = envelope
        self.recipients = recipients
        self.message = message
        self.transcript: list[str] = []
        self.domain = route.route.mx_domain or recipients[0].domain
        self.failures: list[HopFailure] = []
        self.rejections: list[Rejection] = []
        self.learned: list[tuple[str, str]] = []
        self._blob: bytes | bool | None = False  # False: not read yet
        self._reconnected = False  # the fresh token of a refused one got its new connection
        self.signer: Callable[[bytes], bytes] | None = None  # DKIM: the From: domain has a key
        self.sts: Policy | None = None  # the MTA-STS policy (testing or enforce) this attempt applies
        self._tls_error: BaseException | None = None  # the last failed handshake's error (MTA-STS causes)
        self._warnings: list[events.Event] = []  # MTA-STS testing-mode failures: delivered anyway
        self._healed: list[events.Event] = []  # 3010 for each fact new to the peer memory (`_learn`)

    async def choose_dkim_keys(self) -> Outcome | None:
        """Choose the [[dkim]] keys by the From: domain and load them (the signer of every transaction of
        this attempt). A key that cannot be used defers the message (cause dkim-key-unusable), or with
        delivery.dkim_on_error = "send-unsigned" lets it go unsigned with a warning event."""
        config = self.config
        if not config.dkim:
            return None
        handle = await self.message.open()
        try:
            headers = dkim.header_block(handle.read(HEADER_READ))
        finally:
            handle.close()
        domain = dkim.from_domain(headers)
        refs = dkim.keys_for(
            domain, [dkim.KeyRef(k.domain, k.selector, k.key_file, k.algorithm) for k in config.dkim]
        )
        if not refs or domain is None:
            return None
        try:
            keys = self.transport.dkim_keys.load(refs, domain)
        except dkim.KeyUnusable as exc:
            if config.delivery.dkim_on_error == "send-unsigned":
                self.transport.events.emit(
                    events.Event(
                        events.REMOTE_DOMAIN_FAILED,
                        f"{exc}; the message to {self.domain} is sent without a DKIM signature "
                        '(delivery.dkim_on_error = "send-unsigned")',
                        queue_id=self.envelope.id,
                        domain=self.domain,
                        cause=dkim.KEY_UNUSABLE,
                        level="warning",
                    )
                )
                return None
            reason = (
                f'{exc}; the message waits for a usable key (or delivery.dkim_on_error = "send-unsigned")'
            )
            return self._deferred(f"451 4.7.0 {reason}", "4.7.0", reason=reason, cause=dkim.KEY_UNUSABLE)
        self.signer = functools.partial(dkim.sign, keys=keys)
        return None

    async def on_cached(
        self, destination: Destination[SmtpSession], session: SmtpSession
    ) -> list[DeliveryResult] | None:
        """The transaction on a session handed over by the destination; None when it turned out dead (the
        grant is then ours to open a new connection)."""
        session.attach(self.transcript, self.envelope.id)
        self.transcript.append(f"--- {session.label} (connection reused, message {session.messages})")
        return await self._carry(destination, session, slot=None)

    async def on_new_connection(self, destination: Destination[SmtpSession]) -> Outcome | None:
        """With a grant: resolve, then try each host until one carries the transaction. The grant is used up
        whatever happens. None: every host failed (negative feedback given, the destination dead if nothing
        else of it works)."""
        try:
            policy = self._policy()
            if policy.oauth is not None:  # no token, no connection: nothing to say to the server without one
                await policy.oauth.current()
        except OSError as exc:
            destination.unused()
            reply = f"451 4.7.0 Cannot read auth.password_file of {self._auth_owner()}: {exc}"
            return self._deferred(reply, "4.7.0", reason=reply, cause="auth-config")
        except TokenError as exc:
            destination.unused()
            reply = f"451 4.7.0 {exc}"
            return self._deferred(reply, "4.7.0", reason=str(exc), cause=OAUTH_TOKEN_FAILED)
        except BaseException:
            destination.unused()
            raise
        try:
            hops = await self.transport.next_hops(self.route.route)
            self.sts = await self._mta_sts_policy()
        except DnsError as exc:
            destination.unused()
            return self._dns_failed(exc)
        except BaseException:
            destination.unused()
            raise
        if self.sts is not None:
            hops = self._sts_hops(hops)
        holding = True  # the grant: a connection slot not yet turned into a session
        try:
            async with AsyncExitStack() as slot:
                await self.transport.hold_slot(self.route.route.link, slot)
                for hop in hops:
                    session = await (self._open_sts(hop, policy) if self.sts else self._open(hop, policy))
                    if session is None and self._fresh_token_untried(policy):
                        session = await self._open(hop, policy)  # it closed on us after refusing the old one
                    if session is None:
                        continue
                    destination.opened(session)
                    holding = False
                    results = await self._carry(destination, session, slot)
                    if results is not None:
                        return self.finish(results)
                    holding = True  # the session broke: its slot is ours again, for the next host
        except BaseException:
            if holding:
                destination.unused()
            raise
        now = time.time()
        last = self.failures[-1] if self.failures else None
        retry_at = now + retry_delay(1, self.config.delivery.retry, self.transport.rng)
        reason = last.reason if last else "no next hop"
        destination.open_failed(now, retry_at, reason, self._diagnosis(last), every_host=True)
        return None

    async def _open(self, hop: NextHop, policy: SessionPolicy) -> SmtpSession | None:
        """A connection to `hop` ready for a transaction (greeted, EHLO, STARTTLS, AUTH), or None (the
        failure recorded)."""
        dane = await self._dane(hop, policy)
        if isinstance(dane, HopFailure):
            self.failures.append(dane)
            return None
        opened = await connect(
            hop, timeouts_of(self.config), self.transcript, self.transport.protocol_log, self.envelope.id
        )
        if isinstance(opened, HopFailure):
            self.failures.append(opened)
            return None
        session = opened
        session.attach(self.transcript, self.envelope.id)
        try:
            failure = await prepare(session, self.config.server.hostname, policy, self.transport.memory, dane)
        except (Dropped, TlsFailed) as exc:
            if isinstance(exc, TlsFailed):
                self._tls_error = exc.__cause__
            self._collect(session, broken=exc)
            await session.close()
            self.failures.append(self._broken(session, exc))
            return None
        except BaseException:
            await session.close()
            raise
        if failure is not None:
            self._collect(session)
            await session.quit()
            self.failures.append(failure)
            return None
        return session

    # -- MTA-STS (RFC 8461) -------------------------------------------------------------------------
    async def _mta_sts_policy(self) -> Policy | None:
        """The policy to apply: an MX route with tls = "dane-or-mta-sts" to a domain whose policy is in mode
        testing or enforce. Never raises for MTA-STS's own failures: without a policy, opportunistic TLS."""
        route = self.route.route
        sts = self.transport.mta_sts
        if sts is None or self.route.tls != DANE_OR_MTA_STS or route.hosts or not route.mx_domain:
            return None
        lookup = await sts.lookup(route.mx_domain)
        if lookup.error:
            self.transcript.append(f"   ! MTA-STS: {lookup.error}")
        if lookup.report:  # at most hourly per domain: the policy it publishes cannot be applied
            applied = (
                f"its cached policy (mode {lookup.policy.mode}) stays in force"
                if lookup.policy is not None
                else "mail is delivered with opportunistic TLS until it can"
            )
            self._warnings.append(
                events.Event(
                    events.REMOTE_DOMAIN_FAILED,
                    f"{lookup.error[0].upper()}{lookup.error[1:]}; {applied}.",
                    queue_id=self.envelope.id,
                    domain=route.mx_domain,
                    cause=MTA_STS_POLICY_UNAVAILABLE,
                    level="warning",
                )
            )
        policy = lookup.policy
        if policy is None or policy.mode not in ("enforce", "testing"):
            return None
        self.transcript.append(
            f"--- MTA-STS policy of {policy.domain}: mode {policy.mode}, mx {', '.join(policy.mx)}"
        )
        return policy

    def _sts_words(self) -> str:
        assert self.sts is not None
        return f"The MTA-STS policy of {self.sts.domain} (mode {self.sts.mode})"

    def _sts_hops(self, hops: list[NextHop]) -> list[NextHop]:
        """The hops the policy allows (§4.1); in mode testing all of them, the mismatches recorded."""
        assert self.sts is not None
        allowed: list[NextHop] = []
        for hop in hops:
            if mx_allowed(self.sts.mx, hop.host):
                allowed.append(hop)
                continue
            reason = (
                f"{self._sts_words()} does not list {hop.host} as one of its mail servers "
                f"({', '.join(self.sts.mx)})"
            )
            self._count_failure(VALIDATION_FAILURE, hop)
            if self.sts.mode == "enforce":
                self.failures.append(
                    HopFailure(
                        hop_label(hop), reason + "; the message is not sent there.", MTA_STS_MX_MISMATCH
                    )
                )
            else:
                self._warn(hop, reason + "; delivered anyway (testing).", MTA_STS_MX_MISMATCH)
                allowed.append(hop)
        return allowed

    async def _open_sts(self, hop: NextHop, policy: SessionPolicy) -> SmtpSession | None:
        """`_open` under the MTA-STS policy: TLS with a certificate valid for the MX host name (the tls =
        "required" path). A failure of that is a policy failure: in mode enforce the host is skipped with
        the named cause; in mode testing it is recorded and the host tried again with opportunistic TLS."""
        if await self._dane(hop, policy) is not None:
            # DANE wins over MTA-STS for a host with usable (signed) TLSA records, or whose TLSA lookup
            # failed (RFC 8461 §2, RFC 7672 §2.2.1): _open verifies it by DANE, or skips it.
            return await self._open(hop, policy)
        before = len(self.failures)
        self._tls_error = None
        session = await self._open(hop, dataclasses.replace(policy, tls="required"))
        if session is not None:
            if self.transport.tls_counts is not None and self.sts is not None:
                self.transport.tls_counts.success(self.sts)
            return session
        if len(self.failures) == before:
            return None
        failure = self.failures[-1]
        verify = self._tls_error if isinstance(self._tls_error, ssl.SSLCertVerificationError) else None
        if verify is not None:
            code = verify.verify_code
            result_type = (
                CERTIFICATE_HOST_MISMATCH
                if code == _VERIFY_HOSTNAME_MISMATCH
                else CERTIFICATE_EXPIRED
                if code == _VERIFY_CERT_HAS_EXPIRED
                else CERTIFICATE_NOT_TRUSTED
            )
            cause = MTA_STS_CERTIFICATE
            reason = (
                f"{self._sts_words()} demands a valid certificate for {hop.host}, and the one it presented "
                f"is not: {verify.verify_message}"
            )
        elif failure.reason.startswith("TLS is required"):
            result_type, cause = STARTTLS_NOT_SUPPORTED, MTA_STS_TLS_REQUIRED
            reason = f"{self._sts_words()} demands TLS, and {hop.host} does not provide it: {failure.reason}"
        else:
            return None  # not about TLS (refused, no greeting): an ordinary host failure
        self._count_failure(result_type, hop)
        assert self.sts is not None
        if self.sts.mode == "enforce":
            self.failures[-1] = HopFailure(failure.host, reason + ".", cause, failure.reply)
            return None
        self.failures.pop()
        self._warn(hop, reason + "; delivered anyway (testing).", cause)
        return await self._open(hop, policy)

    def _count_failure(self, result_type: str, hop: NextHop) -> None:
        if self.transport.tls_counts is not None and self.sts is not None:
            self.transport.tls_counts.failure(self.sts, result_type, hop.host, hop.address)

    def _warn(self, hop: NextHop, reason: str, cause: str) -> None:
        self._warnings.append(
            events.Event(
                events.REMOTE_HOST_FAILED,
                events.remote_host_failed_text(hop_label(hop), self.domain, reason),
                queue_id=self.envelope.id,
                domain=self.domain,
                host=hop_label(hop),
                cause=cause,
                level="warning",
            )
        )

    async def _carry(
        self, destination: Destination[SmtpSession], session: SmtpSession, slot: AsyncExitStack | None
    ) -> list[DeliveryResult] | None:
        """The transaction on a session: one just opened (`slot`: its cluster connection slot, handed to it),
        or a cached one (None). None when the connection broke: the grant is the caller's again, to open a
        new one; for a new connection that is a host failure, for a cached one only a stale connection."""
        try:
            results = await self._transaction(session)
        except Dropped as exc:
            self._collect(session, broken=exc)  # a peer that choked (or an idle connection that went stale)
            if slot is not None:
                self.failures.append(self._broken(session, exc))
            destination.stale(session)
            return None
        except BaseException:
            session.reusable = False
            self._collect(session)
            destination.release(session)
            raise
        self._collect(session)
        if slot is not None:  # the cluster slot (if any) lives as long as the connection, which may be kept
            session.on_close = slot.pop_all().aclose
        destination.release(session)
        return results

    async def _transaction(self, session: SmtpSession) -> list[DeliveryResult]:
        blob = await self._xexch50()
        handle = await self.message.open()
        try:
            return await send_message(
                session, self.envelope, self.recipients, handle, self.transport.memory, blob, self.signer
            )
        finally:
            handle.close()

    async def _xexch50(self) -> bytes | None:
        if self._blob is False:
            wanted = self.envelope.xexch50 and self.transport.xexch50_allowed(self.route, self.recipients)
            self._blob = await self.message.xexch50() if wanted else None
        assert not isinstance(self._blob, bool)
        return self._blob

    async def _dane(self, hop: NextHop, policy: SessionPolicy) -> TlsaAnswer | HopFailure | None:
        """The host's TLSA records when DANE applies to it (RFC 7672 §2.2), else None.

        Only under tls = "dane-or-mta-sts", and only for a host whose MX and address answers the resolver
        authenticated (`NextHop.secure`: an MX's exchange, or a connector's smart host by name, whose
        addresses are signed). A TLSA answer without the AD bit, or none published, leaves the host to
        opportunistic TLS. A failed TLSA lookup for a signed host skips it (§2.2.1: an attacker could
        otherwise strip DANE by making the lookup fail)."""
        if policy.tls != DANE_OR_MTA_STS or not hop.secure or hop.host == hop.address:
            return None
        try:
            answer = await self.transport.resolver.resolve_tlsa(hop.host, hop.port)
        except DnsError as exc:
            return HopFailure(
                hop_label(hop),
                f"The DANE TLSA lookup for this host failed ({exc}); the host is skipped, not used without "
                "its TLS check",
                DANE_LOOKUP_FAILED,
            )
        if not answer.records:
            return None
        if not answer.secure:
            self.transcript.append(
                f"--- {hop_label(hop)}: TLSA records of {answer.name} are not DNSSEC-authenticated "
                "(no AD bit from the resolver): ignored"
            )
            return None
        return answer

    def _policy(self) -> SessionPolicy:
        """How to talk to this route's hosts. Raises OSError (an unreadable password file) or TokenError (a
        bearer login without a token source)."""
        route, auth = self.route, self.route.auth
        password, login = "", None
        if auth.enabled and auth.bearer:
            tokens = self.transport.tokens
            if tokens is None:
                raise TokenError(
                    f'{self._auth_owner()} logs in with mechanism = "{auth.mechanism}", but no OAuth token '
                    f"source is running: configure the [oauth.{auth.oauth}] profile"
                )
            login = TokenLogin(tokens, auth.oauth)
        elif auth.enabled and auth.password_file:
            password = Path(auth.password_file).read_text(encoding="utf-8").strip()
        return SessionPolicy(
            tls=route.tls,
            auth_user=auth.user if auth.enabled else "",
            auth_password=password,
            use_helo=route.use_helo,
            auth_mechanism=auth.mechanism,
            oauth=login,
        )

    def _auth_owner(self) -> str:
        """Whose auth table this route's is, as the configuration names it."""
        if self.route.connector:
            return f"connector {self.route.connector!r}"
        return "delivery.smart_host_auth"

    def _fresh_token_untried(self, policy: SessionPolicy) -> bool:
        """The host refused our token and the connection broke before the fresh one could be tried: try it
        on a new connection, once per attempt (the retry that goes with the one refresh)."""
        if policy.oauth is None or not policy.oauth.untried or self._reconnected:
            return False
        self._reconnected = True
        self.transcript.append("--- the token was refused; the fresh one goes over a new connection")
        return True

    def _collect(self, session: SmtpSession, broken: BaseException | None = None) -> None:
        """The session's refusals and self-healing facts; `broken`: the connection was lost, and what it
        choked on is diagnosed here. A fact goes into the peer memory at once, so that a new connection
        later in this same attempt already avoids it: a stall after the XEXCH50 blob on a reused connection
        is waited out once, not again on the fresh connection that replaces it."""
        self.rejections.extend(session.rejections)
        session.rejections = []
        self._learn(session, None)  # facts from a reply: the conversation went on (EHLO refused: HELO)
        if broken is not None:
            diagnose_drop(session)
            self._learn(session, broken)

    def _learn(self, session: SmtpSession, broken: BaseException | None) -> None:
        facts, session.learned = session.learned, []
        for host, cause in facts:
            self.learned.append((host, cause))
            if self.transport.memory.learn(host, cause, time.time()):
                self._healed.append(
                    events.Event(
                        events.SELF_HEALING,
                        _healing_text(host, cause, broken),
                        queue_id=self.envelope.id,
                        domain=self.domain,
                        host=host,
                        cause=cause,
                    )
                )

    def _broken(self, session: SmtpSession, exc: BaseException) -> HopFailure:
        if isinstance(exc, TlsFailed):
            return HopFailure(
                session.label, f"The TLS handshake with the remote server failed: {exc}", TRANSIENT_REPLY
            )
        if isinstance(exc, Stalled):
            reason = f"The remote server did not reply to {exc.stage} within {_seconds(exc.seconds)}."
            return HopFailure(session.label, reason, REPLY_TIMEOUT)
        return HopFailure(session.label, DROPPED, CONNECTION_DROPPED)

    # -- outcomes ------------------------------------------------------------------------------------
    def finish(self, results: list[DeliveryResult]) -> Outcome:
        results = [_explained(result) for result in results]
        outcome = Outcome(results, self.transcript)
        if results and all(not r.ok and not r.permanent for r in results):
            diagnosis = diagnose(results[0].reply)
            outcome.reason = results[0].reply
            outcome.cause = diagnosis.cause if diagnosis is not None else TRANSIENT_REPLY
        return outcome

    def unreachable(self) -> Outcome:
        """No host took the message: every recipient is deferred with the last host's reply or reason."""
        last = self.failures[-1] if self.failures else None
        reason = last.reason if last else "no next hop"
        reply = last.reply if last and last.reply else reason
        status = status_of(last.reply, "4.4.1") if last and last.reply else "4.4.1"
        host = last.host if last else ""
        results = [
            DeliveryResult(r.address, ok=False, permanent=False, reply=reply, status=status, remote_mta=host)
            for r in self.recipients
        ]
        cause = self._diagnosis(last) if last else "connection-failed"
        return Outcome(results, self.transcript, unreachable=bool(self.failures), reason=reason, cause=cause)

    def _deferred(self, reply: str, status: str, *, reason: str, cause: str) -> Outcome:
        results = [
            DeliveryResult(r.address, ok=False, permanent=False, reply=reply, status=status)
            for r in self.recipients
        ]
        return Outcome(results, self.transcript, reason=reason, cause=cause)

    def _dns_failed(self, exc: DnsError) -> Outcome:
        # A smart host that DNS cannot find is our configuration mistake, not the recipient's: retry (and
        # let the operator fix it) rather than bounce everything at once.
        smart_host = exc.name if self.route.route.hosts else ""
        permanent = exc.permanent and not self.route.route.hosts
        status = exc.status if permanent or not exc.permanent else "4.4.9"
        # Name the smart host: the IIS text alone reads as if the recipient's domain were not in DNS.
        reason = f"{exc.text} (smart host '{smart_host}': {exc.detail})" if smart_host else exc.text
        detail = reason if smart_host else f"{exc.text} ({exc})"
        reply = f"{'550' if permanent else '451'} {status} {detail}"
        results = [
            DeliveryResult(r.address, ok=False, permanent=permanent, reply=reply, status=status)
            for r in self.recipients
        ]
        return Outcome(
            results,
            self.transcript,
            not_found=exc.cause in DNS_NOT_FOUND,
            dns=True,
            dns_host=smart_host,
            reason=reason,
            cause=exc.cause,
        )

    def _diagnosis(self, failure: HopFailure | None) -> str:
        """The cause of a host failure, or what the drop was about when a self-healing fact says so."""
        if failure is None:
            return "connection-failed"
        if failure.cause in (CONNECTION_DROPPED, REPLY_TIMEOUT) and self.learned:
            return self.learned[-1][1]
        return failure.cause

    # -- events --------------------------------------------------------------------------------------
    def report(self) -> None:
        """Events 3010, 7004 and 4006 for what this attempt saw (once, when it ends)."""
        emit = self.transport.events.emit
        queue_id, domain = self.envelope.id, self.domain
        for healed in self._healed:
            emit(healed)
        for rejection in self.rejections:
            emit(
                events.Event(
                    events.REMOTE_REJECTED_COMMAND,
                    events.remote_rejected_text(
                        rejection.host, rejection.verb, rejection.reply, rejection.command
                    ),
                    queue_id=queue_id,
                    domain=domain,
                    host=rejection.host,
                    status=status_of(rejection.reply, ""),
                    cause=_rejection_cause(rejection),
                )
            )
        for failure in self.failures:
            emit(
                events.Event(
                    events.REMOTE_HOST_FAILED,
                    events.remote_host_failed_text(failure.host, domain, failure.reason),
                    queue_id=queue_id,
                    domain=domain,
                    host=failure.host,
                    cause=self._diagnosis(failure),
                )
            )
        for warning in self._warnings:
            emit(warning)
        self.learned, self.rejections, self.failures, self._warnings = [], [], [], []
        self._healed = []


def _seconds(seconds: float) -> str:
    return format_duration(seconds)


def _healing_text(host: str, cause: str, broken: BaseException | None) -> str:
    """Event 3010: what smtpsvc does with `host` from now on, what the host did (a refusal the conversation
    went on after, a timeout, a drop: in the transcript's words), and what became of the message."""
    action = f"Self-healing for host {host}: {ACTIONS[cause]} from now on ({cause})"
    if broken is None:  # only EHLO is learned from a reply: HELO follows on the same connection
        return f"{action}: it refused EHLO; the message went on over the same connection with HELO"
    if isinstance(broken, Stalled):
        what = str(broken)  # a timeout, in the transcript's words: "no reply to ... within 8s"
    elif isinstance(broken, TlsFailed):
        what = f"the TLS handshake failed ({broken})"
    else:
        what = f"the remote server dropped the connection after {CHOKED_ON[cause]}"
    return f"{action}: {what}; the message is tried again over a new connection"


def _explained(result: DeliveryResult) -> DeliveryResult:
    """A refusal that names a provider's login problem (5.7.60 SendAs denied, say) carries the cause and
    what to do in its reply: the recipient's last error and the NDR. Its permanence stays the reply's: a
    5xx SendAs refusal is final for this message (its sender is not one the login may use; retrying the
    same sender cannot help), a 4xx one is retried."""
    if result.ok:
        return result
    diagnosis = diagnose(result.reply)
    if diagnosis is None:
        return result
    return dataclasses.replace(result, reply=diagnosis.explain(result.reply))


def _rejection_cause(rejection: Rejection) -> str:
    diagnosis = diagnose(rejection.reply)
    return diagnosis.cause if diagnosis is not None else f"remote-rejected-{rejection.verb.lower()}"
