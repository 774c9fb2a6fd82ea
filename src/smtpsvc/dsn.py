"""Delivery status notifications: builds RFC 3464 `multipart/report` messages (NDRs, delay and success DSNs).

Pure: no I/O, no clock (the caller passes `now`), stdlib only. `build_report` returns the finished message
as bytes (CRLF line endings, every line at most 998 octets) for the scheduler to submit through `ingest`;
`should_report` applies the RFC 3461 NOTIFY rules and the "never report to <> or on a report" rules.

The MIME structure is written by hand, not through `email.generator`, so that the returned original is
embedded byte for byte; the boundary is checked against everything it encloses and replaced on a collision.
The human-readable part uses the Windows SMTP Service wording ("This is an automatically generated Delivery
Status Notification. ...").
"""

from __future__ import annotations

import hashlib
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

from smtpsvc.model import Envelope, Recipient, rfc5322_date

KINDS = ("failure", "delay", "success")
ACTIONS = ("failed", "delayed", "delivered", "relayed", "expanded")  # RFC 3464 section 2.3.3

MAX_LINE = 998  # RFC 5322 section 2.1.1, without the CRLF
MAX_DIAGNOSTIC = 2000  # characters of a diagnostic we keep; the rest is cut with a marker
_FOLD_WIDTH = 78  # preferred width of the fields we write
_CHUNK = 900  # longest unbroken token we put on one line (leaves room for any field name)
_TEXT_WIDTH = 76  # width of the human-readable text

_SUBJECTS = {
    "failure": "Delivery Status Notification (Failure)",
    "delay": "Delivery Status Notification (Delay)",
    "success": "Delivery Status Notification (Success)",
}
_INTRO = "This is an automatically generated Delivery Status Notification."
_DELAY_WARNING = ("THIS IS A WARNING MESSAGE ONLY.", "YOU DO NOT NEED TO RESEND YOUR MESSAGE.")
_ACTION_HEADINGS = {  # order = order of the groups in the human-readable text
    "failed": "Delivery to the following recipients failed.",
    "delayed": "Delivery to the following recipients has been delayed.",
    "delivered": "Delivery to the following recipients succeeded.",
    "relayed": "Delivery to the following recipients has been relayed to a system that may not send "
    "further notifications.",
    "expanded": "Delivery to the following recipients succeeded; each was expanded to further recipients.",
}
_DEFAULT_STATUS = {
    "failed": "5.0.0",
    "delayed": "4.0.0",
    "delivered": "2.0.0",
    "relayed": "2.0.0",
    "expanded": "2.0.0",
}

_STATUS_RE = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_SMTP_REPLY_RE = re.compile(r"[245]\d\d(?:[ -]|$)")
_REMOTE_MTA_RE = re.compile(r"(?P<host>[^\[\]]*)\[(?P<ip>[^\]]*)\](?::\d+)?")
_EOL_RE = re.compile(rb"\r\n|\r|\n")
_HEADER_END_RE = re.compile(rb"\r?\n\r?\n")
_ID_UNSAFE_RE = re.compile(r"[^A-Za-z0-9]")


@dataclass(frozen=True, slots=True)
class ReportedRecipient:
    """One recipient's entry in a report: the per-recipient fields of RFC 3464 section 2.3."""

    address: str  # final recipient
    action: str  # "failed" | "delayed" | "delivered" | "relayed" | "expanded"
    status: str  # enhanced status, e.g. "5.1.1", "4.4.7"; "" = the action's generic x.0.0
    diagnostic: str  # the remote's reply ("550 5.1.1 <x@y>: user unknown") or our diagnosis; "" if none
    remote_mta: str = ""  # host name of the MTA that replied ("host[ip]:port" is reduced to host); "" if none
    orcpt: str = ""  # ORCPT value "rfc822;addr" when the client gave one (decoded, not xtext)
    last_attempt: float | None = None  # epoch seconds
    will_retry_until: float | None = None  # epoch seconds; written for "delayed" only

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown DSN action {self.action!r}")


# --- header section helpers (for callers that read only the head of a big file) ---------------------------


def header_block_end(data: bytes) -> int | None:
    """Offset just past the empty line that ends the header section (CRLF or LF), None if `data` has none."""
    lead = re.match(rb"\r?\n", data)
    if lead:  # no header fields at all: the message starts with the empty line
        return lead.end()
    match = _HEADER_END_RE.search(data)
    return match.end() if match else None


