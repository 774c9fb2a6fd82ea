"""smtpsvc.toml: SPEC 1.3 defaults, types, all problems with their lines, env overrides, example, show."""

from __future__ import annotations

import dataclasses
import fnmatch
import ipaddress
import re
import socket
import textwrap
from pathlib import Path
from typing import Literal

import pytest

from smtpsvc import config as config_module
from smtpsvc.config import (
    NOT_YET_EFFECTIVE,
    RESTART_ONLY,
    Config,
    ConfigError,
    ConfigProblem,
    ConnectorAuth,
    ConnectorConfig,
    HostPort,
    RemoteDomain,
    decide_workers,
    default_config_path,
    load_config,
    parse_host_port,
    parse_listen,
    parse_nameserver,
    parse_smart_hosts,
    render_effective,
    render_example,
    restart_needed,
    warnings_for,
    worker_count,
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "smtpsvc.toml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Config:
    return load_config(write(tmp_path, text), env or {})


def problems(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> list[ConfigProblem]:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text, env)
    return info.value.problems


def only_problem(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> ConfigProblem:
    found = problems(tmp_path, text, env)
    assert len(found) == 1, found
    return found[0]


def comparable(cfg: Config) -> Config:
    """The parsed values only: without where they came from."""
    return dataclasses.replace(cfg, source="", explicit_keys=frozenset(), cli_overrides=frozenset())


# ------------------------------------------------------------------------------------------------- defaults


def test_defaults_equal_spec_1_3() -> None:
    cfg = load_config(None, {})
    fqdn = socket.getfqdn()
    s = cfg.server
    assert (s.hostname, s.root, s.listen) == (fqdn, Path("mailroot"), (("127.0.0.1", 2525),))
    assert (s.max_connections, s.connection_timeout, s.data_timeout) == (1000, 600.0, 600.0)
    assert (s.max_message_size, s.max_session_size) == (2097152, 10485760)
    assert (s.max_recipients, s.max_hop_count, s.max_errors) == (100, 15, 10)
    assert (s.reverse_dns, s.masquerade_domain, s.inbound_command_support_options) == (False, "", 7697601)
    assert {name: cfg.extensions.enabled(name) for name in cfg.extensions.resolved} == {
        "pipelining": True,
        "8bitmime": True,
        "smtputf8": True,
        "chunking": True,
        "binarymime": True,
        "dsn": True,
        "enhancedstatuscodes": True,
        "etrn": True,
        "vrfy": False,
        "xexch50": False,
        "x_link2state": False,
    }
    assert cfg.extensions.explicit == {}
    assert (cfg.domains.local, cfg.domains.remote) == ((), ())
    assert cfg.relay.allow == (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"))
    assert (cfg.relay.deny, cfg.relay.allow_authenticated) == ((), True)
    assert (cfg.auth.users_file, cfg.auth.mechanisms, cfg.auth.require_tls) == (
        "users.toml",
        ("PLAIN", "LOGIN"),
        True,
    )
    assert (cfg.tls.cert, cfg.tls.key, cfg.tls.require) == ("", "", False)
    d = cfg.delivery
    assert (d.smart_host, d.smart_host_type, d.remote_port) == ((), "always", 25)
    assert d.retry == (900.0, 1800.0, 3600.0, 14400.0)
    assert (d.delay_notification, d.expiration) == (43200.0, 172800.0)
    assert (d.max_messages_per_connection, d.max_connections, d.max_connections_per_domain) == (20, 1000, 100)
    assert (d.timeout, d.tls, d.send_ndr_copy_to, d.suppress_xexch50_external) == (
        600.0,
        "dane-or-mta-sts",  # issue 16: enforce what the domain publishes
        "",
        True,
    )
    assert (cfg.resolver.nameservers, cfg.resolver.negative_cache_max) == ((), 300.0)
    assert cfg.connectors == ()
    assert cfg.categorizer.reset_message_status is False
    assert cfg.badmail.max_size == 100 * 1024 * 1024
    assert (cfg.admin.listen, cfg.admin.token_file) == (("127.0.0.1", 8025), "")
    assert (cfg.queue.backend, cfg.queue.dsn, cfg.queue.node_id, cfg.queue.lease) == ("local", "", fqdn, 30.0)
    assert (cfg.source, cfg.explicit_keys, cfg.warnings) == ("<defaults>", frozenset(), [])


def test_node_id_defaults_to_the_configured_hostname(tmp_path: Path) -> None:
    cfg = load(tmp_path, '[server]\nhostname = "mx1.example.com"\n')
    assert cfg.queue.node_id == "mx1.example.com"


def test_the_postgres_backend_is_accepted_with_a_dsn(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        '[queue]\nbackend = "postgres"\ndsn = "postgresql://smtpsvc:pw@db.test/smtpsvc"\nlease = "10s"\n'
        'node_id = "mx2"\n',
    )
    assert (cfg.queue.backend, cfg.queue.node_id, cfg.queue.lease) == ("postgres", "mx2", 10.0)
    assert cfg.warnings == []


def test_config_is_frozen() -> None:
    cfg = load_config(None, {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.server.max_recipients = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("hostname", "local", "expected"),
    [
        ("mail.example.com", "[]", ("example.com", "mail.example.com", "localhost")),
        ("mailhost", "[]", ("mailhost", "localhost")),
        ("mail.example.com", '["Example.ORG.", "b.test"]', ("example.org", "b.test")),
    ],
)
def test_local_domains_default_to_the_hostnames_domain_the_hostname_and_localhost(
    tmp_path: Path, hostname: str, local: str, expected: tuple[str, ...]
) -> None:
    cfg = load(tmp_path, f'[server]\nhostname = "{hostname}"\n[domains]\nlocal = {local}\n')
    assert cfg.local_domains == expected


# --------------------------------------------------------------------------------------------------- values


def test_file_values_become_typed_fields(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        """
        [server]
        listen = ["0.0.0.0:25", "[::1]:2525"]
        connection_timeout = "30s"
        max_message_size = "10MB"
        max_session_size = 4096
        [relay]
        allow = ["10.1.2.3/8", "192.0.2.7", "2001:db8::1"]
        [delivery]
        smart_host = "relay.example.com;[192.0.2.1]:2525"
        retry = ["500ms", "2d"]
        tls = "Required"
        [resolver]
        nameservers = ["127.0.0.1:5353", "::1"]
        negative_cache_max = "90s"
        [badmail]
        max_size = 0
        [admin]
        listen = ""
        """,
    )
    assert cfg.server.listen == (("0.0.0.0", 25), ("::1", 2525))
    assert cfg.server.connection_timeout == 30.0
    assert (cfg.server.max_message_size, cfg.server.max_session_size) == (10485760, 4096)
    assert [str(n) for n in cfg.relay.allow] == ["10.0.0.0/8", "192.0.2.7/32", "2001:db8::1/128"]
    assert cfg.delivery.smart_host == (
        HostPort("relay.example.com", None, False),
        HostPort("192.0.2.1", 2525, True),
    )
    assert cfg.delivery.retry == (0.5, 172800.0)
    assert cfg.delivery.tls == "required"
    assert cfg.resolver.nameservers == (("127.0.0.1", 5353), ("::1", 53))
    assert cfg.resolver.negative_cache_max == 90.0
    assert cfg.badmail.max_size == 0
    assert cfg.admin.listen is None


def test_negative_cache_max_of_0s_turns_negative_dns_caching_off(tmp_path: Path) -> None:
    cfg = load(tmp_path, '[resolver]\nnegative_cache_max = "0s"\n')
    assert cfg.resolver.negative_cache_max == 0.0  # unlike other durations, where "0s" is refused


def test_domains_are_lower_cased_without_trailing_dot(tmp_path: Path) -> None:
    cfg = load(tmp_path, '[domains]\nlocal = ["Example.COM.", "bücher.test"]\n')
    assert cfg.domains.local == ("example.com", "xn--bcher-kva.test")


def test_remote_domains_become_remote_domain_records(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        """
        [domains]
        remote = [{ name = "Partner.test", relay = true, route = "partners" }, { name = "other.test" }]
        [[connector]]
        name = "partners"
        address_spaces = ["partner.test"]
        """,
    )
    assert cfg.domains.remote == (
        RemoteDomain("partner.test", True, "partners"),
        RemoteDomain("other.test", False, ""),
    )


def test_connectors_become_connector_records(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        """
        [[connector]]
        name = "partners"
        address_spaces = ["partner.test", "*.Partner.test"]
        cost = 3
        smart_hosts = ["[192.0.2.9]:587", "relay.partner.test"]
        use_helo = true
        tls = "required"
        auth = { user = "relay", password_file = "/etc/smtpsvc/partner.pw" }
        xexch50 = true

        [[connector]]
        name = "default"
        address_spaces = ["*"]
        """,
    )
    assert cfg.connectors == (
        ConnectorConfig(
            name="partners",
            address_spaces=("partner.test", "*.partner.test"),
            cost=3,
            smart_hosts=(HostPort("192.0.2.9", 587, True), HostPort("relay.partner.test", None, False)),
            use_helo=True,
            tls="required",
            auth=ConnectorAuth("relay", "/etc/smtpsvc/partner.pw"),
            xexch50=True,
        ),
        ConnectorConfig("default", ("*",), 1, (), False, "opportunistic", ConnectorAuth("", ""), False),
    )


def test_mask_3503297_turns_8bitmime_off(tmp_path: Path) -> None:
    cfg = load(tmp_path, "[server]\ninbound_command_support_options = 3503297\n")
    assert not cfg.extensions.enabled("8bitmime")
    assert cfg.extensions.why("8bitmime") == "mask 3503297 lacks 0x400000 (KB286673)"
    assert cfg.extensions.enabled("dsn")


def test_an_extensions_key_beats_the_mask_and_is_kept_as_explicit(tmp_path: Path) -> None:
    cfg = load(
        tmp_path, '[server]\ninbound_command_support_options = 3503297\n[extensions]\n"8bitmime" = true\n'
    )
    assert cfg.extensions.enabled("8bitmime")
    assert cfg.extensions.explicit == {"8bitmime": True}


def test_mask_accepts_toml_hex(tmp_path: Path) -> None:
    cfg = load(tmp_path, "[server]\ninbound_command_support_options = 0x3574C1\n")
    assert cfg.server.inbound_command_support_options == 3503297


# ------------------------------------------------------------------------------------------- parsing tables


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("relay.example.com", HostPort("relay.example.com", None, False)),
        ("Relay.Example.com:2525", HostPort("relay.example.com", 2525, False)),
        ("[192.0.2.1]", HostPort("192.0.2.1", None, True)),
        ("[192.0.2.1]:2525", HostPort("192.0.2.1", 2525, True)),
        ("192.0.2.1:26", HostPort("192.0.2.1", 26, True)),
        ("[IPv6:::1]:25", HostPort("::1", 25, True)),
        ("[ipv6:2001:db8::1]", HostPort("2001:db8::1", None, True)),
        ("[::1]:25", HostPort("::1", 25, True)),
    ],
)
def test_parse_host_port(text: str, expected: HostPort) -> None:
    assert parse_host_port(text) == expected
    assert parse_host_port(str(expected)) == expected


@pytest.mark.parametrize(
    "text",
    ["", "[192.0.2.1", "[not-an-ip]:25", "host:0", "host:99999", "host:x", "[2001:db8::1]25", "bad host"],
)
def test_parse_host_port_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_host_port(text)


def test_smart_hosts_are_separated_by_semicolons() -> None:
    assert parse_smart_hosts(" a.example ; [192.0.2.1]:2525 ;") == (
        HostPort("a.example", None, False),
        HostPort("192.0.2.1", 2525, True),
    )
    assert parse_smart_hosts("") == ()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:2525", ("127.0.0.1", 2525)),
        ("[::1]:2525", ("::1", 2525)),
        ("0.0.0.0:25", ("0.0.0.0", 25)),
        ("localhost:0", ("localhost", 0)),
        ("[::]:25", ("::", 25)),
    ],
)
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["127.0.0.1", ":25", "::1:25", "[127.0.0.1]:25", "127.0.0.1:65536", "h:-1"])
def test_parse_listen_refuses(text: str) -> None:
    with pytest.raises(ValueError, match=r"listen address|port"):
        parse_listen(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("127.0.0.1", ("127.0.0.1", 53)),
        ("[::1]:5353", ("::1", 5353)),
        ("[::1]", ("::1", 53)),
        ("2001:db8::53", ("2001:db8::53", 53)),
    ],
)
def test_parse_nameserver(text: str, expected: tuple[str, int]) -> None:
    assert parse_nameserver(text) == expected


