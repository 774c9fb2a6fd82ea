"""Map one IIS SMTP virtual server's properties to smtpsvc settings: pure, table-tested.

Every setting made names the IIS property (and value) it came from; every property that cannot be carried
over goes into the report with the reason. No new keys: where smtpsvc has none, the report says so. The
mappings are those of docs/operations.md ("Moving from IIS"), which keeps the table for reference.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from smtpsvc import verbmask
from smtpsvc.config import parse_address_space, parse_domain, parse_host_port, parse_smart_hosts
from smtpsvc.migrate import ImportFailed
from smtpsvc.migrate.ipseclist import IpSecList, decode
from smtpsvc.migrate.metabase import Properties, VirtualServer

TomlValue = Any  # str | int | bool | list[str] | dict[str, str | bool] | list[dict[...]]
UNLIMITED = 0xFFFFFFFF  # the metabase's "no limit" (VBScript &HFFFFFFFF; WMI's SINT32 shows it as -1)

# RouteAction bits of IIsSmtpDomain (and of the server's outbound security). Microsoft documents the property
# ("flags the various SMTP options", RouteAction Metabase Property, Windows Server 2003 TechNet cc757175) but
# not its bits; these are the SMTP_* constants as listed in that page's community content (Thomas Born).
SMTP_DROP = 0x1  # local domain delivered to the Drop folder
SMTP_SMARTHOST = 0x2  # "Forward all mail to smart host" (the host in RouteActionString)
SMTP_SSL = 0x4  # outbound TLS encryption for this domain
SMTP_SASL = 0x8
SMTP_ALIAS = 0x10  # alias (local) domain
SMTP_DELIVER = 0x20
SMTP_DEFAULT = 0x40  # the default (local) domain
SMTP_AUTH_NTLM = 0x80  # outbound Integrated Windows authentication
SMTP_AUTH_CLEARTEXT = 0x100  # outbound Basic authentication (RouteUserName / RoutePassword)
SMTP_ETRN_CMD = 0x200  # "Send ETRN/TURN" to the domain's server
SMTP_IP_RELAY = 0x400
SMTP_AUTH_RELAY = 0x800
SMTP_DOMAIN_RELAY = 0x1000  # "Allow incoming mail to be relayed to this domain"
SMTP_CSIDE_TURN = 0x2000
SMTP_CSIDE_ETRN = 0x4000
SMTP_DISABLE_ETRN = 0x8000
SMTP_CHUNKING = 0x10000
SMTP_DISABLE_CHUNK = 0x20000
SMTP_DISABLE_BMIME = 0x40000
SMTP_DISABLE_DSN = 0x80000
SMTP_DISABLE_PIPELINE = 0x100000
SMTP_AUTH_KERBEROS = 0x200000
SMTP_USE_HELO = 0x400000
_LOCAL_BITS = SMTP_DROP | SMTP_ALIAS | SMTP_DEFAULT
_CONNECTOR_BITS = SMTP_SMARTHOST | SMTP_SSL | SMTP_AUTH_CLEARTEXT | SMTP_USE_HELO
_UNSUPPORTED_ROUTE_BITS = {
    SMTP_SASL: "SMTP_SASL (0x8): not documented; no equivalent",
    SMTP_DELIVER: "SMTP_DELIVER (0x20): no equivalent",
    SMTP_AUTH_NTLM: "outbound Integrated Windows authentication (0x80): smtpsvc sends PLAIN or LOGIN only",
    SMTP_ETRN_CMD: "Send ETRN/TURN (0x200): smtpsvc never sends ETRN; the destination is retried by itself",
    SMTP_IP_RELAY: "SMTP_IP_RELAY (0x400): no per-domain relay rules; relay.allow is for all domains",
    SMTP_AUTH_RELAY: "SMTP_AUTH_RELAY (0x800): no per-domain relay rules; see relay.allow_authenticated",
    SMTP_CSIDE_TURN: "client-side TURN (0x2000): no equivalent",
    SMTP_CSIDE_ETRN: "client-side ETRN (0x4000): smtpsvc never sends ETRN",
    SMTP_DISABLE_ETRN: "ETRN disabled for this domain (0x8000): only extensions.etrn, for all clients",
    SMTP_DISABLE_CHUNK: "CHUNKING disabled for this domain (0x20000): outbound BDAT is never used anyway",
    SMTP_DISABLE_BMIME: "BINARYMIME disabled for this domain (0x40000): no per-domain switch",
    SMTP_DISABLE_DSN: "DSN disabled for this domain (0x80000): no per-domain switch",
    SMTP_DISABLE_PIPELINE: "PIPELINING disabled for this domain (0x100000): no per-domain switch",
    SMTP_AUTH_KERBEROS: "outbound Kerberos authentication (0x200000): smtpsvc sends PLAIN or LOGIN only",
}
_KNOWN_ROUTE_BITS = (
    _LOCAL_BITS | _CONNECTOR_BITS | SMTP_DOMAIN_RELAY | SMTP_CHUNKING | sum(_UNSUPPORTED_ROUTE_BITS)
)

# AuthFlags (IIsSmtpServer): the MD_AUTH_* bits of the AuthFlags Metabase Property (IIS 6.0 SDK ms524513:
# AuthAnonymous 1, AuthBasic 2, AuthNTLM 4, AuthMD5 16, AuthPassport 64). MetaBase.xml may spell them out.
AUTH_ANONYMOUS, AUTH_BASIC, AUTH_NTLM, AUTH_MD5, AUTH_PASSPORT = 1, 2, 4, 16, 64
_AUTH_NAMES = {
    "authanonymous": AUTH_ANONYMOUS,
    "authbasic": AUTH_BASIC,
    "authntlm": AUTH_NTLM,
    "authmd5": AUTH_MD5,
    "authpassport": AUTH_PASSPORT,
}

# SmartHostType (SmartHostType Metabase Property, TechNet cc739348): 0 no smart host, 1 "Attempt direct
# delivery before sending to smart host" checked, 2 always the smart host.
_SMART_HOST_TYPES = {1: "after_direct", 2: "always"}

# Properties with no smtpsvc key, and why (what to do instead).
_NO_EQUIVALENT = {
    "SmtpOutboundCommandSupportOptions": "outbound, smtpsvc uses what the peer advertises; a connector's "
    "use_helo = true turns ESMTP off for it",
    "SmtpLocalDelayExpireMinutes": "no separate key for local mail: Drop recipients follow "
    "delivery.delay_notification",
    "SmtpLocalNDRExpireMinutes": "no separate key for local mail: Drop recipients follow delivery.expiration",
    "PickupDirectory": "a fixed folder: pickup/ under server.root",
    "QueueDirectory": "a fixed folder: queue/ under server.root",
    "DropDirectory": "a fixed folder: drop/ under server.root",
    "BadMailDirectory": "a fixed folder: badmail/ under server.root",
    "SendBadTo": "Badmail items are not mailed to anyone: watch event 3005 or `smtpsvc badmail list`",
    "RoutePassword": "passwords are never imported: it goes into the password_file named in the report",
    "LogType": "no W3C protocol log: events are in log/events.jsonl",
    "LogFileDirectory": "no W3C protocol log: events are in log/events.jsonl",
    "LogFilePeriod": "no W3C protocol log",
    "SmtpDSNLanguageID": "reports are in English",
    "SmtpDSNOptions": "no equivalent",
    "SaslLogonDomain": "accounts are smtpsvc's own (`smtpsvc users add`), not Windows accounts",
    "SmtpLocalRetryMinutes": "no separate retry for local mail (a Drop write only fails when the disk does)",
    "SmtpRemoteRetryThreshold": "no equivalent: delivery.retry lists the intervals",
    "SmtpDomainValidationFlags": "no equivalent",
    "MaxMailObjects": "no equivalent",
    "PerMsgFailuresBeforeMarkingAsProblem": "no equivalent",
    "CatRetryMinutes": "no equivalent",
    "SmtpDotStuffPickupDirFiles": "Pickup files are taken literally (as with DisablePickupDotStuff = 1)",
    "DisablePickupDotStuff": "Pickup files are taken literally (as with DisablePickupDotStuff = 1)",
    "AllowVerify": "VRFY is governed by the verb mask (server.inbound_command_support_options)",
    "AllowExpand": "EXPN is governed by the verb mask (server.inbound_command_support_options)",
    "SmtpAdvQueueDll": "no equivalent",
}
# Properties read by the mapping below (with the ones above, nothing else is "not looked at").
_MAPPED = {
    name.lower()
    for name in [
        "ServerBindings",
        "FullyQualifiedDomainName",
        "DefaultDomain",
        "MasqueradeDomain",
        "DoMasquerade",
        "SmartHost",
        "SmartHostType",
        "RemoteSmtpPort",
        "SmtpRemoteProgressiveRetry",
        "SmtpRemoteDelayExpireMinutes",
        "SmtpRemoteNDRExpireMinutes",
        "SendNdrTo",
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
        "RelayIpList",
        "IPSecurity",
        "RouteUserName",
        "RouteAction",
        "RouteActionString",
        "ConnectionTimeout",
        "MaxConnections",
        "RemoteTimeout",
        "MaxBatchedMessages",
        "MaxSmtpErrors",
        "EnableReverseDnsLookup",
        "ShouldPipelineIn",
        "IPGrant",
        "IPDeny",
        "DomainGrant",
        "DomainDeny",
        "GrantByDefault",
    ]
}
# Properties every IIS object has that say nothing about mail (not worth a line in the report).
_IGNORED = {
    name.lower()
    for name in [
        "ServerComment",
        "ServerAutoStart",
        "ServerState",
        "ServerSize",
        "ServerListenBacklog",
        "ServerListenTimeout",
        "KeyType",
        "AdminACL",
        "AdminACLBin",
        "Win32Error",
        "ClusterEnabled",
        "ServerID",
        "SettingID",
        "Caption",
        "Description",
        "AuthAnonymous",
        "AuthBasic",
        "AuthNTLM",
        "AuthMD5",
        "AuthPassport",
        "PSComputerName",
    ]
}


@dataclass(frozen=True)
class Setting:
    """One key to write: `section` ("server", "delivery", "connector", ...), its value, and where it came
    from in the IIS administrator's words ('MaxMessageSize 2097152 bytes')."""

    section: str
    key: str
    value: TomlValue
    source: str


