"""The Pickup folder: files an application drops become queued mail.

A file's envelope comes from its leading `X-Sender:` (one) and `X-Receiver:` (one or more) lines, as IIS and
.NET's SmtpClient write them and as our Drop files carry them (so Drop → Pickup replays); without them, from
`Sender`/`From` and `To`/`Cc`/`Bcc`, and then the `Bcc` header is removed from the delivered copy. A file is
taken only once it has stopped changing (same size and mtime on two scans, or untouched for a while), and is
claimed by an atomic rename into `pickup/.claimed/` so that no two scans (or a crash) can submit it twice
unnoticed; it is removed only after the queue has made the message durable. An invalid file (no From, no
recipients, bad addresses, over size) goes to Badmail with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses
from pathlib import Path
from typing import BinaryIO

from smtpsvc import events
from smtpsvc.config import Config, LiveConfig
from smtpsvc.events import EventLog
from smtpsvc.folders.badmail import printable, put_badmail
from smtpsvc.headers import HopCounter
from smtpsvc.ingest import EnvelopeFields, Ingest, received_header
from smtpsvc.model import Recipient, Source
from smtpsvc.protocol import parse_path, xtext_decode
from smtpsvc.queue.base import MessageWriter, QueueError

CLAIMED = ".claimed"
SETTLE_SECONDS = 2.0  # a file untouched this long is complete even if first seen now
MAX_HEADER_BYTES = 1024 * 1024  # a header section larger than this is not a message
MAX_TEXT_LINE = 1000  # octets of a line with its CRLF, as SMTP allows (RFC 5321 section 4.5.3.1.6)
LINE_CHUNK = 4096  # read while looking for the end of a line of the envelope or headers
COPY_CHUNK = 256 * 1024
PICKUP_ERROR = "Error is processing file in pickup directory. The specific error code was 0xC00402CE."


class InvalidPickupFile(Exception):
    """The file is not a message we can send; the text says why (goes into the .bdr)."""


class UnreadablePickupFile(InvalidPickupFile):
    """The file cannot be opened (no permission, say): it is moved into Badmail as it is, not retried every
    second."""


@dataclass(frozen=True, slots=True)
class PickupEnvelope:
    sender: str
    recipients: tuple[str, ...]
    from_headers: bool  # True when derived from To/Cc/Bcc (then Bcc is stripped)
    # DSN parameters of the X-lines, in the ESMTP form of Exchange's Replay folder (`sendmail -N/-R/-V`)
    ret: str = ""
    envid: str = ""
    notify: tuple[tuple[str, ...], ...] = ()  # per recipient, in order; () when none was given
    orcpt: tuple[str, ...] = ()


def parse_envelope_lines(lines: list[bytes]) -> tuple[str | None, list[str]]:
    """X-Sender / X-Receiver values from the leading lines (already split, without line ends)."""
    sender, receivers, _, _ = parse_envelope_params(lines)
    return sender, receivers


def parse_envelope_params(
    lines: list[bytes],
) -> tuple[str | None, list[str], dict[str, str], list[dict[str, str]]]:
    """X-Sender / X-Receiver addresses and the ESMTP parameters after them (`<a@b> RET=HDRS`), which
    Exchange's Replay folder writes and `smtpsvc sendmail -N/-R/-V` writes."""
    sender: str | None = None
    sender_params: dict[str, str] = {}
    receivers: list[str] = []
    receiver_params: list[dict[str, str]] = []
    for raw in lines:
        name, _, value = raw.decode("utf-8", "replace").partition(":")
        key = name.strip().lower()
        if key == "x-sender":
            if sender is not None:
                raise InvalidPickupFile("more than one X-Sender line")
            sender, sender_params = _address_and_params(value)
        elif key == "x-receiver":
            address, params = _address_and_params(value)
            receivers.append(address)
            receiver_params.append(params)
    return sender, receivers, sender_params, receiver_params


def _address_and_params(value: str) -> tuple[str, dict[str, str]]:
    value = value.strip()
    if value.startswith("<") and ">" in value:
        address, _, rest = value[1:].partition(">")
        params: dict[str, str] = {}
        for word in rest.split():
            param, _, arg = word.partition("=")
            params[param.upper()] = arg
        return address.strip(), params
    return _bare_address(value), {}


def _bare_address(value: str) -> str:
    value = value.strip()
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1].strip()
    return value