def split_headers(data: bytes, *, complete: bool = False) -> bytes:
    """The header section of a message given its start, up to and including the first empty line.

    Without an empty line, `data` is taken as a prefix cut somewhere in the header section and is returned
    up to its last line break; with `complete=True` (data is the whole message) all of it is the header.
    """
    end = header_block_end(data)
    if end is not None:
        return data[:end]
    if complete:
        return data
    last = max(data.rfind(b"\n"), data.rfind(b"\r"))
    return data[: last + 1] if last >= 0 else data


# --- policy ------------------------------------------------------------------------------------------------


def should_report(envelope: Envelope, rcpt: Recipient, kind: str) -> bool:
    """Whether a report of `kind` ("failure" | "delay" | "success") is due for `rcpt` (RFC 3461 NOTIFY).

    Never to the null sender <> (RFC 5321 section 4.5.5) and never on a message that is itself a report
    (a report that cannot be delivered goes to Badmail instead). NOTIFY absent means FAILURE,DELAY.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown DSN kind {kind!r}")
    if envelope.sender == "" or envelope.is_report:
        return False
    notify = {n.strip().upper() for n in rcpt.notify}
    if "NEVER" in notify:
        return False
    if kind == "success":
        return "SUCCESS" in notify
    wanted = "FAILURE" if kind == "failure" else "DELAY"
    return not notify or wanted in notify


def requires_8bitmime(message: bytes) -> bool:
    """Whether a built report carries 8-bit octets (from the original): it must then go with BODY=8BITMIME."""
    return not message.isascii()


# --- the builder -------------------------------------------------------------------------------------------


def build_report(
    *,
    reporting_mta: str,
    original: Envelope,
    original_headers: bytes,
    original_body: bytes | None,
    recipients: Sequence[ReportedRecipient],
    kind: str,
    now: float,
    message_id_domain: str,
    postmaster: str,
    message_id: str | None = None,
) -> bytes:
    """The complete RFC 3464 report on `original`, addressed to its sender, as message bytes.

    `original_headers` is the original's header section (see `split_headers`) and `original_body` what
    follows it in the stored message, so `original_headers + original_body` is the original; pass None for
    the body when it is not at hand. `message_id` defaults to one derived from the original's id, `kind`,
    `now` and the recipients (no randomness: the builder stays pure).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown DSN kind {kind!r}")
    if not recipients:
        raise ValueError("a delivery status notification needs at least one recipient")

    seed = _seed(original, kind, now, recipients)
    notes: list[str] = []
    embedded, embedded_type = _original_part(original, original_headers, original_body, kind, notes)
    human = _human_text(kind, recipients, notes).encode("ascii")
    status = _status_text(reporting_mta, original, recipients).encode("ascii")
    boundary = _choose_boundary(seed, (human, status, embedded))

    header = [
        *_fold("From", f"Mail Delivery System <{_clean(postmaster)}>"),
        *_fold("To", f"<{_clean(original.sender)}>"),
        f"Subject: {_SUBJECTS[kind]}",
        f"Date: {rfc5322_date(now)}",
        f"Message-ID: {_message_id(message_id, seed, original, kind, message_id_domain)}",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f' boundary="{boundary}"',
        "Auto-Submitted: auto-replied",
    ]
    cte = "8bit" if requires_8bitmime(embedded) else "7bit"
    original_description = "Undelivered Message" if kind == "failure" else "Original Message"
    if embedded_type == "text/rfc822-headers":
        original_description += " Headers"
    delimiter = b"\r\n--" + boundary.encode("ascii")
    parts = [
        "\r\n".join(header).encode("utf-8")
        + b"\r\n\r\n"  # utf-8 only for an SMTPUTF8 sender (RFC 6532)
        + b"This is a MIME-encapsulated message.\r\n",
        b"\r\nContent-Type: text/plain; charset=us-ascii\r\nContent-Transfer-Encoding: 7bit\r\n"
        b"Content-Description: Notification\r\n\r\n" + human,
        b"\r\nContent-Type: message/delivery-status\r\nContent-Description: Delivery report\r\n\r\n" + status,
        b"\r\nContent-Type: "
        + embedded_type.encode("ascii")
        + b"\r\nContent-Transfer-Encoding: "
        + cte.encode("ascii")
        + b"\r\nContent-Description: "
        + original_description.encode("ascii")
        + b"\r\n\r\n"
        + embedded,
    ]
    return delimiter.join(parts) + delimiter + b"--\r\n"


