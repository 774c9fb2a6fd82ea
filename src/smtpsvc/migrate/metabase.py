"""Read the IIS SMTP settings from either of the two files an administrator can produce, into one neutral
form: the properties of the chosen virtual server (inheriting from the service) and of its domains.

- IIS 6 (Windows Server 2003, and the IIS 6 compatibility of later versions): `%windir%\\system32\\inetsrv\\
  MetaBase.xml`: `<IIsSmtpService Location="/LM/SmtpSvc">`, `<IIsSmtpServer Location="/LM/SmtpSvc/1">`,
  `<IIsSmtpDomain Location="/LM/SmtpSvc/1/Domain/example.com">`; properties are attributes (binary ones as
  hex, multi-string ones one per line) or `<Custom Name=".." Value=".."/>` children.
- IIS 7+: `Get-CimInstance -Namespace root\\MicrosoftIISv2 -ClassName IIsSmtpServerSetting | ConvertTo-Json`
  (one object or a list; `Name` is "SmtpSvc/1"; binary properties are arrays of byte numbers), and the same
  for `IIsSmtpDomainSetting` ("SmtpSvc/1/Domain/example.com"), either as one object
  `{"IIsSmtpServerSetting": [...], "IIsSmtpDomainSetting": [...]}` or as one list of both kinds, told apart
  by their `Name`. An `IIsSmtpServiceSetting` object ("SmtpSvc") is inherited from, as in the metabase; an
  `IIsIPSecuritySetting` object of the server (IPGrant, IPDeny, GrantByDefault) adds to the server's.

Values stay as read (strings from XML, JSON types from JSON); `iis` converts them property by property.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any
from xml.etree import ElementTree

from smtpsvc.migrate import ImportFailed

PropValue = Any  # str | int | bool | list | dict | None, as the file had it
_SERVER_RE = re.compile(r"^(?:/LM/)?SmtpSvc/(\d+)$", re.IGNORECASE)
_DOMAIN_RE = re.compile(r"^(?:/LM/)?SmtpSvc/(\d+)/Domain/([^/]+)$", re.IGNORECASE)
_SERVICE_RE = re.compile(r"^(?:/LM/)?SmtpSvc/?$", re.IGNORECASE)
# Keys of the file format itself, not IIS properties.
_STRUCTURAL = {"location", "name", "cimclass", "ciminstanceproperties", "cimsystemproperties", "__path"}


class Properties:
    """IIS properties by name, looked up without regard to case (MetaBase.xml and WMI spell some
    differently)."""

    def __init__(self, values: dict[str, PropValue] | None = None) -> None:
        self._values: dict[str, tuple[str, PropValue]] = {}
        for name, value in (values or {}).items():
            self.set(name, value)

    def set(self, name: str, value: PropValue) -> None:
        self._values[name.lower()] = (name, value)

    def get(self, name: str) -> PropValue:
        return self._values.get(name.lower(), ("", None))[1]

    def has(self, name: str) -> bool:
        return name.lower() in self._values and self._values[name.lower()][1] is not None

    def names(self) -> list[str]:
        return [original for original, _ in self._values.values()]

    def inherit(self, parent: Properties) -> Properties:
        """These properties over `parent`'s: IIS's INHERIT attribute, which every SMTP property has."""
        merged = Properties()
        merged._values = {**parent._values, **self._values}
        return merged


@dataclass
class VirtualServer:
    """One SMTP virtual server: its number, where it came from, its properties and its domains'."""

    number: str
    where: str  # "/LM/SmtpSvc/1" (MetaBase.xml) or "SmtpSvc/1" (WMI)
    props: Properties
    domains: dict[str, Properties] = field(default_factory=dict)


@dataclass
class Export:
    kind: str  # "MetaBase.xml" | "WMI JSON export"
    service: Properties
    servers: dict[str, VirtualServer]


def read_export(data: bytes) -> Export:
    """Parse either file (told apart by its content); ImportFailed with one line when it is neither."""
    text = _decode(data).lstrip()
    if text.startswith("<"):
        export = _read_xml(text)
    elif text.startswith(("{", "[")):
        export = _read_json(text)
    else:
        raise ImportFailed(
            "not a MetaBase.xml (XML) nor a JSON export of IIsSmtpServerSetting: the file starts with "
            f"{text[:20]!r}"
        )
    if not export.servers:
        raise ImportFailed(f"no SMTP virtual server (IIsSmtpServer, SmtpSvc/N) found in this {export.kind}")
    return export


