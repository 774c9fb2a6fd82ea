"""`smtpsvc users add|remove|list`: prompts and --password-stdin, exit codes, messages, the file it edits."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from smtpsvc.auth.users import FILE_HEADER, UserStore, hash_password
from smtpsvc.cli import main


@pytest.fixture(autouse=True)
def fast_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cheap scrypt parameters for the CLI tests (the hashing itself is tested in test_users)."""
    import smtpsvc.auth.users as users

    original = users.hash_password
    monkeypatch.setattr(users, "hash_password", lambda password: original(password, n=16, r=1, p=1))


@pytest.fixture
def config(tmp_path: Path) -> Path:
    cfg = tmp_path / "conf" / "smtpsvc.toml"
    cfg.parent.mkdir()
    cfg.write_text('[auth]\nusers_file = "users.toml"\n')
    return cfg


def run(*args: str, input: str | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), input=input, env={"SMTPSVC_CONFIG": ""})
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout, result.stderr


def users_file(config: Path) -> Path:
    return config.parent / "users.toml"


def test_add_with_password_stdin_writes_a_hash_next_to_the_config(config: Path) -> None:
    code, out, _ = run(
        "users", "add", "alice@example.test", "--password-stdin", "-c", str(config), input="s3cret pw\n"
    )
    assert code == 0
    assert out.strip() == "added alice@example.test"
    store = UserStore.load(users_file(config))
    assert store.verify("alice@example.test", "s3cret pw")
    assert "s3cret" not in users_file(config).read_text()


def test_password_stdin_strips_only_the_line_ending(config: Path) -> None:
    run(
        "users", "add", "alice", "--password-stdin", "-c", str(config), input="  spaced pw  \r\nsecond line\n"
    )
    assert UserStore.load(users_file(config)).verify("alice", "  spaced pw  ")


def test_password_stdin_without_a_trailing_newline(config: Path) -> None:
    run("users", "add", "alice", "--password-stdin", "-c", str(config), input="pw")
    assert UserStore.load(users_file(config)).verify("alice", "pw")


def test_add_prompts_twice_for_the_password(config: Path) -> None:
    code, out, _ = run("users", "add", "alice", "-c", str(config), input="pw1\npw1\n")
    assert code == 0
    assert "Password" in out
    assert "Repeat for confirmation" in out
    assert "pw1" not in out  # hidden input
    assert UserStore.load(users_file(config)).verify("alice", "pw1")


def test_add_asks_again_when_the_two_entries_differ(config: Path) -> None:
    code, _, _ = run("users", "add", "alice", "-c", str(config), input="one\ntwo\nthree\nthree\n")
    assert code == 0
    store = UserStore.load(users_file(config))
    assert store.verify("alice", "three")
    assert not store.verify("alice", "one")


def test_add_refuses_an_empty_password_with_exit_2(config: Path) -> None:
    code, _, err = run("users", "add", "alice", "--password-stdin", "-c", str(config), input="\n")
    assert code == 2
    assert "password is empty" in err
    assert "Traceback" not in err
    assert not users_file(config).exists()


def test_add_refuses_an_overlong_password_with_exit_2(config: Path) -> None:
    code, _, err = run(
        "users", "add", "alice", "--password-stdin", "-c", str(config), input="x" * 1025 + "\n"
    )
    assert code == 2
    assert "longer than 1024" in err


def test_add_refuses_a_bad_name_with_exit_2_before_asking(config: Path) -> None:
    code, out, err = run("users", "add", "x" * 256, "-c", str(config), input="pw\npw\n")
    assert code == 2
    assert "longer than 255" in err
    assert "Password" not in out


def test_adding_an_existing_user_changes_its_password_and_says_so(config: Path) -> None:
    run("users", "add", "alice", "--password-stdin", "-c", str(config), input="old\n")
    code, out, _ = run("users", "add", "alice", "--password-stdin", "-c", str(config), input="new\n")
    assert code == 0
    assert out.strip() == "password changed for alice"
    store = UserStore.load(users_file(config))
    assert store.names() == ["alice"]
    assert store.verify("alice", "new")


