"""`smtpsvc dkim keygen` and `smtpsvc dkim check` against the test DNS server."""

from __future__ import annotations

import re
import stat
from pathlib import Path

from click.testing import CliRunner

from smtpsvc.cli import main
from tests.dnsserver import DnsServer


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), env={})
    return result.exit_code, result.output


def published_strings(output: str) -> list[str]:
    """The character-strings of the TXT record keygen printed."""
    [line] = [line for line in output.splitlines() if " IN TXT " in line]
    return re.findall(r'"([^"]*)"', line)


def config_for(tmp_path: Path, dns_server: DnsServer, output: str) -> Path:
    """A config made of the [[dkim]] table keygen printed and the test DNS server as resolver."""
    table = output.split("Then add to smtpsvc.toml:\n", 1)[1]
    path = tmp_path / "smtpsvc.toml"
    path.write_text(f'[resolver]\nnameservers = ["{dns_server.nameserver}"]\n\n{table}')
    return path


def test_keygen_writes_a_0600_key_prints_the_record_and_never_overwrites(tmp_path: Path) -> None:
    out = tmp_path / "k.pem"
    code, output = run("dkim", "keygen", "--domain", "example.test", "--selector", "s1", "--out", str(out))
    assert code == 0, output
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    strings = published_strings(output)
    assert len(strings) == 2 and all(len(s) <= 255 for s in strings)  # a 2048-bit key needs two strings
    assert "".join(strings).startswith("v=DKIM1; k=rsa; p=MIIB")
    assert "s1._domainkey.example.test. IN TXT" in output
    secret = "".join(out.read_text().splitlines()[1:-1])
    assert secret[:40] not in output  # the private key is written, never printed
    before = out.read_bytes()
    code, output = run("dkim", "keygen", "--domain", "example.test", "--selector", "s1", "--out", str(out))
    assert code == 1 and "exists; give --force" in output
    assert out.read_bytes() == before
    code, _ = run(
        "dkim", "keygen", "--domain", "example.test", "--selector", "s1", "--out", str(out), "--force"
    )
    assert code == 0 and out.read_bytes() != before


def test_check_says_ok_when_the_published_record_matches_and_names_a_mismatch(
    tmp_path: Path, dns_server: DnsServer
) -> None:
    for algorithm in ("rsa-sha256", "ed25519-sha256"):
        out = tmp_path / f"{algorithm}.pem"
        code, output = run(
            "dkim", "keygen", "--domain", "example.test", "--selector", algorithm[:3], "--out", str(out),
            "--algorithm", algorithm,
        )  # fmt: skip
        assert code == 0, output
        config = config_for(tmp_path, dns_server, output)
        check = ("dkim", "check", "-c", str(config), "--domain", "example.test", "--selector", algorithm[:3])
        code, said = run(*check)
        assert code == 1 and "MISMATCH: no TXT record is published there" in said, said
        dns_server.add_txt(f"{algorithm[:3]}._domainkey.example.test", *published_strings(output))
        code, said = run(*check)
        assert code == 0 and "OK: the published record matches" in said, said
        # a new key in the file, the old record in DNS: a mismatch, said in words
        code, _ = run(
            "dkim", "keygen", "--domain", "example.test", "--selector", algorithm[:3], "--out", str(out),
            "--algorithm", algorithm, "--force",
        )  # fmt: skip
        code, said = run(*check)
        assert code == 1 and "is not the one of the configured key_file" in said, said
        secret = "".join(out.read_text().splitlines()[1:-1])
        assert secret[:30] not in said


def test_check_names_a_key_file_that_cannot_be_used(tmp_path: Path, dns_server: DnsServer) -> None:
    config = tmp_path / "smtpsvc.toml"
    missing = tmp_path / "gone.pem"
    config.write_text(
        f'[resolver]\nnameservers = ["{dns_server.nameserver}"]\n\n'
        f'[[dkim]]\ndomain = "example.test"\nselector = "s1"\nkey_file = "{missing}"\n'
    )
    code, said = run("dkim", "check", "-c", str(config), "--domain", "example.test", "--selector", "s1")
    assert code == 1 and str(missing) in said and "cannot be read" in said
    code, said = run("dkim", "check", "-c", str(config), "--domain", "example.test", "--selector", "s9")
    assert code == 1 and "no [[dkim]] table" in said and "example.test/s1" in said


def test_config_check_names_each_dkim_table_problem_by_line(tmp_path: Path) -> None:
    config = tmp_path / "smtpsvc.toml"
    config.write_text(
        '[[dkim]]\ndomain = "example.test"\nkey_file = "k.pem"\nalgorithm = "rsa"\n\n'
        '[[dkim]]\ndomain = "bad domain"\nselector = "s1"\nkey_file = "k.pem"\n\n'
        '[[dkim]]\ndomain = "*"\nselector = "s1"\nkey_file = "k.pem"\n\n'
        '[[dkim]]\ndomain = "*"\nselector = "s1"\nkey_file = "k2.pem"\n'
    )
    code, said = run("config", "check", "-c", str(config))
    assert code == 2
    assert f'{config}:1: dkim[1].selector: missing "selector"' in said
    assert f"{config}:4: dkim[1].algorithm: expected one of" in said
    assert f'{config}:7: dkim[2].domain: invalid domain "bad domain"' in said
    assert 'dkim[4].selector: *: selector "s1" is given twice' in said
    config.write_text('[dkim]\ndomain = "example.test"\n')
    code, said = run("config", "check", "-c", str(config))
    assert code == 2 and "write [[dkim]] (an array of tables, one per key), not [dkim]" in said