_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")  # a field name and its colon (RFC 5322 section 2.2)


def _is_envelope_line(line: bytes) -> bool:
    lowered = line[:12].lower()
    return lowered.startswith(b"x-sender:") or lowered.startswith(b"x-receiver:")


def envelope_from_headers(header_block: bytes) -> tuple[str, list[str], bool]:
    """(sender, recipients, has_from) from an RFC 5322 header block."""
    headers = BytesHeaderParser(policy=compat32).parsebytes(header_block)
    sender_field = headers.get("Sender") or headers.get("From") or ""
    senders = [addr for _, addr in getaddresses([str(sender_field)]) if addr]
    recipients: list[str] = []
    for name in ("To", "Cc", "Bcc"):
        values = [str(v) for v in headers.get_all(name, [])]
        recipients.extend(addr for _, addr in getaddresses(values) if addr)
    has_from = bool(headers.get("From") or headers.get("Sender"))
    return (senders[0] if senders else ""), recipients, has_from


def strip_bcc(header_block: bytes) -> bytes:
    """Remove `Bcc:` header fields (with their folded continuation lines) from a header block."""
    out: list[bytes] = []
    skipping = False
    for line in header_block.splitlines(keepends=True):
        if skipping and line[:1] in (b" ", b"\t"):
            continue
        skipping = line[:4].lower() == b"bcc:"
        if not skipping:
            out.append(line)
    return b"".join(out)


def validate_address(address: str, allow_null: bool) -> str:
    try:
        return parse_path(f"<{address}>", allow_null=allow_null).address
    except ValueError as exc:
        raise InvalidPickupFile(f"invalid address {address!r}: {exc}") from exc


class CrlfNormalizer:
    """Incremental line-end normaliser: bare LF and bare CR become CRLF (pickup files from Unix tools)."""

    def __init__(self) -> None:
        self._pending_cr = False

    def feed(self, data: bytes) -> bytes:
        if self._pending_cr:
            data = b"\r" + data
            self._pending_cr = False
        if data.endswith(b"\r"):
            data = data[:-1]
            self._pending_cr = True
        if b"\r" not in data:
            return data.replace(b"\n", b"\r\n")
        return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")

    def finish(self) -> bytes:
        if self._pending_cr:
            self._pending_cr = False
            return b"\r\n"
        return b""


class LineTooLong(InvalidPickupFile):
    """A line of the file is longer than SMTP allows; the text names the line and the limit."""

    def __init__(self, number: int) -> None:
        super().__init__(
            f"line {number} of the file is longer than {MAX_TEXT_LINE} octets with its line end, the limit "
            "for a line of a message (RFC 5321 section 4.5.3.1.6, RFC 5322 section 2.1.1); SMTP refuses "
            "such a line too"
        )


class PickupLines:
    """Reads a Pickup file a line at a time, whatever its line ends (CRLF, a bare LF or a bare CR, as the
    body's normaliser takes them), never holding more than one line of at most `MAX_TEXT_LINE` octets:
    a longer line is refused as soon as it is seen, so a hostile file costs no memory."""

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self._buffer = b""
        self._eof = False
        self.number = 0  # the line last returned, counted from 1

    def next(self) -> tuple[bytes, bool] | None:
        """(the next line without its end, whether it had one), or None at the end of the file."""
        while True:
            cut = _first_line_end(self._buffer)
            if cut >= 0 and (cut + 1 < len(self._buffer) or self._eof or self._buffer[cut] == 10):
                end = cut + 2 if self._buffer[cut : cut + 2] == b"\r\n" else cut + 1
                line, self._buffer = self._buffer[:cut], self._buffer[end:]
                return self._counted(line, True)
            if cut < 0 and len(self._buffer) > MAX_TEXT_LINE - 2:
                raise LineTooLong(self.number + 1)
            if self._eof:
                if not self._buffer:
                    return None
                line, self._buffer = self._buffer, b""
                return self._counted(line, False)
            chunk = self._fh.read(LINE_CHUNK)
            if chunk:
                self._buffer += chunk
            else:
                self._eof = True

    def _counted(self, line: bytes, ended: bool) -> tuple[bytes, bool]:
        self.number += 1
        if len(line) > MAX_TEXT_LINE - 2:
            raise LineTooLong(self.number)
        return line, ended

    def rest(self) -> Iterator[bytes]:
        """What follows the lines read so far, in chunks."""
        if self._buffer:
            yield self._buffer
            self._buffer = b""
        while not self._eof and (chunk := self._fh.read(COPY_CHUNK)):
            yield chunk