@pytest.mark.parametrize("text", ["dns.example:53", "127.0.0.1:0", "[::1]:x", ""])
def test_parse_nameserver_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_nameserver(text)


# ------------------------------------------------------------------------------------------------- problems


@pytest.mark.parametrize(
    ("toml", "key", "fragment"),
    [
        (
            '[server]\nmax_recipients = "5"',
            "server.max_recipients",
            'expected an integer, got a string ("5")',
        ),
        ("[server]\nmax_recipients = 0", "server.max_recipients", "must be at least 1, got 0"),
        ("[server]\nmax_recipients = true", "server.max_recipients", "expected an integer, got a boolean"),
        ("[server]\nreverse_dns = 1", "server.reverse_dns", "expected true or false, got an integer (1)"),
        ("[server]\nhostname = 5", "server.hostname", "expected a string"),
        ('[server]\nhostname = ""', "server.hostname", "must not be empty"),
        ("[server]\nlisten = []", "server.listen", "must not be empty"),
        ('[server]\nlisten = ["0.0.0.0"]', "server.listen", "item 1: invalid listen address"),
        ("[server]\nconnection_timeout = 600", "server.connection_timeout", 'add a unit, e.g. "30s"'),
        ('[server]\nconnection_timeout = "0s"', "server.connection_timeout", "must be longer than 0"),
        ('[server]\ndata_timeout = "10 minutes"', "server.data_timeout", "invalid duration"),
        ('[server]\nmax_message_size = "2XB"', "server.max_message_size", 'invalid size "2XB"'),
        ("[server]\nmax_message_size = 2.5", "server.max_message_size", "expected bytes as an integer"),
        (
            "[server]\ninbound_command_support_options = -1",
            "server.inbound_command_support_options",
            "from 0",
        ),
        ('[server]\nmasquerade_domain = "not a domain"', "server.masquerade_domain", "invalid domain"),
        ('[extensions]\n"8bitmime" = "no"', "extensions.8bitmime", "expected true or false"),
        ('[domains]\nlocal = "example.com"', "domains.local", "expected an array of domains"),
        ("[domains]\nremote = [{ relay = true }]", "domains.remote", 'item 1: missing "name"'),
        ('[domains]\nremote = [{ name = "p.test", rely = true }]', "domains.remote", 'did you mean "relay"?'),
        ('[domains]\nremote = [{ name = "p.test", route = "x" }]', "domains.remote", 'route "x" names no'),
        ('[relay]\nallow = ["10.0.0.300/8"]', "relay.allow", 'item 1: invalid network "10.0.0.300/8"'),
        ("[relay]\ndeny = [10]", "relay.deny", "expected a string"),
        ('[connection]\nallow = ["10.0.0.300/8"]', "connection.allow", 'invalid network "10.0.0.300/8"'),
        ('[connection]\ndeny = "10.0.0.0/8"', "connection.deny", "expected an array of networks like"),
        ('[auth]\nmechanisms = ["CRAM-MD5"]', "auth.mechanisms", 'unsupported mechanism "CRAM-MD5"'),
        ("[tls]\nrequire = true", "tls.require", "needs tls.cert"),
        ('[delivery]\nsmart_host = ["a.example"]', "delivery.smart_host", "expected a string"),
        (
            '[delivery]\nsmart_host = "a.example:99999"',
            "delivery.smart_host",
            '"a.example:99999": invalid port',
        ),
        ('[delivery]\nsmart_host_type = "never"', "delivery.smart_host_type", '"always", "after_direct"'),
        ("[delivery]\nremote_port = 70000", "delivery.remote_port", "must be from 1 to 65535"),
        ("[delivery]\nretry = []", "delivery.retry", "must not be empty"),
        ('[delivery]\nretry = ["15m", 30]', "delivery.retry", "item 2: duration 30 has no unit"),
        (
            '[delivery]\ntls = "sometimes"',
            "delivery.tls",
            'expected one of "none", "opportunistic", "required"',
        ),
        ('[delivery]\nsend_ndr_copy_to = "postmaster"', "delivery.send_ndr_copy_to", "user@domain"),
        ('[resolver]\nnameservers = ["dns.example"]', "resolver.nameservers", "invalid nameserver"),
        ("[resolver]\nnegative_cache_max = 0", "resolver.negative_cache_max", "duration 0 has no unit"),
        ('[badmail]\nmax_size = "lots"', "badmail.max_size", "invalid size"),
        ('[admin]\nlisten = "8025"', "admin.listen", "invalid listen address"),
        ('[queue]\nbackend = "postgres"', "queue.dsn", 'queue.backend = "postgres" needs queue.dsn'),
        ('[queue]\nbackend = "redis"', "queue.backend", 'expected one of "local", "postgres"'),
        ('[queue]\nlease = "1x"', "queue.lease", "invalid duration"),
        ("server = 5", "server", "expected a table [server], got an integer (5)"),
        ('[connector]\nname = "x"', "connector", "write [[connector]]"),
        ('[[connector]]\nname = "x"', "connector[1].address_spaces", 'missing "address_spaces"'),
        ('[[connector]]\naddress_spaces = ["*"]', "connector[1].name", 'missing "name"'),
        ('[[connector]]\nname = "x"\naddress_spaces = ["a..b"]', "connector[1].address_spaces", "invalid"),
        ('[[connector]]\nname = "x"\naddress_spaces = ["*"]\ncost = -1', "connector[1].cost", "at least 0"),
        (
            '[[connector]]\nname = "x"\naddress_spaces = ["*"]\nauth = { usr = "a" }',
            "connector[1].auth",
            '"user"?',
        ),
    ],
)
def test_each_wrong_value_is_reported_with_what_was_expected(
    tmp_path: Path, toml: str, key: str, fragment: str
) -> None:
    problem = only_problem(tmp_path, toml + "\n")
    assert problem.key == key
    assert fragment in problem.problem


