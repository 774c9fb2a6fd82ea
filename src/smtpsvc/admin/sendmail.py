"""The sendmail door: the command line Unix programs pass to `/usr/sbin/sendmail`, parsed as Postfix's
sendmail(1) parses it, and the two ways in behind it: a message on standard input (`-bm`, written into Pickup)
and an SMTP session on standard input and output (`-bs`, the service's own session code, whose messages are
written into Pickup too, as Postfix's stand-alone smtpd hands them to postdrop).

The parser is hand-written, not click: sendmail's options are getopt(3)'s, where `-oi` is option `o` with
the argument `i`, `-ti` is `-t -i`, `-fSENDER` and `-f SENDER` are the same, and options end at the first
recipient. click reads `-oi` as an unknown option `-o`. The parser is pure, so its table is tested.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import re
import socket
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from email.utils import formataddr
from pathlib import Path
from typing import BinaryIO, Literal

from smtpsvc.admin.submit import dsn_envelope_lines, write_pickup_file
from smtpsvc.auth.limiter import AuthLimiter
from smtpsvc.auth.users import UserStore
from smtpsvc.config import Config, LiveConfig
from smtpsvc.events import EventLog
from smtpsvc.folders.pickup import InvalidPickupFile, envelope_from_headers, strip_bcc, validate_address
from smtpsvc.ingest import Ingest
from smtpsvc.model import Envelope, new_queue_id
from smtpsvc.queue.base import QueueError
from smtpsvc.server.session import Session, SessionContext, SmtpStream
from smtpsvc.tls import ServerCertificate

# sysexits.h, as sendmail(1) and Postfix's sendmail exit
EX_OK = 0
EX_USAGE = 64  # the command line is wrong
EX_DATAERR = 65  # the message or an address is not usable
EX_NOINPUT = 66  # standard input cannot be read
EX_UNAVAILABLE = 69  # the message is refused (over the size limit)
EX_SOFTWARE = 70
EX_TEMPFAIL = 75  # the message cannot be queued now (Pickup cannot be written): try again later
EX_CONFIG = 78  # the configuration cannot be loaded

Mode = Literal["deliver", "smtp", "mailq", "newaliases"]

# getopt(3) option letters of Postfix's sendmail ("A:B:C:F:GIL:N:O:R:UV:X:b:ce:f:h:imno:p:r:q:tvx"), less
# `c`, which is smtpsvc's own `-c FILE` (the configuration file) here.
WITH_ARGUMENT = frozenset("ABCFLNORVXbcefhopqr")
FLAGS = frozenset("GIUimntvx")
NOTIFY_VALUES = ("SUCCESS", "DELAY", "FAILURE")


class UsageError(Exception):
    """The command line is wrong; the text says how, in one line (exit 64)."""


@dataclass(frozen=True, slots=True)
class SendmailRequest:
    mode: Mode = "deliver"
    config_file: str | None = None
    sender: str | None = None  # -f / -r
    full_name: str | None = None  # -F
    from_headers: bool = False  # -t
    dot_ends_input: bool = True  # a line with a single "." ends the message, unless -i / -oi
    notify: tuple[str, ...] = ()  # -N: () when not given; ("NEVER",) or some of NOTIFY_VALUES
    ret: str = ""  # -R: FULL or HDRS
    envid: str = ""  # -V
    recipients: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())  # one line each on stderr: options that mean nothing here
    help: bool = False


def parse_argv(args: Sequence[str]) -> SendmailRequest:
    """sendmail's command line (without the program name), getopt style: options, then recipients."""
    values: dict[str, object] = {}
    notes: list[str] = []
    recipients: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            recipients.extend(args[i:])
            break
        if arg in ("--help", "-?"):
            values["help"] = True
            continue
        if arg.startswith("--config"):  # smtpsvc's long spelling of -c
            if arg.startswith("--config="):
                values["config_file"] = arg[len("--config=") :]
                continue
            if arg == "--config" and i < len(args):
                values["config_file"] = args[i]
                i += 1
                continue
            raise UsageError("--config needs a FILE")
        if arg.startswith("--"):
            raise UsageError(f"unknown option {arg}")
        if arg == "-q":  # flush the queue: "-q" alone is not getopt-shaped (it has no argument)
            notes.append("-q ignored: the service retries the queue itself (see `smtpsvc queue retry`)")
            continue
        if not arg.startswith("-") or arg == "-":
            recipients.extend(args[i - 1 :])  # options end at the first recipient, as with getopt
            break
        j = 1
        while j < len(arg):
            letter = arg[j]
            j += 1
            if letter in FLAGS:
                _flag(letter, values, notes)
                continue
            if letter not in WITH_ARGUMENT:
                raise UsageError(f"unknown option -{letter}")
            if j < len(arg):
                value, j = arg[j:], len(arg)
            elif i < len(args):
                value, i = args[i], i + 1
            else:
                raise UsageError(f"option -{letter} needs a value")
            _option(letter, value, values, notes)
    request = SendmailRequest(
        recipients=tuple(recipients),
        notes=tuple(notes),
        **values,  # type: ignore[arg-type]  # keys are the dataclass's fields, set above
    )
    if request.from_headers and request.mode != "deliver":
        raise UsageError("-t can be used only when delivering a message (not with -bs, -bp or -bi)")
    if request.mode != "deliver" and request.recipients:
        raise UsageError(f"no recipients are taken with -b{_MODE_LETTER[request.mode]}")
    return request