@dataclass(frozen=True)
class Connector:
    """One [[connector]] made from a remote domain."""

    domain: str
    settings: tuple[Setting, ...]
    source: str


@dataclass(frozen=True)
class Shortfall:
    """A property (or part of one) not carried over, and why."""

    prop: str
    why: str


@dataclass(frozen=True)
class Credential:
    """An AUTH user whose password the administrator must supply: `key` names the table in the TOML."""

    key: str
    user: str
    password_file: str
    written: bool = False  # the CLI asked for the password and wrote the file


@dataclass
class Conversion:
    where: str
    settings: list[Setting] = field(default_factory=list)
    connectors: list[Connector] = field(default_factory=list)
    shortfalls: list[Shortfall] = field(default_factory=list)
    credentials: list[Credential] = field(default_factory=list)

    def set(self, section: str, key: str, value: TomlValue, source: str) -> None:
        self.settings.append(Setting(section, key, value, source))

    def short(self, prop: str, why: str) -> None:
        self.shortfalls.append(Shortfall(prop, why))

    def value(self, section: str, key: str) -> TomlValue:
        for s in self.settings:
            if (s.section, s.key) == (section, key):
                return s.value
        return None


class _Reader:
    """Typed access to one object's properties; a value that is not of its type fails the import."""

    def __init__(self, props: Properties, where: str) -> None:
        self.props = props
        self.where = where

    def bad(self, name: str, what: str) -> ImportFailed:
        return ImportFailed(f"{name} of {self.where} {what}: {self.props.get(name)!r}")

    def has(self, name: str) -> bool:
        return self.props.has(name)

    def number(self, name: str) -> int | None:
        raw = self.props.get(name)
        if raw is None or raw == "":
            return None
        if isinstance(raw, bool):
            return int(raw)
        if isinstance(raw, int):
            value = raw
        elif isinstance(raw, str):
            try:
                value = int(raw.strip(), 0) if raw.strip().lower().startswith("0x") else int(raw.strip())
            except ValueError:
                raise self.bad(name, "is not a number") from None
        else:
            raise self.bad(name, "is not a number")
        return value + 2**32 if -(2**31) <= value < 0 else value  # a DWORD read as SINT32 by WMI

    def boolean(self, name: str) -> bool | None:
        raw = self.props.get(name)
        if raw is None or raw == "":
            return None
        if isinstance(raw, str) and raw.strip().lower() in ("true", "false"):
            return raw.strip().lower() == "true"
        number = self.number(name)
        return bool(number)

    def text(self, name: str) -> str:
        raw = self.props.get(name)
        if raw is None:
            return ""
        if isinstance(raw, list):
            return ";".join(str(x) for x in raw)
        return str(raw).strip()

    def strings(self, name: str) -> list[object]:
        """A multi-string: one per line in MetaBase.xml, a JSON array in the export."""
        raw = self.props.get(name)
        if raw is None:
            return []
        if isinstance(raw, list):
            return [x for x in raw if x not in (None, "")]
        # One per line in the file, but an XML parser turns the line breaks of an attribute into spaces
        # (attribute-value normalization); the values split here (bindings) have no spaces of their own.
        return list(str(raw).split())

    def flags(self, name: str, names: dict[str, int]) -> int | None:
        raw = self.props.get(name)
        if isinstance(raw, str) and raw.strip() and not raw.strip().lstrip("-").isdigit():
            total = 0
            for word in raw.replace(",", "|").split("|"):
                if word.strip().lower() not in names:
                    raise self.bad(name, f"has an unknown flag {word.strip()!r}")
                total |= names[word.strip().lower()]
            return total
        return self.number(name)

    def blob(self, name: str) -> bytes | None:
        """A binary property: hex in MetaBase.xml, an array of byte numbers in the export; None if absent."""
        raw = self.props.get(name)
        if raw is None:
            return None
        if isinstance(raw, list):
            if not all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= 255 for b in raw):
                raise self.bad(name, "is not an array of byte numbers (0-255)")
            return bytes(raw)
        if isinstance(raw, str):
            text = "".join(raw.split())
            try:
                return bytes.fromhex(text)
            except ValueError:
                raise ImportFailed(
                    f"{name} of {self.where} is damaged: not hexadecimal digits in pairs "
                    f"({len(text)} characters starting {text[:16]!r})"
                ) from None
        raise self.bad(name, "is not binary data")