def test_unknown_key_gets_a_suggestion_and_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, '# mail relay\n\n[server]\nhostname = "mx.example.com"\nmax_recipient = 5\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert (
        str(info.value) == f'{path}:5: server.max_recipient: unknown key "max_recipient"; '
        'did you mean "max_recipients"?'
    )


def test_unknown_key_from_another_section_says_where_it_belongs(tmp_path: Path) -> None:
    problem = only_problem(tmp_path, "[server]\nremote_port = 25\n")
    assert problem.problem == 'unknown key "remote_port"; it belongs in [delivery]'


@pytest.mark.parametrize(
    ("toml", "hint"),
    [
        (
            "[relay]\nRelayFlags = 2\n",
            "did you mean relay.deny, relay.allow, relay.allow_authenticated? (Exchange 5.5 RelayFlags bits "
            "1, 2 and 8, Q206968; bit 4, RelayLocalIPList, has no equivalent)",
        ),
        ("[relay]\nrelayflags = 2\n", "did you mean relay.deny, relay.allow, relay.allow_authenticated?"),
        ("RelayFlags = 2\n", "outside any section; did you mean relay.deny, relay.allow"),
        (
            "[relay]\nRelayForAuth = true\n",
            'did you mean "relay.allow_authenticated"? (the IIS name RelayForAuth)',
        ),
        (
            "[server]\nRemoteSmtpPort = 25\n",
            'did you mean "delivery.remote_port"? (the IIS name RemoteSmtpPort)',
        ),
        (
            "[connection]\nIPSecurity = 1\n",
            "did you mean connection.allow, connection.deny? (IIS Connection control, IPSecurity",
        ),
        ("[server]\nIPGrant = []\n", 'did you mean "connection.allow"? (the IIS name IPGrant)'),
        ("IPDeny = []\n", 'did you mean "connection.deny"? (the IIS name IPDeny)'),
        ("[connection]\nGrantByDefault = true\n", "did you mean connection.allow, connection.deny?"),
    ],
)
def test_an_iis_name_gets_the_smtpsvc_key_that_replaces_it(tmp_path: Path, toml: str, hint: str) -> None:
    problem = only_problem(tmp_path, toml)
    assert problem.problem.startswith('unknown key "') and hint in problem.problem


