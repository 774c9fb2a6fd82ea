"""The scheduler ("qmgr"): decides what is delivered and when. It takes due messages from the queue, routes
each due recipient afresh, hands each route group to its transport (`delivery/transport.py`: Drop or SMTP),
settles the results (`delivery/settle.py`: retry, expiry 4.4.7, delivered, failed), writes the events,
makes the reports (NDR, delay, success; Badmail when even the NDR cannot go) and saves or completes the
message. How a group is delivered (connections, hosts, slow start) is the transport's business.

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
import json
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO

from smtpsvc import diskspace, events, safeio
from smtpsvc.config import Config, LiveConfig
from smtpsvc.delivery.budget import (
    Budget,
    Budgets,
    BudgetView,
    Limits,
    is_quota_reply,
    limits_of,
    quota_pause,
)
from smtpsvc.delivery.reports import Reporter
from smtpsvc.delivery.settle import Settlement, apply, report_retry_time, settle
from smtpsvc.delivery.transport import Outcome, Transport
from smtpsvc.events import EventLog
from smtpsvc.model import DeliveryResult, Envelope, Recipient, RecipientState, domain_of, rfc5322_date
from smtpsvc.queue.base import Claim, LeaseLost, MessageSetAside, QueueError, QueueStore
from smtpsvc.routing.categorizer import choices_for, route_for
from smtpsvc.routing.connectors import SMART_HOST_LINK, RouteChoice

TRANSCRIPTS_KEPT = 3  # SMTP conversations kept in the envelope, newest last
INTERNAL_RETRY = 300.0  # back-off after an unexpected internal error
QUEUE_RETRY = 1.0  # the queue (a database) cannot be reached: look again this soon
SAVE_RETRY_MAX = 5.0  # longest pause between tries of a save to a shared queue that cannot be reached
CLAIM_BATCH = 128  # messages claimed at once
GATHER = 0.005  # seconds the scheduler, woken, waits for what else arrives before it claims
POSTPONE_SPREAD = 0.1  # recipients postponed for a dead destination come due over this share of the wait
BUDGET_SAVE_EVERY = 10.0  # seconds between saves of the budgets' state file (when something was counted)
BUDGET_CAUSE = "budget-wait"  # a message postponed because its link's rate or daily budget is used up
QUOTA_CAUSE = "provider-quota"  # the provider refused for its sending quota


class Scheduler:
    def __init__(
        self,
        queue: QueueStore,
        live: LiveConfig,
        reports: Reporter,
        event_log: EventLog,
        transports: Mapping[str, Transport],
        rng: random.Random | None = None,
        space: diskspace.SpaceWatcher | None = None,
        budget_file: Path | None = None,
    ) -> None:
        self.queue = queue
        self.live = live
        self.reports = reports
        self.events = event_log
        self.transports = transports  # by route kind: "drop", "smtp", "graph"
        self.rng = rng or random.Random()
        self._inflight: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._queue_down = False  # the last claim failed: logged once until it works again
        self.transcripts: dict[str, list[str]] = {}  # last SMTP transcript per queue id (in memory for now)
        self._connector_down: dict[str, float] = {}  # connector name -> unavailable until
        # Routing answers of self._routes_config, per (domain, unavailable connectors) (see _choices).
        self._routes: dict[tuple[str, frozenset[str]], tuple[RouteChoice, ...]] = {}
        self._routes_config: Config | None = None
        # metrics hook: (route kind "drop"|"smtp", the group's results, seconds the attempt took)
        self.delivery_observer: Callable[[str, Sequence[DeliveryResult], float], None] | None = None
        # Messages a transport could not deliver for lack of space (the Drop folder's disk is full): due
        # again as soon as the watcher sees room, not at their next retry time.
        self._waiting_for_space: set[str] = set()
        self._space_task: asyncio.Task[None] | None = None
        self._room_again = False  # the watcher saw room while the last retries were under way
        if space is not None:
            space.subscribe(self._space_back)
        # The providers' limits (connector rate, recipients_per_day): one budget per link, its send log
        # saved to `budget_file` now and then so a restart keeps the day's count (delivery/budget.py).
        self.budgets = Budgets()
        self._limits: tuple[Config, dict[str, Limits]] | None = None
        self._budget_file = budget_file
        self._budget_dirty = False
        self._budget_task: asyncio.Task[None] | None = None
        self._budget_unsaved = False  # the last save failed: logged once until one works
        self._load_budgets()

    @property
    def config(self) -> Config:
        return self.live.current

    def wake(self) -> None:
        self.queue.wake()

    async def etrn(self, domain: str, subdomains: bool = False) -> int:
        """ETRN / Force Connection for a domain, on either backend: `QueueStore.make_due` makes its pending
        recipients due now and this node lifts its per-destination backoff for their links. A message
        being delivered counts too: it is due again when that delivery saves. Returns how many messages
        changed."""
        done = await self.queue.make_due(time.time(), domain=domain, subdomains=subdomains)
        self.forget_backoff(done.links)
        if done.messages:
            self.wake()
        return done.messages

    def forget_backoff(self, links: set[str] | frozenset[str] | None) -> None:
        """The operator forced a retry: try these links (None: every link) now even if they just failed
        for another message."""
        for transport in self.transports.values():
            transport.revive(links)

    async def recategorize(self, previous: Config | None = None) -> int:
        """Run the categorizer and router again on queued mail (ResetMessageStatus, config reload), through
        `QueueStore.recategorize`: every pending recipient's route is recomputed from the current config and
        is due now; or, given the `previous` config (a reload), only those whose route differs under the two
        (a connector, smart host or local domain changed or vanished). A message being delivered is due
        again when that attempt ends. Returns how many messages changed."""
        config = self.config
        # What we learned about destinations (backoff, unavailable connectors) was about the old routes.
        self.forget_backoff(None)
        self._connector_down.clear()

        def route_of(address: str) -> str:
            return route_for(address, config).link

        def changed(address: str) -> bool:  # after a reload: does this recipient go elsewhere now?
            return previous is not None and route_for(address, config) != route_for(address, previous)

        done = await self.queue.recategorize(
            route_of, time.time(), changed_only=None if previous is None else changed
        )
        if done.messages:
            self.wake()
        return done.messages

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    async def run(self) -> None:
        limit = max(1, self.config.delivery.max_connections)
        if self._budget_file is not None and self._budget_task is None:
            self._budget_task = asyncio.get_running_loop().create_task(
                self._save_budgets_now_and_then(), name="save-budgets"
            )
        while not self._stopping:
            try:
                timeout = await self._start_due(limit)
            except QueueError as exc:
                self._queue_unreachable(exc)
                timeout = QUEUE_RETRY
            else:
                self._queue_reachable()
            if timeout == 0.0:
                await asyncio.sleep(0)  # more is due now: let the loop run the rest first
                continue
            # Woken by new mail, a finished delivery, an operator, or (PostgreSQL) another node's NOTIFY.
            if await self.queue.wait_for_work(timeout) and not self._stopping:
                # A moment for what comes with it: mail arriving message by message (a worker's notice
                # each) then goes out in one pass, not one wake-up and claim per message. Measured (2
                # cores, smtp-source, interleaved pairs: 8 at one session, 3 at ten): 12% more messages
                # per second with one session, 6% with ten, less CPU per message; a delivery starts 5 ms
                # later.
                await asyncio.sleep(GATHER)

    async def _start_due(self, limit: int) -> float | None:
        """Lease what is due (one task per message, at most `limit` in flight); returns how long to wait
        before looking again (None: until woken)."""
        free = limit - len(self._inflight)
        if free > 0:
            # A claim reads envelopes (from disk, for the local spool): at most CLAIM_BATCH at a time, so a
            # retry wave of a hundred thousand messages never holds the loop for long.
            claims = await self.queue.claim(time.time(), min(free, CLAIM_BATCH))
            for claim in claims:
                self._start(claim)
            if len(claims) == CLAIM_BATCH:
                return 0.0  # more may be due: look again at once, after the loop has had its turn
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
        if self._space_task is not None:
            self._space_task.cancel()
            await asyncio.gather(self._space_task, return_exceptions=True)
        if self._budget_task is not None:
            self._budget_task.cancel()
            await asyncio.gather(self._budget_task, return_exceptions=True)
        if self._inflight:
            _, pending = await asyncio.wait(set(self._inflight), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        for transport in self.transports.values():
            await transport.close()
        await self._save_budgets()  # what the deliveries that ended at the stop counted

    async def _process_or_recover(self, envelope: Envelope) -> None:
        try:
            await self.process(envelope)
        except asyncio.CancelledError:
            with contextlib.suppress(QueueError):  # a lease that cannot be given back expires
                await self.queue.release(envelope.id)
            raise
        except LeaseLost as exc:
            self._lease_lost(envelope, exc)
        except MessageSetAside:
            self.transcripts.pop(envelope.id, None)  # in queue/corrupt/ now, with event 9001: nothing to save
        except QueueError as exc:
            if not exc.full:
                await self._internal_error(envelope, exc)
                return
            # A full disk (event 9010, once): the results of this attempt stay in memory, held by the
            # spool, which writes them and makes the message due as soon as there is room again. Not the
            # internal-error schedule: the disk, not the message, is at fault.
            self.queue.abandon(envelope.id)
        except Exception as exc:  # one bad message must not stop delivery of the rest
            await self._internal_error(envelope, exc)

    async def _internal_error(self, envelope: Envelope, exc: Exception) -> None:
        """Something unexpected failed for this message: it is tried again in INTERNAL_RETRY seconds (until it
        expires), and event 4000 says why."""
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
            # spool the index takes the new times above; in a cluster the lease expires first (a full
            # disk: the spool writes it once there is room).
            self.queue.abandon(envelope.id)

    def _space_back(self) -> None:
        """The watcher saw room again: what a full Drop folder deferred is tried now."""
        self._room_again = True
        if self._waiting_for_space and (self._space_task is None or self._space_task.done()):
            self._space_task = asyncio.get_running_loop().create_task(
                self._retry_waiting_for_space(), name="retry-after-disk-full"
            )

    async def _retry_waiting_for_space(self) -> None:
        """Make each message a full Drop folder deferred due now (`make_due`: written, and honoured by a
        delivery under way). When the queue's disk is full again, the rest wait for the watcher's next
        "room", which may have come meanwhile."""
        while self._room_again and not self._stopping:
            self._room_again = False
            for queue_id in list(self._waiting_for_space):
                try:
                    await self.queue.make_due(time.time(), queue_id=queue_id)
                except QueueError as exc:
                    if exc.full:
                        break
                self._waiting_for_space.discard(queue_id)
                self.wake()

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
            groups.setdefault(first, []).append(rcpt)
            fallbacks[first] = rest
        message = _QueuedMessage(self.queue, envelope.id)
        if len(groups) == 1:  # the usual case: awaited directly, without gather's task (speed)
            [(choice, rcpts)] = groups.items()
            outcomes = [await self._deliver_group(envelope, choice, rcpts, fallbacks[choice], message)]
        else:
            outcomes = await asyncio.gather(
                *(
                    self._deliver_group(envelope, choice, rcpts, fallbacks[choice], message)
                    for choice, rcpts in groups.items()
                )
            )
        now = time.time()
        results: list[DeliveryResult] = []
        postponed: dict[str, float] = {}
        retry_at: dict[str, float] = {}
        for (choice, rcpts), outcome in zip(groups.items(), outcomes, strict=True):
            results.extend(outcome.results)
            if outcome.retry_at:  # the provider said when (quota, Graph's Retry-After): then, not sooner
                retry_at.update((r.address, outcome.retry_at) for r in outcome.results if not r.ok)
            if outcome.postponed_until:
                # The destination failed moments ago for another message: wait with it, without an attempt
                # on the count; spread a little, so its mail does not all come due at one instant.
                wait = max(0.0, outcome.postponed_until - now)
                for rcpt in rcpts:
                    postponed[rcpt.address] = outcome.postponed_until + self.rng.uniform(
                        0, POSTPONE_SPREAD * wait
                    )
            elif choice.route.kind != "drop":  # an SMTP or Graph conversation
                self._keep_transcript(envelope, outcome.transcript, started)
        if any(outcome.cause == diskspace.CAUSE for outcome in outcomes):
            self._waiting_for_space.add(envelope.id)
        settlement = settle(envelope, results, now, self.config.delivery, self.rng, postponed, retry_at)
        apply(envelope, settlement)
        self._log_settlement(envelope, settlement, now)
        if settlement.report_success:
            await self.reports.success(envelope, list(settlement.report_success))
        if settlement.report_failure:
            await self._report(envelope, settlement.report_failure, now)
        if settlement.report_delay and await self.reports.delay(envelope):
            envelope.delay_notified = True
        if envelope.outstanding:
            await self._durably(lambda: self.queue.save(envelope))
        else:
            await self._durably(lambda: self.queue.complete(envelope.id))
            self.transcripts.pop(envelope.id, None)

    def _keep_transcript(self, envelope: Envelope, transcript: list[str], started: float) -> None:
        self.transcripts[envelope.id] = transcript
        stamped = [f"attempt at {rfc5322_date(started)}", *transcript]  # when the attempt began
        envelope.transcripts = [*envelope.transcripts, stamped][-TRANSCRIPTS_KEPT:]

    def _log_settlement(self, envelope: Envelope, settlement: Settlement, now: float) -> None:
        """Events 3002 and 3004 with their Postfix-shaped tracking lines (the reply may contain any text)."""
        delay = now - envelope.received_at
        for rcpt, result in settlement.delivered:
            self.events.emit(
                events.Event(
                    events.MESSAGE_DELIVERED,
                    f"Message delivered to {rcpt.address}",
                    queue_id=envelope.id,
                    domain=rcpt.domain,
                    host=result.remote_mta,
                    status=result.status,
                    track=_track(rcpt, result, delay, "sent"),
                )
            )
        for rcpt, result in settlement.bounced:
            self.events.emit(
                events.Event(
                    events.NDR_SENT,
                    f"Delivery to {rcpt.address} failed permanently: {result.reply}",
                    queue_id=envelope.id,
                    domain=rcpt.domain,
                    host=result.remote_mta,
                    status=result.status,
                    track=_track(rcpt, result, delay, "bounced"),
                )
            )
        for rcpt in settlement.expired:
            self.events.emit(
                events.Event(
                    events.NDR_SENT,
                    f"Message to {rcpt.address} expired after {rcpt.attempts} attempts",
                    queue_id=envelope.id,
                    domain=rcpt.domain,
                    status=rcpt.status,
                    cause="expired",
                    track=(
                        f"to=<{rcpt.address}>, relay=none, delay={delay:.2f}, "
                        f"dsn={rcpt.status}, status=expired ({rcpt.last_reply})"
                    ),
                )
            )

    def _choices(self, address: str, unavailable: frozenset[str]) -> tuple[RouteChoice, ...]:
        """`choices_for(address, self.config, unavailable)`, remembered per domain.

        Speed: routing is a pure function of the recipient's domain, the (frozen) config and the unavailable
        connectors (routing.categorizer), and it ran for every recipient of every attempt. The answers are
        kept for as long as the config in force is the same object: a reload replaces it, and that empties
        them. Bounded: emptied when full."""
        config = self.config
        if self._routes_config is not config:
            self._routes.clear()
            self._routes_config = config
        key = (domain_of(address), unavailable)
        choices = self._routes.get(key)
        if choices is None:
            if len(self._routes) >= ROUTES_KEPT:
                self._routes.clear()
            choices = self._routes[key] = tuple(choices_for(address, config, unavailable))
        return choices

    # -- delivery per route --------------------------------------------------------------------------
    async def _deliver_group(
        self,
        envelope: Envelope,
        choice: RouteChoice,
        rcpts: list[Recipient],
        fallbacks: list[RouteChoice],
        message: _QueuedMessage,
    ) -> Outcome:
        started = time.monotonic()  # metrics hook: how long this group's attempt takes
        outcome = await self._send(envelope, choice, rcpts, message)
        if outcome.not_found and fallbacks:
            # smart_host_type = "after_direct", or connectors of equal specificity: DNS cannot find the
            # destination, so the next candidate takes the mail in this same attempt.
            return await self._deliver_group(envelope, fallbacks[0], rcpts, fallbacks[1:], message)
        if outcome.unreachable and choice.connector:
            # Every host of this connector failed: it is unavailable (the Exchange link in retry state) for
            # the longest retry interval, and the next cost takes the mail now, in this same attempt.
            self._connector_down[choice.connector] = time.time() + max(self.config.delivery.retry)
            backup = [c for c in fallbacks if c.connector and c.connector != choice.connector]
            if backup:
                return await self._deliver_group(envelope, backup[0], rcpts, backup[1:], message)
        self._log_deferral(envelope, choice, rcpts, outcome)
        if self.delivery_observer is not None and not outcome.postponed_until:  # metrics hook
            with contextlib.suppress(Exception):  # counting must never fail a delivery
                self.delivery_observer(choice.route.kind, outcome.results, time.monotonic() - started)
        return outcome

    async def _send(
        self, envelope: Envelope, choice: RouteChoice, rcpts: list[Recipient], message: _QueuedMessage
    ) -> Outcome:
        """The transport's delivery, within the link's budget when it has one: a message the budget has no
        room for is postponed (no attempt counted, no event) until the room comes; one the provider refuses
        for its quota is deferred until the budget frees (cause provider-quota)."""
        transport = self.transports[choice.route.kind]
        link = budget_link(choice)
        limits = self.limits.get(link) if link else None
        if link is None or limits is None:
            outcome = await transport.deliver(choice, envelope, rcpts, message)
            return self._quota_deferred(outcome, choice, None, None) if _has_quota_reply(outcome) else outcome
        budget = self.budgets.get(link)
        wait_until = budget.take(time.time(), limits, len(rcpts))
        if wait_until:
            reason = f"the sending budget of {link} is used up; the message waits in the queue until it frees"
            return Outcome(postponed_until=wait_until, reason=reason, cause=BUDGET_CAUSE)
        delivered = len(rcpts)  # if the delivery is cancelled or breaks, it may have gone: count it
        try:
            outcome = await transport.deliver(choice, envelope, rcpts, message)
            delivered = sum(1 for r in outcome.results if r.ok)
        finally:
            budget.done(time.time(), limits, len(rcpts), delivered)
            self._budget_dirty = True
        if _has_quota_reply(outcome):
            return self._quota_deferred(outcome, choice, budget, limits)
        return outcome

    def _quota_deferred(
        self, outcome: Outcome, choice: RouteChoice, budget: Budget | None, limits: Limits | None
    ) -> Outcome:
        """The provider refused for its sending quota: never a bounce (the message is fine; the sender sent
        too much). The link pauses until its budget frees and the refused recipients are tried then; a link
        without limits retries on the retry schedule."""
        now = time.time()
        link = budget_link(choice) or choice.route.link
        until = quota_pause(now, limits, budget) if budget is not None and limits is not None else 0.0
        if until and budget is not None:
            budget.pause(until)
            self._budget_dirty = True
            note = (
                f"the provider's sending quota is exceeded (provider-quota): nothing more is sent over "
                f"{link} until {_utc(until)}, when its budget frees, and this message is tried again then"
            )
        else:
            note = (
                "the provider's sending quota is exceeded (provider-quota): the message is tried again on "
                f"the retry schedule; to stay under the provider's limits, {_how_to_limit(choice)}"
            )
        results = [
            replace(r, permanent=False, reply=f"{r.reply} [{note}]")
            if not r.ok and is_quota_reply(r.reply)
            else r
            for r in outcome.results
        ]
        outcome.results = results
        outcome.retry_at = until
        if all(not r.ok for r in results):
            outcome.reason, outcome.cause = note, QUOTA_CAUSE
        # The host answered (a quota at its greeting, say): it is not down, so no failover to another
        # connector for hours; the pause above is the wait.
        outcome.unreachable = False
        return outcome

    # -- budgets (the providers' limits) -------------------------------------------------------------
    @property
    def limits(self) -> dict[str, Limits]:
        """The links that have limits under the config in force (worked out once per config)."""
        config = self.config
        if self._limits is None or self._limits[0] is not config:
            self._limits = (config, limits_of(config))
        return self._limits[1]

    def budget_views(self, now: float | None = None) -> list[BudgetView]:
        """Every link with limits and what of its budget is used (`queue summary`, /metrics)."""
        return self.budgets.views(time.time() if now is None else now, self.limits)

    def _load_budgets(self) -> None:
        """The send logs saved before a restart: the day's count goes on. A file that cannot be read
        starts the count afresh, and says so."""
        if self._budget_file is None:
            return
        try:
            data = json.loads(self._budget_file.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            self.events.emit(
                events.Event(
                    events.MAILROOT_UNUSABLE,
                    f"The sending budgets could not be read from {self._budget_file} ({exc}); the "
                    "connectors' rate and recipients_per_day count afresh from now",
                    cause="budget-state-unreadable",
                )
            )
            return
        self.budgets.load(data)

    async def _save_budgets_now_and_then(self) -> None:
        while True:
            await asyncio.sleep(BUDGET_SAVE_EVERY)
            if self._budget_dirty:
                await self._save_budgets()

    async def _save_budgets(self) -> None:
        """Write the budgets' state file (atomically; a crash loses at most BUDGET_SAVE_EVERY seconds of
        counting). A failure (a full disk) is logged once, and the count goes on in memory."""
        if self._budget_file is None or not self._budget_dirty:
            return
        self._budget_dirty = False
        payload = json.dumps(self.budgets.dump(time.time(), self.limits)).encode()
        try:
            await asyncio.to_thread(safeio.replace_file, self._budget_file, payload)
        except OSError as exc:
            self._budget_dirty = True
            if not self._budget_unsaved:
                self._budget_unsaved = True
                self.events.emit(
                    events.Event(
                        events.MAILROOT_UNUSABLE,
                        f"The sending budgets cannot be saved to {self._budget_file} ({exc}); they are kept "
                        "in memory, and a restart now would count the day's recipients afresh",
                        cause="budget-state-unsaved",
                    )
                )
            return
        self._budget_unsaved = False

    def _log_deferral(
        self, envelope: Envelope, choice: RouteChoice, rcpts: list[Recipient], outcome: Outcome
    ) -> None:
        """Event 4000: DNS failed (even for good), or the whole group was deferred; one per remote domain,
        as IIS logs it, also when a smart host carries several domains."""
        if not outcome.reason or not outcome.results or outcome.postponed_until:
            return
        route = choice.route
        if outcome.dns:
            domains = [route.mx_domain or rcpts[0].domain]
        elif all(not r.ok and not r.permanent for r in outcome.results):
            domains = [route.mx_domain] if route.mx_domain else sorted({r.domain for r in rcpts})
        else:
            return
        for domain in domains:
            self.events.emit(
                events.Event(
                    events.REMOTE_DOMAIN_FAILED,
                    events.remote_domain_failed_text(domain, outcome.reason),
                    queue_id=envelope.id,
                    domain=domain,
                    host=outcome.dns_host,
                    status=outcome.results[0].status,
                    cause=outcome.cause,
                )
            )

    def _unavailable_connectors(self, now: float) -> frozenset[str]:
        """Connectors whose every smart host failed lately: the next cost takes over until they heal."""
        if not self._connector_down:  # the usual case, without copying an empty dict (speed)
            return _NO_CONNECTORS
        for name, until in list(self._connector_down.items()):
            if until <= now:
                del self._connector_down[name]
        return frozenset(self._connector_down)

    # -- reports -------------------------------------------------------------------------------------
    async def _report(self, envelope: Envelope, failed: Sequence[Recipient], now: float) -> None:
        """Tell the sender (NDR) or, for a null sender, write Badmail. Only when that is durable are the
        recipients marked notified; otherwise the report is retried later and the message stays queued."""
        try:
            await self.reports.failure(envelope, failed)
        except (QueueError, OSError) as exc:
            retry_at = report_retry_time(now, self.config.delivery, self.rng)  # e.g. disk full
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


class _QueuedMessage:
    """The queued message as a transport reads it (`MessageSource`): opened only when it is sent."""

    __slots__ = ("queue", "queue_id")

    def __init__(self, queue: QueueStore, queue_id: str) -> None:
        self.queue = queue
        self.queue_id = queue_id

    async def open(self) -> BinaryIO:
        return await self.queue.open_message(self.queue_id)

    async def xexch50(self) -> bytes | None:
        return await self.queue.xexch50_blob(self.queue_id)


def budget_link(choice: RouteChoice) -> str | None:
    """The link whose budget a route choice spends: its connector, or the default smart host; None for MX."""
    if choice.connector:
        return choice.connector
    return SMART_HOST_LINK if choice.route.link == SMART_HOST_LINK else None


def _how_to_limit(choice: RouteChoice) -> str:
    """What the administrator sets so that this route stays under a provider's limits."""
    if choice.connector:
        return f"set rate and recipients_per_day on connector {choice.connector}"
    if choice.route.link == SMART_HOST_LINK:
        return "set delivery.smart_host_rate and delivery.smart_host_recipients_per_day"
    return f"send {choice.route.link} through a [[connector]] with rate and recipients_per_day"


def _has_quota_reply(outcome: Outcome) -> bool:
    return any(not r.ok and is_quota_reply(r.reply) for r in outcome.results)


def _utc(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(when))


def _track(rcpt: Recipient, result: DeliveryResult, delay: float, outcome: str) -> str:
    """The Postfix-shaped tracking line of one recipient's result."""
    return (
        f"to=<{rcpt.address}>, relay={result.remote_mta or 'none'}, delay={delay:.2f}, "
        f"dsn={result.status}, status={outcome} ({result.reply})"
    )


_NO_CONNECTORS: frozenset[str] = frozenset()
ROUTES_KEPT = 4096  # entries of Scheduler._routes
