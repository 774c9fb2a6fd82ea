"""The scheduler ("qmgr"): takes due messages from the queue, routes each pending recipient afresh,
delivers each route group (Drop or SMTP), records per-recipient results, and decides what follows:
retry on the schedule, expiry (4.4.7), an NDR to the sender, or Badmail when even the NDR cannot go.

Routing is re-run at every attempt from the current config, so a config change re-routes queued mail.
One message is one task; at most `delivery.max_connections` messages are in flight.

The queue is a `QueueStore`: the local spool, or PostgreSQL shared by several nodes. With PostgreSQL a
message may come back "taken over" (the node that held it died or stalled): it is re-categorized from this
node's configuration and logged (event 9005, cause `lease-taken-over`), as Exchange cluster failover does.
A save refused because another node took the message over meanwhile (LeaseLost) drops this node's copy of
the state, quietly but logged (cause `lease-lost`): the other node's delivery counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import BinaryIO

from smtpsvc import events
from smtpsvc.config import Config
from smtpsvc.delivery import smtp
from smtpsvc.delivery.drop import write_drop_file
from smtpsvc.delivery.healing import ACTIONS, PeerMemory
from smtpsvc.delivery.reports import Reporter
from smtpsvc.delivery.schedule import expired, next_attempt_time, retry_delay
from smtpsvc.events import EventLog
from smtpsvc.ingest import Ingest
from smtpsvc.model import (
    Attempt,
    DeliveryResult,
    Envelope,
    Recipient,
    RecipientState,
    Route,
    domain_of,
    rfc5322_date,
)
from smtpsvc.queue.base import Claim, LeaseLost, QueueError, QueueStore
from smtpsvc.queue.local import LocalSpool, LocalStore
from smtpsvc.routing.categorizer import choices_for, route_for
from smtpsvc.routing.connectors import RouteChoice
from smtpsvc.routing.mx import DnsError, MxResolver, NextHop

TRANSCRIPTS_KEPT = 3  # SMTP conversations kept in the envelope, newest last
HISTORY_KEPT = 20  # attempts remembered per recipient
EXPIRED_TEXT = (
    "Could not deliver the message in the time limit specified. Please retry or contact your administrator."
)
INTERNAL_RETRY = 300.0  # back-off after an unexpected internal error
QUEUE_RETRY = 1.0  # the queue (a database) cannot be reached: look again this soon
SAVE_RETRY_MAX = 5.0  # longest pause between tries of a save to a shared queue that cannot be reached
REROUTE_BATCH = 64  # re-categorized messages written at once (one group commit, or a few connections)


class Scheduler:
    def __init__(
        self,
        queue: QueueStore,
        config: Config,
        ingest: Ingest,
        event_log: EventLog,
        resolver: MxResolver,
        drop_dir: Path,
        badmail_dir: Path,
        rng: random.Random | None = None,
    ) -> None:
        self.queue = queue
        self.config = config
        self.ingest = ingest
        self.events = event_log
        self.resolver = resolver
        self.drop_dir = drop_dir
        self.badmail_dir = badmail_dir
        self.rng = rng or random.Random()
        self._inflight: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._queue_down = False  # the last claim failed: logged once until it works again
        self.transcripts: dict[str, list[str]] = {}  # last SMTP transcript per queue id (in memory for now)
        self._connector_down: dict[str, float] = {}  # connector name -> unavailable until
        self._link_down: dict[str, float] = {}  # link -> not tried before (every host just failed to connect)
        self.pool = smtp.ConnectionPool(config.delivery.max_messages_per_connection)
        self.memory = PeerMemory()  # self-healing facts per next hop (SPEC 2.9)
        self.reports = Reporter(queue, config, ingest, event_log, badmail_dir)
        self._link_slots: dict[str, asyncio.Semaphore] = {}  # max_connections_per_domain, per link
        # Smart hosts given as address literals -> their next hops (see _next_hops). Bounded.
        self._literal_hops: dict[tuple[tuple[str, int], ...], list[NextHop]] = {}
        # Routing answers of self._routes_config, per (domain, unavailable connectors) (see _choices).
        self._routes: dict[tuple[str, frozenset[str]], tuple[RouteChoice, ...]] = {}
        self._routes_config: Config | None = None
        # metrics hook: (route kind "drop"|"smtp", the group's results, seconds the attempt took)
        self.delivery_observer: Callable[[str, Sequence[DeliveryResult], float], None] | None = None

    def wake(self) -> None:
        self.queue.wake()

    async def etrn(self, domain: str, subdomains: bool = False) -> int:
        """ETRN / Force Connection for a domain, on either backend; returns how many messages changed."""
        if isinstance(self.queue, LocalStore):
            return self._flush_local(self.queue.spool, domain, subdomains)
        done = await self.queue.make_due(time.time(), domain=domain, subdomains=subdomains)
        self.forget_backoff(done.links)
        if done.messages:
            self.wake()
        return done.messages

    def _flush_local(self, spool: LocalSpool, domain: str, subdomains: bool) -> int:
        domain = domain.rstrip(".").lower()
        now = time.time()
        count = 0
        for envelope in spool.list():
            if envelope.id in spool.leased or envelope.frozen:
                continue
            touched = False
            for rcpt in envelope.pending:
                d = rcpt.domain
                if d == domain or (subdomains and d.endswith("." + domain)):
                    rcpt.next_attempt = now
                    touched = True
            if touched:
                for rcpt in envelope.pending:
                    self._link_down.pop(rcpt.route, None)  # the operator asked: try it now
                spool.reschedule(envelope.id)
                count += 1
        if count:
            self.wake()
        return count

    def forget_backoff(self, links: set[str] | frozenset[str] | None) -> None:
        """The operator forced a retry: try these links (None: every link) now even if they just failed
        for another message."""
        if links is None:
            self._link_down.clear()
            return
        for link in links:
            self._link_down.pop(link, None)

    async def recategorize(self, previous: Config | None = None) -> int:
        """Run the categorizer and router again on queued mail (ResetMessageStatus, config reload). Every
        pending recipient's route is recomputed from the current config; the messages affected are due now:
        all of them, or, given the `previous` config (a reload), those whose route differs under the two
        (a connector, smart host or local domain changed or vanished). A message being delivered is due
        again when that attempt ends. Returns their count."""
        now = time.time()
        # What we learned about destinations (backoff, unavailable connectors) was about the old routes.
        self._link_down.clear()
        self._connector_down.clear()
        changes: list[tuple[str, dict[str, str]]] = []
        for envelope in await self.queue.list():
            if envelope.frozen or not envelope.pending:
                continue
            routes = {r.address: route_for(r.address, self.config) for r in envelope.pending}
            if previous is None or any(route != route_for(a, previous) for a, route in routes.items()):
                changes.append((envelope.id, {address: route.link for address, route in routes.items()}))
        count = 0
        for start in range(0, len(changes), REROUTE_BATCH):  # concurrent writes share commits
            batch = changes[start : start + REROUTE_BATCH]
            done = await asyncio.gather(*(self.queue.reroute(qid, links, now) for qid, links in batch))
            count += sum(done)
        if count:
            self.wake()
        return count

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    async def run(self) -> None:
        limit = max(1, self.config.delivery.max_connections)
        while not self._stopping:
            try:
                timeout = await self._start_due(limit)
            except QueueError as exc:
                self._queue_unreachable(exc)
                timeout = QUEUE_RETRY
            else:
                self._queue_reachable()
            # Woken by new mail, a finished delivery, an operator, or (PostgreSQL) another node's NOTIFY.
            await self.queue.wait_for_work(timeout)

    async def _start_due(self, limit: int) -> float | None:
        """Lease what is due (one task per message, at most `limit` in flight); returns how long to wait
        before looking again (None: until woken)."""
        free = limit - len(self._inflight)
        if free > 0:
            for claim in await self.queue.claim(time.time(), free):
                self._start(claim)
        due = await self.queue.next_due()
        return None if due is None or free <= 0 else max(0.0, due - time.time())

    def _start(self, claim: Claim) -> None:
        if claim.taken_over:
            self._take_over(claim)
        task = asyncio.get_running_loop().create_task(self._process_or_recover(claim.envelope))
        self._inflight.add(task)
        task.add_done_callback(self._done)

    def _take_over(self, claim: Claim) -> None:
        """Exchange cluster failover: the node that held this message died or stalled mid-delivery and its
        lease expired. Its routing decisions were made with its configuration: route every pending
        recipient again with ours (categorization is a pure function of address and config)."""
        envelope = claim.envelope
        for rcpt in envelope.pending:
            rcpt.route = route_for(rcpt.address, self.config).link
        self.events.emit(
            events.Event(
                events.RECATEGORIZED,
                f"Message {envelope.id} was held by node {claim.taken_over_from}, whose lease expired "
                f"(it stopped or died mid-delivery); node {self.queue.node_id} took it over, re-categorized "
                "it and delivers it (recipients the other node had already delivered may receive it twice)",
                queue_id=envelope.id,
                cause="lease-taken-over",
            )
        )

    def _queue_unreachable(self, exc: QueueError) -> None:
        if self._queue_down:
            return
        self._queue_down = True
        self.events.emit(
            events.Event(
                events.MAILROOT_UNUSABLE,
                f"The queue cannot be reached ({exc}); delivery waits, and SMTP clients get 4xx until it "
                "is back",
                cause="queue-unavailable",
            )
        )

    def _queue_reachable(self) -> None:
        if self._queue_down:
            self._queue_down = False
            self.events.emit(
                events.Event(
                    events.SERVICE_STARTED,
                    "The queue can be reached again; delivery resumes",
                    cause="queue-available",
                )
            )

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self.queue.wake()

    async def stop(self, grace: float) -> None:
        """Stop leasing; give in-flight deliveries `grace` seconds, then cancel (they are retried later)."""
        self._stopping = True
        self.queue.wake()
        if self._inflight:
            _, pending = await asyncio.wait(set(self._inflight), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        await self.pool.close()

    async def _process_or_recover(self, envelope: Envelope) -> None:
        try:
            await self.process(envelope)
        except asyncio.CancelledError:
            with contextlib.suppress(QueueError):  # a lease that cannot be given back expires
                await self.queue.release(envelope.id)
            raise
        except LeaseLost as exc:
            self._lease_lost(envelope, exc)
        except Exception as exc:  # one bad message must not stop delivery of the rest
            now = time.time()
            expiry = envelope.received_at + self.config.delivery.expiration
            for rcpt in envelope.recipients:
                if not rcpt.outstanding:
                    continue
                rcpt.last_reply = f"internal error: {type(exc).__name__}: {exc}"
                rcpt.next_attempt = min(now + INTERNAL_RETRY, max(expiry, now))
                if rcpt.pending and now >= expiry:
                    # even a message that keeps failing inside smtpsvc expires, and its sender hears of it
                    rcpt.state, rcpt.status = RecipientState.FAILED, "4.4.7"
            self.events.emit(
                events.Event(
                    events.REMOTE_DOMAIN_FAILED,
                    f"Internal error while delivering: {type(exc).__name__}: {exc}",
                    queue_id=envelope.id,
                    cause="internal-error",
                )
            )
            try:
                await self.queue.save(envelope)
            except QueueError:
                # Its state cannot be written either. Let go of it without making it due: with the local
                # spool the index takes the new times above; in a cluster the lease expires first.
                self.queue.abandon(envelope.id)

    def _lease_lost(self, envelope: Envelope, exc: LeaseLost) -> None:
        """Another node owns the message now: our results are dropped, never written over its state.
        Nothing is redelivered on purpose; what this attempt delivered may go twice (at-least-once)."""
        self.transcripts.pop(envelope.id, None)
        self.events.emit(
            events.Event(
                events.RECATEGORIZED,
                f"This node's delivery state for {envelope.id} was dropped: {exc}",
                queue_id=envelope.id,
                cause="lease-lost",
            )
        )

    async def _durably(self, step: Callable[[], Awaitable[None]]) -> None:
        """Run a save or complete. With a shared queue whose database is away for a moment it is tried
        again until it works (the results of the attempt exist only in memory: giving up would deliver
        the message again), or until another node took the message over (LeaseLost), or the task is
        cancelled at stop. The local spool's errors (disk full) go to the caller at once, as before."""
        pause = QUEUE_RETRY / 2
        while True:
            try:
                await step()
                return
            except LeaseLost:
                raise
            except QueueError:
                if not self.queue.shared:
                    raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, SAVE_RETRY_MAX)

    @contextlib.asynccontextmanager
    async def _message(self, queue_id: str) -> AsyncIterator[BinaryIO]:
        """The queued message, one handle per reader (route groups are delivered concurrently)."""
        handle = await self.queue.open_message(queue_id)
        try:
            yield handle
        finally:
            handle.close()

    # -- one message ---------------------------------------------------------------------------------
    async def process(self, envelope: Envelope) -> None:
        started = time.time()
        groups: dict[RouteChoice, list[Recipient]] = {}
        fallbacks: dict[RouteChoice, list[RouteChoice]] = {}
        unavailable = self._unavailable_connectors(started)
        frozen_links = await self.queue.frozen_links()
        for rcpt in envelope.pending:
            if rcpt.next_attempt > started:
                continue  # this recipient's retry time has not come (another one made the message due)
            first, *rest = self._choices(rcpt.address, unavailable)
            rcpt.route = first.route.link
            if rcpt.route in frozen_links:
                continue  # the operator froze this next hop: it keeps its mail until thawed
            down_until = self._link_down.get(first.route.link, 0.0)
            if down_until > started:
                # The destination just failed for another message: wait with it instead of hammering it.
                rcpt.next_attempt = down_until
                continue
            groups.setdefault(first, []).append(rcpt)
            fallbacks[first] = rest
        if len(groups) == 1:  # the usual case: awaited directly, without gather's task (speed)
            [(choice, rcpts)] = groups.items()
            outcomes = [await self._deliver_group(envelope, choice, rcpts, fallbacks[choice])]
        else:
            outcomes = await asyncio.gather(
                *(
                    self._deliver_group(envelope, choice, rcpts, fallbacks[choice])
                    for choice, rcpts in groups.items()
                )
            )
        now = time.time()
        by_address = {r.address: r for r in envelope.pending}
        succeeded: list[tuple[Recipient, DeliveryResult]] = []
        for results in outcomes:
            for result in results:
                rcpt = by_address[result.address]
                self._record(envelope, rcpt, result, now)
                if result.ok and "SUCCESS" in rcpt.notify and not result.dsn_passed_on:
                    succeeded.append((rcpt, result))
        if succeeded and envelope.sender:
            await self.reports.success(envelope, succeeded)
        cfg = self.config.delivery
        if expired(now, envelope.received_at, cfg.expiration):  # the same for every recipient: asked once
            for rcpt in envelope.pending:
                rcpt.state = RecipientState.FAILED
                rcpt.status = "4.4.7"
                rcpt.last_reply = (
                    f"{EXPIRED_TEXT} Last error: {rcpt.last_reply}" if rcpt.last_reply else EXPIRED_TEXT
                )
                self.events.emit(
                    events.Event(
                        events.NDR_SENT,
                        f"Message to {rcpt.address} expired after {rcpt.attempts} attempts",
                        queue_id=envelope.id,
                        domain=rcpt.domain,
                        status="4.4.7",
                        cause="expired",
                        track=(
                            f"to=<{rcpt.address}>, relay=none, delay={now - envelope.received_at:.2f}, "
                            f"dsn=4.4.7, status=expired ({rcpt.last_reply})"
                        ),
                    )
                )
        unreported = [r for r in envelope.recipients if r.state is RecipientState.FAILED and not r.notified]
        if unreported:
            await self._report(envelope, unreported, now)
        if self._delay_due(envelope, now):
            await self._send_delay_report(envelope)
        if envelope.outstanding:
            await self._durably(lambda: self.queue.save(envelope))
        else:
            await self._durably(lambda: self.queue.complete(envelope.id))
            self.transcripts.pop(envelope.id, None)

    def _choices(self, address: str, unavailable: frozenset[str]) -> tuple[RouteChoice, ...]:
        """`choices_for(address, self.config, unavailable)`, remembered per domain.

        Speed: routing is a pure function of the recipient's domain, the (frozen) config and the unavailable
        connectors (routing.categorizer), and it ran for every recipient of every attempt. The answers are
        kept for as long as `self.config` is the same object: a reload replaces it, and that empties them.
        Bounded: emptied when full."""
        if self._routes_config is not self.config:
            self._routes.clear()
            self._routes_config = self.config
        key = (domain_of(address), unavailable)
        choices = self._routes.get(key)
        if choices is None:
            if len(self._routes) >= ROUTES_KEPT:
                self._routes.clear()
            choices = self._routes[key] = tuple(choices_for(address, self.config, unavailable))
        return choices

    def _record(self, envelope: Envelope, rcpt: Recipient, result: DeliveryResult, now: float) -> None:
        rcpt.attempts += 1
        rcpt.last_reply = result.reply
        rcpt.status = result.status
        rcpt.remote_mta = result.remote_mta
        rcpt.history.append(Attempt(now, result.reply, result.remote_mta))
        del rcpt.history[:-HISTORY_KEPT]
        delay = now - envelope.received_at

        def track(outcome: str) -> str:  # the Postfix-shaped tracking line (the reply may contain any text)
            return (
                f"to=<{rcpt.address}>, relay={result.remote_mta or 'none'}, delay={delay:.2f}, "
                f"dsn={result.status}, status={outcome} ({result.reply})"
            )

        if result.ok or result.permanent:
            rcpt.state = RecipientState.DELIVERED if result.ok else RecipientState.FAILED
            self.events.emit(
                events.Event(
                    events.MESSAGE_DELIVERED if result.ok else events.NDR_SENT,
                    f"Message delivered to {rcpt.address}"
                    if result.ok
                    else f"Delivery to {rcpt.address} failed permanently: {result.reply}",
                    queue_id=envelope.id,
                    domain=rcpt.domain,
                    host=result.remote_mta,
                    status=result.status,
                    track=track("sent" if result.ok else "bounced"),
                )
            )
        else:
            cfg = self.config.delivery
            rcpt.next_attempt = next_attempt_time(
                now, rcpt.attempts, envelope.received_at, cfg.expiration, cfg.retry, self.rng
            )
            delay_at = envelope.received_at + cfg.delay_notification
            if not envelope.delay_notified and envelope.sender and now < delay_at < rcpt.next_attempt:
                rcpt.next_attempt = delay_at  # be awake when the delay notification falls due

    # -- delivery per route --------------------------------------------------------------------------
    async def _deliver_group(
        self, envelope: Envelope, choice: RouteChoice, rcpts: list[Recipient], fallbacks: list[RouteChoice]
    ) -> list[DeliveryResult]:
        started = time.monotonic()  # metrics hook: how long this group's attempt takes
        if choice.route.kind == "drop":
            results = await self._deliver_drop(envelope, rcpts)
        else:
            results = await self._deliver_smtp(envelope, choice, rcpts, fallbacks)
        if self.delivery_observer is not None:  # metrics hook
            with contextlib.suppress(Exception):  # counting must never fail a delivery
                self.delivery_observer(choice.route.kind, results, time.monotonic() - started)
        return results

    def _unavailable_connectors(self, now: float) -> frozenset[str]:
        """Connectors whose every smart host failed lately: the next cost takes over until they heal."""
        if not self._connector_down:  # the usual case, without copying an empty dict (speed)
            return _NO_CONNECTORS
        for name, until in list(self._connector_down.items()):
            if until <= now:
                del self._connector_down[name]
        return frozenset(self._connector_down)

    async def _deliver_drop(self, envelope: Envelope, rcpts: list[Recipient]) -> list[DeliveryResult]:
        addresses = [r.address for r in rcpts]
        try:
            async with self._message(envelope.id) as message:
                path = await asyncio.to_thread(
                    write_drop_file, self.drop_dir, envelope.id, envelope.sender, addresses, message
                )
        except (OSError, QueueError) as exc:
            # Disk full, or the queue cannot be read now: a transient failure, never a loss (SPEC 2.6).
            if isinstance(exc, OSError):
                reply = f"451 4.3.1 Cannot write to the Drop folder: {exc.strerror or exc}"
            else:
                reply = f"451 4.3.0 Cannot read the message from the queue: {exc}"
            status = reply.split(" ", 2)[1]
            return [
                DeliveryResult(a, ok=False, permanent=False, reply=reply, status=status, remote_mta="drop")
                for a in addresses
            ]
        reply = f"250 2.0.0 Delivered to the Drop folder as {path.name}"
        return [
            DeliveryResult(a, ok=True, permanent=False, reply=reply, status="2.0.0", remote_mta="drop")
            for a in addresses
        ]

    async def _deliver_smtp(
        self, envelope: Envelope, choice: RouteChoice, rcpts: list[Recipient], fallbacks: list[RouteChoice]
    ) -> list[DeliveryResult]:
        route = choice.route
        domain = route.mx_domain or rcpts[0].domain
        try:
            hops = await self._next_hops(route)
        except DnsError as exc:
            if fallbacks and exc.cause in DNS_NOT_FOUND:
                # smart_host_type = "after_direct": DNS cannot find the domain, so the smart host takes it.
                return await self._deliver_smtp(envelope, fallbacks[0], rcpts, fallbacks[1:])
            # A smart host that DNS cannot find is our configuration mistake, not the recipient's:
            # retry (and let the operator fix it) rather than bounce everything at once.
            permanent = exc.permanent and not route.hosts
            status = exc.status if permanent or not exc.permanent else "4.4.9"
            self.events.emit(
                events.Event(
                    events.REMOTE_DOMAIN_FAILED,
                    events.remote_domain_failed_text(domain, exc.text),
                    queue_id=envelope.id,
                    domain=domain,
                    status=status,
                    cause=exc.cause,
                )
            )
            reply = f"{'550' if permanent else '451'} {status} {exc.text} ({exc})"
            return [
                DeliveryResult(r.address, ok=False, permanent=permanent, reply=reply, status=status)
                for r in rcpts
            ]
        try:
            policy = _hop_policy(choice, self._xexch50_allowed(choice, rcpts))
        except OSError as exc:
            reply = f"451 4.7.0 Cannot read auth.password_file of connector {choice.connector!r}: {exc}"
            self.events.emit(
                events.Event(
                    events.REMOTE_DOMAIN_FAILED,
                    events.remote_domain_failed_text(domain, reply),
                    queue_id=envelope.id,
                    domain=domain,
                    status="4.7.0",
                    cause="auth-config",
                )
            )
            return [
                DeliveryResult(r.address, ok=False, permanent=False, reply=reply, status="4.7.0")
                for r in rcpts
            ]
        cfg = self.config.delivery
        slots = self._link_slots.get(route.link)
        if slots is None:  # not setdefault(): that would make a Semaphore per message
            slots = self._link_slots[route.link] = asyncio.Semaphore(max(1, cfg.max_connections_per_domain))
        # The node's own limit first, then (a cluster) the link's slot shared by every node.
        async with slots, self.queue.link_slot(route.link, cfg.max_connections_per_domain):
            # The handle by hand, not with `async with self._message()`: a generator-based context manager
            # costs several µs per message on this path.
            message = await self.queue.open_message(envelope.id)
            try:
                outcome = await self._smtp_deliver(hops, envelope, rcpts, policy, message)
            finally:
                message.close()
        self.transcripts[envelope.id] = outcome.transcript
        envelope.transcripts = [*envelope.transcripts, _stamped(outcome.transcript)][-TRANSCRIPTS_KEPT:]
        if (
            hops
            and len(outcome.host_failures) >= len(hops)
            and not any(f.permanent for f in outcome.host_failures)
        ):
            # No host of this destination took a connection: other messages to it wait for one interval.
            self._link_down[route.link] = time.time() + retry_delay(1, cfg.retry, self.rng)
        else:
            self._link_down.pop(route.link, None)
        for host, cause in outcome.learned:
            if self.memory.learn(host, cause, time.time()):
                self.events.emit(
                    events.Event(
                        events.SELF_HEALING,
                        f"Self-healing for host {host}: {ACTIONS[cause]} from now on ({cause}); "
                        "the message is retried",
                        queue_id=envelope.id,
                        domain=domain,
                        host=host,
                        cause=cause,
                    )
                )
        for rejection in outcome.rejections:
            self.events.emit(
                events.Event(
                    events.REMOTE_REJECTED_COMMAND,
                    events.remote_rejected_text(
                        rejection.host, rejection.verb, rejection.reply, rejection.command
                    ),
                    queue_id=envelope.id,
                    domain=domain,
                    host=rejection.host,
                    status=_status_of(rejection.reply),
                    cause=f"remote-rejected-{rejection.verb.lower()}",
                )
            )
        diagnosis = outcome.learned[-1][1] if outcome.learned else ""  # what the drop was about, if known
        for failure in outcome.host_failures:
            self.events.emit(
                events.Event(
                    events.REMOTE_HOST_FAILED,
                    events.remote_host_failed_text(failure.host, domain, failure.reason),
                    queue_id=envelope.id,
                    domain=domain,
                    host=failure.host,
                    cause=diagnosis
                    if diagnosis and failure.reason == smtp.DROPPED
                    else _cause(failure.reason),
                )
            )
        every_host_failed = hops and len(outcome.host_failures) >= len(hops)
        if choice.connector and every_host_failed and not any(f.permanent for f in outcome.host_failures):
            # Every smart host of this connector failed: it is unavailable (the Exchange link in retry state)
            # for the longest retry interval, and the next cost takes the mail now, in this same attempt.
            self._connector_down[choice.connector] = time.time() + max(cfg.retry)
            backup = [c for c in fallbacks if c.connector and c.connector != choice.connector]
            if backup:
                return await self._deliver_smtp(envelope, backup[0], rcpts, backup[1:])
        if outcome.results and all(not r.ok and not r.permanent for r in outcome.results):
            reason = outcome.host_failures[-1].reason if outcome.host_failures else outcome.results[0].reply
            # One 4000 per remote domain, as IIS logs it, also when a smart host carries several domains.
            for failed_domain in [route.mx_domain] if route.mx_domain else sorted({r.domain for r in rcpts}):
                self.events.emit(
                    events.Event(
                        events.REMOTE_DOMAIN_FAILED,
                        events.remote_domain_failed_text(failed_domain, reason),
                        queue_id=envelope.id,
                        domain=failed_domain,
                        status=outcome.results[0].status,
                        cause=diagnosis if diagnosis and reason == smtp.DROPPED else _cause(reason),
                    )
                )
        return outcome.results

    def _xexch50_allowed(self, choice: RouteChoice, rcpts: list[Recipient]) -> bool:
        """SPEC 2.5: only on routes with xexch50 = true and, with suppress_xexch50_external
        (SuppressExternal), only to internal domains: our local domains and the domains.remote entries."""
        if not choice.xexch50:
            return False
        if not self.config.delivery.suppress_xexch50_external:
            return True
        internal = set(self.config.local_domains) | {r.name for r in self.config.domains.remote}
        return {r.domain for r in rcpts} <= internal  # every recipient of this transaction is internal

    async def _smtp_deliver(
        self,
        hops: list[NextHop],
        envelope: Envelope,
        rcpts: list[Recipient],
        policy: smtp.HopPolicy,
        message: BinaryIO,
    ) -> smtp.SmtpOutcome:
        cfg = self.config.delivery
        blob = await self.queue.xexch50_blob(envelope.id) if envelope.xexch50 and policy.xexch50 else None
        return await smtp.deliver(
            hops,
            envelope,
            rcpts,
            message,
            hostname=self.config.server.hostname,
            timeout=cfg.timeout,
            connect_timeout=min(cfg.timeout, 30.0),
            policy=policy,
            pool=self.pool,
            memory=self.memory,
            xexch50=blob,
        )

    async def _next_hops(self, route: Route) -> list[NextHop]:
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
                # of parsing the address again for every message. A name's hops are named after the name
                # and are always looked up afresh.
                if len(self._literal_hops) >= LITERAL_HOPS_KEPT:
                    self._literal_hops.clear()
                self._literal_hops[route.hosts] = list(hops)
            return hops
        return await self.resolver.resolve_mx(route.mx_domain, route.port)

    # -- reports -------------------------------------------------------------------------------------
    async def _report(self, envelope: Envelope, failed: Sequence[Recipient], now: float) -> None:
        """Tell the sender (NDR) or, for a null sender, write Badmail. Only when that is durable are the
        recipients marked notified; otherwise the report is retried later and the message stays queued."""
        try:
            await self.reports.failure(envelope, failed)
        except (QueueError, OSError) as exc:
            retry_at = now + retry_delay(1, self.config.delivery.retry, self.rng)  # e.g. disk full
            for rcpt in failed:
                rcpt.next_attempt = retry_at
            self.events.emit(
                events.Event(
                    events.NDR_SENT,
                    f"Cannot make the report for {envelope.id} now ({exc}); will try again",
                    queue_id=envelope.id,
                    cause="report-deferred",
                )
            )
            return
        for rcpt in failed:
            rcpt.notified = True

    def _delay_due(self, envelope: Envelope, now: float) -> bool:
        delay = self.config.delivery.delay_notification
        return (  # the cheap test that is usually false first: envelope.pending builds a list
            now - envelope.received_at >= delay
            and not envelope.delay_notified
            and bool(envelope.sender)
            and bool(envelope.pending)
        )

    async def _send_delay_report(self, envelope: Envelope) -> None:
        if await self.reports.delay(envelope):
            envelope.delay_notified = True