_MODE_LETTER = {"deliver": "m", "smtp": "s", "mailq": "p", "newaliases": "i"}


def _flag(letter: str, values: dict[str, object], notes: list[str]) -> None:
    if letter == "t":
        values["from_headers"] = True
    elif letter == "i":
        values["dot_ends_input"] = False
    elif letter == "I":
        values["mode"] = "newaliases"
    elif letter == "n":
        raise UsageError("-n is not supported (there are no aliases to leave unexpanded)")
    elif letter == "v":
        notes.append("-v ignored: no delivery report is mailed; `smtpsvc events` shows what happened")
    # G (gateway submission), U (initial user submission), m (me too) and x mean nothing here: silent


def _option(letter: str, value: str, values: dict[str, object], notes: list[str]) -> None:
    if letter in "fr":
        values["sender"] = value
    elif letter == "F":
        values["full_name"] = value
    elif letter == "c":
        values["config_file"] = value
    elif letter == "b":
        values["mode"] = _mode(value)
    elif letter == "N":
        values["notify"] = parse_notify(value)
    elif letter == "R":
        ret = value.upper()
        if ret not in ("FULL", "HDRS"):
            raise UsageError(f"-R {value}: give full (return the whole message) or hdrs (its headers)")
        values["ret"] = ret
    elif letter == "V":
        if not value or len(value) > 100 or not all(33 <= ord(c) <= 126 for c in value):
            raise UsageError("-V needs an envelope id of 1 to 100 printable characters without spaces")
        values["envid"] = value
    elif letter == "o":
        if value[:1] == "i":  # -oi: the same as -i
            values["dot_ends_input"] = False
        # -od* (delivery mode), -oe* (error mode), -om, -oQ, -o7, -o8 ...: sendmail.cf settings the service's
        # own configuration holds; programs pass them by habit, so they pass in silence
    elif letter == "C":
        notes.append(f"-C {value} ignored: smtpsvc reads its own configuration (-c FILE or SMTPSVC_CONFIG)")
    elif letter == "h":
        notes.append("-h ignored: the hop limit is server.max_hop_count")
    elif letter == "X":
        notes.append("-X ignored: conversations are recorded by the service (`smtpsvc events`)")
    # A, B (body type: 8-bit text passes as it is), L (log label), O, e, p, q<interval>: silent


def _mode(value: str) -> Mode:
    modes: dict[str, Mode] = {"m": "deliver", "s": "smtp", "p": "mailq", "i": "newaliases"}
    if value in modes:
        return modes[value]
    if value in ("h", "H"):
        return "deliver"  # host status: Postfix ignores it too
    if value == "d":
        raise UsageError("-bd: run the service with `smtpsvc serve`")
    raise UsageError(f"-b{value} is not supported (use -bm, -bs, -bp or -bi)")


def parse_notify(value: str) -> tuple[str, ...]:
    """-N: `never`, or a comma-separated list of success, delay, failure (RFC 3461 NOTIFY)."""
    words = tuple(w.strip().upper() for w in value.split(",") if w.strip())
    if words == ("NEVER",):
        return words
    if not words or any(w not in NOTIFY_VALUES for w in words):
        raise UsageError(
            f"-N {value}: give never, or a list of success, delay, failure (e.g. -N failure,delay)"
        )
    return tuple(dict.fromkeys(words))


