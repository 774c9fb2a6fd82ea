"""[oauth.NAME] profiles in smtpsvc.toml: provider defaults, every problem with its line and what to do,
and `config show` with file paths only."""

from __future__ import annotations

from pathlib import Path

import pytest

from smtpsvc.config import ConfigError, ConfigProblem, load_config, render_effective
from tests.test_config import load, only_problem, problems, write

M365 = """\
[oauth.m365]
provider = "microsoft"
tenant = "contoso.onmicrosoft.com"
client_id = "app-id"
client_secret_file = "/etc/smtpsvc/m365.secret"
"""


def test_microsoft_defaults_scope_and_token_url(tmp_path: Path) -> None:
    profile = load(tmp_path, M365).oauth["m365"]
    assert profile.scope == "https://outlook.office365.com/.default"
    assert profile.token_url == "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
    assert profile.grant == "client_credentials"


def test_google_defaults_scope_and_token_url(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        """\
        [oauth.gmail]
        provider = "google"
        client_id = "123.apps.googleusercontent.com"
        client_secret_file = "/etc/smtpsvc/google.secret"
        refresh_token_file = "/var/lib/smtpsvc/google.refresh"
        """,
    )
    profile = cfg.oauth["gmail"]
    assert (profile.scope, profile.token_url) == (
        "https://mail.google.com/",
        "https://oauth2.googleapis.com/token",
    )
    assert profile.grant == "refresh_token"


def test_a_national_cloud_overrides_token_url_with_the_tenant_placeholder(tmp_path: Path) -> None:
    text = M365 + 'token_url = "https://login.microsoftonline.us/{tenant}/oauth2/v2.0/token"\n'
    text += 'scope = "https://outlook.office365.us/.default"\n'
    profile = load(tmp_path, text).oauth["m365"]
    assert profile.token_url == "https://login.microsoftonline.us/contoso.onmicrosoft.com/oauth2/v2.0/token"
    assert profile.scope == "https://outlook.office365.us/.default"


def test_several_profiles(tmp_path: Path) -> None:
    text = M365 + M365.replace("[oauth.m365]", "[oauth.fabrikam]").replace("contoso", "fabrikam")
    assert list(load(tmp_path, text).oauth) == ["m365", "fabrikam"]


@pytest.mark.parametrize(
    ("text", "line", "key", "problem"),
    [
        (
            M365.replace('provider = "microsoft"', 'provider = "microsft"'),
            2,
            "oauth.m365.provider",
            'expected one of "microsoft", "google", "generic"',
        ),
        (M365 + 'client_secret = "x"\n', 6, "oauth.m365.client_secret", 'did you mean "client_secret_file"?'),
        (M365.replace('provider = "microsoft"\n', ""), 1, "oauth.m365.provider", 'missing "provider"'),
        (M365.replace('client_id = "app-id"\n', ""), 1, "oauth.m365.client_id", 'missing "client_id"'),
        (
            M365.replace('tenant = "contoso.onmicrosoft.com"\n', ""),
            1,
            "oauth.m365.tenant",
            'missing "tenant"',
        ),
        (
            M365.replace('client_secret_file = "/etc/smtpsvc/m365.secret"\n', ""),
            1,
            "oauth.m365",
            "no credential: set client_secret_file, or certificate_file + key_file, or refresh_token_file",
        ),
        (
            M365.replace("client_secret_file", "certificate_file"),
            5,
            "oauth.m365.certificate_file",
            "certificate_file is set but key_file is not",
        ),
        (
            M365 + 'certificate_file = "c.pem"\nkey_file = "k.pem"\n',
            6,
            "oauth.m365.certificate_file",
            "set client_secret_file or certificate_file + key_file, not both",
        ),
        (
            M365 + 'token_url = "http://login.example/token"\n',
            6,
            "oauth.m365.token_url",
            "must be an https:// URL",
        ),
        (
            M365 + 'token_url = "https://:443/token"\n',
            6,
            "oauth.m365.token_url",
            "must be an https:// URL",
        ),
        (
            M365.replace('"microsoft"', '"generic"'),
            1,
            "oauth.m365.scope",
            'missing "scope" (required with provider = "generic")',
        ),
        (
            M365.replace('"microsoft"', '"google"'),
            1,
            "oauth.m365.refresh_token_file",
            "Google gives mail access through the refresh-token grant",
        ),
        ('[oauth]\nprovider = "microsoft"\n', 1, "oauth", "name the profile: [oauth.NAME]"),
    ],
    ids=[
        "provider-typo",
        "unknown-key",
        "no-provider",
        "no-client-id",
        "no-tenant",
        "no-credential",
        "certificate-without-key",
        "secret-and-certificate",
        "plain-http",
        "no-host",
        "generic-needs-scope",
        "google-needs-refresh-token",
        "unnamed",
    ],
)
def test_problems(tmp_path: Path, text: str, line: int, key: str, problem: str) -> None:
    found = problems(tmp_path, text)
    first = found[0]
    assert (first.line, first.key) == (line, key), found
    assert problem in first.problem, first


def test_generic_needs_scope_and_token_url(tmp_path: Path) -> None:
    found = problems(tmp_path, M365.replace('"microsoft"', '"generic"'))
    assert {p.key for p in found} == {"oauth.m365.scope", "oauth.m365.token_url"}


def test_profiles_cannot_come_from_the_environment(tmp_path: Path) -> None:
    found = only_problem(tmp_path, "", env={"SMTPSVC__OAUTH__M365": "x"})
    assert found == ConfigProblem(
        "$SMTPSVC__OAUTH__M365",
        None,
        "oauth.m365",
        "[oauth.NAME] profiles cannot be set from the environment; use the config file",
    )


def test_config_show_lists_file_paths_and_loads_back(tmp_path: Path) -> None:
    cfg = load(tmp_path, M365 + 'ca_file = "/etc/smtpsvc/private-ca.pem"\n')
    shown = render_effective(cfg)
    assert "[oauth.m365]" in shown
    assert 'client_secret_file = "/etc/smtpsvc/m365.secret"' in shown
    again = load_config(write(tmp_path, shown), {})
    assert again.oauth == cfg.oauth


def test_a_profile_that_is_not_a_table(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, 'oauth = { m365 = "x" }\n')
    assert "expected a table [oauth.m365]" in str(caught.value)


def test_every_problem_of_a_profile_is_reported_at_once(tmp_path: Path) -> None:
    text = '[oauth.m365]\nprovider = "microsoft"\nclient_id = "app"\n'
    text += 'certificate_file = "c.pem"\nclient_secret = "x"\n'
    found = [(p.line, p.key) for p in problems(tmp_path, text)]
    assert found == [
        (1, "oauth.m365.tenant"),
        (4, "oauth.m365.certificate_file"),
        (5, "oauth.m365.client_secret"),
    ]
