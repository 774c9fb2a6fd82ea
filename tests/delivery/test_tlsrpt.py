"""TLS reporting (RFC 8460): the day's counts survive a restart, a new UTC day starts them anew, and the
report of one domain is the §4.4 JSON."""

from __future__ import annotations

from pathlib import Path

from smtpsvc.delivery.tlsrpt import CERTIFICATE_EXPIRED, TlsCounts, build_report
from smtpsvc.routing.mtasts import parse_policy

DAY = 1_796_342_400.0  # 2026-12-04T00:00:00Z
POLICY = parse_policy(
    "example.test", "1", "version: STSv1\nmode: enforce\nmx: mx.example.test\nmax_age: 60\n", DAY
)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_counts_are_kept_across_a_restart_and_start_anew_the_next_day(tmp_path: Path) -> None:
    clock = Clock(DAY + 3600)
    counts = TlsCounts(tmp_path / "tlsrpt.json", clock)
    counts.success(POLICY)
    counts.success(POLICY)
    counts.failure(POLICY, CERTIFICATE_EXPIRED, "mx.example.test", "192.0.2.1")
    counts.save()
    again = TlsCounts(tmp_path / "tlsrpt.json", clock)  # the service restarted
    assert again.day == "2026-12-04"
    assert again.domains["example.test"]["success"] == 2
    assert again.take_finished_day() is None  # still the same day
    clock.now = DAY + 86400 + 5
    day, domains = again.take_finished_day() or ("", {})
    assert day == "2026-12-04" and domains["example.test"]["success"] == 2
    assert (again.day, again.domains) == ("2026-12-05", {})


def test_report_is_rfc_8460_json_with_the_counts(tmp_path: Path) -> None:
    counts = TlsCounts(tmp_path / "tlsrpt.json", Clock(DAY))
    counts.success(POLICY)
    counts.failure(POLICY, CERTIFICATE_EXPIRED, "mx.example.test", "192.0.2.1")
    counts.failure(POLICY, CERTIFICATE_EXPIRED, "mx.example.test", "192.0.2.1")
    report = build_report(
        "2026-12-04",
        "example.test",
        counts.domains["example.test"],
        organization="Example Org",
        contact="postmaster@relay.test",
        report_id="r1@relay.test",
    )
    assert report == {
        "organization-name": "Example Org",
        "date-range": {"start-datetime": "2026-12-04T00:00:00Z", "end-datetime": "2026-12-04T23:59:59Z"},
        "contact-info": "postmaster@relay.test",
        "report-id": "r1@relay.test",
        "policies": [
            {
                "policy": {
                    "policy-type": "sts",
                    "policy-string": [
                        "version: STSv1",
                        "mode: enforce",
                        "mx: mx.example.test",
                        "max_age: 60",
                    ],
                    "policy-domain": "example.test",
                    "mx-host": ["mx.example.test"],
                },
                "summary": {"total-successful-session-count": 1, "total-failure-session-count": 2},
                "failure-details": [
                    {
                        "result-type": "certificate-expired",
                        "failed-session-count": 2,
                        "receiving-mx-hostname": "mx.example.test",
                        "receiving-ip": "192.0.2.1",
                    }
                ],
            }
        ],
    }
