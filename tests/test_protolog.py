"""The protocol log's writer and reader (smtpsvc.protolog): W3C escaping, what a command looks like in it
(AUTH's secrets never), its header, rotation at max_size with max_files kept, and several processes writing
the one file (a worker reopens what the main process rotated)."""

from __future__ import annotations

from pathlib import Path

import pytest

from smtpsvc import protolog
from smtpsvc.protocol import Auth, AuthResponse, Data, DataEnd, Ehlo, Mail, Quit, Rcpt, XLink2State
from smtpsvc.protolog import FIELDS, ProtocolLog, ProtocolLogSettings


@pytest.mark.parametrize(
    ("value", "logged"),
    [
        ("", "-"),
        ("FROM:<a@b.test>", "FROM:<a@b.test>"),
        ("250 2.0.0 Ok: queued", "250+2.0.0+Ok:+queued"),
        ("two\r\nlines", "two+lines"),
        ("tab\there", "tab+here"),
    ],
)
def test_a_value_is_written_as_w3c_writes_it(value: str, logged: str) -> None:
    assert protolog.field(value) == logged


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (Ehlo("client.test"), ("EHLO", "client.test", 18)),
        (
            Mail("a@b.test", {"SIZE": "10", "BODY": "8BITMIME"}),
            ("MAIL", "FROM:<a@b.test> SIZE=10 BODY=8BITMIME", 44),
        ),
        (Rcpt("r@c.test", {}), ("RCPT", "TO:<r@c.test>", 20)),
        (Data(), ("DATA", "", 6)),
        (DataEnd(), ("DATA", "", 6)),
        (Quit(), ("QUIT", "", 6)),
        (XLink2State("FIRST CHUNK=x"), ("X-LINK2STATE", "FIRST CHUNK=x", 28)),
        # AUTH: the mechanism is logged, never what follows it (an initial response carries the password)
        (Auth("PLAIN", "AGFsaWNlAHMzY3JldA=="), ("AUTH", "PLAIN ***", 33)),
        (Auth("LOGIN", None), ("AUTH", "LOGIN", 12)),
        (AuthResponse("czNjcmV0"), ("AUTH", "***", 10)),
    ],
)
def test_each_command_is_logged_by_its_verb_and_argument(
    event: object, expected: tuple[str, str, int]
) -> None:
    assert protolog.logged_command(event) == expected


def test_auth_secrets_are_never_in_a_line() -> None:
    method, query, _ = protolog.logged_command(Auth("PLAIN", "AGFsaWNlAHMzY3JldA=="))
    text = protolog.line(
        0.0,
        client_ip="192.0.2.1",
        username="client.test",
        computer="relay.test",
        server_ip="192.0.2.25",
        server_port=25,
        method=method,
        query=query,
        status=235,
        sc_bytes=30,
        cs_bytes=33,
        taken_ms=4,
        queue_id="",
    )
    assert "AGFsaWNl" not in text
    assert (
        text
        == "1970-01-01 00:00:00 192.0.2.1 client.test relay.test 192.0.2.25 25 AUTH PLAIN+*** 235 30 33 4 -\n"
    )


def settings(tmp_path: Path, max_size: int = 10_000_000, max_files: int = 10) -> ProtocolLogSettings:
    return ProtocolLogSettings(tmp_path / "protocol", max_size, max_files)


def one_line(number: int, queue_id: str = "Q1") -> str:
    return protolog.line(
        1_780_000_000.0 + number,
        client_ip="192.0.2.1",
        username="client.test",
        computer="relay.test",
        server_ip="192.0.2.25",
        server_port=25,
        method="RCPT",
        query=f"TO:<r{number}@remote.test>",
        status=250,
        sc_bytes=30,
        cs_bytes=25,
        taken_ms=0,
        queue_id=queue_id,
    )