def convert(server: VirtualServer, password_file: Callable[[str], str]) -> Conversion:
    """The smtpsvc settings for `server`. `password_file(label)` gives the path to name for an AUTH
    user's password (the CLI decides where it lives)."""
    r = _Reader(server.props, server.where)
    out = Conversion(server.where)
    _server_section(r, out)
    _limits(r, out)
    _delivery(r, out, password_file)
    _auth_and_relay(r, out)
    _domains(server, r, out, password_file)
    _unmapped(r, out)
    return out


def _server_section(r: _Reader, out: Conversion) -> None:
    bindings = r.strings("ServerBindings")
    if bindings:
        listen = [_listen(r, b) for b in bindings]
        shown = ", ".join(f'"{_binding_text(b)}"' for b in bindings)
        out.set("server", "listen", listen, f"ServerBindings {shown}")
    if r.text("FullyQualifiedDomainName"):
        fqdn = r.text("FullyQualifiedDomainName")
        out.set("server", "hostname", fqdn.lower(), f"FullyQualifiedDomainName {fqdn}")
    masquerade = r.text("MasqueradeDomain")
    if masquerade and r.boolean("DoMasquerade") is not False:
        out.set("server", "masquerade_domain", masquerade.lower(), f"MasqueradeDomain {masquerade}")
    elif masquerade:
        out.short("MasqueradeDomain", f"{masquerade} is set but DoMasquerade is off: not imported")
    mask = r.number("SmtpInboundCommandSupportOptions")
    if mask is not None:
        if 0 <= mask <= verbmask.MAX_MASK:
            out.set(
                "server",
                "inbound_command_support_options",
                mask,
                f"SmtpInboundCommandSupportOptions {mask} (0x{mask:X})",
            )
        else:
            out.short(
                "SmtpInboundCommandSupportOptions", f"{mask} has bits beyond the verb mask; not imported"
            )
    timeout = r.number("ConnectionTimeout")
    if timeout:
        out.set("server", "connection_timeout", f"{timeout}s", f"ConnectionTimeout {timeout} seconds")
    if r.boolean("EnableReverseDnsLookup") is not None:
        on = bool(r.boolean("EnableReverseDnsLookup"))
        out.set("server", "reverse_dns", on, f"EnableReverseDnsLookup {r.text('EnableReverseDnsLookup')}")
    if r.boolean("ShouldPipelineIn") is False:
        out.set("extensions", "pipelining", False, "ShouldPipelineIn FALSE")