def test_an_iis_name_in_the_environment_gets_the_key_that_replaces_it(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nhostname = "mx.example.com"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, {"SMTPSVC__RELAY__RELAYFLAGS": "2"})
    assert "did you mean relay.deny, relay.allow, relay.allow_authenticated?" in str(info.value)


def test_unknown_section_gets_a_suggestion(tmp_path: Path) -> None:
    problem = only_problem(tmp_path, '[sever]\nhostname = "x"\n')
    assert (problem.line, problem.key, problem.problem) == (
        1,
        "sever",
        'unknown section "sever"; did you mean "server"?',
    )


def test_key_outside_any_section_says_which_section(tmp_path: Path) -> None:
    problem = only_problem(tmp_path, 'hostname = "mx.example.com"\n')
    assert (problem.line, problem.problem) == (
        1,
        'unknown key "hostname" outside any section; it belongs in [server]',
    )


def test_all_problems_are_reported_together_in_file_order(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """\
        [server]
        max_recipients = "many"
        listen = ["::1:25"]

        [delivery]
        retry = []
        tls = "sometimes"

        [[connector]]
        name = "a"
        address_spaces = ["*"]
        cost = "cheap"
        """,
    )
    assert [(p.line, p.key) for p in found] == [
        (2, "server.max_recipients"),
        (3, "server.listen"),
        (6, "delivery.retry"),
        (7, "delivery.tls"),
        (12, "connector[1].cost"),
    ]