def message_lines(stream: BinaryIO, dot_ends_input: bool) -> Iterator[bytes]:
    """Standard input a line at a time (line ends as given), up to EOF or, unless -i, a line with only a
    "." (not part of the message). No dot-unstuffing: that is SMTP's, not sendmail's."""
    for line in iter(stream.readline, b""):
        if dot_ends_input and line.rstrip(b"\r\n") == b".":
            return
        yield line


# ----------------------------------------------------------------------------------------------- -bs
class PickupIntake:
    """The queue as a `-bs` session sees it: each message is written into the Pickup folder with its whole
    envelope (X-Sender/X-Receiver lines with the DSN parameters), and the running service queues it from
    there, as it does any Pickup file. The session's `250` comes once the file is durable."""

    def __init__(self, pickup_dir: Path) -> None:
        self.pickup_dir = pickup_dir

    def create_writer(self) -> SpooledMessage:
        try:
            self.pickup_dir.mkdir(parents=True, exist_ok=True)
            return SpooledMessage(self.pickup_dir)
        except OSError as exc:  # the session answers 451 (452 for a full disk), as for the queue
            raise _pickup_error(exc) from None

    async def put(self, writer: SpooledMessage, envelope: Envelope) -> None:
        head = dsn_envelope_lines(
            envelope.sender,
            [(r.address, r.notify, r.orcpt) for r in envelope.recipients],
            envelope.ret,
            envelope.envid,
        )
        try:
            writer.body.seek(0)
            write_pickup_file(self.pickup_dir, _chained(head, writer.body), writer.id)
        except OSError as exc:
            raise _pickup_error(exc) from None
        finally:
            writer.abort()


def _pickup_error(exc: OSError) -> QueueError:
    return QueueError(f"cannot write to the Pickup folder: {exc.strerror or exc}", full=exc.errno in FULL)


FULL = (errno.ENOSPC, errno.EDQUOT)


def _chained(head: bytes, body: BinaryIO) -> Iterator[bytes]:
    yield head
    while chunk := body.read(1024 * 1024):
        yield chunk


class SpooledMessage:
    """A message being received in a `-bs` session: a temporary file, unnamed (gone if we die)."""

    def __init__(self, folder: Path) -> None:
        self._id = new_queue_id()
        self.body = tempfile.TemporaryFile(dir=folder)  # noqa: SIM115 - closed by abort()
        self._size = 0

    @property
    def id(self) -> str:
        return self._id

    @property
    def size(self) -> int:
        return self._size

    def write(self, data: bytes) -> None:
        self.body.write(data)
        self._size += len(data)

    def attach_xexch50(self, blob: bytes) -> None:
        pass  # XEXCH50 needs AUTH, which a -bs session does not offer

    def abort(self) -> None:
        self.body.close()


def run_smtp_session(config: Config, stdin: BinaryIO, stdout: BinaryIO) -> None:
    """`sendmail -bs`: smtpsvc's own SMTP session (server/session.py) over standard input and output.

    The session runs on one end of a socket pair; two threads copy standard input to it and its replies to
    standard output. Trusted as a local submission (`trusted=True`): whoever can run it can write the Pickup
    folder, and Postfix's stand-alone smtpd applies no relay rules either. No STARTTLS, no AUTH (nothing
    to protect on a pipe), no events (the service logs event 3001 when Pickup queues each message)."""
    pickup = Path(config.server.root) / "pickup"
    ours, theirs = socket.socketpair()
    pumps = [
        threading.Thread(target=_copy_in, args=(stdin, theirs), daemon=True),
        threading.Thread(target=_copy_out, args=(theirs, stdout), daemon=True),
    ]
    for pump in pumps:
        pump.start()
    try:
        asyncio.run(_serve_one(config, pickup, ours))
    finally:
        pumps[1].join(30)  # every reply written before we exit
        theirs.close()


async def _serve_one(config: Config, pickup: Path, sock: socket.socket) -> None:
    events = EventLog(None, stream=None)
    live = LiveConfig(config)
    context = SessionContext(
        live=live,
        ingest=Ingest(PickupIntake(pickup), live, events),  # type: ignore[arg-type]
        events=events,
        certificate=ServerCertificate("", ""),
        users=UserStore(),
        limiter=AuthLimiter(),
        etrn=_no_etrn,
        trusted=True,
    )
    loop = asyncio.get_running_loop()
    started: asyncio.Future[Session] = loop.create_future()

    def connected(stream: SmtpStream) -> None:
        started.set_result(Session(stream, context))

    await loop.connect_accepted_socket(lambda: SmtpStream(connected), sock)
    session = await started
    await session.run()


async def _no_etrn(domain: str, subdomains: bool) -> int:
    return 0


