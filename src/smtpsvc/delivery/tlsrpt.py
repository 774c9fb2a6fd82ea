"""SMTP TLS reporting (RFC 8460): counts of our sessions per policy domain, and the daily aggregate report.

The SMTP transport counts, for every domain whose MTA-STS policy it applied (``testing`` or ``enforce``), the
sessions that met the policy and those that did not, with the RFC's result types (§4.3: ``starttls-not-
supported``, ``certificate-host-mismatch``, ``certificate-expired``, ``certificate-not-trusted``,
``validation-failure``, ``sts-policy-fetch-error``, ``sts-policy-invalid``), the MX host and its address.
The counts of the current UTC day live in memory and in ``queue/tlsrpt.json`` (saved every minute and at
stop: a crash loses at most a minute of counting).

When the day is over the report of each domain (JSON per §4.4, gzip, ``application/tlsrpt+gzip``, in a
``multipart/report; report-type="tlsrpt"`` message with the §5.3 Subject and headers) is queued through
ingest, like a DSN with the null sender, to every ``mailto:`` address of the domain's ``_smtp._tls`` TXT
record. ``https:`` addresses (§3, HTTP POST) are not used: the report is not sent there.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import secrets
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any

from smtpsvc.ingest import EnvelopeFields, Ingest
from smtpsvc.model import Recipient, Source
from smtpsvc.routing.mtasts import Policy, parse_tlsrpt_record
from smtpsvc.routing.mx import DnsError, MxResolver
from smtpsvc.safeio import replace_file

# RFC 8460 §4.3 result types we produce
STARTTLS_NOT_SUPPORTED = "starttls-not-supported"
CERTIFICATE_HOST_MISMATCH = "certificate-host-mismatch"
CERTIFICATE_EXPIRED = "certificate-expired"
CERTIFICATE_NOT_TRUSTED = "certificate-not-trusted"
VALIDATION_FAILURE = "validation-failure"
STS_POLICY_FETCH_ERROR = "sts-policy-fetch-error"

SAVE_INTERVAL = 60.0


def _day(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d")


class TlsCounts:
    """The day's session counts per policy domain (see the module docstring); `path` keeps them."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        self.day = _day(clock())
        self.domains: dict[str, dict[str, Any]] = {}
        self._dirty = False
        self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            day, domains = str(data["day"]), data["domains"]
        except (OSError, ValueError, KeyError, TypeError):
            return
        if isinstance(domains, dict):
            self.day, self.domains = day, domains

    def save(self) -> None:
        if not self._dirty:
            return
        payload = json.dumps({"day": self.day, "domains": self.domains}, indent=1, sort_keys=True)
        try:
            replace_file(self.path, payload.encode("utf-8"), mode=0o644, durable=False)
            self._dirty = False
        except OSError:
            pass  # a full disk: counted in memory, saved at the next try

    def _entry(self, policy: Policy) -> dict[str, Any]:
        entry = self.domains.setdefault(policy.domain, {"success": 0, "failures": {}})
        entry["policy"] = {
            "policy-type": "sts",
            "policy-string": [line for line in policy.text.replace("\r\n", "\n").split("\n") if line.strip()],
            "policy-domain": policy.domain,
            "mx-host": list(policy.mx),
        }
        self._dirty = True
        return entry

    def success(self, policy: Policy) -> None:
        self._entry(policy)["success"] += 1

    def failure(self, policy: Policy, result_type: str, mx_host: str = "", ip: str = "") -> None:
        failures: dict[str, int] = self._entry(policy)["failures"]
        key = f"{result_type}|{mx_host}|{ip}"
        failures[key] = failures.get(key, 0) + 1

    def take_finished_day(self) -> tuple[str, dict[str, dict[str, Any]]] | None:
        """The counts of a day that is over (None while it is still today); counting starts anew."""
        today = _day(self.clock())
        if today == self.day:
            return None
        finished = (self.day, self.domains)
        self.day, self.domains, self._dirty = today, {}, True
        return finished

    def take_now(self) -> tuple[str, dict[str, dict[str, Any]]]:
        """Today's counts so far, for a report now (`TlsReporter.send_now`); counting starts anew."""
        taken = (self.day, self.domains)
        self.domains, self._dirty = {}, True
        return taken