def choose_server(export: Export, number: str | None) -> VirtualServer:
    """The virtual server `--server N` names, or the only one; its properties inherit the service's."""
    found = sorted(export.servers, key=int)
    if number is None:
        if len(found) > 1:
            listing = ", ".join(f"{n} ({export.servers[n].where})" for n in found)
            raise ImportFailed(
                f"{len(found)} SMTP virtual servers found: {listing}; choose one with --server N"
            )
        number = found[0]
    number = number.strip().rsplit("/", 1)[-1]
    if number not in export.servers:
        raise ImportFailed(f"no SMTP virtual server {number}; found: {', '.join(found)}")
    chosen = export.servers[number]
    return VirtualServer(number, chosen.where, chosen.props.inherit(export.service), chosen.domains)


def _decode(data: bytes) -> str:
    # PowerShell 5's `> file` writes UTF-16 with a byte order mark; MetaBase.xml is UTF-8.
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ImportFailed(
            "not a MetaBase.xml (XML) nor a JSON export of IIsSmtpServerSetting: not text (UTF-8 or UTF-16)"
        ) from None


def _read_xml(text: str) -> Export:
    # The stdlib parser expands internal entities: a DOCTYPE could make a small file huge ("billion laughs").
    # MetaBase.xml never has one, so refuse any.
    if re.search(r"<!(DOCTYPE|ENTITY)", text, re.IGNORECASE):
        raise ImportFailed("this XML has a DOCTYPE or ENTITY declaration, which MetaBase.xml never has")
    try:
        root = ElementTree.fromstring(text)
    except ElementTree.ParseError as exc:
        raise ImportFailed(f"not well-formed XML ({exc})") from None
    export = Export("MetaBase.xml", Properties(), {})
    for element in root.iter():
        tag = element.tag.rsplit("}", 1)[-1]
        location = element.get("Location", "")
        if tag not in ("IIsSmtpService", "IIsSmtpServer", "IIsSmtpDomain"):
            continue
        props = Properties({k: v for k, v in element.attrib.items() if k.lower() not in _STRUCTURAL})
        for child in element:
            if child.tag.rsplit("}", 1)[-1] == "Custom" and child.get("Name"):
                props.set(child.get("Name", ""), child.get("Value", ""))
        _place(export, tag, location.strip(), props)
    return export


def _read_json(text: str) -> Export:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ImportFailed(f"not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if isinstance(document, dict) and any(
        k in document for k in ("IIsSmtpServerSetting", "IIsSmtpDomainSetting", "IIsSmtpServiceSetting")
    ):
        items: list[object] = []
        for value in document.values():
            items.extend(value if isinstance(value, list) else [value])
    else:
        items = document if isinstance(document, list) else [document]
    export = Export("WMI JSON export", Properties(), {})
    for item in items:
        if not isinstance(item, dict):
            raise ImportFailed("the JSON holds something other than objects with IIS properties")
        name = str(item.get("Name", "")).strip()
        props = Properties({k: v for k, v in item.items() if k.lower() not in _STRUCTURAL})
        if _DOMAIN_RE.match(name):
            _place(export, "IIsSmtpDomain", name, props)
        elif _SERVER_RE.match(name):
            _place(export, "IIsSmtpServer", name, props)
        elif _SERVICE_RE.match(name):
            _place(export, "IIsSmtpService", name, props)
    return export


def _place(export: Export, kind: str, location: str, props: Properties) -> None:
    if kind == "IIsSmtpService":
        export.service = props
        return
    if kind == "IIsSmtpServer":
        match = _SERVER_RE.match(location)
        if match:
            server = _server(export, match.group(1), location)
            # Merged, not replaced: IIsIPSecuritySetting ("SmtpSvc/1" too) adds IPGrant/IPDeny to the server.
            server.props = props.inherit(server.props)
        return
    match = _DOMAIN_RE.match(location)
    if match:
        where = re.sub(r"/Domain/[^/]+$", "", location, flags=re.IGNORECASE)
        _server(export, match.group(1), where).domains[match.group(2)] = props


def _server(export: Export, number: str, where: str) -> VirtualServer:
    if number not in export.servers:
        export.servers[number] = VirtualServer(number, where, Properties())
    return export.servers[number]
