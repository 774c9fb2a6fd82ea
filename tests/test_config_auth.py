"""Outbound AUTH tables (issue 15): `delivery.smart_host_auth` and a connector's `auth`, with `mechanism` and
`oauth`: what loads, what is refused and how it says so, what `config show` prints."""

from __future__ import annotations

from pathlib import Path

import pytest

from smtpsvc.config import (
    Config,
    ConfigError,
    ConnectorAuth,
    auth_oauth_problems,
    load_config,
    render_effective,
)


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Config:
    path = tmp_path / "smtpsvc.toml"
    path.write_text(text, encoding="utf-8")
    return load_config(path, env or {})


# The profiles the tables below name (an `oauth` naming none is refused: see the cross-check tests).
PROFILES = """
[oauth.m365]
provider = "microsoft"
tenant = "contoso.onmicrosoft.com"
client_id = "11111111-1111-1111-1111-111111111111"
client_secret_file = "m365.secret"

[oauth.google]
provider = "google"
client_id = "1234567890-abc.apps.googleusercontent.com"
client_secret_file = "google.secret"
refresh_token_file = "google.refresh"
"""


def test_the_smart_host_has_no_auth_by_default(tmp_path: Path) -> None:
    assert load(tmp_path, "").delivery.smart_host_auth == ConnectorAuth("", "", "auto", "")


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ('{ user = "relay", password_file = "/etc/smtpsvc/isp.pw" }',
         ConnectorAuth("relay", "/etc/smtpsvc/isp.pw", "auto", "")),
        ('{ user = "relay", password_file = "isp.pw", mechanism = "LOGIN" }',
         ConnectorAuth("relay", "isp.pw", "login", "")),
        ('{ mechanism = "xoauth2", user = "relay@contoso.com", oauth = "m365" }',
         ConnectorAuth("relay@contoso.com", "", "xoauth2", "m365")),
        ('{ mechanism = "oauthbearer", user = "relay@example.com", oauth = "google" }',
         ConnectorAuth("relay@example.com", "", "oauthbearer", "google")),
    ],
)  # fmt: skip
def test_smart_host_auth_and_connector_auth_take_the_same_table(
    tmp_path: Path, table: str, expected: ConnectorAuth
) -> None:
    cfg = load(
        tmp_path,
        f'[delivery]\nsmart_host = "smtp.office365.com:587"\nsmart_host_auth = {table}\n\n'
        f'[[connector]]\nname = "c"\naddress_spaces = ["*"]\nauth = {table}\n\n' + PROFILES,
    )
    assert cfg.delivery.smart_host_auth == expected
    assert cfg.connectors[0].auth == expected


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('{ mechanism = "xoauth2", user = "relay@contoso.com" }', 'needs oauth, the name of an [oauth.NAME]'),
        ('{ mechanism = "xoauth2", oauth = "m365" }', "needs user, the mailbox to log in as"),
        ('{ mechanism = "xoauth2", user = "r@contoso.com", oauth = "m365", password_file = "p" }',
         "password_file is not used with"),
        ('{ user = "relay@contoso.com", oauth = "m365" }', 'needs mechanism = "xoauth2"'),
        ('{ mechanism = "plain" }', 'mechanism = "plain" needs user and password_file'),
        ('{ user = "relay" }', "user is set but password_file is not"),
        ('{ mechanism = "cram-md5", user = "u", password_file = "p" }', 'expected one of "auto", "plain"'),
        ('{ user = "u", password_file = "p", mechanisms = "plain" }', 'did you mean "mechanism"'),
    ],
)  # fmt: skip
def test_a_wrong_auth_table_is_refused_with_what_to_write(tmp_path: Path, table: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, f"[delivery]\nsmart_host_auth = {table}\n")
    [problem] = caught.value.problems
    assert problem.key == "delivery.smart_host_auth" and problem.line == 2
    assert message in problem.problem


def test_config_show_names_the_mechanism_and_profile_and_never_the_password(tmp_path: Path) -> None:
    secret = tmp_path / "isp.pw"
    secret.write_text("Sup3rSecret!\n")
    cfg = load(
        tmp_path,
        f'[delivery]\nsmart_host_auth = {{ user = "relay", password_file = "{secret}" }}\n\n'
        '[[connector]]\nname = "m365"\naddress_spaces = ["*"]\n'
        'auth = { mechanism = "xoauth2", user = "relay@contoso.com", oauth = "m365" }\n\n' + PROFILES,
    )
    shown = render_effective(cfg)
    assert f'smart_host_auth = {{ user = "relay", password_file = "{secret}" }}' in shown
    assert (
        'auth = { user = "relay@contoso.com", password_file = "", mechanism = "xoauth2", oauth = "m365" }'
        in shown
    )
    assert "Sup3rSecret" not in shown
    assert load(tmp_path, shown).connectors[0].auth == cfg.connectors[0].auth  # it loads back


def test_an_environment_override_sets_smart_host_auth(tmp_path: Path) -> None:
    env = {"SMTPSVC__DELIVERY__SMART_HOST_AUTH": '{ user = "relay", password_file = "/run/isp.pw" }'}
    assert load(tmp_path, "", env).delivery.smart_host_auth == ConnectorAuth("relay", "/run/isp.pw")


def test_an_oauth_name_without_its_profile_is_refused_naming_the_known_ones(tmp_path: Path) -> None:
    tables = (
        '[delivery]\nsmart_host_auth = { mechanism = "xoauth2", user = "a@contoso.com", oauth = "m365" }\n\n'
        '[[connector]]\nname = "ok"\naddress_spaces = ["a.test"]\n'
        'auth = { mechanism = "xoauth2", user = "b@contoso.com", oauth = "m365" }\n\n'
        '[[connector]]\nname = "typo"\naddress_spaces = ["*"]\n'
        'auth = { mechanism = "oauthbearer", user = "c@example.com", oauth = "gogle" }\n'
    )
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, tables + PROFILES)
    problems = str(caught.value)
    assert (
        'connector[2].auth: oauth = "gogle" names no [oauth.gogle] profile; known: google, m365' in problems
    )
    assert "smart_host_auth" not in problems and "connector[1]" not in problems
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, tables)
    assert (
        'delivery.smart_host_auth: oauth = "m365" names no [oauth.m365] profile; '
        "there is no [oauth.NAME] profile" in str(caught.value)
    )
    assert (
        auth_oauth_problems(load(tmp_path, tables.replace("gogle", "google") + PROFILES), {"m365", "google"})
        == []
    )
