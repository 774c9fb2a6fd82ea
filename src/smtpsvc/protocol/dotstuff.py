"""Incremental dot-stuffing (client, `DotStuffer`) and dot-unstuffing (server, `DotUnstuffer`) of DATA
content, RFC 5321 §4.5.2, with line-ending normalisation as the SMTP smuggling defence.

Both work on arbitrary chunk splits (one byte at a time included), carry at most four bytes between chunks,
and do their work with bytes.find/replace and regular expressions that are literal strings (plus a lookahead
of one byte), so time is linear and mostly at C speed even for hostile input such as a flood of bare LFs.

Speed (this runs over every octet of every message, 100 KiB and more): bytes.replace() with a pattern of
two or more bytes is slow (it counts, then calls find() once per occurrence), one with a one-byte pattern is
not (memchr). So `_normalise()` recognises content that is CRLF-normalised already (our stored messages, what
almost every client sends) or has only one kind of line end with one-byte replace() calls, and returns it
uncopied; dots at line starts are found with a regular expression, whose search for a literal prefix is
faster than bytes.replace() unless they are dense; the line limit is checked without visiting every line.

Smuggling defence: only `<CRLF>.<CRLF>` *as received* ends the data. Every bare CR and bare LF is turned into
CRLF in the content we keep, so a next hop that reads lines differently cannot be made to see an end of data
(or a new SMTP command) that we did not see.
"""

from __future__ import annotations

import re

_CR, _LF, _DOT = 0x0D, 0x0A, 0x2E

# --- Client side ------------------------------------------------------------------------------------------


class DotStuffer:
    """Encode message content for DATA: normalise line ends to CRLF and double every leading ".".

    `feed(chunk)` returns the bytes to send for that chunk; `finish()` returns the tail: a CRLF when the
    content did not end with one, then ".\\r\\n". Normalising here (not only stuffing after CRLF) means a
    next hop that treats a bare LF as a line end still sees each "." stuffed; our stored messages are
    CRLF-normalised already, so for them this is only stuffing.
    """

    __slots__ = ("_at_line_start", "_finished", "_skip_lf")

    def __init__(self) -> None:
        self._at_line_start = True  # the next byte starts a line (start of content counts)
        self._skip_lf = False  # the previous chunk ended with CR, already sent as CRLF
        self._finished = False

    def feed(self, data: bytes) -> bytes:
        if self._finished:
            raise ValueError("DotStuffer.feed() after finish()")
        if not data:
            return b""
        if self._skip_lf:
            self._skip_lf = False
            if data[0] == _LF:
                data = data[1:]
                if not data:
                    return b""
        head = b"." if self._at_line_start and data[0] == _DOT else b""
        if len(data) < _SMALL:
            body = normalise_line_ends(data).replace(b"\r\n.", b"\r\n..")
        else:
            body = _stuff_dots(_normalise(data))
        # A CR at the very end may be the first half of a CRLF split across chunks: it was sent as CRLF,
        # so drop an LF that starts the next chunk.
        self._skip_lf = data[-1] == _CR
        self._at_line_start = data[-1] in (_CR, _LF)
        return head + body

    def finish(self) -> bytes:
        """The end of the content: CRLF if needed (RFC 5321 §4.1.1.4), then the terminating "."."""
        if self._finished:
            raise ValueError("DotStuffer.finish() called twice")
        self._finished = True
        return b".\r\n" if self._at_line_start else b"\r\n.\r\n"


def stuff(data: bytes) -> bytes:
    """One-shot DotStuffer: the complete DATA payload including the final ".\\r\\n"."""
    stuffer = DotStuffer()
    return stuffer.feed(data) + stuffer.finish()


def normalise_line_ends(data: bytes) -> bytes:
    """Every bare CR and bare LF becomes CRLF (what both codecs do to content): see `_normalise()`."""
    if len(data) >= _SMALL and type(data) is bytes:  # (a bytearray gets a copy, as it always did)
        return _normalise(data)
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


# Below this many octets the plain replace() calls cost less than the faster paths' extra calls.
_SMALL = 256


