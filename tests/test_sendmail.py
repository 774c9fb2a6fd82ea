"""The sendmail door as Unix programs use it: Postfix's sendmail(1) command line (`-oi -t`, `-F -f -odi -oem`,
`-bs`, `-N/-R/-V`), a program that calls `sendmail` through a link named so, and sendmail's exit codes. The
command runs as a real process (`python -m smtpsvc` or the installed console script); where delivery is
checked, the service runs and the message reaches the Drop folder through Pickup."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from smtpsvc.admin.sendmail import SendmailRequest, UsageError, parse_argv
from smtpsvc.app import Service
from tests.conftest import StartService, wait_until

SCRIPT = Path(sys.executable).parent / "smtpsvc"  # the console script pip installed next to python


def env() -> dict[str, str]:
    src = Path(__file__).resolve().parent.parent / "src"
    return {**os.environ, "PYTHONPATH": str(src), "NAME": ""}


async def sendmail(
    *args: str, stdin: bytes = b"", program: list[str] | None = None, extra_env: dict[str, str] | None = None
) -> tuple[int, bytes, str]:
    """Run `smtpsvc sendmail ARGS` (or `program ARGS`) as a process, without blocking the service's loop."""
    command = program or [sys.executable, "-m", "smtpsvc", "sendmail"]
    proc = await asyncio.create_subprocess_exec(
        *command,
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**env(), **(extra_env or {})},
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode is not None
    return proc.returncode, out, err.decode()


def config_of(service: Service) -> str:
    assert service.config_path is not None
    return service.config_path


def drop_files(service: Service) -> list[Path]:
    return sorted(service.folders["drop"].glob("*.eml"))


def not_reports(files: list[Path]) -> list[Path]:
    return [f for f in files if not f.read_bytes().startswith(b"X-Sender: <>")]