def _first_line_end(data: bytes) -> int:
    """Index of the first CR or LF in `data`, or -1."""
    cr, lf = data.find(b"\r"), data.find(b"\n")
    if cr < 0:
        return lf
    return cr if lf < 0 else min(cr, lf)


class LineLimit:
    """Checks the lines of CRLF-normalised text fed in pieces: each at most `MAX_TEXT_LINE` octets with its
    CRLF. `after_line` is the number of the file's lines before the text (to name a line as in the file)."""

    def __init__(self, after_line: int) -> None:
        self._number = after_line + 1  # the line being read
        self._current = 0  # its octets so far

    def feed(self, data: bytes) -> None:
        limit = MAX_TEXT_LINE - 2
        parts = data.split(b"\r\n")
        self._current += len(parts[0])
        if len(parts) > 1:
            if self._current <= limit and max(map(len, parts[1:-1]), default=0) <= limit:
                self._number += len(parts) - 1
                self._current = len(parts[-1])
            else:
                lengths = [self._current, *map(len, parts[1:-1])]
                self._number += next(i for i, n in enumerate(lengths) if n > limit)
                raise LineTooLong(self._number)
        if self._current > limit:
            raise LineTooLong(self._number)


def _notify(value: str) -> tuple[str, ...]:
    return tuple(n.strip().upper() for n in value.split(",") if n.strip())


def _xtext(value: str) -> str:
    try:
        return xtext_decode(value)
    except ValueError:
        return value


def read_pickup_file(
    fh: BinaryIO, writer: MessageWriter, hostname: str, max_size: int, max_hops: int = 0
) -> PickupEnvelope:
    """Parse a pickup file and stream its message (with our Received header) into `writer`."""
    lines = PickupLines(fh)
    first_lines: list[bytes] = []
    read = lines.next()
    while read is not None and _is_envelope_line(read[0]):
        first_lines.append(read[0])
        read = lines.next()
    x_sender, x_receivers, sender_params, receiver_params = parse_envelope_params(first_lines)
    header_lines: list[bytes] = []
    header_size = 0
    while read is not None and read[0]:
        header_lines.append(read[0] + b"\r\n")  # any line end becomes CRLF, as in the body
        header_size += len(read[0]) + 2
        if header_size > MAX_HEADER_BYTES:
            raise InvalidPickupFile("the header section is larger than 1 MB")
        read = lines.next()
    separator = b"\r\n" if read is not None and read[1] else b""  # the empty line ending the headers
    header_block = b"".join(header_lines)
    if not header_block:
        raise InvalidPickupFile("the file has no message headers")
    if not _FIELD.match(header_lines[0]):
        number = len(first_lines) + 1
        raise InvalidPickupFile(
            f'the file has no message headers: line {number} is not a header field ("Name: value")'
        )
    hops = HopCounter()
    hops.feed(header_block + b"\r\n")
    if max_hops and hops.received > max_hops:
        raise InvalidPickupFile(
            f"554 5.4.6 too many hops: {hops.received} Received headers, max_hop_count is {max_hops} (a loop)"
        )
    header_sender, header_rcpts, has_from = envelope_from_headers(header_block)
    if x_receivers:
        sender = x_sender if x_sender is not None else header_sender
        recipients, from_headers = x_receivers, False
    else:
        if not has_from:
            raise InvalidPickupFile("the message has no From header")
        sender = x_sender if x_sender is not None else header_sender
        recipients, from_headers = header_rcpts, True
    if not recipients:
        raise InvalidPickupFile("the message has no recipients (no X-Receiver, To, Cc or Bcc)")
    envelope = PickupEnvelope(
        validate_address(sender, allow_null=True),
        tuple(validate_address(r, allow_null=False) for r in recipients),
        from_headers,
        ret=ret if (ret := sender_params.get("RET", "").upper()) in ("FULL", "HDRS") else "",
        envid=_xtext(sender_params.get("ENVID", "")),
        notify=tuple(_notify(p.get("NOTIFY", "")) for p in receiver_params) if x_receivers else (),
        orcpt=tuple(_xtext(p.get("ORCPT", "")) for p in receiver_params) if x_receivers else (),
    )

    normalizer = CrlfNormalizer()
    limit = LineLimit(lines.number)
    writer.write(received_header(hostname=hostname, queue_id=writer.id, helo="pickup", protocol="Pickup"))
    block = strip_bcc(header_block) if from_headers else header_block
    writer.write(block + separator)
    for chunk in lines.rest():
        text = normalizer.feed(chunk)
        limit.feed(text)
        writer.write(text)
        if max_size and writer.size > max_size:
            raise InvalidPickupFile(f"the message is larger than the maximum message size ({max_size} bytes)")
    writer.write(normalizer.finish())
    if max_size and writer.size > max_size:
        raise InvalidPickupFile(f"the message is larger than the maximum message size ({max_size} bytes)")
    return envelope