def _binding_text(binding: object) -> str:
    if isinstance(binding, dict):
        return f"{binding.get('IP') or ''}:{binding.get('Port') or ''}:{binding.get('Hostname') or ''}"
    return str(binding)


def _listen(r: _Reader, binding: object) -> str:
    """An IIS binding ("IP:port:hostname", ":25:" for all addresses; WMI: {IP, Port, Hostname}) as
    HOST:PORT."""
    text = _binding_text(binding)
    parts = text.split(":")
    if len(parts) < 2 or not parts[1].strip().isdigit() or not 0 < int(parts[1]) < 65536:
        raise ImportFailed(f'ServerBindings of {r.where}: {text!r} is not IP:port:hostname (e.g. ":25:")')
    address = parts[0].strip() or "0.0.0.0"
    try:
        ipaddress.IPv4Address(address)
    except ValueError:
        raise ImportFailed(
            f"ServerBindings of {r.where}: {address!r} in {text!r} is not an IPv4 address"
        ) from None
    return f"{address}:{int(parts[1])}"


def _size(value: int) -> int:
    return 0 if value in (0, UNLIMITED) else value


def _limits(r: _Reader, out: Conversion) -> None:
    for prop, section, key in (
        ("MaxMessageSize", "server", "max_message_size"),
        ("MaxSessionSize", "server", "max_session_size"),
    ):
        value = r.number(prop)
        if value is not None:
            note = " (no limit)" if _size(value) == 0 else ""
            out.set(section, key, _size(value), f"{prop} {value} bytes{note}")
    counts = (
        ("MaxRecipients", "server", "max_recipients"),
        ("HopCount", "server", "max_hop_count"),
        ("MaxConnections", "server", "max_connections"),
        ("MaxSmtpErrors", "server", "max_errors"),
        ("MaxOutConnections", "delivery", "max_connections"),
        ("MaxOutConnectionsPerDomain", "delivery", "max_connections_per_domain"),
        ("MaxBatchedMessages", "delivery", "max_messages_per_connection"),
    )
    for prop, section, key in counts:
        value = r.number(prop)
        if value is None:
            continue
        if value in (0, UNLIMITED):
            out.short(
                prop,
                f"{value} means no limit in IIS; smtpsvc always has one: {section}.{key} keeps "
                "its default (docs/configuration.md); raise it if need be",
            )
        else:
            out.set(section, key, value, f"{prop} {value}")