def test_lines_are_found_for_quoted_keys_and_later_connectors(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """\
        [[connector]]
        name = "a"
        address_spaces = ["*"]
        [[connector]]
        name = "a"
        address_spaces = ["b.test"]
        use_helo = "yes"
        [extensions]
        "8bitmime" = 1
        """,
    )
    assert [(p.line, p.key) for p in found] == [
        (5, "connector[2].name"),
        (7, "connector[2].use_helo"),
        (9, "extensions.8bitmime"),
    ]


def test_a_problem_prints_as_file_line_key_problem() -> None:
    assert str(ConfigProblem("smtpsvc.toml", 7, "server.max_errors", "must be at least 1, got 0")) == (
        "smtpsvc.toml:7: server.max_errors: must be at least 1, got 0"
    )
    assert str(ConfigProblem("$SMTPSVC__SERVER__MAX_ERRORS", None, "server.max_errors", "bad")) == (
        "$SMTPSVC__SERVER__MAX_ERRORS: server.max_errors: bad"
    )


def test_toml_syntax_error_reports_tomllibs_line(tmp_path: Path) -> None:
    problem = only_problem(tmp_path, '[server]\nmax_recipients = 5\nhostname = "unterminated\n')
    assert problem.line == 3
    assert problem.key == ""


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "missing.toml", {})


# ------------------------------------------------------------------------------------------------ overrides


def test_env_overrides_beat_the_file(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        '[server]\nmax_recipients = 50\nhostname = "file.example"\n',
        env={
            "SMTPSVC__SERVER__MAX_RECIPIENTS": "5",
            "SMTPSVC__DELIVERY__RETRY": '["1s", "2s"]',
            "SMTPSVC__DELIVERY__SMART_HOST": "[192.0.2.1]:2525",
            "SMTPSVC__SERVER__HOSTNAME": "env.example",
            "SMTPSVC__EXTENSIONS__8BITMIME": "false",
            "SMTPSVC__SERVER__LISTEN": "0.0.0.0:25",
            "SMTPSVC__AUTH__USERS_FILE": "123",
            "SMTPSVC_CONFIG": "ignored-here.toml",
            "PATH": "/usr/bin",
        },
    )
    assert cfg.server.max_recipients == 5
    assert cfg.delivery.retry == (1.0, 2.0)
    assert cfg.delivery.smart_host == (HostPort("192.0.2.1", 2525, True),)
    assert cfg.server.hostname == "env.example"
    assert not cfg.extensions.enabled("8bitmime")
    assert cfg.server.listen == (("0.0.0.0", 25),)
    assert cfg.auth.users_file == "123"
    assert "server.max_recipients" in cfg.explicit_keys


def test_env_overrides_apply_without_a_file() -> None:
    cfg = load_config(None, {"SMTPSVC__SERVER__MAX_RECIPIENTS": "7"})
    assert cfg.server.max_recipients == 7