class PickupScanner:
    def __init__(
        self,
        pickup_dir: Path,
        badmail_dir: Path,
        ingest: Ingest,
        live: LiveConfig,
        event_log: EventLog,
        interval: float = 1.0,
    ) -> None:
        self.dir = pickup_dir
        self.claimed_dir = pickup_dir / CLAIMED
        self.badmail_dir = badmail_dir
        self.ingest = ingest
        self.live = live  # the service's configuration holder: a reload reaches this part too
        self.events = event_log
        self.interval = interval
        self._seen: dict[str, tuple[int, int]] = {}
        # The queue's disk is full: said once (this 9004 and the spool's 9010), then one file is tried per
        # scan until one is queued, instead of every file every second each with its own event.
        self._disk_full = False
        self._full_now = False  # the file just submitted met the full disk: this pass stops

    @property
    def config(self) -> Config:
        return self.live.current

    def open(self) -> None:
        self.claimed_dir.mkdir(parents=True, exist_ok=True)

    async def run(self) -> None:
        # Files claimed before a crash were never removed, so they may not be queued: submit them again
        # (at-least-once; the crash window after the commit and before the unlink can duplicate). One bad
        # file is one event here, never the end of the task.
        try:
            claimed = sorted(self.claimed_dir.iterdir())
        except OSError as exc:
            claimed = []
            self.events.emit(
                events.Event(
                    events.PICKUP_REJECTED,
                    f"Pickup cannot list {printable(str(self.claimed_dir))}: "
                    f"{printable(exc.strerror or str(exc))}; the files claimed before the last stop wait for "
                    "the next start",
                )
            )
        for path in claimed:
            await self._submit(path, only_a_file=True)
        while True:
            try:
                await self.scan()
            except Exception as exc:  # the scanner must outlive any one bad file or folder problem
                self.events.emit(
                    events.Event(
                        events.PICKUP_REJECTED,
                        f"Pickup scan failed: {type(exc).__name__}: {printable(str(exc))}",
                    )
                )
                await asyncio.sleep(max(self.interval, 5.0))
            await asyncio.sleep(self.interval)

    async def scan(self) -> int:
        """One pass over pickup/: claim and submit every settled file. Returns how many were taken."""
        now = time.time()
        seen: dict[str, tuple[int, int]] = {}
        taken = 0
        for entry in sorted(os.scandir(self.dir), key=lambda e: e.name):
            if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                continue
            stat = entry.stat(follow_symlinks=False)
            signature = (stat.st_size, stat.st_mtime_ns)
            settled = self._seen.get(entry.name) == signature or now - stat.st_mtime > SETTLE_SECONDS
            if not settled:
                seen[entry.name] = signature
                continue
            claimed = self.claimed_dir / entry.name
            try:
                os.rename(entry.path, claimed)
            except OSError:
                continue  # taken by someone else, or locked (Windows): next scan
            self._full_now = False
            await self._submit(claimed)
            taken += 1
            if self._full_now:
                break  # the rest waits in pickup/ for the next scan (their settle state is kept)
        self._seen = seen
        return taken

    async def _submit(self, path: Path, only_a_file: bool = False) -> None:
        """Queue one claimed file, or put it in Badmail, or back into pickup/ (a transient problem). Never
        raises: whatever one file does, Pickup goes on with the next."""
        try:
            if not only_a_file or path.is_file():
                await self._submit_claimed(path)
        except Exception as exc:  # a bug met by a hostile file: one event, and the next file
            self.events.emit(
                events.Event(
                    events.PICKUP_REJECTED,
                    f"Pickup file {printable(path.name)} could not be processed ({type(exc).__name__}: "
                    f"{printable(str(exc))}); left in {printable(str(self.claimed_dir))}",
                    level="error",
                )
            )

    async def _submit_claimed(self, path: Path) -> None:
        try:
            writer = self.ingest.begin()
        except QueueError as exc:
            self._unclaim(path, f"cannot queue it: {exc}", full=exc.full)
            return
        try:
            envelope = await asyncio.to_thread(self._read, path, writer)
        except InvalidPickupFile as exc:
            writer.abort()
            await self._reject(path, str(exc), move=isinstance(exc, UnreadablePickupFile))
            return
        except (OSError, QueueError) as exc:
            writer.abort()
            full = isinstance(exc, QueueError) and exc.full
            self._unclaim(path, f"cannot queue it: {exc}" if full else f"cannot read it: {exc}", full=full)
            return
        except Exception as exc:  # the file made a parser fail: it is not a message we can send
            writer.abort()
            await self._reject(path, f"the file cannot be parsed ({type(exc).__name__}: {exc})")
            return
        fields = EnvelopeFields(
            sender=envelope.sender,
            source=Source.PICKUP,
            helo="pickup",
            recipients=[
                Recipient(
                    address=r,
                    notify=envelope.notify[n] if envelope.notify else (),
                    orcpt=envelope.orcpt[n] if envelope.orcpt else "",
                )
                for n, r in enumerate(envelope.recipients)
            ],
            ret=envelope.ret,
            envid=envelope.envid,
        )
        try:
            await self.ingest.commit(writer, fields)
        except QueueError as exc:
            writer.abort()
            self._unclaim(path, f"cannot queue it: {exc}", full=exc.full)
            return
        self._disk_full = False
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    def _unclaim(self, path: Path, why: str, full: bool = False) -> None:
        """A transient problem: put the file back into pickup/ so a later scan tries again."""
        if full:
            self._full_now = True
        if not (full and self._disk_full):
            more = "; Pickup tries one file a second until the disk has room" if full else ""
            self.events.emit(
                events.Event(
                    events.PICKUP_REJECTED,
                    f"Pickup file {printable(path.name)}: {printable(why)}; will retry{more}",
                )
            )
        self._disk_full = self._disk_full or full
        with contextlib.suppress(OSError):
            os.rename(path, self.dir / path.name)

    def _read(self, path: Path, writer: MessageWriter) -> PickupEnvelope:
        try:
            fh = open(path, "rb")  # noqa: SIM115 - closed by the with below
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EINTR):
                raise  # a shortage of the moment: put back, tried again
            raise UnreadablePickupFile(f"the file cannot be opened: {exc.strerror or exc}") from exc
        with fh:
            server = self.config.server
            return read_pickup_file(
                fh, writer, server.hostname, server.max_message_size, server.max_hop_count
            )

    async def _reject(self, path: Path, reason: str, move: bool = False) -> None:
        """The file goes to Badmail under a name of safe ASCII characters; the event and the .bdr show its
        own name, escaped where it is not UTF-8 text."""
        shown, reason = printable(path.name), printable(reason)
        try:
            bad = await put_badmail(
                self.events,
                self.badmail_dir,
                badmail_name(path.stem),
                path,
                [f"{PICKUP_ERROR} Pickup file {shown}: {reason}"],
                {"pickup_file": shown, "reason": reason},
                self.config.badmail.max_size,
                move,
            )
        except OSError as exc:
            self.events.emit(
                events.Event(
                    events.PICKUP_REJECTED,
                    f"Pickup file {shown} is invalid ({reason}) and Badmail "
                    f"cannot be written: {printable(str(exc))}; left in {printable(str(self.claimed_dir))}",
                )
            )
            return
        where = f"moved to Badmail as {bad.name}" if bad else "discarded (badmail.max_size = 0)"
        self.events.emit(
            events.Event(
                events.BADMAIL_WRITTEN, f"Pickup file {shown} {where}: {reason}", cause="pickup-invalid"
            )
        )
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def badmail_name(stem: str) -> str:
    """The Badmail item name for a Pickup file: `pickup-` and its name in letters, digits, `.`, `_` and `-`
    only (anything else, such as bytes that are not UTF-8, becomes `_`), short enough for any file system."""
    return "pickup-" + "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "_" for c in stem)[:100]