def build_report(
    day: str, domain: str, entry: dict[str, Any], *, organization: str, contact: str, report_id: str
) -> dict[str, Any]:
    """The RFC 8460 §4.4 JSON report of one policy domain for one UTC day."""
    failures: dict[str, int] = entry.get("failures", {})
    details = []
    for key, count in sorted(failures.items()):
        result_type, mx_host, ip = key.split("|", 2)
        detail: dict[str, Any] = {"result-type": result_type, "failed-session-count": count}
        if mx_host:
            detail["receiving-mx-hostname"] = mx_host
        if ip:
            detail["receiving-ip"] = ip
        details.append(detail)
    return {
        "organization-name": organization,
        "date-range": {"start-datetime": f"{day}T00:00:00Z", "end-datetime": f"{day}T23:59:59Z"},
        "contact-info": contact,
        "report-id": report_id,
        "policies": [
            {
                "policy": entry.get("policy", {"policy-type": "no-policy-found", "policy-domain": domain}),
                "summary": {
                    "total-successful-session-count": int(entry.get("success", 0)),
                    "total-failure-session-count": sum(failures.values()),
                },
                "failure-details": details,
            }
        ],
    }


def build_message(
    report: dict[str, Any], domain: str, submitter: str, recipients: Sequence[str], now: float
) -> bytes:
    """The §5.3 report message: Subject and TLS-Report-* headers, a text part, the gzipped JSON."""
    day = report["date-range"]["start-datetime"][:10]
    start = int(datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=UTC).timestamp())
    report_id = report["report-id"]
    message = EmailMessage()
    message["From"] = f"TLS reporting <noreply-tlsrpt@{submitter}>"
    message["To"] = ", ".join(recipients)
    message["Subject"] = f"Report Domain: {domain} Submitter: {submitter} Report-ID: <{report_id}>"
    message["Date"] = format_datetime(datetime.fromtimestamp(now, UTC))
    message["Message-ID"] = make_msgid(domain=submitter)
    message["TLS-Report-Domain"] = domain
    message["TLS-Report-Submitter"] = submitter
    message.set_content(
        f"This is an aggregate TLS report (RFC 8460) from {submitter} for {domain}, {day} (UTC).\n"
    )
    payload = gzip.compress(json.dumps(report, indent=1).encode("utf-8"), mtime=0)
    filename = f"{submitter}!{domain}!{start}!{start + 86399}!{report_id.split('@')[0]}.json.gz"
    message.add_attachment(payload, maintype="application", subtype="tlsrpt+gzip", filename=filename)
    message.replace_header("Content-Type", 'multipart/report; report-type="tlsrpt"')
    return message.as_bytes()


class TlsReporter:
    """Sends the reports of a finished day (`tick`, from the service's loop) or of today so far
    (`send_now`): one per policy domain with a ``mailto:`` rua."""

    def __init__(
        self,
        counts: TlsCounts,
        resolver: MxResolver,
        ingest: Ingest,
        submitter: Callable[[], tuple[str, str]],  # () -> (server.hostname, organization-name)
    ) -> None:
        self.counts = counts
        self.resolver = resolver
        self.ingest = ingest
        self.submitter = submitter
        self.sent: list[tuple[str, str, str, tuple[str, ...]]] = []  # (queue id, domain, day, rua): tests

    async def tick(self) -> int:
        """Save the counts; send the reports of a day that is over. Returns how many reports were queued."""
        finished = self.counts.take_finished_day()
        sent = 0
        if finished is not None:
            sent = await self._send(*finished)
        self.counts.save()
        return sent

    async def send_now(self) -> int:
        """Today's reports so far, now (a test, or an operator who wants them before midnight)."""
        sent = await self._send(*self.counts.take_now())
        self.counts.save()
        return sent

    async def run(self) -> None:
        while True:
            await asyncio.sleep(SAVE_INTERVAL)
            await self.tick()

    async def _send(self, day: str, domains: dict[str, dict[str, Any]]) -> int:
        sent = 0
        hostname, organization = self.submitter()
        for domain, entry in sorted(domains.items()):
            try:
                rua = parse_tlsrpt_record(await self.resolver.txt_records(f"_smtp._tls.{domain}"))
            except DnsError:
                rua = []
            mailto = [uri[7:].split("?", 1)[0] for uri in rua if uri.lower().startswith("mailto:")]
            if not mailto:
                continue  # no report wanted, or only by https (not supported: docs/delivery.md)
            report_id = f"{day}.{secrets.token_hex(8)}@{hostname}"
            report = build_report(
                day,
                domain,
                entry,
                organization=organization,
                contact=f"postmaster@{hostname}",
                report_id=report_id,
            )
            message = build_message(report, domain, hostname, mailto, time.time())
            queued = await self.ingest.submit_bytes(
                message,
                EnvelopeFields(
                    sender="", recipients=[Recipient(address=a) for a in mailto], source=Source.DSN
                ),
            )
            self.sent.append((queued.id, domain, day, tuple(mailto)))  # its event: 3001 from ingest
            sent += 1
        return sent