def _cause(reason: str) -> str:
    """Name the failure for the event's `cause` (SPEC 2.9)."""
    if reason == smtp.DROPPED:
        return "connection-dropped"
    if reason == smtp.CANNOT_CONNECT:
        return "connection-failed"
    return "transient-reply"


DNS_NOT_FOUND = frozenset({"dns-nxdomain", "dns-no-address"})
_NO_CONNECTORS: frozenset[str] = frozenset()
LITERAL_HOPS_KEPT = 256  # entries of Scheduler._literal_hops
ROUTES_KEPT = 4096  # entries of Scheduler._routes


def _hop_policy(choice: RouteChoice, xexch50: bool = False) -> smtp.HopPolicy:
    password = ""
    if choice.auth_user and choice.auth_password_file:
        password = Path(choice.auth_password_file).read_text(encoding="utf-8").strip()
    return smtp.HopPolicy(
        tls=choice.tls,
        auth_user=choice.auth_user,
        auth_password=password,
        use_helo=choice.use_helo,
        xexch50=xexch50,
    )


def _status_of(reply: str) -> str:
    parts = reply.split(" ", 2)
    return parts[1] if len(parts) > 1 and parts[1][:1] in "245" and parts[1].count(".") == 2 else ""


def _stamped(transcript: list[str]) -> list[str]:
    """A transcript with the wall-clock time of the attempt on its first line."""
    return [f"attempt at {rfc5322_date(time.time())}", *transcript]
