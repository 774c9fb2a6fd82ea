"""Badmail items by kind (KB306043): `badmail list` and /api/badmail say whether each item is a failure,
delay or relayed (success) report, or other; `badmail replay --all` replays failure reports only unless
`--kind` says otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from smtpsvc.admin.badmail import report_kind
from smtpsvc.cli import main
from tests.admin.conftest import Admin
from tests.conftest import base_sections, write_config

ENVELOPE = {"sender": "", "recipients": [{"address": "alice@local.test"}]}


def report(*actions: str, content_type: str = "multipart/report; report-type=delivery-status;") -> bytes:
    """A delivery status notification as dsn.py writes one, its original message holding a decoy Action."""
    status = "".join(
        f"\r\nFinal-Recipient: rfc822; r{n}@remote.test\r\nAction: {action}\r\nStatus: 5.0.0\r\n"
        for n, action in enumerate(actions)
    )
    return (
        "From: Mail Delivery System <postmaster@relay.test>\r\nTo: <>\r\nSubject: report\r\n"
        f'MIME-Version: 1.0\r\nContent-Type: {content_type}\r\n boundary="b1"\r\n\r\n'
        "This is a MIME-encapsulated message.\r\n"
        "\r\n--b1\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nAction: delivered\r\n"
        "\r\n--b1\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; relay.test\r\n"
        f"{status}"
        "\r\n--b1\r\nContent-Type: message/rfc822\r\n\r\nSubject: original\r\n\r\nAction: delivered\r\n"
        "\r\n--b1--\r\n"
    ).encode()


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        (report("failed"), "failure"),
        (report("delayed"), "delay"),
        (report("relayed"), "relayed"),
        (report("delivered"), "relayed"),
        (report("expanded"), "relayed"),
        (report("delayed", "failed", "delivered"), "failure"),  # any failed recipient: a failure report
        (report("delivered", "delayed"), "delay"),
        (report("Failed"), "failure"),
        (report("failed", content_type='multipart/report; report-type="delivery-status";'), "failure"),
        (report("failed", content_type="multipart/report;\r\n report-type=delivery-status;"), "failure"),
        (report("failed", content_type="multipart/mixed;"), "other"),  # not a report
        (report("bogus"), "other"),
        (b"From: <postmaster@relay.test>\r\nSubject: lost\r\n\r\nAction: failed\r\n", "other"),
        (b"", "other"),
    ],
)
def test_report_kind_reads_the_actions_of_the_delivery_status_part(message: bytes, kind: str) -> None:
    assert report_kind(message) == kind


@pytest.fixture
def kinds_config(tmp_path: Path) -> tuple[Path, Path]:
    config = write_config(tmp_path / "smtpsvc.toml", base_sections(tmp_path / "mailroot"))
    folder = tmp_path / "mailroot" / "badmail"
    folder.mkdir(parents=True)
    for name, message in (
        ("F1", report("failed")),
        ("D1", report("delayed")),
        ("R1", report("relayed")),
        ("pickup-O1", b"Subject: no sender\r\n\r\nx\r\n"),
    ):
        (folder / f"{name}.bad").write_bytes(message)
        (folder / f"{name}.bdr").write_text("Unable to deliver this message. 5.1.1\r\n")
        (folder / f"{name}.bdp").write_text(json.dumps(ENVELOPE))
    return config, folder


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), env={})
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.stdout + result.stderr
    return result.exit_code, result.stdout, result.stderr


def replayed(folder: Path) -> list[str]:
    return sorted(p.name for p in (folder.parent / "pickup").glob("replay-*.eml"))


def test_badmail_list_shows_each_items_kind(kinds_config: tuple[Path, Path]) -> None:
    config, _ = kinds_config
    code, out, _ = run("badmail", "list", "-c", str(config))
    assert code == 0
    kinds = {line.split()[0]: line.split()[1] for line in out.splitlines()}
    assert kinds == {"F1": "failure", "D1": "delay", "R1": "relayed", "pickup-O1": "other"}


def test_badmail_replay_all_replays_failure_reports_only(kinds_config: tuple[Path, Path]) -> None:
    config, folder = kinds_config
    code, out, _ = run("badmail", "replay", "-c", str(config), "--all")
    assert code == 0 and "F1: written to" in out
    assert replayed(folder) == ["replay-F1.eml"]
    assert (folder / "D1.bad").exists() and (folder / "R1.bad").exists()


@pytest.mark.parametrize(
    ("kind", "names"),
    [
        ("delay", ["replay-D1.eml"]),
        ("relayed", ["replay-R1.eml"]),
        ("other", ["replay-pickup-O1.eml"]),
        ("all", ["replay-D1.eml", "replay-F1.eml", "replay-R1.eml", "replay-pickup-O1.eml"]),
    ],
)
def test_badmail_replay_all_of_a_kind(kinds_config: tuple[Path, Path], kind: str, names: list[str]) -> None:
    config, folder = kinds_config
    code, _, _ = run("badmail", "replay", "-c", str(config), "--all", "--kind", kind)
    assert code == 0 and replayed(folder) == names


def test_badmail_replay_kind_without_all_is_refused_with_a_hint(kinds_config: tuple[Path, Path]) -> None:
    config, folder = kinds_config
    code, _, err = run("badmail", "replay", "-c", str(config), "D1", "--kind", "delay")
    assert code == 2 and "--kind goes with --all" in err and replayed(folder) == []
    code, _, err = run("badmail", "replay", "-c", str(config), "--all", "--kind", "success")
    assert code == 2 and "success" in err and replayed(folder) == []


async def test_the_admin_api_lists_each_items_kind(admin: Admin) -> None:
    folder = admin.service.folders["badmail"]
    (folder / "F1.bad").write_bytes(report("failed"))
    (folder / "D1.bad").write_bytes(report("delayed"))
    async with admin.client() as http:
        response = await http.get("/api/badmail")
        assert response.status_code == 200
        assert {i["name"]: i["kind"] for i in response.json()} == {"F1": "failure", "D1": "delay"}