def _normalise(data: bytes) -> bytes:
    """normalise_line_ends(data), `data` itself if it is normalised already.

    The general case is three replace() passes: linear and at C speed, where a regular expression pays per
    match (a flood of bare LFs); but the first one has a two-byte pattern, slow. Cheaper, with one-byte
    patterns only: with no LF every CR is bare and becomes CRLF. Else delete every CR and write every LF as
    CRLF: with no CR in `data` that is the normalisation (every LF was bare), and it gives back `data`
    exactly when each CR in it is followed by an LF and each LF follows a CR (normalised already)."""
    if b"\n" not in data:
        return data.replace(b"\r", b"\r\n")
    no_cr = data.replace(b"\r", b"")
    if len(no_cr) == len(data):
        return no_cr.replace(b"\n", b"\r\n")
    if no_cr.replace(b"\n", b"\r\n") == data:
        return data
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


# A "." at a line start in CRLF-normalised text: the client doubles it.
_LINE_START_DOT = re.compile(rb"\r\n\.")


def _stuff_dots(text: bytes) -> bytes:
    """text.replace(b"\r\n.", b"\r\n.."), faster: the regular expression costs a third of replace() when
    such dots are rare (one in 7,000 octets in a 100 KiB message) but up to three times more when they are
    dense (a line of its own every few octets), so it gives up after one per 128 octets."""
    limit = (len(text) >> 7) + 16
    stuffed, count = _LINE_START_DOT.subn(b"\r\n..", text, limit)
    return stuffed if count < limit else text.replace(b"\r\n.", b"\r\n..")


# --- Server side ------------------------------------------------------------------------------------------

_TERMINATOR = b"\r\n.\r\n"
_END = re.compile(re.escape(_TERMINATOR))  # search() is a little faster than bytes.find() here
# In CRLF-normalised text: a "." starting a line that has more on it (RFC 5321 §4.5.2: delete it). A "." alone
# on a line (possible only after a bare CR/LF, since a real CRLF.CRLF ends the data) is content and stays.
_STUFFED_DOT = re.compile(rb"\r\n\.(?=[^\r])")


def _safe_cut(buf: bytes) -> int:
    """How much of `buf` can be decoded now without knowing what comes next.

    Decoding a line end depends on up to two following bytes (CR+LF or bare CR; a "." and whether more follows
    on its line), and a CRLF.CRLF may straddle two chunks. So hold back the last line end when fewer than two
    bytes follow it, and any tail that could begin CRLF.CRLF: at most four bytes are ever held back.
    """
    n = len(buf)
    last = max(buf.rfind(b"\r"), buf.rfind(b"\n"))
    cut = n
    if last >= 0 and n - last - 1 < 2:
        cut = last - 1 if buf[last] == _LF and last > 0 and buf[last - 1] == _CR else last
    for k in (4, 3, 2, 1):
        if buf.endswith(_TERMINATOR[:k]):
            return min(cut, n - k)
    return cut


