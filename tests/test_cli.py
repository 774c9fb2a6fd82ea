"""The command line: config check/show/example exit codes and output; serve on a broken mailroot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from smtpsvc import config as config_module
from smtpsvc.cli import main


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), env=env or {})
    return result.exit_code, result.stdout, result.stderr


def test_config_check_accepts_a_valid_file(tmp_path: Path) -> None:
    cfg = tmp_path / "smtpsvc.toml"
    cfg.write_text('[server]\nmax_recipients = 5\n[relay]\nallow = ["10.0.0.0/8"]\n')
    code, out, _ = run("config", "check", "-c", str(cfg))
    assert code == 0
    assert out.strip() == f"{cfg}: OK"


def test_config_check_reports_file_line_key_and_a_suggestion_with_exit_2(tmp_path: Path) -> None:
    cfg = tmp_path / "smtpsvc.toml"
    cfg.write_text('[server]\nhostname = "relay.test"\nmax_recipient = 5\n')
    code, _, err = run("config", "check", "-c", str(cfg))
    assert code == 2
    assert f"{cfg}:3: server.max_recipient" in err
    assert 'did you mean "max_recipients"' in err


def test_config_check_warns_about_keys_not_yet_in_effect(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config_module, "NOT_YET_EFFECTIVE", frozenset({"queue.lease"}))  # none is, today
    cfg = tmp_path / "smtpsvc.toml"
    cfg.write_text('[queue]\nlease = "1m"\n')
    code, _, err = run("config", "check", "-c", str(cfg))
    assert code == 0
    assert "queue.lease" in err and "not yet in effect" in err


def test_config_check_names_kb286673s_typo_in_the_verb_mask(tmp_path: Path) -> None:
    cfg = tmp_path / "smtpsvc.toml"
    cfg.write_text("[server]\ninbound_command_support_options = 41943040\n")
    code, out, err = run("config", "check", "-c", str(cfg))
    assert code == 0  # a warning, not an error: the mask is a valid DWORD
    assert out.strip() == f"{cfg}: OK"
    warnings = err.splitlines()
    assert len(warnings) == 3 and all(
        w.startswith("warning: server.inbound_command_support_options") for w in warnings
    )
    assert "turns off 6 of the 6 verbs it controls (DSN, ETRN" in err
    assert "KB286673's typo for 4194304: did you mean 7697601 - 4194304 = 3503297" in err


def test_config_check_is_quiet_about_the_mask_kb286673_meant(tmp_path: Path) -> None:
    cfg = tmp_path / "smtpsvc.toml"
    cfg.write_text("[server]\ninbound_command_support_options = 3503297\n")
    assert run("config", "check", "-c", str(cfg)) == (0, f"{cfg}: OK\n", "")


def test_config_show_decodes_the_verb_mask(tmp_path: Path) -> None:
    cfg = tmp_path / "smtpsvc.toml"
    cfg.write_text("[server]\ninbound_command_support_options = 3503297\n")
    code, out, _ = run("config", "show", "-c", str(cfg))
    assert code == 0
    assert "3503297" in out
    line = next(x for x in out.splitlines() if "8BITMIME" in x and "BINARY" not in x)
    assert "off" in line


def test_config_example_is_itself_a_valid_configuration(tmp_path: Path) -> None:
    code, out, _ = run("config", "example")
    assert code == 0
    cfg = tmp_path / "example.toml"
    cfg.write_text(out)
    assert run("config", "check", "-c", str(cfg))[0] == 0


def test_environment_override_beats_the_file(tmp_path: Path) -> None:
    cfg = tmp_path / "smtpsvc.toml"
    cfg.write_text("[server]\nmax_recipients = 5\n")
    code, out, _ = run("config", "show", "-c", str(cfg), env={"SMTPSVC__SERVER__MAX_RECIPIENTS": "7"})
    assert code == 0
    assert "max_recipients = 7" in out


def test_serve_on_an_unusable_mailroot_exits_1_with_event_429(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the mailroot should be")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "smtpsvc",
            "serve",
            "--root",
            str(blocker / "mailroot"),
            "--listen",
            "127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert " 429 " in proc.stderr and "cannot be used" in proc.stderr


def test_relay_check_explains_a_refusal_and_the_rule(tmp_path: Path) -> None:
    cfg = tmp_path / "smtpsvc.toml"
    cfg.write_text('[domains]\nlocal = ["corp.test"]\n[relay]\nallow = ["10.0.0.0/8"]\n')
    code, out, _ = run("relay", "check", "-c", str(cfg), "--client", "192.0.2.7", "--rcpt", "u@remote.test")
    assert code == 0
    assert 'refused with "550 5.7.1 Unable to relay for <u@remote.test>"' in out
    assert "rule: default-deny" in out
    code, out, _ = run("relay", "check", "-c", str(cfg), "--client", "10.1.1.1", "--rcpt", "u@remote.test")
    assert "decision: accepted" in out and "allow-list:10.0.0.0/8" in out


def test_relay_check_says_whether_the_client_may_connect(tmp_path: Path) -> None:
    cfg = tmp_path / "smtpsvc.toml"
    cfg.write_text('[domains]\nlocal = ["corp.test"]\n')
    _, out, _ = run("relay", "check", "-c", str(cfg), "--client", "192.0.2.7", "--rcpt", "u@corp.test")
    assert "connection: accepted (connection.allow and connection.deny are empty: everyone may" in out
    cfg.write_text(
        '[server]\nhostname = "mx.corp.test"\n[domains]\nlocal = ["corp.test"]\n'
        '[connection]\nallow = ["10.0.0.0/8"]\ndeny = ["10.9.9.9"]\n'
    )
    verdicts = {
        client: run("relay", "check", "-c", str(cfg), "--client", client, "--rcpt", "u@corp.test")[1]
        for client in ("10.1.1.1", "10.9.9.9", "192.0.2.7")
    }
    assert "connection: accepted (in connection.allow)" in verdicts["10.1.1.1"]
    refused = 'connection: refused with "554 5.7.1 mx.corp.test Access denied: {} may not connect'
    assert refused.format("10.9.9.9") in verdicts["10.9.9.9"]
    assert "(in connection.deny)" in verdicts["10.9.9.9"]
    assert refused.format("192.0.2.7") in verdicts["192.0.2.7"]
    assert "(not in connection.allow)" in verdicts["192.0.2.7"]
    assert "decision: accepted" in verdicts["192.0.2.7"]  # the relay rules' own answer, still shown


def test_relay_check_names_relay_tricks(tmp_path: Path) -> None:
    cfg = tmp_path / "smtpsvc.toml"
    cfg.write_text('[domains]\nlocal = ["corp.test"]\n')
    code, out, _ = run(
        "relay", "check", "-c", str(cfg), "--client", "127.0.0.1", "--rcpt", "u%evil.test@corp.test"
    )
    assert code == 0 and "rule: relay-trick" in out


def test_relay_check_refuses_bad_input_with_exit_2(tmp_path: Path) -> None:
    assert run("relay", "check", "--client", "not-an-ip", "--rcpt", "u@x.test")[0] == 2
    code, _, err = run("relay", "check", "--client", "127.0.0.1", "--rcpt", "no spaces@x")
    assert code == 2 and "not a valid address" in err


def test_relay_check_treats_a_bare_postmaster_as_local(tmp_path: Path) -> None:
    cfg = tmp_path / "smtpsvc.toml"
    cfg.write_text('[domains]\nlocal = ["corp.test"]\n[relay]\nallow = []\n')
    code, out, _ = run("relay", "check", "-c", str(cfg), "--client", "192.0.2.7", "--rcpt", "postmaster")
    assert code == 0
    assert "recipient postmaster@corp.test" in out and "decision: accepted" in out


def test_sendmail_writes_a_pickup_file_with_the_envelope(tmp_path: Path) -> None:
    cfg = tmp_path / "smtpsvc.toml"
    cfg.write_text(f'[server]\nroot = "{tmp_path / "root"}"\n')
    message = b"Subject: cron\r\n\r\nbackup done\r\n"
    result = CliRunner().invoke(
        main, ["sendmail", "-c", str(cfg), "-f", "cron@local.test", "ops@local.test"], input=message, env={}
    )
    assert result.exit_code == 0
    [written] = (tmp_path / "root" / "pickup").glob("sendmail-*.eml")
    assert (
        written.read_bytes()
        == b"X-Sender: <cron@local.test>\r\nX-Receiver: <ops@local.test>\r\nFrom: cron@local.test\r\n"
        + message
    )


def test_sendmail_without_recipients_or_t_is_a_usage_error(tmp_path: Path) -> None:
    assert run("sendmail")[0] == 64  # EX_USAGE, as sendmail(1)


def test_events_filters_by_id_and_since(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "log").mkdir(parents=True)
    (root / "log" / "events.jsonl").write_text(
        '{"time":"2000-01-01T00:00:00.000+00:00","id":4000,"level":"warning","text":"old"}\n'
        '{"time":"2999-01-01T00:00:00.000+00:00","id":4000,"level":"warning","text":"new","cause":"dns-timeout"}\n'
        '{"time":"2999-01-01T00:00:00.000+00:00","id":3001,"level":"info","text":"queued"}\n'
    )
    cfg = tmp_path / "smtpsvc.toml"
    cfg.write_text(f'[server]\nroot = "{root}"\n')
    code, out, _ = run("events", "-c", str(cfg), "--id", "4000", "--since", "1h")
    assert code == 0
    assert "new" in out and "cause=dns-timeout" in out and "old" not in out and "queued" not in out