def test_list_prints_one_name_per_line_and_never_hashes(config: Path) -> None:
    for name in ("bob", "alice@example.test"):
        run("users", "add", name, "--password-stdin", "-c", str(config), input="pw\n")
    code, out, _ = run("users", "list", "-c", str(config))
    assert code == 0
    assert out == "alice@example.test\nbob\n"
    assert "scrypt" not in out


def test_list_without_accounts_prints_nothing_and_says_so_on_stderr(config: Path) -> None:
    code, out, err = run("users", "list", "-c", str(config))
    assert code == 0
    assert out == ""
    assert "no accounts" in err


def test_remove_deletes_the_account(config: Path) -> None:
    run("users", "add", "alice", "--password-stdin", "-c", str(config), input="pw\n")
    run("users", "add", "bob", "--password-stdin", "-c", str(config), input="pw\n")
    code, out, _ = run("users", "remove", "alice", "-c", str(config))
    assert code == 0
    assert out.strip() == "removed alice"
    assert UserStore.load(users_file(config)).names() == ["bob"]


def test_remove_of_an_unknown_user_exits_1(config: Path) -> None:
    run("users", "add", "alice", "--password-stdin", "-c", str(config), input="pw\n")
    code, _, err = run("users", "remove", "Alice", "-c", str(config))
    assert code == 1
    assert "no such user: Alice" in err
    assert "users list" in err
    assert UserStore.load(users_file(config)).names() == ["alice"]


def test_users_file_path_from_the_config_is_honoured(tmp_path: Path) -> None:
    cfg = tmp_path / "smtpsvc.toml"
    cfg.write_text('[auth]\nusers_file = "private/accounts.toml"\n')
    code, _, _ = run("users", "add", "alice", "--password-stdin", "-c", str(cfg), input="pw\n")
    assert code == 0
    assert UserStore.load(tmp_path / "private" / "accounts.toml").names() == ["alice"]


def test_without_a_config_the_file_is_in_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, _ = run("users", "add", "alice", "--password-stdin", input="pw\n")
    assert code == 0
    assert UserStore.load(tmp_path / "users.toml").names() == ["alice"]


def test_a_broken_users_file_exits_1_with_file_line_and_advice(config: Path) -> None:
    users_file(config).write_text(
        f'{FILE_HEADER}\n[users.alice]\nhash = "{hash_password("pw", n=16, r=1, p=1)}"\n'
        '[users.bob]\nhash = "plaintext"\n'
    )
    for args in (["list"], ["remove", "alice"], ["add", "carol", "--password-stdin"]):
        code, _, err = run("users", *args, "-c", str(config), input="pw\n")
        assert code == 1, args
        assert f"{users_file(config)}:5: " in err
        assert "Traceback" not in err


def test_a_broken_config_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "smtpsvc.toml"
    cfg.write_text("[auth]\nusers_fil = 'x'\n")
    code, _, err = run("users", "list", "-c", str(cfg))
    assert code == 2
    assert "users_fil" in err


def test_an_empty_users_file_setting_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "smtpsvc.toml"
    cfg.write_text('[auth]\nusers_file = ""\n')
    code, _, err = run("users", "list", "-c", str(cfg))
    assert code == 2
    assert "users_file is empty" in err


def test_a_failed_write_exits_1_with_advice_and_no_traceback(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(src: object, dst: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", refuse)
    code, _, err = run("users", "add", "alice", "--password-stdin", "-c", str(config), input="pw\n")
    assert code == 1
    assert f"cannot write {users_file(config)}: Permission denied" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in config.parent.iterdir()) == ["smtpsvc.toml"]


def test_users_help_lists_the_three_commands() -> None:
    code, out, _ = run("users", "--help")
    assert code == 0
    for verb in ("add", "remove", "list"):
        assert verb in out