def _delivery(r: _Reader, out: Conversion, password_file: Callable[[str], str]) -> None:
    smart_host, kind = r.text("SmartHost"), r.number("SmartHostType")
    if smart_host and kind in _SMART_HOST_TYPES:
        try:
            parse_smart_hosts(smart_host)
        except ValueError as exc:
            out.short("SmartHost", f"{smart_host!r} is not a host smtpsvc can use ({exc})")
        else:
            out.set("delivery", "smart_host", smart_host, f"SmartHost {smart_host}")
            out.set(
                "delivery",
                "smart_host_type",
                _SMART_HOST_TYPES[kind or 0],
                f"SmartHostType {kind} ({'direct delivery first' if kind == 1 else 'always the smart host'})",
            )
    elif smart_host:
        out.short("SmartHost", f"{smart_host} is set but SmartHostType is {kind}: IIS does not use it either")
    port = r.number("RemoteSmtpPort")
    if port is not None:
        out.set("delivery", "remote_port", port, f"RemoteSmtpPort {port}")
    retry = r.text("SmtpRemoteProgressiveRetry")
    if retry:
        minutes = [m.strip() for m in retry.split(",")]
        if all(m.isdigit() and int(m) > 0 for m in minutes):
            out.set(
                "delivery", "retry", [f"{m}m" for m in minutes], f"SmtpRemoteProgressiveRetry {retry} minutes"
            )
        else:
            out.short("SmtpRemoteProgressiveRetry", f"{retry!r} is not a list of minutes")
    for prop, key in (
        ("SmtpRemoteDelayExpireMinutes", "delay_notification"),
        ("SmtpRemoteNDRExpireMinutes", "expiration"),
    ):
        expire = r.number(prop)
        if expire:
            out.set("delivery", key, f"{expire}m", f"{prop} {expire} minutes")
    timeout = r.number("RemoteTimeout")
    if timeout:
        out.set("delivery", "timeout", f"{timeout}s", f"RemoteTimeout {timeout} seconds")
    if r.text("SendNdrTo"):
        out.set("delivery", "send_ndr_copy_to", r.text("SendNdrTo"), f"SendNdrTo {r.text('SendNdrTo')}")
    if r.boolean("AlwaysUseSsl"):
        out.set(
            "delivery", "tls", "required", f"AlwaysUseSsl {r.text('AlwaysUseSsl')} (TLS for every delivery)"
        )
    user = r.text("RouteUserName")
    route = r.number("RouteAction") or 0
    if route & (SMTP_AUTH_NTLM | SMTP_AUTH_KERBEROS):
        out.short(
            "RouteAction", "outbound Integrated Windows authentication: smtpsvc sends PLAIN or LOGIN only"
        )
    if user and out.value("delivery", "smart_host"):
        path = password_file("smarthost")
        out.set(
            "delivery",
            "smart_host_auth",
            {"user": user, "password_file": path},
            f"RouteUserName {user} (Outbound Security, Basic authentication); the password is not imported",
        )
        out.credentials.append(Credential("delivery.smart_host_auth", user, path))
    elif user:
        out.short(
            "RouteUserName",
            f"{user}: smtpsvc sends AUTH only to a smart host or a connector, and "
            "this server has no smart host",
        )


