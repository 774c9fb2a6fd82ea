"""A damaged accounts file (auth.users_file): the service starts anyway, AUTH is answered 454 4.7.0 (try again
later, never 235) with an event naming the file and the problem, `smtpsvc users list` says what is wrong,
and a mended file is taken at the next reload. Hostile files (huge, nested too deep) never raise anything
but UsersFileError."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from smtpsvc.auth.users import MAX_FILE_BYTES, UsersFileError, UserStore
from smtpsvc.cli import main
from tests.conftest import StartService, base_sections, wait_events, write_config
from tests.security.helpers import events_of, greeted, keywords, plain
from tests.test_reload import workers_reloaded

USER, PASSWORD = "alice@local.test", "correct horse battery staple"


def sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as fh:
        fh.truncate(size)  # a real size, no blocks written
    return path


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("a = " + "[" * 100_000 + "]" * 100_000 + "\n", "invalid TOML: values nested too deep"),
        ("users = " + "{ a = " * 3000 + "1" + " }" * 3000 + "\n", "invalid TOML: values nested too deep"),
        ("users = 5\n", "users must be tables"),
        ('[users."alice"]\nhash = 5\n', "hash is missing or not a string"),
    ],
    ids=["nested arrays", "nested tables", "users a number", "hash a number"],
)
def test_a_hostile_accounts_file_is_a_users_file_error(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "users.toml"
    path.write_text(content)
    with pytest.raises(UsersFileError, match=problem):
        UserStore.load(path)


def test_a_huge_accounts_file_is_refused_unread(tmp_path: Path) -> None:
    path = sparse(tmp_path / "users.toml", MAX_FILE_BYTES + 1)
    with pytest.raises(UsersFileError, match=r"is larger than 16,777,216 bytes"):
        UserStore.load(path)


async def test_a_damaged_accounts_file_makes_auth_answer_454_and_the_service_start(
    start_service: StartService, tmp_path: Path
) -> None:
    users = tmp_path / "users.toml"
    users.write_text("a = " + "[" * 100_000 + "]" * 100_000 + "\n")
    service = await start_service(auth={"users_file": str(users), "require_tls": False})
    [started] = [e for e in events_of(service, 9002) if e.get("cause") == "users-file-unusable"]
    assert str(users) in str(started["text"]) and "nested too deep" in str(started["text"])
    client = await greeted(service)
    assert "AUTH PLAIN LOGIN" in keywords(await client.command("EHLO client.test"))
    assert (await client.command(f"AUTH PLAIN {plain(USER, PASSWORD)}")).startswith("454 4.7.0")
    [refused] = [e for e in await wait_events(service, 7010) if e.get("cause") == "auth-unavailable"]
    assert str(users) in str(refused["text"]) and "nested too deep" in str(refused["text"])
    assert PASSWORD not in (service.folders["log"] / "events.jsonl").read_text()
    # mail that needs no AUTH still flows
    assert (await client.command("MAIL FROM:<a@local.test>")).startswith("250")
    assert (await client.command("RCPT TO:<b@local.test>")).startswith("250")
    await client.close()

    store = UserStore()
    store.add(USER, PASSWORD)
    store.save(users)  # mended: the next reload takes it
    service.reload()
    await workers_reloaded(service)  # the SMTP workers take it on SIGHUP, within milliseconds
    client = await greeted(service)
    assert (await client.command(f"AUTH PLAIN {plain(USER, PASSWORD)}")).startswith("235")
    await client.close()


def test_users_list_says_what_is_wrong_with_the_file(tmp_path: Path) -> None:
    config = write_config(tmp_path / "smtpsvc.toml", base_sections(tmp_path / "mailroot"))
    config.write_text(config.read_text() + '\n[auth]\nusers_file = "users.toml"\n')
    sparse(tmp_path / "users.toml", MAX_FILE_BYTES + 1)
    result = CliRunner().invoke(main, ["users", "list", "-c", str(config)], env={})
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit | None)
    assert f"{tmp_path / 'users.toml'}: is larger than 16,777,216 bytes" in result.stderr
    assert "Traceback" not in result.output