def _original_part(
    original: Envelope, headers: bytes, body: bytes | None, kind: str, notes: list[str]
) -> tuple[bytes, str]:
    """The returned content and its type: the full original only for RET=FULL failures, else its headers.

    RFC 3461 leaves the default (no RET) to the implementation; ours is headers only. The full original is
    kept byte for byte when it already has CRLF endings and lines within 998 octets; bare CR/LF are turned
    into CRLF, and an original with over-long lines is returned as headers only (with a note in the text).
    """
    if original.ret.upper() == "FULL" and body is not None and kind == "failure":
        full = _crlf(headers + body)
        if not _has_long_line(full):
            return full, "message/rfc822"
        notes.append(
            "The original message has lines longer than 998 octets and cannot be returned in full; "
            "its headers follow."
        )
    return _fold_raw_lines(_crlf(headers)), "text/rfc822-headers"


def _human_text(kind: str, recipients: Sequence[ReportedRecipient], notes: list[str]) -> str:
    """The text/plain part in the Windows SMTP Service wording, recipients grouped by action."""
    lines: list[str] = [_INTRO, ""]
    if kind == "delay":
        for warning in _DELAY_WARNING:
            lines.extend([warning, ""])
    for action, heading in _ACTION_HEADINGS.items():
        group = [r for r in recipients if r.action == action]
        if group:
            lines.extend([*_wrap(heading, ""), ""])
        for r in group:
            lines.extend(_wrap(_ascii(r.address), "       "))
            if r.diagnostic:
                lines.extend(_wrap("Reason: " + _diagnostic(r.diagnostic), "           ", "               "))
            if r.remote_mta:
                lines.extend(_wrap("Remote server: " + _remote_mta(r.remote_mta), "           "))
            if r.action == "delayed" and r.will_retry_until is not None:
                until = rfc5322_date(r.will_retry_until)
                lines.append("           Will retry until: " + until)
            lines.append("")
    for note in notes:
        lines.extend([*_wrap(note, ""), ""])
    return "\r\n".join(lines).rstrip("\r\n") + "\r\n"


def _wrap(text: str, indent: str, subsequent_indent: str | None = None) -> list[str]:
    return textwrap.wrap(
        text,
        _TEXT_WIDTH,
        initial_indent=indent,
        break_on_hyphens=False,
        subsequent_indent=indent if subsequent_indent is None else subsequent_indent,
    )


def _status_text(reporting_mta: str, original: Envelope, recipients: Sequence[ReportedRecipient]) -> str:
    """The message/delivery-status body: per-message fields, then one block per recipient."""
    fields = _fold("Reporting-MTA", "dns; " + _clean(reporting_mta))
    if original.helo:
        received_from = _clean(original.helo)
        if original.client_ip:
            received_from += f" ([{_clean(original.client_ip)}])"
        fields += _fold("Received-From-MTA", "dns; " + received_from)
    if original.envid:
        fields += _fold("Original-Envelope-Id", _clean(original.envid))
    if original.received_at > 0:
        fields.append("Arrival-Date: " + rfc5322_date(original.received_at))
    blocks = ["\r\n".join(fields)]
    for r in recipients:
        block: list[str] = []
        if r.orcpt:
            addr_type, sep, addr = r.orcpt.partition(";")
            block += _fold(
                "Original-Recipient",
                _address_field(addr.strip(), addr_type.strip()) if sep else _address_field(r.orcpt.strip()),
            )
        block += _fold("Final-Recipient", _address_field(r.address))
        block.append("Action: " + r.action)
        block.append("Status: " + (r.status if _STATUS_RE.fullmatch(r.status) else _DEFAULT_STATUS[r.action]))
        if r.remote_mta:
            block += _fold("Remote-MTA", "dns; " + _remote_mta(r.remote_mta))
        if r.diagnostic:
            diagnostic = _diagnostic(r.diagnostic)
            # "smtp" is for SMTP replies (RFC 3464 2.3.6); our own diagnoses get an X- type as in Postfix.
            diagnostic_type = "smtp" if _SMTP_REPLY_RE.match(diagnostic) else "X-smtpsvc"
            block += _fold("Diagnostic-Code", f"{diagnostic_type}; {diagnostic}")
        if r.last_attempt is not None:
            block.append("Last-Attempt-Date: " + rfc5322_date(r.last_attempt))
        if r.action == "delayed" and r.will_retry_until is not None:
            block.append("Will-Retry-Until: " + rfc5322_date(r.will_retry_until))
        blocks.append("\r\n".join(block))
    return "\r\n\r\n".join(blocks) + "\r\n"


# --- small pieces ------------------------------------------------------------------------------------------


def _seed(original: Envelope, kind: str, now: float, recipients: Sequence[ReportedRecipient]) -> str:
    material = "\0".join([original.id, kind, repr(now), *(r.address for r in recipients)])
    return hashlib.sha256(material.encode("utf-8", "surrogateescape")).hexdigest()


