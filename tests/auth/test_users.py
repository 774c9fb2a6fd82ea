"""The SMTP AUTH accounts file: scrypt hashes, verifying, load errors with lines, atomic save, users_path."""

from __future__ import annotations

import json
import os
import re
import stat
import time
from pathlib import Path

import pytest

from smtpsvc.auth.users import (
    FILE_HEADER,
    MAX_N,
    UsersFileError,
    UserStore,
    hash_password,
    users_path,
    verify_password,
)
from smtpsvc.config import load_config

# Cheap parameters keep the tests fast; the defaults are exercised where the cost itself matters.
FAST = {"n": 2**4, "r": 1, "p": 1}
GOOD = "scrypt$n=16,r=1,p=1$c2FsdHNhbHRzYWx0c2FsdA==$" + "A" * 43 + "="


@pytest.fixture
def fast_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make UserStore.add hash with cheap parameters (the format and verification path are unchanged)."""
    import smtpsvc.auth.users as users

    original = users.hash_password
    monkeypatch.setattr(users, "hash_password", lambda password: original(password, **FAST))


# --------------------------------------------------------------------------------------------- hashes


def test_hash_has_the_documented_format_with_default_parameters() -> None:
    encoded = hash_password("s3cret")
    assert re.fullmatch(r"scrypt\$n=16384,r=8,p=1\$[A-Za-z0-9+/=]{24}\$[A-Za-z0-9+/=]{44}", encoded)


def test_hash_verifies_its_password_and_nothing_else() -> None:
    encoded = hash_password("correct horse", **FAST)
    assert verify_password("correct horse", encoded)
    assert not verify_password("correct hors", encoded)
    assert not verify_password("Correct horse", encoded)


def test_same_password_gets_a_different_salt_each_time() -> None:
    assert hash_password("pw", **FAST) != hash_password("pw", **FAST)


def test_parameters_are_read_from_the_hash_so_they_can_be_raised_later() -> None:
    stronger = hash_password("pw", n=2**5, r=2, p=2)
    assert stronger.startswith("scrypt$n=32,r=2,p=2$")
    assert verify_password("pw", stronger)


def test_non_ascii_passwords_work() -> None:
    assert verify_password("pässwörd ✓", hash_password("pässwörd ✓", **FAST))


@pytest.mark.parametrize(
    ("password", "kwargs"),
    [
        ("", {}),
        ("x" * 1025, {}),
        ("pw", {"n": 1000}),  # not a power of 2
        ("pw", {"n": MAX_N * 2}),
        ("pw", {"r": 0}),
        ("pw", {"p": 99}),
        ("pw", {"n": 2**19, "r": 8}),  # 512 MiB
    ],
)
def test_hash_password_refuses_bad_input(password: str, kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        hash_password(password, **kwargs)


def test_longest_password_is_accepted() -> None:
    assert verify_password("x" * 1024, hash_password("x" * 1024, **FAST))


@pytest.mark.parametrize(
    "encoded",
    [
        "",
        "plain-text-password",
        "argon2id$v=19$m=65536,t=3,p=4$c2FsdA$a2V5",
        GOOD.replace("scrypt$", "bcrypt$"),
        GOOD.replace("n=16", "n=15"),  # not a power of 2
        GOOD.replace("n=16", "n=1"),
        GOOD.replace("n=16", "n=33554432"),  # over MAX_N: a tampered file must not make us burn memory
        GOOD.replace("r=1", "r=64"),
        GOOD.replace("p=1", "p=999"),
        GOOD.replace("n=16,r=1", "n=1048576,r=8"),  # 1 GiB
        GOOD.replace("c2FsdHNhbHRzYWx0c2FsdA==", "not*base64"),
        GOOD.replace("c2FsdHNhbHRzYWx0c2FsdA==", "c2FsdA=="),  # 4-byte salt
        GOOD.rsplit("$", 1)[0] + "$AAAA",  # 3-byte key
        GOOD + "$extra",
        GOOD.replace("$", "$ ", 1),
    ],
)
def test_malformed_or_out_of_range_hash_is_false_never_an_exception(encoded: str) -> None:
    assert verify_password("pw", encoded) is False


def test_unusable_passwords_never_verify() -> None:
    encoded = hash_password("pw", **FAST)
    assert not verify_password("", encoded)
    assert not verify_password("\udcff", encoded)  # a lone surrogate (undecodable client bytes)


# --------------------------------------------------------------------------------------------- the store


def test_missing_file_is_an_empty_store(tmp_path: Path) -> None:
    store = UserStore.load(tmp_path / "users.toml")
    assert not store.has_users
    assert store.names() == []
    assert not store.verify("alice", "pw")


def test_add_save_load_verify_round_trip(tmp_path: Path, fast_hashes: None) -> None:
    file = tmp_path / "users.toml"
    store = UserStore()
    assert store.add("bob@example.test", "pw-bob") is False
    assert store.add("alice@example.test", "pw-alice") is False
    store.save(file)
    again = UserStore.load(file)
    assert again.has_users
    assert again.names() == ["alice@example.test", "bob@example.test"]
    assert again.verify("alice@example.test", "pw-alice")
    assert not again.verify("alice@example.test", "pw-bob")
    assert not again.verify("carol@example.test", "pw-alice")


def test_names_are_case_sensitive(fast_hashes: None) -> None:
    store = UserStore()
    store.add("Alice", "pw")
    assert store.verify("Alice", "pw")
    assert not store.verify("alice", "pw")


def test_adding_an_existing_user_replaces_the_password_and_keeps_created(fast_hashes: None) -> None:
    store = UserStore()
    store.add("alice", "old")
    created = store.render().split("created = ")[1]
    assert store.add("alice", "new") is True
    assert store.verify("alice", "new")
    assert not store.verify("alice", "old")
    assert store.render().split("created = ")[1] == created


def test_remove_says_whether_the_user_existed(fast_hashes: None) -> None:
    store = UserStore()
    store.add("alice", "pw")
    assert store.remove("alice") is True
    assert store.remove("alice") is False
    assert not store.has_users


@pytest.mark.parametrize("name", ["", "x" * 256, "bad\nname", "tab\there", "del\x7f", "c1\x85"])
def test_add_refuses_bad_names(name: str) -> None:
    with pytest.raises(ValueError):
        UserStore().add(name, "pw")


@pytest.mark.parametrize("password", ["", "x" * 1025])
def test_add_refuses_bad_passwords(password: str) -> None:
    with pytest.raises(ValueError):
        UserStore().add("alice", password)


def test_odd_but_valid_names_survive_the_file(tmp_path: Path, fast_hashes: None) -> None:
    names = ['quote"d', "back\\slash", "dot.ted name", "ünï@exämple.test", "x" * 255, "emoji😀"]
    store = UserStore()
    for name in names:
        store.add(name, "pw")
    store.save(tmp_path / "users.toml")
    again = UserStore.load(tmp_path / "users.toml")
    assert again.names() == sorted(names)
    assert all(again.verify(name, "pw") for name in names)


def test_saved_file_has_the_header_the_layout_and_no_plain_password(
    tmp_path: Path, fast_hashes: None
) -> None:
    file = tmp_path / "users.toml"
    store = UserStore()
    store.add("alice@example.test", "hunter2-plain")
    store.save(file)
    text = file.read_text()
    assert text.startswith(FILE_HEADER + "\n")
    assert '[users."alice@example.test"]\nhash = "scrypt$n=16,r=1,p=1$' in text
    assert re.search(r'^created = "\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"$', text, re.M)
    assert "hunter2-plain" not in text


@pytest.mark.skipif(os.name != "posix", reason="POSIX modes")
def test_save_writes_mode_0600_atomically_and_leaves_no_temp_file(tmp_path: Path, fast_hashes: None) -> None:
    file = tmp_path / "users.toml"
    file.write_text(FILE_HEADER + "\n")
    file.chmod(0o644)
    store = UserStore()
    store.add("alice", "pw")
    store.save(file)
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users.toml"]


def test_save_creates_a_missing_folder(tmp_path: Path, fast_hashes: None) -> None:
    file = tmp_path / "etc" / "smtpsvc" / "users.toml"
    store = UserStore()
    store.add("alice", "pw")
    store.save(file)
    assert UserStore.load(file).names() == ["alice"]


def test_failed_save_keeps_the_old_file_and_removes_the_temp_file(
    tmp_path: Path, fast_hashes: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = tmp_path / "users.toml"
    store = UserStore()
    store.add("alice", "pw")
    store.save(file)
    before = file.read_text()
    store.add("bob", "pw")

    def fail(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        store.save(file)
    assert file.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users.toml"]


def test_repr_never_shows_hashes(fast_hashes: None) -> None:
    store = UserStore()
    store.add("alice", "pw")
    assert "scrypt" not in repr(store)
    assert "alice" not in repr(store)


def test_hand_written_file_with_comments_and_unquoted_datetime_loads(tmp_path: Path) -> None:
    file = tmp_path / "users.toml"
    file.write_text(
        f'# my accounts\n[users.alice]\nhash = "{hash_password("pw", **FAST)}"\n'
        'created = 2026-11-22T17:00:00Z\n\n[users."bob@example.test"]  # no created\n'
        f'hash = "{hash_password("pw2", **FAST)}"\n'
    )
    store = UserStore.load(file)
    assert store.names() == ["alice", "bob@example.test"]
    assert store.verify("bob@example.test", "pw2")
    assert 'created = "2026-11-22T17:00:00Z"' in store.render()


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        ('[users."alice"\nhash = "x"\n', 1, "invalid TOML"),
        ('# header\n\n[users.alice]\nhash = "x\n', 4, "invalid TOML"),
        (
            f'[users.alice]\nhash = "{GOOD}"\n\n[users.bob]\ncreated = "2026-01-01T00:00:00Z"\n',
            4,
            "hash is missing",
        ),
        (f'[users.alice]\nhash = "{GOOD}"\n[users.bob]\nhash = "plain"\n', 4, 'bob": hash: not an scrypt'),
        (
            '[users.alice]\nhash = "' + GOOD.replace("n=16", "n=33554432") + '"\n',
            2,
            "scrypt parameters out of range",
        ),
        (f'[users.alice]\nhash = "{GOOD}"\npassword = "plain"\n', 3, 'unknown key "password"'),
        (f'[users.alice]\nhash = "{GOOD}"\ncreated = 5\n', 3, "created must be a date-time"),
        (f'[users."bad\\u0007name"]\nhash = "{GOOD}"\n', 1, "control character"),
        ('[users]\nalice = "x"\n', None, "must be a table"),
        ('users = "x"\n', None, "users must be tables"),
        ('[accounts.alice]\nhash = "x"\n', None, 'unknown key "accounts"'),
    ],
)
def test_bad_files_raise_users_file_error_with_the_line(
    tmp_path: Path, text: str, line: int | None, problem: str
) -> None:
    file = tmp_path / "users.toml"
    file.write_text(text)
    with pytest.raises(UsersFileError) as caught:
        UserStore.load(file)
    assert caught.value.line == line
    assert problem in caught.value.problem
    assert caught.value.path == str(file)
    where = str(file) if line is None else f"{file}:{line}"
    assert str(caught.value).startswith(f"{where}: ")


def test_non_utf8_file_is_a_users_file_error(tmp_path: Path) -> None:
    file = tmp_path / "users.toml"
    file.write_bytes(b"# ok\n[users.\xff]\n")
    with pytest.raises(UsersFileError) as caught:
        UserStore.load(file)
    assert caught.value.line == 2


def test_a_folder_instead_of_a_file_is_a_users_file_error(tmp_path: Path) -> None:
    with pytest.raises(UsersFileError, match="is a folder"):
        UserStore.load(tmp_path)


def test_load_is_cheap_enough_for_sighup(tmp_path: Path) -> None:
    file = tmp_path / "users.toml"
    entry = hash_password("pw")  # default (expensive) parameters: load must not hash
    file.write_text(FILE_HEADER + "\n" + "".join(f'[users."u{i}"]\nhash = "{entry}"\n' for i in range(500)))
    start = time.perf_counter()
    store = UserStore.load(file)
    assert time.perf_counter() - start < 1.0
    assert len(store.names()) == 500


def test_unknown_user_costs_about_as_much_as_a_known_one() -> None:
    store = UserStore()
    store.add("alice", "pw")  # default parameters: the real cost
    timings: dict[str, float] = {"alice": float("inf"), "nobody": float("inf")}
    for _ in range(3):  # interleaved, best of three: robust against a busy machine
        for name in timings:
            start = time.perf_counter()
            store.verify(name, "wrong")
            timings[name] = min(timings[name], time.perf_counter() - start)
    assert timings["nobody"] > timings["alice"] * 0.5
    assert timings["nobody"] < timings["alice"] * 2.0


# --------------------------------------------------------------------------------------------- users_path


def test_users_path_is_relative_to_the_config_file_folder(tmp_path: Path) -> None:
    cfg = tmp_path / "conf" / "smtpsvc.toml"
    cfg.parent.mkdir()
    cfg.write_text('[auth]\nusers_file = "secrets/users.toml"\n')
    assert users_path(load_config(cfg, {}), cfg) == tmp_path / "conf" / "secrets" / "users.toml"


def test_users_path_without_a_config_file_is_relative_to_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert users_path(load_config(None, {}), None) == tmp_path / "users.toml"


def test_users_path_keeps_an_absolute_path(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere" / "accounts.toml"
    cfg = tmp_path / "smtpsvc.toml"
    cfg.write_text(f"[auth]\nusers_file = {json.dumps(str(target))}\n")
    assert users_path(load_config(cfg, {}), cfg) == target


def test_users_path_with_a_relative_config_path_is_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "smtpsvc.toml").write_text("")
    monkeypatch.chdir(tmp_path)
    found = users_path(load_config("conf/smtpsvc.toml", {}), "conf/smtpsvc.toml")
    assert found == tmp_path / "conf" / "users.toml"
    assert found.is_absolute()


def test_users_path_refuses_an_empty_setting(tmp_path: Path) -> None:
    cfg = tmp_path / "smtpsvc.toml"
    cfg.write_text('[auth]\nusers_file = ""\n')
    with pytest.raises(ValueError, match="users_file is empty"):
        users_path(load_config(cfg, {}), cfg)