def _copy_in(stdin: BinaryIO, sock: socket.socket) -> None:
    try:
        while data := os.read(stdin.fileno(), 65536):
            sock.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)


def _copy_out(sock: socket.socket, stdout: BinaryIO) -> None:
    try:
        while data := sock.recv(65536):
            stdout.write(data)
            stdout.flush()
    except OSError:
        pass


# ----------------------------------------------------------------------------------------------- -bm
MAX_HEADER_BYTES = 1024 * 1024
_HEADER_LINE = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:|[ \t]")  # a field, or a folded continuation


class SubmitError(Exception):
    """The message cannot be submitted; `status` is the sysexits code, the text says why in one line."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status


def qualify(address: str, config: Config) -> str:
    """A bare name (`root`, as cron passes it) gets the first local domain, as Postfix appends myorigin."""
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1].strip()
    if address and "@" not in address and config.local_domains:
        return f"{address}@{config.local_domains[0]}"
    return address


def submit_message(config: Config, request: SendmailRequest, stdin: BinaryIO, login: str) -> Path:
    """`sendmail` (-bm): standard input into a Pickup file with its whole envelope. Raises SubmitError."""
    lines = _reading(message_lines(stdin, request.dot_ends_input))
    header_lines: list[bytes] = []
    first_body: list[bytes] = []
    size = 0
    for line in lines:
        if not line.rstrip(b"\r\n"):  # the empty line that ends the headers
            first_body.append(line)
            break
        if not _HEADER_LINE.match(line) or (not header_lines and line[:1] in b" \t"):
            first_body.append(b"\n" + line if header_lines else line)  # no headers (or no more): body
            break
        header_lines.append(line)
        size += len(line)
        if size > MAX_HEADER_BYTES:
            raise SubmitError(EX_DATAERR, "the message's header section is larger than 1 MB")
    header_block = b"".join(header_lines)
    header_sender, header_rcpts, has_from = envelope_from_headers(header_block)
    sender = qualify(request.sender, config) if request.sender is not None else ""
    if request.sender is None:
        sender = qualify(header_sender, config) if header_sender else qualify(login, config)
    recipients = [qualify(r, config) for r in request.recipients]
    if request.from_headers:
        recipients += [qualify(r, config) for r in header_rcpts]
        header_block = strip_bcc(header_block)
    if not recipients:
        raise SubmitError(
            EX_USAGE,
            "no recipient addresses found in the message's To, Cc or Bcc"
            if request.from_headers
            else "give recipients, or -t to take them from the message's To, Cc and Bcc",
        )
    try:
        sender = validate_address(sender, allow_null=True)
        recipients = [validate_address(r, allow_null=False) for r in recipients]
    except InvalidPickupFile as exc:
        raise SubmitError(EX_DATAERR, str(exc)) from None
    head = dsn_envelope_lines(
        sender, [(r, request.notify, "") for r in recipients], request.ret, request.envid
    )
    if not has_from:  # RFC 5322 requires one; -F (or $NAME) is its display name, as with Postfix
        name = request.full_name if request.full_name is not None else os.environ.get("NAME", "")
        author = sender or qualify(login, config)
        head += f"From: {formataddr((name, author), charset='utf-8')}\r\n".encode()
    if not header_block:
        head += b"\r\n"  # the text had no header section: all of it is the body
    try:
        return write_pickup_file(
            Path(config.server.root) / "pickup",
            _within(config.server.max_message_size, head, [header_block, *first_body], lines),
        )
    except OSError as exc:
        raise SubmitError(
            EX_TEMPFAIL, f"cannot write to the Pickup folder: {exc.strerror or exc}; try again later"
        ) from None


def _reading(lines: Iterator[bytes]) -> Iterator[bytes]:
    try:
        yield from lines
    except OSError as exc:
        raise SubmitError(EX_NOINPUT, f"cannot read standard input: {exc.strerror or exc}") from None


def _within(limit: int, head: bytes, first: list[bytes], rest: Iterator[bytes]) -> Iterator[bytes]:
    """The Pickup file's pieces; a message over `server.max_message_size` is refused now, while the caller
    can still be told (exit 69, as Postfix's sendmail), rather than go to Badmail after a 0."""
    yield head
    size = 0
    for piece in itertools.chain(first, rest):
        size += len(piece)
        if limit and size > limit:
            raise SubmitError(
                EX_UNAVAILABLE,
                f"the message is larger than the maximum message size ({limit} bytes, max_message_size)",
            )
        yield piece