# ------------------------------------------------------------------------------------------ the parser
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["-oi", "-t"], SendmailRequest(from_headers=True, dot_ends_input=False)),
        (["-ti"], SendmailRequest(from_headers=True, dot_ends_input=False)),
        (
            ["-it", "a@x.test"],
            SendmailRequest(from_headers=True, dot_ends_input=False, recipients=("a@x.test",)),
        ),
        (["-fme@x.test", "a@x.test"], SendmailRequest(sender="me@x.test", recipients=("a@x.test",))),
        (["-f", "me@x.test", "a@x.test"], SendmailRequest(sender="me@x.test", recipients=("a@x.test",))),
        (["-r", "me@x.test", "a@x.test"], SendmailRequest(sender="me@x.test", recipients=("a@x.test",))),
        (["-tf", "me@x.test"], SendmailRequest(from_headers=True, sender="me@x.test")),
        (
            ["-F", "Cron Daemon", "-f", "a@b.test", "-odi", "-oem", "-t"],
            SendmailRequest(full_name="Cron Daemon", sender="a@b.test", from_headers=True),
        ),
        (
            ["-FCron", "-B8BITMIME", "-oQ/var/spool", "-Am", "-t"],
            SendmailRequest(full_name="Cron", from_headers=True),
        ),
        (["-bm", "a@x.test"], SendmailRequest(recipients=("a@x.test",))),
        (["-bs"], SendmailRequest(mode="smtp")),
        (["-bp"], SendmailRequest(mode="mailq")),
        (["-bi"], SendmailRequest(mode="newaliases")),
        (["-I"], SendmailRequest(mode="newaliases")),
        (
            ["-N", "success,failure", "-R", "hdrs", "-V", "env-1", "a@x.test"],
            SendmailRequest(
                notify=("SUCCESS", "FAILURE"), ret="HDRS", envid="env-1", recipients=("a@x.test",)
            ),
        ),
        (
            ["-Nnever", "-Rfull", "a@x.test"],
            SendmailRequest(notify=("NEVER",), ret="FULL", recipients=("a@x.test",)),
        ),
        (["--", "-odd@x.test"], SendmailRequest(recipients=("-odd@x.test",))),
        (["a@x.test", "-t"], SendmailRequest(recipients=("a@x.test", "-t"))),  # options end at a recipient
        (["-c", "/etc/s.toml", "-t"], SendmailRequest(config_file="/etc/s.toml", from_headers=True)),
        (["--config=/etc/s.toml", "-t"], SendmailRequest(config_file="/etc/s.toml", from_headers=True)),
        (
            ["-v", "-C", "/etc/mail/sendmail.cf", "-t"],
            SendmailRequest(
                from_headers=True,
                notes=(
                    "-v ignored: no delivery report is mailed; `smtpsvc events` shows what happened",
                    "-C /etc/mail/sendmail.cf ignored: smtpsvc reads its own configuration (-c FILE or "
                    "SMTPSVC_CONFIG)",
                ),
            ),
        ),
        (["--help"], SendmailRequest(help=True)),
    ],
)
def test_the_command_line_is_read_as_postfix_sendmail_reads_it(
    argv: list[str], expected: SendmailRequest
) -> None:
    assert parse_argv(argv) == expected


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-Q"], "unknown option -Q"),
        (["--verbose"], "unknown option --verbose"),
        (["-f"], "option -f needs a value"),
        (["-N", "sometimes", "a@x.test"], "-N sometimes: give never, or a list of success, delay, failure"),
        (["-R", "all", "a@x.test"], "-R all: give full"),
        (["-V", "has space", "a@x.test"], "-V needs an envelope id"),
        (["-bd"], "-bd: run the service with `smtpsvc serve`"),
        (["-bv", "a@x.test"], "-bv is not supported"),
        (["-bs", "-t"], "-t can be used only when delivering a message"),
        (["-bs", "a@x.test"], "no recipients are taken with -bs"),
        (["-n"], "-n is not supported"),
    ],
)
def test_a_wrong_command_line_is_a_usage_error_that_says_what_is_wrong(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_argv(argv)
    assert str(caught.value).startswith(message)


# ------------------------------------------------------------------------------------- exit codes
async def test_bad_usage_exits_64_with_one_line_on_stderr(tmp_path: Path) -> None:
    config = tmp_path / "smtpsvc.toml"
    config.write_text(f'[server]\nroot = "{tmp_path / "root"}"\n')
    code, out, err = await sendmail("-c", str(config), "-Q", "-t", stdin=b"Subject: x\n\nx\n")
    assert (code, out) == (64, b"")
    assert err == "smtpsvc sendmail: unknown option -Q (see `smtpsvc sendmail --help`)\n"
    code, _, err = await sendmail("-c", str(config), stdin=b"Subject: x\n\nx\n")
    assert code == 64 and err.count("\n") == 1 and "give recipients, or -t" in err
    code, _, err = await sendmail("-c", str(config), "-t", stdin=b"Subject: x\n\nx\n")
    assert code == 64 and "no recipient addresses found in the message's To, Cc or Bcc" in err
    assert not list((tmp_path / "root").glob("pickup/*.eml"))


async def test_a_pickup_folder_that_cannot_be_written_exits_75_tempfail(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "pickup").write_text("a file where the folder should be")
    config = tmp_path / "smtpsvc.toml"
    config.write_text(f'[server]\nroot = "{tmp_path / "root"}"\n')
    code, _, err = await sendmail("-c", str(config), "a@local.test", stdin=b"Subject: x\n\nx\n")
    assert code == 75 and "cannot write to the Pickup folder" in err and "try again later" in err
    assert "Traceback" not in err


async def test_an_invalid_address_exits_65_dataerr(tmp_path: Path) -> None:
    config = tmp_path / "smtpsvc.toml"
    config.write_text(f'[server]\nroot = "{tmp_path / "root"}"\n')
    code, _, err = await sendmail("-c", str(config), "bad@@x", stdin=b"Subject: x\n\nx\n")
    assert code == 65 and "invalid address 'bad@@x'" in err


# ------------------------------------------------------------------------------------ -i and the dot
async def test_a_lone_dot_ends_the_message_without_i_and_is_kept_with_i(tmp_path: Path) -> None:
    config = tmp_path / "smtpsvc.toml"
    config.write_text(f'[server]\nroot = "{tmp_path / "root"}"\n[domains]\nlocal = ["local.test"]\n')
    text = b"From: a@local.test\nSubject: dots\n\nbefore\n.\nafter\n"
    assert (await sendmail("-c", str(config), "b@local.test", stdin=text))[0] == 0
    [ended] = (tmp_path / "root" / "pickup").glob("*.eml")
    assert ended.read_bytes().endswith(b"\nbefore\n")
    ended.unlink()
    for flag in ("-i", "-oi"):
        assert (await sendmail("-c", str(config), flag, "b@local.test", stdin=text))[0] == 0
        [kept] = (tmp_path / "root" / "pickup").glob("*.eml")
        assert kept.read_bytes().endswith(b"\nbefore\n.\nafter\n")
        kept.unlink()


# ------------------------------------------------------------------------- through the running service
async def test_sendmail_oi_t_queues_the_message_and_it_is_delivered(start_service: StartService) -> None:
    service = await start_service()
    text = (
        b"From: app@local.test\nTo: ops@local.test\nBcc: audit@local.test\nSubject: report\n\n"
        b"line\n.\nafter the dot\n"
    )
    code, out, err = await sendmail("-c", config_of(service), "-oi", "-t", stdin=text)
    assert (code, out, err) == (0, b"", "")  # sendmail's silence on success
    delivered = await wait_until(
        lambda: len(drop_files(service)) == 1 and drop_files(service), what="delivery"
    )
    data = delivered[0].read_bytes()
    assert data.startswith(
        b"X-Sender: <app@local.test>\r\nX-Receiver: <ops@local.test>\r\nX-Receiver: <audit@local.test>\r\n"
    )
    assert b"\r\nBcc:" not in data and b"\r\nline\r\n.\r\nafter the dot\r\n" in data


async def test_sendmail_F_f_odi_oem_t_sets_the_sender_and_the_from_display_name(
    start_service: StartService,
) -> None:
    service = await start_service()
    text = b"To: ops@local.test\nSubject: nightly\n\nbackup done\n"
    code, _, err = await sendmail(
        "-c", config_of(service), "-F", "Cron Daemon", "-f", "a@b.test", "-odi", "-oem", "-t", stdin=text
    )
    assert (code, err) == (0, "")
    [delivered] = await wait_until(lambda: drop_files(service), what="delivery")
    data = delivered.read_bytes()
    assert data.startswith(b"X-Sender: <a@b.test>\r\nX-Receiver: <ops@local.test>\r\n")
    assert b"\r\nFrom: Cron Daemon <a@b.test>\r\n" in data and b"\r\nbackup done\r\n" in data


async def test_F_does_not_replace_a_from_the_message_has(start_service: StartService) -> None:
    service = await start_service()
    text = b"From: Real Author <author@local.test>\nTo: ops@local.test\n\nx\n"
    assert (await sendmail("-c", config_of(service), "-F", "Other", "-t", stdin=text))[0] == 0
    [delivered] = await wait_until(lambda: drop_files(service), what="delivery")
    data = delivered.read_bytes()
    assert data.startswith(b"X-Sender: <author@local.test>\r\n")  # no -f: the From: address, as Pickup
    assert b"From: Real Author <author@local.test>\r\n" in data and b"Other" not in data


async def test_N_R_V_reach_the_queue_as_dsn_parameters(start_service: StartService) -> None:
    service = await start_service()
    text = b"From: app@local.test\nSubject: tracked\n\nx\n"
    code, _, err = await sendmail(
        "-c", config_of(service), "-f", "app@local.test", "-N", "success", "-R", "hdrs", "-V", "env-42",
        "ops@local.test", stdin=text,
    )  # fmt: skip
    assert (code, err) == (0, "")
    # NOTIFY=SUCCESS: the delivery to Drop brings a success report to the sender, naming the ENVID
    files = await wait_until(lambda: len(drop_files(service)) == 2 and drop_files(service), what="the report")
    [report] = [f for f in files if f.read_bytes().startswith(b"X-Sender: <>\r\n")]
    data = report.read_bytes()
    assert b"X-Receiver: <app@local.test>" in data and b"Original-Envelope-Id: env-42" in data
    assert b"Action: delivered" in data


async def test_bs_is_an_smtp_session_on_standard_input_and_output(start_service: StartService) -> None:
    service = await start_service(relay={"allow": []})  # -bs is trusted as a local submission
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "smtpsvc", "sendmail", "-c", config_of(service), "-bs",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=env(),
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None

    async def reply() -> bytes:
        lines = [await asyncio.wait_for(proc.stdout.readline(), 30)]  # type: ignore[union-attr]
        while lines[-1][3:4] == b"-":
            lines.append(await asyncio.wait_for(proc.stdout.readline(), 30))  # type: ignore[union-attr]
        return b"".join(lines)

    async def say(line: bytes) -> bytes:
        proc.stdin.write(line + b"\r\n")  # type: ignore[union-attr]
        await proc.stdin.drain()  # type: ignore[union-attr]
        return await reply()

    assert (await reply()).startswith(b"220 relay.test")
    assert b"250-DSN" in await say(b"EHLO app.local")
    assert (await say(b"MAIL FROM:<app@local.test>")).startswith(b"250 ")
    assert (await say(b"RCPT TO:<ops@local.test>")).startswith(b"250 ")
    assert (await say(b"RCPT TO:<someone@remote.test>")).startswith(b"250 ")  # no relay rules here
    assert (await say(b"DATA")).startswith(b"354 ")
    queued = await say(b"From: app@local.test\r\nSubject: over a pipe\r\n\r\n..stuffed\r\n.")
    assert queued.startswith(b"250 2.6.0 ")
    assert (await say(b"QUIT")).startswith(b"221 ")
    proc.stdin.close()
    assert await asyncio.wait_for(proc.wait(), 30) == 0
    # the remote recipient may get its report meanwhile (remote.test has no DNS here)
    [delivered] = await wait_until(lambda: not_reports(drop_files(service)), what="delivery")
    data = delivered.read_bytes()
    assert data.startswith(b"X-Sender: <app@local.test>\r\nX-Receiver: <ops@local.test>\r\n")
    assert b"Subject: over a pipe\r\n" in data and b"\r\n.stuffed\r\n" in data


async def test_a_program_calling_a_link_named_sendmail_works_the_same(
    start_service: StartService, tmp_path: Path
) -> None:
    assert SCRIPT.is_file(), f"the console script {SCRIPT} is not installed"
    service = await start_service(admin={"listen": "127.0.0.1:0"})  # for mailq
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sendmail").symlink_to(SCRIPT)
    (bin_dir / "newaliases").symlink_to(SCRIPT)
    (bin_dir / "mailq").symlink_to(SCRIPT)
    # a program as PHP's mail() or cron calls it: "sendmail -t -i" found on its PATH, config by variable
    program = ["/bin/sh", "-c", 'printf "To: ops@local.test\\nSubject: from sh\\n\\nhi\\n" | sendmail -t -i']
    code, _, err = await sendmail(
        program=program,
        extra_env={"PATH": f"{bin_dir}:{os.environ['PATH']}", "SMTPSVC_CONFIG": config_of(service)},
    )
    assert (code, err) == (0, "")
    [delivered] = await wait_until(lambda: drop_files(service), what="delivery")
    assert b"X-Receiver: <ops@local.test>\r\n" in delivered.read_bytes()
    code, _, err = await sendmail(program=[str(bin_dir / "newaliases")])
    assert (
        code == 0
        and err == "newaliases: nothing to do: smtpsvc has no alias database (routes are in smtpsvc.toml)\n"
    )
    code, out, _ = await sendmail(
        program=[str(bin_dir / "mailq")], extra_env={"SMTPSVC_CONFIG": config_of(service)}
    )
    assert code == 0 and out.startswith(b"the queue is empty")
    code, _, err = await sendmail("-t", program=[str(bin_dir / "sendmail")], extra_env={"SMTPSVC_CONFIG": ""})
    # linked, with no configuration (none in /etc/smtpsvc here): an error, never ./mailroot of the caller
    assert code == 78 and "no configuration: put it at /etc/smtpsvc/smtpsvc.toml" in err


async def test_a_closed_standard_input_exits_66_noinput(tmp_path: Path) -> None:
    config = tmp_path / "smtpsvc.toml"
    config.write_text(f'[server]\nroot = "{tmp_path / "root"}"\n')
    command = f'exec "{sys.executable}" -m smtpsvc sendmail -c "{config}" a@local.test <&-'
    code, _, err = await sendmail(program=["/bin/sh", "-c", command])
    assert code == 66 and err == "smtpsvc sendmail: standard input is closed: there is no message to read\n"


async def test_bs_answers_451_when_the_pickup_folder_cannot_be_written(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "pickup").write_text("a file where the folder should be")
    config = tmp_path / "smtpsvc.toml"
    config.write_text(f'[server]\nroot = "{tmp_path / "root"}"\n')
    session = b"HELO app\r\nMAIL FROM:<a@local.test>\r\nRCPT TO:<b@local.test>\r\nDATA\r\nQUIT\r\n"
    code, out, err = await sendmail("-c", str(config), "-bs", stdin=session)
    replies = out.decode().splitlines()
    assert code == 0 and err == ""
    assert replies[4].startswith("451 4.3.0") and replies[5].startswith("221 ")


async def test_a_message_over_the_size_limit_exits_69_and_leaves_nothing_in_pickup(tmp_path: Path) -> None:
    config = tmp_path / "smtpsvc.toml"
    config.write_text(f'[server]\nroot = "{tmp_path / "root"}"\nmax_message_size = "1KB"\n')
    text = b"From: a@local.test\n\n" + (b"x" * 80 + b"\n") * 40
    code, _, err = await sendmail("-c", str(config), "b@local.test", stdin=text)
    assert code == 69 and "larger than the maximum message size" in err
    assert not list((tmp_path / "root" / "pickup").iterdir())