def _auth_and_relay(r: _Reader, out: Conversion) -> None:
    flags = r.flags("AuthFlags", _AUTH_NAMES)
    if flags is not None:
        shown = f"AuthFlags {r.text('AuthFlags')}"
        if flags & AUTH_BASIC:
            out.set("auth", "mechanisms", ["PLAIN", "LOGIN"], f"{shown} (Basic authentication)")
        else:
            out.set("auth", "mechanisms", [], f"{shown} (no Basic authentication: AUTH not offered)")
        if flags & AUTH_NTLM:
            out.short(
                "AuthFlags",
                "Integrated Windows authentication (NTLM, GSSAPI): no equivalent; "
                "clients log in with PLAIN or LOGIN to smtpsvc's own accounts (`smtpsvc users add`)",
            )
        if not flags & AUTH_ANONYMOUS:
            out.short(
                "AuthFlags",
                "anonymous access is off in IIS: smtpsvc always accepts anonymous clients "
                'for its local domains (there is no "AUTH required" switch)',
            )
    relay_for_auth = r.number("RelayForAuth")
    if relay_for_auth is not None:
        out.set("relay", "allow_authenticated", relay_for_auth != 0, f"RelayForAuth {r.text('RelayForAuth')}")
    _relay_list(r, out)
    _ip_security(r, out)


def _relay_list(r: _Reader, out: Conversion) -> None:
    if "relayiplist" not in {n.lower() for n in r.props.names()}:
        return  # not set anywhere: smtpsvc's default (this computer only) stands
    blob = r.blob("RelayIpList")
    source = "RelayIpList"
    if blob is None:
        out.set("relay", "allow", [], f'{source} (none: "Only the list below", nobody listed)')
        return
    if not blob:
        out.set("relay", "allow", ["0.0.0.0/0", "::/0"], f'{source} (empty: "All except the list below")')
        out.short(
            "RelayIpList",
            'was "All except the list below" with nobody listed: every client may '
            "relay, an open relay on the Internet; consider a relay.allow list instead",
        )
        return
    lists = decode(blob, f"RelayIpList of {r.where}")
    if lists.grant_by_default:
        out.set("relay", "allow", ["0.0.0.0/0", "::/0"], f"{source} {lists.describe()}")
        out.set("relay", "deny", [str(n) for n in lists.deny], f"{source} {lists.describe()}")
        out.short(
            "RelayIpList",
            'was "All except the list below": every other client may relay, an open '
            "relay on the Internet; consider a relay.allow list instead",
        )
    else:
        out.set("relay", "allow", [str(n) for n in lists.grant], f"{source} {lists.describe()}")
        if lists.deny:
            out.set("relay", "deny", [str(n) for n in lists.deny], f"{source} (its deny list)")
    _names(out, "RelayIpList", lists)


def _names(out: Conversion, prop: str, lists: IpSecList) -> None:
    for count, which in ((lists.grant_names, "granted"), (lists.deny_names, "denied")):
        if count:
            out.short(
                prop,
                f"{count} computer(s) {which} by DNS name (DomainGrant/DomainDeny): smtpsvc's "
                "rules are by address only; list their networks instead",
            )


