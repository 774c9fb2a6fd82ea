"""`smtpsvc import iis`, run as the administrator runs it: the fixtures (fixtures/MetaBase.xml, an IIS 6
metabase, and fixtures/iis7-export.json, the same virtual server as IIS 7+'s WMI export) become a TOML that
`smtpsvc config check` accepts and whose effective settings are those of the IIS server; bad input gives one
line and exit 2, never a traceback.

fixtures/iis7-export.json is what `Get-CimInstance -Namespace root\\MicrosoftIISv2 -ClassName
IIsSmtpServerSetting` and `... IIsSmtpDomainSetting` give through `ConvertTo-Json`, gathered under the two
class names: property names and types as the IIS 6.0 SDK lists them for the WMI classes IIsSmtpServerSetting
and IIsSmtpDomainSetting (SINT32 for DWORDs, so RelayForAuth's -1; `array of uint8` for RelayIpList and
IPSecurity; ServerBindings as ServerBinding objects with IP, Port and Hostname), plus the CimClass /
CimInstanceProperties / CimSystemProperties members ConvertTo-Json adds. The values are those of
fixtures/MetaBase.xml (see the comment at its top for where each comes from).
"""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from smtpsvc import cli
from smtpsvc.config import Config, load_config
from smtpsvc.migrate.iis import Credential
from tests.migrate.ipsecbuild import build

FIXTURES = Path(__file__).parent / "fixtures"
METABASE = FIXTURES / "MetaBase.xml"
EXPORT = FIXTURES / "iis7-export.json"

# The properties issue 17 lists, each carried into a key whose comment names it (or into the report).
LISTED = [
    "ServerBindings",
    "FullyQualifiedDomainName",
    "DefaultDomain",
    "MasqueradeDomain",
    "SmartHost",
    "SmartHostType",
    "RemoteSmtpPort",
    "RouteUserName",
    "SmtpRemoteProgressiveRetry",
    "SmtpRemoteDelayExpireMinutes",
    "SmtpRemoteNDRExpireMinutes",
    "SmtpLocalDelayExpireMinutes",
    "SmtpLocalNDRExpireMinutes",
    "PickupDirectory",
    "QueueDirectory",
    "DropDirectory",
    "BadMailDirectory",
    "SendNdrTo",
    "SendBadTo",
    "MaxMessageSize",
    "MaxSessionSize",
    "MaxRecipients",
    "HopCount",
    "MaxOutConnections",
    "MaxOutConnectionsPerDomain",
    "AuthFlags",
    "RelayForAuth",
    "AlwaysUseSsl",
    "SmtpInboundCommandSupportOptions",
    "SmtpOutboundCommandSupportOptions",
    "RouteAction",
    "RelayIpList",
    "IPSecurity",
]