def _boundary(seed: str, attempt: int) -> str:
    return "=_dsn_" + hashlib.sha256(f"{seed}:{attempt}".encode("ascii")).hexdigest()[:32]


def _choose_boundary(seed: str, contents: Sequence[bytes]) -> str:
    """The first boundary candidate that occurs nowhere in the enclosed content (RFC 2046 section 5.1.1)."""
    attempt = 0
    while True:
        boundary = _boundary(seed, attempt)
        needle = boundary.encode("ascii")
        if not any(needle in content for content in contents):
            return boundary
        attempt += 1


def _message_id(given: str | None, seed: str, original: Envelope, kind: str, domain: str) -> str:
    if given:
        given = _clean(given)
        return given if given.startswith("<") else f"<{given}>"
    orig = _ID_UNSAFE_RE.sub("", original.id)[:64] or "msg"
    return f"<DSN.{orig}.{kind}.{seed[:16]}@{_clean(domain)}>"


def _crlf(data: bytes) -> bytes:
    """Line endings made CRLF; data that already has only CRLF comes back unchanged."""
    return _EOL_RE.sub(b"\r\n", data)


def _has_long_line(data: bytes) -> bool:
    """Whether CRLF-terminated `data` has a line over 998 octets (linear: a regex here would be quadratic)."""
    start = 0
    while True:
        end = data.find(b"\r\n", start)
        if end < 0:
            return len(data) - start > MAX_LINE
        if end - start > MAX_LINE:
            return True
        start = end + 2


def _fold_raw_lines(data: bytes) -> bytes:
    """Header lines over 998 octets folded before a space (or, lacking one, split with an added space)."""
    if not _has_long_line(data):
        return data if data.endswith(b"\r\n") or not data else data + b"\r\n"
    out: list[bytes] = []
    for line in data.split(b"\r\n"):
        while len(line) > MAX_LINE:
            cut = max(line.rfind(b" ", 1, MAX_LINE), line.rfind(b"\t", 1, MAX_LINE))
            if cut > 0:
                out.append(line[:cut])
                line = line[cut:]
            else:
                out.append(line[:MAX_LINE])
                line = b" " + line[MAX_LINE:]
        out.append(line)
    result = b"\r\n".join(out)
    return result if result.endswith(b"\r\n") else result + b"\r\n"


def _fold(name: str, value: str) -> list[str]:
    """A `Name: value` field folded at spaces to about 78 columns; tokens over 900 characters are split."""
    words: list[str] = []
    for word in value.split():
        words.extend(word[i : i + _CHUNK] for i in range(0, len(word), _CHUNK))
    lines: list[str] = []
    line = name + ":"
    for word in words:
        if len(line) + 1 + len(word) > _FOLD_WIDTH and line.strip() != name + ":":
            lines.append(line)
            line = " " + word
        else:
            line += " " + word
    lines.append(line)
    return lines


def _clean(text: str) -> str:
    """One line of text: CR, LF and other controls become spaces (kept non-ASCII is the caller's choice)."""
    return " ".join("".join(" " if ord(c) < 0x20 or ord(c) == 0x7F else c for c in text).split())


def _ascii(text: str) -> str:
    """One line of printable ASCII: non-ASCII characters become RFC 6533 style \\x{HEX} escapes."""
    return "".join(c if ord(c) < 0x7F else f"\\x{{{ord(c):02X}}}" for c in _clean(text))


def _diagnostic(text: str) -> str:
    """A reply or diagnosis on one ASCII line (multi-line replies joined), cut to MAX_DIAGNOSTIC chars."""
    text = _ascii(text)
    if len(text) > MAX_DIAGNOSTIC:
        text = text[:MAX_DIAGNOSTIC] + " ...[truncated]"
    return text


def _remote_mta(host: str) -> str:
    """A host name for Remote-MTA: "mx.example.test[192.0.2.1]:25" becomes "mx.example.test"."""
    host = _ascii(host)
    match = _REMOTE_MTA_RE.fullmatch(host)
    if match:
        return match["host"].strip() or f"[{match['ip']}]"
    return host


def _address_field(address: str, addr_type: str = "rfc822") -> str:
    """`type; address` for Final-/Original-Recipient; a non-ASCII address becomes RFC 6533 `utf-8` xtext."""
    address = _clean(address)
    if address.isascii():
        return f"{_clean(addr_type) or 'rfc822'}; {address}"
    return "utf-8; " + "".join(
        c if 0x20 < ord(c) < 0x7F and c not in "\\+=" else f"\\x{{{ord(c):X}}}" for c in address
    )