def _ip_security(r: _Reader, out: Conversion) -> None:
    """IIS's Connection control (IPSecurity) as `[connection]`: "Only the list below" is connection.allow,
    "All except the list below" connection.deny. IIS 7+'s IIsIPSecuritySetting gives the same lists as
    IPGrant/IPDeny strings ("192.0.2.0, 255.255.255.0") with GrantByDefault; IIS 6 the IPSECLIST blob."""
    granted, denied = r.strings("IPGrant"), r.strings("IPDeny")
    names = r.strings("DomainGrant") + r.strings("DomainDeny")
    if granted or denied or names:
        default = r.boolean("GrantByDefault")
        grant = tuple(_ip_entry(r, "IPGrant", e) for e in granted)
        deny = tuple(_ip_entry(r, "IPDeny", e) for e in denied)
        by_default = default if default is not None else not grant
        _connection_rules(out, IpSecList(grant, deny, 0, 0, by_default), "IPSecurity (IIsIPSecuritySetting)")
        if names:
            out.short(
                "IPSecurity",
                f"{len(names)} computer(s) by DNS name (DomainGrant/DomainDeny): connection control is by "
                "address only; list their networks instead",
            )
        return  # the same lists as the blob, already decoded by WMI
    blob = r.blob("IPSecurity")
    if not blob:
        return
    lists = decode(blob, f"IPSecurity of {r.where}")
    _connection_rules(out, lists, "IPSecurity")
    _names(out, "IPSecurity", lists)


def _ip_entry(r: _Reader, name: str, entry: object) -> ipaddress.IPv4Network:
    """One IIsIPSecuritySetting entry, "address, mask" (or a bare address: that one computer)."""
    text = str(entry).strip()
    address, _, mask = (part.strip() for part in text.partition(","))
    try:
        return ipaddress.IPv4Network(f"{address}/{mask or '255.255.255.255'}", strict=False)
    except ValueError:
        raise ImportFailed(
            f'{name} of {r.where}: {text!r} is not "address, mask" (e.g. "192.0.2.0, 255.255.255.0")'
        ) from None


def _connection_rules(out: Conversion, lists: IpSecList, source: str) -> None:
    described = f"{source} {lists.describe()}"
    if lists.grant_by_default:
        if lists.deny:
            out.set("connection", "deny", [str(n) for n in lists.deny], described)
        if lists.grant:  # the dialog cannot make these: a script did, and IIS went by the deny list
            listed = ", ".join(str(n) for n in lists.grant)
            out.short("IPSecurity", f'granted {listed} in an "All except the list below" list: not imported')
        return  # nobody denied: everyone may connect, smtpsvc's default
    if not lists.grant:
        out.set("connection", "deny", ["0.0.0.0/0", "::/0"], f"{described}: nobody may connect")
        return
    loopback = ipaddress.IPv4Address("127.0.0.1")
    if not any(loopback in n for n in lists.grant):
        described += "; 127.0.0.1 is not listed: programs on this computer may not connect either"
    out.set("connection", "allow", [str(n) for n in lists.grant], described)
    if lists.deny:
        out.set("connection", "deny", [str(n) for n in lists.deny], f"{source} (its deny list)")


def _domains(server: VirtualServer, r: _Reader, out: Conversion, password_file: Callable[[str], str]) -> None:
    default = r.text("DefaultDomain")
    local: list[str] = [default.lower()] if default else []
    sources = [f"DefaultDomain {default}"] if default else []
    remote: list[dict[str, TomlValue]] = []
    remote_sources: list[str] = []
    for name, props in sorted(server.domains.items()):
        d = _Reader(props, f"{server.where}/Domain/{name}")
        route = d.number("RouteAction") or 0
        if d.blob("RelayIpList"):
            out.short(
                f"RelayIpList of {name}", "a relay list of one domain: no equivalent (relay.allow is for all)"
            )
        if route & _LOCAL_BITS or name.lower() == default.lower():
            if name.lower() not in local:
                local.append(name.lower())
                sources.append(f"IIsSmtpDomain {name} (RouteAction 0x{route:X}: local)")
            continue
        entry = _remote_domain(name, d, route, out, password_file)
        if entry is not None:
            remote.append(entry)
            remote_sources.append(f"IIsSmtpDomain {name} (RouteAction 0x{route:X})")
    if local:
        out.set("domains", "local", local, "; ".join(sources) + " (delivered to drop/)")
    if remote:
        out.set("domains", "remote", remote, "; ".join(remote_sources))