class DotUnstuffer:
    """Decode DATA content as received after the 354: find the end of data, normalise bare CR/LF to CRLF,
    remove the stuffed "." from line starts, and enforce the line and size limits.

    `feed(data)` returns `(content, consumed)`; when `done` becomes true, `data[consumed:]` is what the
    client pipelined after the end of data. Once a limit is exceeded (`error` is set) no more content is
    returned, but the input is still drained up to the end of data.

    A line is "too long" when its unstuffed content plus CRLF exceeds `max_line` (RFC 5321 §4.5.3.1.6 does
    not count the stuffed dot). `max_size` counts the unstuffed, normalised octets. 0 means unlimited.

    Only a CRLF "." CRLF *as received* ends the data; the start of the data counts as following a CRLF (so
    ".\r\n" right after the 354 is an empty message). A line start after a bare CR or LF is a line start for
    unstuffing (as it will be one in the normalised content) but never for the end of data.
    """

    __slots__ = (
        "_line",
        "_pending",
        "_virtual",
        "done",
        "error",
        "max_line",
        "max_size",
        "size",
    )

    def __init__(self, max_line: int = 0, max_size: int = 0) -> None:
        self.max_line = max_line
        self.max_size = max_size
        self.size = 0  # content octets so far (stops growing once an error is set)
        self.done = False
        self.error: str | None = None  # "line" or "size": the first limit exceeded
        # A virtual CRLF before the data makes the start of data a line start; it is never emitted.
        self._pending = b"\r\n"
        self._virtual = True
        self._line = 0  # content octets of the current, unfinished output line

    def feed(self, data: bytes) -> tuple[bytes, int]:
        if self.done:
            raise ValueError("DotUnstuffer.feed() after the end of data")
        held = len(self._pending)
        buf = self._pending + data
        found = _END.search(buf)
        if found is not None:
            end = found.start()
            self.done = True
            self._pending = b""
            # The CRLF before the "." belongs to the content (RFC 5321 §4.1.1.4).
            return self._decode(buf[: end + 2]), end + len(_TERMINATOR) - held
        cut = _safe_cut(buf)
        self._pending = buf[cut:]
        return self._decode(buf[:cut]), len(data)

    def _decode(self, raw: bytes) -> bytes:
        if not raw or self.error is not None:
            return b""
        virtual = self._virtual
        if virtual:
            # `raw` starts with the virtual CRLF. A whole line end, so the rest normalises on its own (and
            # the CRLF does not spoil the fast paths of _normalise); it only makes a "." that starts the data
            # a stuffed one, dropped below as _STUFFED_DOT would drop it: when more follows that is not a CR.
            self._virtual = False
            raw = raw[2:]
        # Every CRLF, bare CR and bare LF becomes one CRLF (linear and at C speed; no copy if normalised).
        if len(raw) < _SMALL:
            text = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        else:
            text = _normalise(raw)
        if virtual and text[:1] == b"." and text[1:2] not in (b"", b"\r"):
            text = text[1:]
        text = _STUFFED_DOT.sub(b"\r\n", text)
        self._check_lines(text)
        if self.max_size and self.size + len(text) > self.max_size:
            self._fail("size")
        if self.error is not None:
            return b""
        self.size += len(text)
        return text

    def _check_lines(self, text: bytes) -> None:
        """Fail "line" if a line of `text` (CRLF-normalised) is too long: the first one continuing the `_line`
        octets of the unfinished line before it, the unfinished last one included."""
        max_line = self.max_line
        if not max_line:
            return
        if max_line < 2:  # not even an empty line fits (the options refuse a negative limit)
            self._fail("line")
            return
        last = text.rfind(b"\r\n")
        if last < 0:
            self._line += len(text)
        elif self._line + len(text) + 2 <= max_line:
            self._line = len(text) - last - 2  # (small chunks) even all of it would fit on one line
        else:
            # Visiting every line (split() or a regex) was a fifth of the event loop's time on 100 KiB
            # messages. Jump instead: a line that starts at `start` fits if its CRLF ends by `stop`. The last
            # CRLF that ends by `stop` ends that line and every line after it up to there, and they all fit
            # (they are shorter), so go on from there. A window with no CRLF in it means a line too long,
            # unless it is the last line (after `last`), unfinished: checked below as before. Here `_line` + 2
            # <= max_line (else an error is set and nothing is decoded), so the first window is not empty.
            rfind = text.rfind
            start, stop = 0, max_line - self._line
            while (end := rfind(b"\r\n", start, stop)) >= 0:
                start = end + 2
                stop = start + max_line
            if start != last + 2:
                self._fail("line")
                return
            self._line = len(text) - start
        if self._line + 2 > max_line:
            self._fail("line")

    def _fail(self, what: str) -> None:
        if self.error is None:
            self.error = what


def unstuff(data: bytes) -> bytes:
    """One-shot DotUnstuffer over a complete DATA payload (tests, tools). Raises ValueError if the payload
    has no end of data or has bytes after it."""
    unstuffer = DotUnstuffer()
    content, consumed = unstuffer.feed(data)
    if not unstuffer.done or consumed != len(data):
        raise ValueError("payload does not end exactly at <CRLF>.<CRLF>")
    return content