@pytest.mark.parametrize(
    ("name", "value", "key", "fragment"),
    [
        ("SMTPSVC__SERVER__MAX_RECIPIENT", "5", "server.max_recipient", 'did you mean "max_recipients"?'),
        ("SMTPSVC__SERVR__HOSTNAME", "x", "servr.hostname", 'did you mean "server"?'),
        ("SMTPSVC__SERVER", "x", "server", "expected SMTPSVC__SECTION__KEY"),
        ("SMTPSVC__CONNECTOR__NAME", "x", "connector.name", "cannot be set from the environment"),
        ("SMTPSVC__SERVER__MAX_RECIPIENTS", "many", "server.max_recipients", "expected an integer"),
    ],
)
def test_env_problems_name_the_variable_without_a_line(
    name: str, value: str, key: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {name: value})
    [problem] = info.value.problems
    assert (problem.file, problem.line, problem.key) == (f"${name}", None, key)
    assert fragment in problem.problem


def test_env_problems_come_after_file_problems(tmp_path: Path) -> None:
    found = problems(tmp_path, "[server]\nmax_errors = 0\n", env={"SMTPSVC__SERVER__MAX_RECIPIENTS": "x"})
    assert [p.file for p in found] == [str(tmp_path / "smtpsvc.toml"), "$SMTPSVC__SERVER__MAX_RECIPIENTS"]