def _remote_domain(
    name: str, d: _Reader, route: int, out: Conversion, password_file: Callable[[str], str]
) -> dict[str, TomlValue] | None:
    """A remote domain's [[connector]] (if it has a route of its own) and its domains.remote entry (if
    relayed to, or routed)."""
    prop = f"RouteAction of {name}"
    for bit, why in _UNSUPPORTED_ROUTE_BITS.items():
        if route & bit:
            out.short(prop, why)
    if route & ~_KNOWN_ROUTE_BITS:
        out.short(prop, f"unknown bits 0x{route & ~_KNOWN_ROUTE_BITS:X}: not imported")
    try:
        space = parse_address_space(name)
    except ValueError as exc:
        out.short(f"IIsSmtpDomain {name}", f"not a domain smtpsvc can route ({exc})")
        return None
    settings: list[Setting] = []
    if route & SMTP_SMARTHOST:
        hosts = [h.strip() for h in d.text("RouteActionString").split(";") if h.strip()]
        try:
            for h in hosts:
                parse_host_port(h)
        except ValueError as exc:
            out.short(f"RouteActionString of {name}", f"{d.text('RouteActionString')!r}: {exc}; not imported")
            hosts = []
        if hosts:
            settings.append(
                Setting(
                    "connector",
                    "smart_hosts",
                    hosts,
                    f"RouteActionString {';'.join(hosts)} (Forward all mail to smart host)",
                )
            )
        else:
            out.short(prop, '"Forward all mail to smart host" without a host (RouteActionString)')
    if route & SMTP_SSL:
        settings.append(Setting("connector", "tls", "required", "RouteAction 0x4 (TLS encryption)"))
    if route & SMTP_USE_HELO:
        settings.append(
            Setting("connector", "use_helo", True, "RouteAction 0x400000 (Send HELO instead of EHLO)")
        )
    user = d.text("RouteUserName")
    if route & SMTP_AUTH_CLEARTEXT and user:
        path = password_file(_label(name))
        settings.append(
            Setting(
                "connector",
                "auth",
                {"user": user, "password_file": path},
                f"RouteAction 0x100 (Basic authentication), RouteUserName {user}",
            )
        )
        out.credentials.append(Credential(f'connector "{_label(name)}" auth', user, path))
    elif user:
        out.short(f"RouteUserName of {name}", f"{user}: Basic authentication is not selected for this domain")
    routed = bool(settings)
    if routed:
        head = (
            Setting("connector", "name", _label(name), f"IIsSmtpDomain {name} (remote domain)"),
            Setting("connector", "address_spaces", [space], f"IIsSmtpDomain {name}"),
        )
        out.connectors.append(Connector(name, head + tuple(settings), f"RouteAction 0x{route:X}"))
    relay = bool(route & SMTP_DOMAIN_RELAY)
    if space == "*" or space.startswith("*."):
        if relay:
            out.short(
                f"IIsSmtpDomain {name}", "relaying to a wildcard domain: domains.remote takes exact names"
            )
        return None
    if not relay and not routed:
        out.short(
            f"IIsSmtpDomain {name}",
            "a remote domain with no route, relay or security of its own: mail "
            "to it goes by MX as to any domain",
        )
        return None
    entry: dict[str, TomlValue] = {"name": parse_domain(name), "relay": relay}
    if routed:
        entry["route"] = _label(name)
    return entry


def _label(domain: str) -> str:
    return domain.lower().replace("*", "any")


def _unmapped(r: _Reader, out: Conversion) -> None:
    """The report's lines for properties with no equivalent, and one line naming the ones not looked at."""
    unknown = []
    known = {k.lower(): k for k in _NO_EQUIVALENT}
    for name in r.props.names():
        lowered = name.lower()
        if lowered in known:
            if r.text(name):
                out.short(known[lowered], f'"{r.text(name)}": {_NO_EQUIVALENT[known[lowered]]}')
        elif lowered not in _MAPPED and lowered not in _IGNORED:
            unknown.append(name)
    if unknown:
        out.short(
            "other properties", "not looked at (no smtpsvc equivalent known): " + ", ".join(sorted(unknown))
        )
