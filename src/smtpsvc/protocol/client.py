"""ClientConnection: the sending side of SMTP without I/O (outbound delivery), plus EHLO `Capabilities` and
MAIL/RCPT argument formatting.

`send_command()` returns the bytes of a command and remembers that a reply is owed; `receive_data()` +
`next_event()` parse the server's replies (multi-line included, with bounded buffers) and pair each with the
command it answers, in order, which is all PIPELINING (RFC 2920) needs. DATA content goes through a
`DotStuffer` from `start_data()`, closed by `end_data()`; a BDAT chunk (RFC 3030) is one `send_bdat()`.

STARTTLS (RFC 3207): after the 220 to STARTTLS every byte still buffered or received is dropped (a reply
injected in plaintext must not be read as if it came over TLS) until `tls_established()`; then the next
command must be EHLO (or HELO, or QUIT).
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from .dotstuff import DotStuffer
from .errors import LocalProtocolError, RemoteProtocolError
from .events import NEED_DATA, ConnectionClosed, NeedData, ServerReply
from .params import format_params
from .replies import Reply

MAX_REPLY_LINE = 4096  # octets incl. CRLF; RFC 5321 §4.5.3.1.5 says 512, real servers send more
MAX_REPLY_LINES = 100  # a multi-line reply longer than this is garbage or an attack

_REPLY_LINE = re.compile(r"([2-5][0-9][0-9])([ -]|$)(.*)", re.S)
_ENHANCED_PREFIX = re.compile(r"([245]\.\d{1,3}\.\d{1,3})(?: |$)")
_VERB = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")

# Speed: a peer answers message after message with the same few one-line replies ("250 2.0.0 Ok"). The Reply
# parsed from such a line is kept here, keyed by the line, so the regular expressions and Reply's checks run
# once per distinct line instead of once per reply (a Reply is immutable: sharing it is safe). Bounded, since
# the lines come from remote servers: emptied when full.
_ONE_LINE_REPLIES: dict[str, Reply] = {}
_ONE_LINE_REPLIES_MAX = 256


def _strip_enhanced(text: str, enhanced: str) -> str:
    m = _ENHANCED_PREFIX.match(text)
    return text[m.end() :] if m and m.group(1) == enhanced else text


def _parse_reply(lines: list[tuple[int, str]]) -> Reply:
    """Build a Reply from (code, text) lines, taking the RFC 3463 code off the text when it is there."""
    code = lines[0][0]
    texts = [text for _, text in lines]
    enhanced = ""
    m = _ENHANCED_PREFIX.match(texts[0])
    if m and m.group(1)[0] == str(code)[0]:
        enhanced = m.group(1)
        # RFC 2034 §4 repeats the code on every line; strip it wherever it is repeated.
        texts = [_strip_enhanced(t, enhanced) for t in texts]
    try:
        return Reply(code, enhanced, texts[0], tuple(texts[1:]))
    except ValueError as exc:
        raise RemoteProtocolError(f"unusable reply: {exc}") from None


class ClientConnection:
    """One outbound SMTP session, without I/O. The first reply expected is the server's greeting."""

    def __init__(self, max_line: int = MAX_REPLY_LINE, max_lines: int = MAX_REPLY_LINES) -> None:
        self._max_line = max_line
        self._max_lines = max_lines
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._broken: RemoteProtocolError | None = None
        self._lines: list[tuple[int, str]] = []  # lines of the multi-line reply being received
        self._expect: deque[str] = deque(["GREETING"])  # commands whose replies are still owed, in order
        self._data_ready = False  # the last reply was a 354 to DATA: start_data() may be called
        self._in_data = False  # between start_data() and end_data()
        self._tls_pending = False  # 220 to STARTTLS received, tls_established() not called yet
        self._tls = False
        self._need_hello = False  # after tls_established(): the next command must be EHLO/HELO (or QUIT)

    @property
    def pending(self) -> int:
        """Replies still expected."""
        return len(self._expect)

    @property
    def tls(self) -> bool:
        """TLS is active (tls_established() was called)."""
        return self._tls

    @property
    def awaiting_tls(self) -> bool:
        """The server said 220 to STARTTLS: do the handshake, then call tls_established()."""
        return self._tls_pending

    def tls_established(self) -> None:
        """The TLS handshake after the 220 to STARTTLS is done. Everything received before it was dropped;
        the SMTP session starts over (RFC 3207 §4.2): send EHLO again."""
        if not self._tls_pending:
            raise LocalProtocolError("tls_established() without a 220 reply to STARTTLS")
        self._tls_pending = False
        self._tls = True
        self._need_hello = True
        self._buf = bytearray()
        self._pos = 0

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the server; b"" means it closed the connection."""
        if not data:
            self._eof = True
            return
        if self._eof:
            raise LocalProtocolError("receive_data() after EOF")
        if self._tls_pending:
            return  # plaintext after the 220 to STARTTLS: never read as replies
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def next_event(self) -> ServerReply | ConnectionClosed | NeedData:
        if self._broken is not None:
            raise self._broken
        try:
            while True:
                if self._tls_pending:
                    return ConnectionClosed() if self._eof else NEED_DATA
                line = self._take_line()
                if line is None:
                    return ConnectionClosed() if self._eof else NEED_DATA
                if not self._lines:
                    known = _ONE_LINE_REPLIES.get(line)
                    if known is not None:
                        return self._match(known)
                m = _REPLY_LINE.fullmatch(line)
                if m is None:
                    raise RemoteProtocolError(f"malformed reply line: {line[:80]!r}")
                code = int(m.group(1))
                if self._lines and code != self._lines[0][0]:
                    raise RemoteProtocolError(f"reply code changed inside a multi-line reply: {line[:80]!r}")
                self._lines.append((code, m.group(3)))
                if m.group(2) == "-":
                    if len(self._lines) >= self._max_lines:
                        raise RemoteProtocolError(f"reply longer than {self._max_lines} lines")
                    continue
                reply = _parse_reply(self._lines)
                if len(self._lines) == 1:
                    if len(_ONE_LINE_REPLIES) >= _ONE_LINE_REPLIES_MAX:
                        _ONE_LINE_REPLIES.clear()
                    _ONE_LINE_REPLIES[line] = reply
                self._lines = []
                return self._match(reply)
        except RemoteProtocolError as exc:
            self._broken = exc
            raise

    def _match(self, reply: Reply) -> ServerReply:
        if not self._expect:
            # RFC 5321 §3.8: a server may send 421 and close at any time, e.g. while shutting down.
            if reply.code == 421:
                return ServerReply(reply, "")
            raise RemoteProtocolError(f"reply with no command to answer: {reply}")
        command = self._expect.popleft()
        self._data_ready = command == "DATA" and reply.code == 354
        if command == "STARTTLS" and reply.code == 220:
            # RFC 3207 §4.2 (and CVE-2011-0411 turned around): anything after the 220 came in plaintext.
            self._tls_pending = True
            self._buf = bytearray()
            self._pos = 0
        return ServerReply(reply, command)

    def _take_line(self) -> str | None:
        buf, pos = self._buf, self._pos
        lf = buf.find(b"\n", pos)
        if lf < 0:
            if len(buf) - pos > self._max_line:
                raise RemoteProtocolError(f"reply line longer than {self._max_line} octets")
            return None
        if lf + 1 - pos > self._max_line:
            raise RemoteProtocolError(f"reply line longer than {self._max_line} octets")
        end = lf - 1 if lf > pos and buf[lf - 1] == 0x0D else lf
        self._pos = lf + 1
        # Replies are ASCII by RFC 5321 and UTF-8 at most (RFC 6531); never fail on odd bytes.
        return buf[pos:end].decode("utf-8", "replace")

    def _check_can_send(self, what: str, verb: str) -> None:
        if self._in_data:
            raise LocalProtocolError(f"{what} between start_data() and end_data()")
        if self._tls_pending or "STARTTLS" in self._expect:
            # RFC 2920 §3.1: STARTTLS ends a pipelined group; nothing goes out until TLS is up.
            raise LocalProtocolError(f"{what} while STARTTLS is in progress")
        if self._need_hello and verb not in ("EHLO", "HELO", "QUIT"):
            raise LocalProtocolError(f"{what} before EHLO after STARTTLS (RFC 3207 §4.2)")

    def send_command(self, verb: str, arg: str = "") -> bytes:
        """The bytes of `VERB arg` CRLF; records that its reply is expected."""
        if not _VERB.fullmatch(verb):
            raise ValueError(f"bad SMTP verb: {verb!r}")
        if "\r" in arg or "\n" in arg or "\0" in arg:  # not any() over a generator: this runs per command
            raise ValueError("CR, LF or NUL in a command argument")
        verb = verb.upper()
        self._check_can_send("send_command()", verb)
        self._need_hello = False
        self._expect.append(verb)
        self._data_ready = False
        line = f"{verb} {arg}" if arg else verb
        return line.encode("utf-8") + b"\r\n"

    def send_bdat(self, data: bytes, last: bool = False) -> bytes:
        """`BDAT <len> [LAST]` CRLF followed by `data` as is (RFC 3030: binary, no stuffing); records that a
        "BDAT" reply is expected. May be pipelined; the chunk sizes need not be equal."""
        self._check_can_send("send_bdat()", "BDAT")
        self._expect.append("BDAT")
        self._data_ready = False
        return f"BDAT {len(data)}{' LAST' if last else ''}\r\n".encode("ascii") + data

    def send_auth_response(self, response: str) -> bytes:
        """One client line inside an AUTH exchange (after a 334): base64, not a command; records that the
        "AUTH" reply is expected."""
        if any(c in response for c in "\r\n\0"):
            raise ValueError("CR, LF or NUL in an AUTH response")
        self._expect.append("AUTH")
        self._data_ready = False
        return response.encode("ascii") + b"\r\n"

    def send_xexch50_blob(self, blob: bytes) -> bytes:
        """After the 354 to `XEXCH50 <n> 2`: the n octets as they are (SPEC 2.5); records that the
        "XEXCH50-BLOB" reply (250) is expected."""
        if self._expect:
            raise LocalProtocolError("send_xexch50_blob() needs the 354 reply to XEXCH50 first")
        self._expect.append("XEXCH50-BLOB")
        self._data_ready = False
        return blob

    def start_data(self) -> DotStuffer:
        """After the 354 to DATA: an encoder for the content. Pass it to end_data() when done."""
        if not self._data_ready or self._expect:
            raise LocalProtocolError("start_data() needs a 354 reply to DATA first")
        self._data_ready = False
        self._in_data = True
        return DotStuffer()

    def end_data(self, stuffer: DotStuffer) -> bytes:
        """The last bytes of the content (CRLF if needed, then "."); the "DOT" reply is then expected."""
        if not self._in_data:
            raise LocalProtocolError("end_data() without start_data()")
        self._in_data = False
        self._expect.append("DOT")
        return stuffer.finish()


@dataclass(frozen=True, slots=True)
class Capabilities:
    """The service extensions a server announced in its EHLO reply."""

    keywords: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # upper-cased keyword → params
    size_limit: int | None = None  # from "SIZE n"; None when absent, bare, or 0 (no fixed limit)

    @classmethod
    def from_ehlo(cls, reply: Reply) -> Capabilities:
        """Parse a 250 EHLO reply (anything else: no extensions). The first line is the greeting."""
        if reply.code != 250:
            return cls()
        keywords: dict[str, tuple[str, ...]] = {}
        for line in reply.more:
            words = line.split()
            if not words:
                continue
            key, eq, first = words[0].partition("=")
            key = key.upper()
            if eq:
                # Pre-RFC 2554 servers also say "AUTH=LOGIN PLAIN"; the standard line wins when both exist.
                keywords.setdefault(key, (first, *words[1:]) if first else tuple(words[1:]))
            else:
                keywords[key] = tuple(words[1:])
        size = keywords.get("SIZE", ())
        limit = int(size[0]) if size and size[0].isdigit() and size[0].isascii() else 0
        return cls(keywords, limit or None)

    def has(self, keyword: str) -> bool:
        return keyword.upper() in self.keywords

    def params(self, keyword: str) -> list[str]:
        return list(self.keywords.get(keyword.upper(), ()))

    @property
    def auth_mechanisms(self) -> tuple[str, ...]:
        """The SASL mechanisms of the AUTH keyword, upper-cased, in the server's order; () without AUTH."""
        return tuple(m.upper() for m in self.keywords.get("AUTH", ()))


def mail_arg(sender: str, params: Mapping[str, str | None] | None = None) -> str:
    """`FROM:<sender> KEY=value ...` for send_command("MAIL", ...); sender "" is the null path."""
    return f"FROM:<{sender}>{format_params(params or {})}"


def rcpt_arg(address: str, params: Mapping[str, str | None] | None = None) -> str:
    """`TO:<address> KEY=value ...` for send_command("RCPT", ...)."""
    return f"TO:<{address}>{format_params(params or {})}"