def test_a_new_file_starts_with_the_w3c_header(tmp_path: Path) -> None:
    log = ProtocolLog(settings(tmp_path), rotate=True, computer="relay.test")
    log.write(one_line(1))
    log.close()
    text = (tmp_path / "protocol" / "smtp.log").read_text()
    lines = text.splitlines()
    assert lines[0] == "#Software: smtpsvc"
    assert lines[1] == "#Version: 1.0"
    assert lines[2].startswith("#Date: ")
    assert lines[3] == "#Fields: " + " ".join(FIELDS)
    assert "x-queue-id" in lines[3]
    [parsed] = protolog.parse_lines(lines)
    assert parsed.get("cs-method") == "RCPT" and parsed.get("cs-uri-query") == "TO:<r1@remote.test>"
    assert parsed.get("x-queue-id") == "Q1" and parsed.when == "2026-05-28 20:26:41"


def test_lines_wait_in_memory_until_a_flush(tmp_path: Path) -> None:
    log = ProtocolLog(settings(tmp_path), rotate=True, computer="relay.test")
    log.write(one_line(1))
    assert protolog.read_log(tmp_path / "protocol") == []  # buffered: no write per line
    log.flush()
    assert len(protolog.read_log(tmp_path / "protocol")) == 1
    log.close()


def test_the_file_is_rotated_at_max_size_and_only_max_files_are_kept(tmp_path: Path) -> None:
    log = ProtocolLog(settings(tmp_path, max_size=2000, max_files=3), rotate=True, computer="relay.test")
    for number in range(200):  # about 20 KB of lines, flushed in small batches
        log.write(one_line(number))
        if number % 5 == 4:
            log.flush()
    log.close()
    folder = tmp_path / "protocol"
    rotated = sorted(protolog.rotated_files(folder))
    assert len(rotated) == 3  # the oldest beyond max_files were removed
    for path in [*rotated, folder / "smtp.log"]:
        text = path.read_text()
        assert text.startswith("#Software: smtpsvc\n#Version: 1.0\n#Date: ")
        assert len(text.encode()) <= 2000  # rotated before a flush would take it past max_size
    kept = protolog.read_log(folder)
    numbers = [int(line.get("cs-uri-query")[5:].split("@")[0]) for line in kept]
    assert numbers == sorted(numbers) and numbers[-1] == 199  # oldest first, the newest all there


def test_a_worker_reopens_the_file_the_main_process_rotated(tmp_path: Path) -> None:
    main = ProtocolLog(settings(tmp_path, max_size=1000), rotate=True, computer="relay.test")
    worker = ProtocolLog(settings(tmp_path, max_size=1000), rotate=False, computer="relay.test")
    for number in range(30):
        worker.write(one_line(number, "W"))
    worker.flush()  # the worker never rotates: the file is past max_size now
    folder = tmp_path / "protocol"
    assert protolog.rotated_files(folder) == []
    main.flush()  # nothing of its own to write: it rotates for the workers all the same
    assert len(protolog.rotated_files(folder)) == 1
    worker.write(one_line(99, "W"))
    worker.flush()
    active = protolog.parse_lines((folder / "smtp.log").read_text().splitlines())
    assert [line.get("cs-uri-query") for line in active] == ["TO:<r99@remote.test>"]
    main.close()
    worker.close()


def test_an_unwritable_folder_loses_lines_without_raising(tmp_path: Path) -> None:
    log = ProtocolLog(settings(tmp_path), rotate=True, computer="relay.test")
    (tmp_path / "protocol" / "smtp.log").unlink()
    (tmp_path / "protocol").rmdir()
    (tmp_path / "protocol").write_text("not a folder")  # every write fails now
    log.write(one_line(1))
    log.flush()  # must not raise: mail flows on without its log
    assert log.lost == 1
    log.close()


def test_a_line_cut_short_is_skipped_when_read(tmp_path: Path) -> None:
    text = protolog.header(0) + one_line(1) + "2026-05-28 20:26:41 192.0.2.1 cut"
    lines = protolog.parse_lines(text.splitlines())
    assert len(lines) == 1