def test_cli_root_and_listen_beat_file_and_env(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nroot = "/var/spool/a"\nlisten = ["0.0.0.0:25"]\n')
    cfg = load_config(path, {"SMTPSVC__SERVER__ROOT": "/b"}, root_override="/c", listen_override=["[::1]:0"])
    assert (cfg.server.root, cfg.server.listen) == (Path("/c"), (("::1", 0),))


def test_cli_overrides_name_the_keys_the_command_line_set_and_no_others(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nlisten = ["0.0.0.0:25"]\n')
    assert load_config(path, {"SMTPSVC__SERVER__WORKERS": "2"}).cli_overrides == frozenset()
    cfg = load_config(path, {}, root_override="/c", listen_override=["[::1]:0"])
    assert cfg.cli_overrides == {"server.root", "server.listen"}


@pytest.mark.parametrize(
    ("toml", "changed"),
    [
        ('[server]\nhostname = "renamed.test"\nmax_recipients = 5', []),  # in effect at once
        ('[delivery]\nsend_ndr_copy_to = "pm@local.test"\nmax_connections_per_domain = 3', []),
        ('[server]\nlisten = ["127.0.0.1:2626"]\nworkers = 2', ["server.listen", "server.workers"]),
        ('[resolver]\nnameservers = ["127.0.0.1:5353"]', ["resolver.nameservers"]),
        ('[admin]\nlisten = "127.0.0.1:8026"', ["admin.listen"]),
        ('[queue]\nnode_id = "node-b"\nlease = "1m"', []),  # unused by the local spool
        ('[queue]\nbackend = "postgres"\ndsn = "postgresql://db/mail"', ["queue.backend", "queue.dsn"]),
        ("[delivery]\nmax_connections = 7", ["delivery.max_connections"]),
    ],
)
def test_restart_needed_names_the_changed_keys_that_are_read_only_at_start(
    tmp_path: Path, toml: str, changed: list[str]
) -> None:
    before = load_config(None, {})
    assert restart_needed(before, load(tmp_path, toml)) == changed


def test_every_restart_only_key_exists() -> None:
    cfg = load_config(None, {})
    for key in RESTART_ONLY:
        section, name = key.split(".")
        assert name in {f.name for f in dataclasses.fields(getattr(cfg, section))}, key


def test_cli_listen_problem_names_the_option() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {}, listen_override=["nonsense"])
    assert str(info.value).startswith("--listen: server.listen: item 1: invalid listen address")


def test_default_config_path_follows_spec_1_1(tmp_path: Path) -> None:
    assert default_config_path({}, tmp_path) is None
    (tmp_path / "smtpsvc.toml").write_text("")
    assert default_config_path({}, tmp_path) == tmp_path / "smtpsvc.toml"
    assert default_config_path({"SMTPSVC_CONFIG": "/etc/smtpsvc.toml"}, tmp_path) == Path("/etc/smtpsvc.toml")
    assert default_config_path({"SMTPSVC_CONFIG": "/etc/x.toml"}, tmp_path, "my.toml") == tmp_path / "my.toml"


# ----------------------------------------------------------------------------------------- example and show


def test_example_loads_cleanly_to_the_defaults(tmp_path: Path) -> None:
    cfg = load(tmp_path, render_example())
    assert comparable(cfg) == comparable(load_config(None, {}))


def test_example_with_every_setting_uncommented_is_the_defaults_plus_one_connector(tmp_path: Path) -> None:
    uncommented = re.sub(r"^#(?=[^ #\n])", "", render_example(), flags=re.M)
    cfg = load(tmp_path, uncommented)
    defaults = load_config(None, {})
    assert cfg.connectors[0].name == "partners"
    assert list(cfg.oauth) == ["m365"]  # and one OAuth profile
    assert [k.domain for k in cfg.dkim] == ["example.com"]  # and one DKIM key
    bare = dataclasses.replace(cfg, connectors=(), oauth={}, dkim=(), extensions=defaults.extensions)
    assert comparable(bare) == comparable(defaults)
    assert {n: cfg.extensions.enabled(n) for n in cfg.extensions.resolved} == {
        n: defaults.extensions.enabled(n) for n in defaults.extensions.resolved
    }


SPEC_KEYS = {
    "server": "hostname root listen max_connections connection_timeout data_timeout max_message_size "
    "max_session_size max_recipients max_hop_count max_errors reverse_dns masquerade_domain "
    "inbound_command_support_options workers delivery_nice",  # the last two: ours, beyond SPEC 1.3
    "extensions": "pipelining 8bitmime smtputf8 chunking binarymime dsn enhancedstatuscodes etrn vrfy "
    "xexch50 x_link2state",
    "domains": "local remote",
    "relay": "allow deny allow_authenticated",
    "connection": "allow deny",  # ours, issue 17: IIS's Connection control (IPSecurity)
    "auth": "users_file mechanisms require_tls",
    "tls": "cert key require",
    "delivery": "smart_host smart_host_type remote_port retry delay_notification expiration "
    "max_messages_per_connection max_connections max_connections_per_domain timeout tls send_ndr_copy_to "
    "suppress_xexch50_external dkim_on_error "
    # ours, beyond SPEC 1.3: slow start and the RFC 5321 section 4.5.3.2 deadlines
    "initial_connections_per_domain connect_timeout greeting_timeout mail_timeout rcpt_timeout data_timeout "
    "data_block_timeout final_timeout "
    "smart_host_auth "  # ours: AUTH to the smart host (issue 15)
    # ours, issue 15: the provider's limits for the default smart host
    "smart_host_rate smart_host_recipients_per_day "
    "mta_sts_ca_file mta_sts_port tlsrpt_organization",  # ours, issue 16: MTA-STS and TLS reporting
    "resolver": "nameservers negative_cache_max",  # the last: ours, beyond SPEC 1.3 (RFC 2308)
    "connector": "name address_spaces cost smart_hosts use_helo tls auth xexch50 "
    "transport oauth mailbox graph_url ca_file "  # ours, the Microsoft Graph transport
    "rate recipients_per_day",  # ours, issue 15: the provider's limits
    "categorizer": "reset_message_status",
    "badmail": "max_size",
    "admin": "listen token_file",
    "protocol_log": "enabled directory max_size max_files",
    "queue": "backend dsn node_id lease",
}


def test_example_documents_every_spec_key_and_no_other(tmp_path: Path) -> None:
    uncommented = re.sub(r"^#(?=[^ #\n])", "", render_example(), flags=re.M)
    keys = load(tmp_path, uncommented).explicit_keys
    expected = {f"{section}.{key}" for section, names in SPEC_KEYS.items() for key in names.split()}
    oauth = "provider tenant client_id client_secret_file certificate_file key_file refresh_token_file scope "
    oauth += "token_url ca_file"
    expected |= {f"oauth.m365.{key}" for key in oauth.split()}
    expected |= {f"dkim.{key}" for key in ("domain", "selector", "key_file", "algorithm")}
    assert keys - {"connector", "oauth", "dkim"} == expected


def test_example_names_iis_settings() -> None:
    example = render_example()
    for iis in (
        "MaxMessageSize",
        "SmtpInboundCommandSupportOptions",
        "SmtpRemoteProgressiveRetry",
        "RelayForAuth",
    ):
        assert iis in example


def test_effective_config_loads_back_to_the_same_values(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        """
        [server]
        hostname = "mx.example.com"
        listen = ["[::1]:2525", "0.0.0.0:25"]
        max_message_size = 1000
        inbound_command_support_options = 3503297
        [extensions]
        vrfy = true
        dsn = false
        [domains]
        local = ["example.com"]
        remote = [{ name = "partner.test", relay = true, route = "partners" }]
        [relay]
        deny = ["192.0.2.0/24"]
        [delivery]
        smart_host = "[IPv6:2001:db8::1]:2525;relay.example.com"
        retry = ["500ms", "90s", "2d"]
        [resolver]
        nameservers = ["[::1]:5353", "127.0.0.1"]
        negative_cache_max = "0s"
        [[connector]]
        name = "partners"
        address_spaces = ["partner.test"]
        auth = { user = "u", password_file = "/etc/smtpsvc/u.secret" }
        [admin]
        listen = ""
        """,
    )
    shown = render_effective(cfg)
    again = load(tmp_path, shown)
    assert comparable(again) == comparable(cfg)
    assert again.extensions.explicit == {"vrfy": True, "dsn": False}


def test_effective_config_shows_the_decoded_mask_and_human_units(tmp_path: Path) -> None:
    shown = render_effective(load(tmp_path, "[server]\ninbound_command_support_options = 3503297\n"))
    assert re.search(r"^#\s+8BITMIME\s+off\s+mask 3503297 lacks 0x400000 \(KB286673\)$", shown, re.M)
    assert "0x1 0x2000 0x4000 0x10000 0x40000" in shown
    assert 'retry = ["15m", "30m", "1h", "4h"]' in shown
    assert 'max_message_size = "2MB"' in shown


# ---------------------------------------------------------------------------------------- not yet in effect


@pytest.fixture
def announced(monkeypatch: pytest.MonkeyPatch) -> None:
    """A key announced as not yet in effect (every real key is in effect today: the mechanism stays)."""
    monkeypatch.setattr(config_module, "NOT_YET_EFFECTIVE", frozenset({"queue.lease"}))


def test_every_key_is_in_effect_today() -> None:
    assert frozenset() == NOT_YET_EFFECTIVE


@pytest.mark.usefixtures("announced")
def test_keys_not_yet_in_effect_are_warned_about_when_set(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        """
        [server]
        reverse_dns = true
        max_recipients = 5
        [queue]
        lease = "1m"
        [auth]
        require_tls = false
        """,
    )
    assert cfg.warnings == [
        "queue.lease: accepted but not yet in effect",
    ]


def test_a_remote_route_and_a_connector_are_in_effect(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        """
        [domains]
        remote = [{ name = "p.test", relay = true, route = "c" }]
        [[connector]]
        name = "c"
        address_spaces = ["p.test"]
        """,
    )
    assert cfg.warnings == []


def test_every_not_yet_effective_pattern_names_a_real_key(tmp_path: Path) -> None:
    uncommented = re.sub(r"^#(?=[^ #\n])", "", render_example(), flags=re.M)
    uncommented = uncommented.replace("remote = []", 'remote = [{ name = "p.test", route = "partners" }]')
    keys = load(tmp_path, uncommented).explicit_keys
    for pattern in NOT_YET_EFFECTIVE:
        assert any(fnmatch.fnmatchcase(key, pattern) for key in keys), pattern


@pytest.mark.usefixtures("announced")
def test_warnings_for_ignores_keys_in_effect() -> None:
    assert warnings_for(["server.max_recipients", "relay.allow"]) == []
    assert warnings_for(["queue.lease"]) == ["queue.lease: accepted but not yet in effect"]


def test_lines_stay_right_after_a_multiline_string(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        '[tls]\ncert = """\n[server]\nmax_errors = 0\n"""\n[server]\nmax_errors = 0\n',
    )
    assert [(p.line, p.key) for p in found] == [(7, "server.max_errors")]


def test_a_connector_user_without_a_password_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="password_file"):
        load(tmp_path, '[[connector]]\nname = "c"\naddress_spaces = ["*"]\nauth = { user = "u" }\n')