def smtpsvc(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "smtpsvc", *args],
        input=stdin.decode(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def effective(cfg: Config) -> dict[str, Any]:
    """The settings the import is meant to set, as plain values."""
    d, s = cfg.delivery, cfg.server
    return {
        "listen": list(s.listen),
        "hostname": s.hostname,
        "masquerade_domain": s.masquerade_domain,
        "mask": s.inbound_command_support_options,
        "max_message_size": s.max_message_size,
        "max_session_size": s.max_session_size,
        "max_recipients": s.max_recipients,
        "max_hop_count": s.max_hop_count,
        "connection_timeout": s.connection_timeout,
        "local": list(cfg.domains.local),
        "remote": [(r.name, r.relay, r.route) for r in cfg.domains.remote],
        "relay_allow": [str(n) for n in cfg.relay.allow],
        "relay_deny": [str(n) for n in cfg.relay.deny],
        "connection_allow": [str(n) for n in cfg.connection.allow],
        "connection_deny": [str(n) for n in cfg.connection.deny],
        "allow_authenticated": cfg.relay.allow_authenticated,
        "mechanisms": list(cfg.auth.mechanisms),
        "smart_host": [str(h) for h in d.smart_host],
        "smart_host_type": d.smart_host_type,
        "smart_host_auth_user": d.smart_host_auth.user,
        "remote_port": d.remote_port,
        "retry": list(d.retry),
        "delay_notification": d.delay_notification,
        "expiration": d.expiration,
        "send_ndr_copy_to": d.send_ndr_copy_to,
        "max_connections": d.max_connections,
        "max_connections_per_domain": d.max_connections_per_domain,
        "tls": d.tls,
        "connectors": [
            (c.name, list(c.address_spaces), [str(h) for h in c.smart_hosts], c.tls, c.use_helo, c.auth.user)
            for c in cfg.connectors
        ],
    }


EXPECTED = {
    "listen": [("0.0.0.0", 25), ("192.0.2.1", 587)],
    "hostname": "mail.example.com",
    "masquerade_domain": "example.com",
    "mask": 3503297,
    "max_message_size": 10485760,
    "max_session_size": 52428800,
    "max_recipients": 500,
    "max_hop_count": 30,
    "connection_timeout": 600.0,
    "local": ["example.com", "alias.example.com"],
    "remote": [
        ("legacy.test", False, "legacy.test"),
        ("partner.test", True, "partner.test"),
        ("relayonly.test", True, ""),
    ],
    "relay_allow": ["127.0.0.1/32", "192.0.2.77/32", "192.0.2.0/24", "198.51.100.0/22"],
    "relay_deny": [],
    "connection_allow": [],
    "connection_deny": ["203.0.113.0/24", "198.51.100.7/32", "10.0.0.0/8"],  # IPSecurity
    "allow_authenticated": True,
    "mechanisms": ["PLAIN", "LOGIN"],
    "smart_host": ["[192.0.2.25]"],
    "smart_host_type": "after_direct",
    "smart_host_auth_user": "isp-relay",
    "remote_port": 2525,
    "retry": [600.0, 1200.0, 1800.0, 3600.0],
    "delay_notification": 720 * 60.0,
    "expiration": 2880 * 60.0,
    "send_ndr_copy_to": "postmaster@example.com",
    "max_connections": 500,
    "max_connections_per_domain": 50,
    "tls": "required",
    "connectors": [
        ("legacy.test", ["legacy.test"], [], "opportunistic", True, ""),
        ("partner.test", ["partner.test"], ["[192.0.2.50]"], "required", False, "partner-relay"),
    ],
}


def _plain_list(tmp_path: Path) -> Path:
    """The export as one JSON list of both kinds of objects (told apart by Name), UTF-16 as PowerShell 5's
    `> file` writes it."""
    document = json.loads(EXPORT.read_text())
    items = [document["IIsSmtpServerSetting"], *document["IIsSmtpDomainSetting"]]
    path = tmp_path / "export-list.json"
    path.write_bytes(json.dumps(items).encode("utf-16"))
    return path


@pytest.mark.parametrize("source", ["metabase", "export", "plain-list-utf16"])
def test_each_listed_property_is_imported_into_a_configuration_config_check_accepts(
    tmp_path: Path, source: str
) -> None:
    path = {"metabase": METABASE, "export": EXPORT}.get(source) or _plain_list(tmp_path)
    out = tmp_path / "smtpsvc.toml"
    done = smtpsvc("import", "iis", str(path), "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    check = smtpsvc("config", "check", "-c", str(out))
    assert check.returncode == 0, check.stderr
    assert effective(load_config(out, {})) == EXPECTED
    text = out.read_text()
    for prop in LISTED:
        assert prop in text, f"{prop} is neither a key's source nor in the report"


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fixtures/MetaBase.xml imported once for the tests that only read the result."""
    out = tmp_path_factory.mktemp("imported") / "smtpsvc.toml"
    done = smtpsvc("import", "iis", str(METABASE), "-o", str(out))
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.parametrize(
    ("client", "decision"),
    [
        ("127.0.0.1", "accepted"),
        ("192.0.2.5", "accepted"),
        ("198.51.100.9", "accepted"),
        ("192.0.2.77", "accepted"),
        ("203.0.113.5", "refused"),
    ],
)
def test_the_imported_relay_list_decides_as_iis_did(imported: Path, client: str, decision: str) -> None:
    done = smtpsvc(
        "relay", "check", "-c", str(imported), "--client", client, "--rcpt", "someone@elsewhere.test"
    )
    assert done.returncode == 0, done.stderr
    assert f"decision: {decision}" in done.stdout


@pytest.mark.parametrize(
    ("client", "verdict"),
    [
        ("192.0.2.5", "accepted (not in connection.deny)"),
        ("127.0.0.1", "accepted (not in connection.deny)"),
        ("203.0.113.5", "refused"),
        ("198.51.100.7", "refused"),
        ("198.51.100.8", "accepted"),
        ("10.20.30.40", "refused"),
    ],
)
def test_the_imported_connection_control_decides_as_iis_did(
    imported: Path, client: str, verdict: str
) -> None:
    done = smtpsvc("relay", "check", "-c", str(imported), "--client", client, "--rcpt", "u@example.com")
    assert done.returncode == 0, done.stderr
    assert f"connection: {verdict}" in done.stdout


def test_ipsecurity_becomes_the_connection_section_with_its_source() -> None:
    done = smtpsvc("import", "iis", str(METABASE))
    assert done.returncode == 0, done.stderr
    assert (
        "[connection]\n"
        '# IIS: IPSecurity "All except the list below" (denied: 203.0.113.0/24, 198.51.100.7/32, '
        "10.0.0.0/8)\n"
        'deny = ["203.0.113.0/24", "198.51.100.7/32", "10.0.0.0/8"]\n'
    ) in done.stdout
    assert "IPSecurity:" not in done.stderr  # carried over, so not in the report


def test_every_key_names_the_iis_property_and_value_it_came_from() -> None:
    done = smtpsvc("import", "iis", str(METABASE))
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "# IIS: MaxMessageSize 10485760 bytes\nmax_message_size = 10485760\n" in text
    assert '# IIS: SmartHostType 1 (direct delivery first)\nsmart_host_type = "after_direct"\n' in text
    assert (
        '# IIS: SmtpRemoteProgressiveRetry 10,20,30,60 minutes\nretry = ["10m", "20m", "30m", "60m"]\n'
        in text
    )
    lines = text.splitlines()
    keys = [i for i, line in enumerate(lines) if line and not line.startswith(("#", "["))]
    assert keys and all(lines[i - 1].startswith("# IIS: ") for i in keys)


def test_what_cannot_be_carried_over_is_reported_on_stderr_and_at_the_end_of_the_toml() -> None:
    done = smtpsvc("import", "iis", str(METABASE))
    assert done.returncode == 0
    for needle in (
        "AuthFlags: Integrated Windows authentication",
        "RouteAction of legacy.test: Send ETRN/TURN",
        'SendBadTo: "badmail@example.com"',
        'PickupDirectory: "C:\\Inetpub\\mailroot\\Pickup": a fixed folder: pickup/ under server.root',
        "SmtpOutboundCommandSupportOptions",
    ):
        assert needle in done.stderr
        assert f"#   {needle}" in done.stdout


def test_no_password_is_written_and_the_report_names_the_files_still_needed(tmp_path: Path) -> None:
    out = tmp_path / "smtpsvc.toml"
    done = smtpsvc("import", "iis", str(METABASE), "-o", str(out))  # stdin is not a terminal: no prompt
    assert done.returncode == 0, done.stderr
    smarthost = tmp_path / "smtpsvc-smarthost.password"
    partner = tmp_path / "smtpsvc-partner.test.password"
    assert f"user isp-relay still needs its password in {smarthost}" in done.stderr
    assert f"user partner-relay still needs its password in {partner}" in done.stderr
    assert not smarthost.exists() and not partner.exists()
    cfg = load_config(out, {})
    assert cfg.delivery.smart_host_auth.password_file == str(smarthost)
    assert cfg.connectors[1].auth.password_file == str(partner)
    assert "RoutePassword" not in out.read_text() or "never imported" in out.read_text()


def test_a_password_asked_for_goes_into_a_file_of_mode_0600(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli.getpass, "getpass", lambda prompt: "s3cret")
    path = tmp_path / "smtpsvc-partner.test.password"
    done = cli._ask_password(Credential('connector "partner.test" auth', "partner-relay", str(path)), False)
    assert done.written
    assert path.read_text() == "s3cret\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_password_file_that_cannot_be_written_is_left_to_the_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli.getpass, "getpass", lambda prompt: "s3cret")
    path = tmp_path / "no-such-dir" / "smtpsvc-smarthost.password"
    done = cli._ask_password(Credential("delivery.smart_host_auth", "isp-relay", str(path)), False)
    assert not done.written
    assert capsys.readouterr().err == f"cannot write {path}: No such file or directory\n"


def test_an_existing_output_is_kept_unless_force(tmp_path: Path) -> None:
    out = tmp_path / "smtpsvc.toml"
    out.write_text("# mine\n")
    refused = smtpsvc("import", "iis", str(METABASE), "-o", str(out))
    assert refused.returncode == 2
    assert refused.stderr.strip() == f"smtpsvc import iis: {out} exists; give --force to overwrite it"
    assert out.read_text() == "# mine\n"
    forced = smtpsvc("import", "iis", str(METABASE), "-o", str(out), "--force")
    assert forced.returncode == 0, forced.stderr
    assert "[server]" in out.read_text()


TWO_SERVERS = """<?xml version="1.0"?>
<configuration xmlns="urn:microsoft-catalog:XML_Metabase_V64_0"><MBProperty>
<IIsSmtpServer Location="/LM/SmtpSvc/1" FullyQualifiedDomainName="one.example.com"/>
<IIsSmtpServer Location="/LM/SmtpSvc/2" FullyQualifiedDomainName="two.example.com" ServerBindings=":2525:"/>
</MBProperty></configuration>
"""


def test_two_servers_need_server_and_it_picks_one(tmp_path: Path) -> None:
    path = tmp_path / "MetaBase.xml"
    path.write_text(TWO_SERVERS)
    refused = smtpsvc("import", "iis", str(path))
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        f"smtpsvc import iis: {path}: 2 SMTP virtual servers found: 1 (/LM/SmtpSvc/1), 2 (/LM/SmtpSvc/2); "
        "choose one with --server N"
    )
    chosen = smtpsvc("import", "iis", str(path), "--server", "2")
    assert chosen.returncode == 0, chosen.stderr
    assert 'hostname = "two.example.com"' in chosen.stdout
    assert 'listen = ["0.0.0.0:2525"]' in chosen.stdout


def _server_xml(**attributes: str) -> str:
    attrs = " ".join(f'{k}="{v}"' for k, v in attributes.items())
    server = f'<IIsSmtpServer Location="/LM/SmtpSvc/1" {attrs}/>'
    return f"<configuration><MBProperty>{server}</MBProperty></configuration>"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(b"MZ\x90\x00binary", "not a MetaBase.xml (XML) nor a JSON export", id="not-xml"),
        pytest.param(b"<configuration><MBProperty>", "not well-formed XML", id="broken-xml"),
        pytest.param(
            b'<configuration><IIsWebServer Location="/LM/W3SVC/1"/></configuration>',
            "no SMTP virtual server (IIsSmtpServer, SmtpSvc/N) found in this MetaBase.xml",
            id="no-smtp-server",
        ),
        pytest.param(b'{"Name": "W3SVC/1"}', "no SMTP virtual server", id="json-without-smtp"),
        pytest.param(b"[1, 2]", "the JSON holds something other than objects", id="json-not-objects"),
        pytest.param(
            _server_xml(RelayIpList="18000080ZZ").encode(),
            "RelayIpList of /LM/SmtpSvc/1 is damaged: not hexadecimal digits in pairs",
            id="damaged-hex",
        ),
        pytest.param(
            _server_xml(RelayIpList=build(["10.0.0.0/8"], [])[:-3].hex()).encode(),
            "RelayIpList of /LM/SmtpSvc/1: unknown IPSECLIST layout",
            id="truncated-blob",
        ),
        pytest.param(
            _server_xml(
                IPSecurity=build(["10.0.0.0/8"], [])
                .replace(b"\x02\x00\x00\x00", b"\x17\x00\x00\x00", 1)
                .hex()
            ).encode(),
            "IPSecurity of /LM/SmtpSvc/1: unknown IPSECLIST layout (grant entry 1 has address family 23",
            id="unknown-blob-layout",
        ),
        pytest.param(
            _server_xml(MaxMessageSize="lots").encode(),
            "MaxMessageSize of /LM/SmtpSvc/1 is not a number",
            id="not-a-number",
        ),
        pytest.param(
            b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><x>&a;</x>',
            "has a DOCTYPE or ENTITY declaration",
            id="entity-expansion",
        ),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "input"
    path.write_bytes(content)
    done = smtpsvc("import", "iis", str(path))
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"smtpsvc import iis: {path}: ")
    assert message in lines[0]


def test_a_missing_file_gives_one_line_and_exit_2(tmp_path: Path) -> None:
    done = smtpsvc("import", "iis", str(tmp_path / "nope.xml"))
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        == f"smtpsvc import iis: cannot read {tmp_path / 'nope.xml'}: No such file or directory"
    )