def test_workers_is_checked(tmp_path: Path) -> None:
    assert load(tmp_path, "[server]\nworkers = 2\n").server.workers == 2
    assert load(tmp_path, "").server.workers == "auto"  # the default: one per usable core
    assert load(tmp_path, '[server]\nworkers = "Auto"\n').server.workers == "auto"
    with_postgres = '[server]\nworkers = 2\n[queue]\nbackend = "postgres"\ndsn = "postgresql://x@h/db"\n'
    problem = only_problem(tmp_path, with_postgres)
    assert problem.key == "server.workers" and "needs the local queue" in problem.problem
    # "auto" with PostgreSQL is no error: it means one process there.
    auto_postgres = '[server]\nworkers = "auto"\n[queue]\nbackend = "postgres"\ndsn = "postgresql://x@h/db"\n'
    assert worker_count(load(tmp_path, auto_postgres)) == 1
    assert only_problem(tmp_path, "[server]\nworkers = 0\n").key == "server.workers"
    assert "auto" in only_problem(tmp_path, '[server]\nworkers = "many"\n').problem


@pytest.mark.parametrize(
    ("setting", "backend", "cores", "share_ports", "expected"),
    [
        ("auto", "local", 2, True, 2),  # one per core: this machine
        ("auto", "local", 1, True, 1),  # one core: no worker gains anything
        ("auto", "local", 128, True, 64),  # at most 64
        ("auto", "postgres", 8, True, 1),  # the cluster scales by nodes, not workers
        ("auto", "local", 8, False, 1),  # no SO_REUSEPORT (Windows)
        (1, "local", 8, True, 1),  # an explicit number is kept
        (3, "local", 2, True, 3),
    ],
)
def test_decide_workers(
    setting: int | Literal["auto"], backend: str, cores: int, share_ports: bool, expected: int
) -> None:
    assert decide_workers(setting, backend, cores, share_ports) == expected


def test_config_show_says_what_auto_workers_means(tmp_path: Path) -> None:
    auto = load(tmp_path, '[server]\nworkers = "auto"\n')
    shown = render_effective(auto)
    assert 'workers = "auto"' in shown
    count = worker_count(auto)
    line = next(x for x in shown.splitlines() if x.startswith('# workers = "auto":'))
    assert (f"{count} SMTP worker processes" in line) if count > 1 else ("one process" in line)
    assert "one process receives SMTP and delivers" in render_effective(
        load(tmp_path, "[server]\nworkers = 1\n")
    )
