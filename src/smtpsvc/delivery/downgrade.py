"""8-bit to 7-bit MIME conversion for a peer without 8BITMIME (RFC 6152; the KB286673 failure): pure.

`needs_downgrade` says whether a message has any octet above 127 or a NUL (streaming a file in 64 KiB
reads). `downgrade_to_7bit` rewrites only what has to change and splices everything else through byte for
byte: header order and folding, untouched parts, boundaries, preamble and epilogue.

- A leaf part with 8-bit octets, a NUL or a line over 998 octets is re-encoded: `text/*` as quoted-printable
  (RFC 2045 §6.7: lines of at most 76, line breaks kept as CRLF, trailing white space encoded), anything else
  as base64 (76-character lines); its `Content-Transfer-Encoding` is replaced (or added). A part already
  labelled base64 or quoted-printable but carrying 8-bit junk is decoded leniently and encoded again.
- multipart/* and message/rfc822 are recursed into (at most `MAX_NESTING` levels); a label of 8bit/binary
  on such a container becomes 7bit. 8-bit octets in a preamble or epilogue, which MIME readers ignore,
  become "?".
- 8-bit header field values become RFC 2047 encoded-words (charset utf-8, or unknown-8bit when the octets
  are not UTF-8), folded at 78 where possible; in address fields only display names and comments are
  encoded; in Content-Type / Content-Disposition parameters become RFC 2231 `name*=utf-8''...`.
- A message without MIME-Version (or a part without Content-Type) whose body is 8-bit gets `MIME-Version:
  1.0`, `Content-Type: text/plain; charset=utf-8` (or unknown-8bit) and a transfer encoding.

A part whose octets are all 7-bit stays as it is, whatever its label says, and header lines are not
refolded unless they are rewritten: the 998-octet bound is guaranteed for what this module writes.

What cannot be converted raises `DowngradeError`; its `status` is the enhanced code for the NDR:
- 5.6.7: 8-bit octets in an address (local part or domain): only SMTPUTF8 can carry it (RFC 6531).
- 5.6.9: 8-bit octets in a field name, in a field where encoded-words are not allowed (Message-ID,
  Received, References...), in a Content-Type value, boundary or charset.
- 5.6.5: 8-bit octets in the header of an attached message/rfc822 (not converted for now), or a message
  that cannot be parsed safely: a multipart without its boundary, an unterminated quoted string or comment,
  bad base64, an unknown transfer encoding, nesting deeper than `MAX_NESTING`.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from email.message import Message
from typing import BinaryIO, Final

__all__ = ["MAX_NESTING", "DowngradeError", "downgrade_to_7bit", "needs_downgrade"]

READ_SIZE: Final = 64 * 1024
MAX_NESTING: Final = 16  # nested multipart / message/rfc822 levels
MAX_LINE: Final = 998  # RFC 5322 §2.1.1, without the CRLF
FOLD_AT: Final = 78  # RFC 5322 §2.1.1 "SHOULD"
QP_LINE: Final = 76  # RFC 2045 §6.7 (5)
B64_LINE: Final = 76
ENCODED_WORD_MAX: Final = 75  # RFC 2047 §2

CRLF: Final = b"\r\n"
UTF8: Final = b"utf-8"
UNKNOWN_8BIT: Final = b"unknown-8bit"  # RFC 1428

ADDRESS_FIELDS: Final = frozenset(
    {
        b"from", b"sender", b"reply-to", b"to", b"cc", b"bcc",
        b"resent-from", b"resent-sender", b"resent-reply-to", b"resent-to", b"resent-cc", b"resent-bcc",
        b"disposition-notification-to", b"mail-followup-to", b"mail-reply-to", b"return-receipt-to",
    }
)  # fmt: skip
PARAMETER_FIELDS: Final = frozenset({b"content-type", b"content-disposition"})
# Structured fields in which RFC 2047 forbids encoded-words: 8-bit octets there only travel with SMTPUTF8.
NO_ENCODED_WORD_FIELDS: Final = frozenset(
    {
        b"date", b"resent-date", b"message-id", b"resent-message-id", b"in-reply-to", b"references",
        b"return-path", b"received", b"mime-version", b"content-transfer-encoding", b"content-id",
        b"content-md5", b"content-location", b"content-language", b"dkim-signature", b"domainkey-signature",
        b"authentication-results", b"received-spf", b"list-id", b"list-post", b"list-unsubscribe",
        b"list-help", b"list-subscribe", b"list-owner", b"list-archive", b"autocrypt",
    }
)  # fmt: skip
IDENTITY_ENCODINGS: Final = frozenset({"7bit", "8bit", "binary"})

_QP_ESCAPE: Final = re.compile(rb"[^\x21-\x3c\x3e-\x7e \t]")  # '=' and everything not printable ASCII
_LONG_LINE: Final = re.compile(rb"[^\r\n]{%d}" % (MAX_LINE + 1))
_EOL: Final = re.compile(rb"\r?\n")
_QUOTED_PAIR: Final = re.compile(rb"\\(.)", re.DOTALL)
_UNSTRUCTURED_TOKEN: Final = re.compile(rb"[ \t]+|[^ \t]+")
_ENCODED_WORD: Final = re.compile(rb"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=")
_SANITIZE: Final = bytes(b if 0 < b < 128 else ord("?") for b in range(256))
_RFC2231_SAFE: Final = frozenset(
    b"!#$&+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)
_ADDRESS_SPECIALS: Final = b",:;@.[]<>\\"
_PARAMETER_SPECIALS: Final = b"<>@,;:\\/[]?="


class DowngradeError(ValueError):
    """The message cannot be made 7-bit without changing its meaning; `status` is the NDR's enhanced code."""

    def __init__(self, message: str, status: str = "5.6.5") -> None:
        super().__init__(message)
        self.status = status


def needs_downgrade(message: BinaryIO | bytes) -> bool:
    """True if any octet is above 127 or NUL (headers or body). A file is read in 64 KiB chunks from its
    current position, which is restored afterwards when the file is seekable."""
    if isinstance(message, bytes | bytearray):
        return not _is_7bit(message)
    start = message.tell() if message.seekable() else None
    try:
        while chunk := message.read(READ_SIZE):
            if not _is_7bit(chunk):
                return True
        return False
    finally:
        if start is not None:
            message.seek(start)


def downgrade_to_7bit(message: bytes) -> bytes:
    """Return `message` with every octet below 128 and body lines of at most 998 octets (see the module
    docstring for what changes). A message that does not need it is returned unchanged."""
    if not needs_downgrade(message):
        return message
    converted = _convert(message, _Context(is_message=True, headers_may_change=True, depth=0))
    if not _is_7bit(converted):  # pragma: no cover - every 8-bit octet is handled above; never send one
        raise DowngradeError("conversion left 8-bit octets in the message")
    return converted


# --- structure ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Field:
    name: bytes  # as written, without trailing white space
    raw: bytes  # the whole field: name, colon, value, folding, line ending

    @property
    def key(self) -> bytes:
        return self.name.lower()

    @property
    def value(self) -> bytes:
        """The value after the colon, unfolded, without the line ending."""
        return _EOL.sub(b"", self.raw[self.raw.index(b":") + 1 :])


@dataclass(frozen=True, slots=True)
class _Entity:
    fields: tuple[_Field, ...]
    separator: bytes  # the empty line ending the header section, b"" when there was none
    body: bytes

    def first(self, key: bytes) -> _Field | None:
        return next((f for f in self.fields if f.key == key), None)


@dataclass(frozen=True, slots=True)
class _Context:
    is_message: bool  # a whole message (top level or message/rfc822 content), not a body part
    headers_may_change: bool
    depth: int
    default_type: str = "text/plain"


def _is_7bit(data: bytes | bytearray) -> bool:
    return data.isascii() and b"\0" not in data


def _needs_conversion(data: bytes) -> bool:
    return not _is_7bit(data) or _LONG_LINE.search(data) is not None


def _lines(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each line, `end` past its line ending."""
    spans = []
    pos = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        end = len(data) if nl < 0 else nl + 1
        spans.append((pos, end))
        pos = end
    return spans


def _strip_eol(line: bytes) -> bytes:
    if line.endswith(b"\n"):
        line = line[:-1]
        if line.endswith(b"\r"):
            line = line[:-1]
    return line


def _field_name(line: bytes) -> bytes | None:
    """The field name if `line` starts a header field, None if it is not a header line at all."""
    colon = line.find(b":")
    if colon <= 0:
        return None
    name = line[:colon].rstrip(b" \t")  # obs-optional: white space before the colon
    if not name or any(c <= 32 or c == 127 for c in name):
        return None
    if not name.isascii():
        raise DowngradeError(f"8-bit octets in a header field name {name!r}", "5.6.9")
    return name


def _parse_entity(raw: bytes) -> _Entity:
    """Split header fields, separator and body. Like the stdlib parser, a line that is neither a field nor a
    continuation ends the header section and starts the body."""
    fields: list[_Field] = []
    pos = 0
    for start, end in _lines(raw):
        line = _strip_eol(raw[start:end])
        if not line:
            return _Entity(tuple(fields), raw[start:end], raw[end:])
        if line[0] in b" \t":
            if not fields:
                raise DowngradeError("the header section starts with a continuation line")
            fields[-1] = _Field(fields[-1].name, fields[-1].raw + raw[start:end])
        else:
            name = _field_name(line)
            if name is None:
                return _Entity(tuple(fields), b"", raw[start:])
            fields.append(_Field(name, raw[start:end]))
        pos = end
    return _Entity(tuple(fields), b"", raw[pos:])


def _content_type(entity: _Entity, default: str) -> Message:
    """A stdlib Message holding only the Content-Type, for its parameter parsing (RFC 2045/2231)."""
    message = Message()
    message.set_default_type(default)
    field = entity.first(b"content-type")
    if field is not None:
        message["Content-Type"] = field.value.decode("latin-1")
    return message


def _transfer_encoding(entity: _Entity) -> str | None:
    field = entity.first(b"content-transfer-encoding")
    if field is None:
        return None
    return field.value.split(b"(")[0].strip().decode("latin-1").lower()


# --- conversion --------------------------------------------------------------------------------------------


def _convert(raw: bytes, ctx: _Context) -> bytes:
    """Convert one entity (message or body part); an entity that is already 7-bit comes back as is."""
    if not _needs_conversion(raw):
        return raw
    entity = _parse_entity(raw)
    dirty_fields = [f for f in entity.fields if not _is_7bit(f.raw)]
    if dirty_fields and not ctx.headers_may_change:
        raise DowngradeError(
            f"8-bit octets in the {dirty_fields[0].name!r} field of an attached message (message/rfc822)"
        )
    headers = [f.raw if _is_7bit(f.raw) else _rewrite_field(f) for f in entity.fields]
    if not _needs_conversion(entity.body):
        return b"".join(headers) + entity.separator + entity.body

    content_type = _content_type(entity, ctx.default_type)
    ctype = content_type.get_content_type()
    cte = _transfer_encoding(entity)
    added: list[bytes] = []
    if ctx.is_message and entity.first(b"mime-version") is None:
        added.append(b"MIME-Version: 1.0\r\n")
    new_cte: str | None
    if ctype.startswith("multipart/"):
        _check_container(ctype, cte, ctx)
        body = _convert_multipart(entity.body, _boundary(content_type), ctype == "multipart/digest", ctx)
        new_cte = "7bit" if cte in ("8bit", "binary") else None
    elif ctype == "message/rfc822":
        _check_container(ctype, cte, ctx)
        body = _convert(entity.body, _Context(is_message=True, headers_may_change=False, depth=ctx.depth + 1))
        new_cte = "7bit" if cte in ("8bit", "binary") else None
    elif ctype in ("message/partial", "message/external-body"):
        raise DowngradeError(f"{ctype} with 8-bit content cannot be converted (RFC 2046 §5.2)")
    else:
        data = _decode(entity.body, cte)
        charset = (content_type.get_content_charset() or "").lower()
        as_text = (
            ctype.startswith("text/") and cte != "base64" and not charset.startswith(("utf-16", "utf-32"))
        )
        body, new_cte = (_qp_encode(data), "quoted-printable") if as_text else (_b64_encode(data), "base64")
        if entity.first(b"content-type") is None:
            added.append(b"Content-Type: text/plain; charset=%s\r\n" % _charset(data))
        if new_cte == cte:
            new_cte = None
    if new_cte is not None:
        headers, replaced = _replace_cte(entity.fields, headers, new_cte.encode())
        if not replaced:
            added.append(b"Content-Transfer-Encoding: %s\r\n" % new_cte.encode())
    if headers and added and not headers[-1].endswith(b"\n"):
        headers[-1] += CRLF
    return b"".join(headers + added) + (entity.separator or CRLF) + body


def _check_container(ctype: str, cte: str | None, ctx: _Context) -> None:
    if ctx.depth >= MAX_NESTING:
        raise DowngradeError(f"MIME nesting deeper than {MAX_NESTING} levels")
    if cte is not None and cte not in IDENTITY_ENCODINGS:
        raise DowngradeError(
            f"{ctype} labelled {cte!r} holds 8-bit octets (RFC 2045 §6.4 allows 7bit/8bit/binary)"
        )


def _boundary(content_type: Message) -> bytes:
    boundary = content_type.get_boundary()
    if not boundary:
        raise DowngradeError("multipart without a boundary parameter")
    if not boundary.isascii():
        raise DowngradeError("multipart boundary with 8-bit octets")
    return boundary.encode("ascii")


@dataclass(frozen=True, slots=True)
class _Delimiter:
    start: int  # start of the delimiter line
    end: int  # past its line ending
    close: bool


def _delimiters(body: bytes, boundary: bytes) -> list[_Delimiter]:
    """Delimiter lines `--boundary` (and the close delimiter `--boundary--`), transport padding allowed."""
    found = []
    dash_boundary = b"--" + boundary
    for start, end in _lines(body):
        if not body.startswith(dash_boundary, start):
            continue
        rest = _strip_eol(body[start + len(dash_boundary) : end])
        close = rest.startswith(b"--")
        if rest[2 if close else 0 :].strip(b" \t"):
            continue
        found.append(_Delimiter(start, end, close))
        if close:
            break
    return found


def _convert_multipart(body: bytes, boundary: bytes, digest: bool, ctx: _Context) -> bytes:
    """Convert each body part between the delimiters; delimiters, preamble and epilogue stay (sanitized)."""
    delimiters = _delimiters(body, boundary)
    if not delimiters or delimiters[0].close:
        raise DowngradeError(f"multipart body without its boundary {boundary!r}")
    part_ctx = _Context(
        is_message=False,
        headers_may_change=True,
        depth=ctx.depth + 1,
        default_type="message/rfc822" if digest else "text/plain",
    )
    out: list[bytes] = []
    position = 0  # everything before it has been emitted
    for previous, delimiter in zip([None, *delimiters], delimiters, strict=False):
        if previous is not None:
            # The line ending before a delimiter belongs to the delimiter (RFC 2046 §5.1.1).
            part_end = max(previous.end, delimiter.start - _eol_length_before(body, delimiter.start))
            out.append(_convert(body[previous.end : part_end], part_ctx))
            position = part_end
        out.append(body[position : delimiter.end].translate(_SANITIZE))
        position = delimiter.end
    if delimiters[-1].close:
        out.append(body[position:].translate(_SANITIZE))  # the epilogue
    else:
        out.append(_convert(body[position:], part_ctx))  # no close delimiter: the last part runs to the end
    return b"".join(out)


def _eol_length_before(data: bytes, position: int) -> int:
    if data[max(0, position - 2) : position] == CRLF:
        return 2
    return 1 if data[max(0, position - 1) : position] == b"\n" else 0


def _decode(body: bytes, cte: str | None) -> bytes:
    if cte is None or cte in IDENTITY_ENCODINGS:
        return body
    if cte == "base64":
        try:
            return binascii.a2b_base64(body)  # RFC 2045 §6.8: characters outside the alphabet are ignored
        except binascii.Error as exc:
            raise DowngradeError(f"malformed base64 body: {exc}") from None
    if cte == "quoted-printable":
        return binascii.a2b_qp(body)  # 8-bit octets (ill-formed there) pass through as data
    raise DowngradeError(f"8-bit octets in a part with transfer encoding {cte!r}")


def _replace_cte(fields: tuple[_Field, ...], headers: list[bytes], cte: bytes) -> tuple[list[bytes], bool]:
    """Replace the first Content-Transfer-Encoding field and drop any further ones."""
    out: list[bytes] = []
    replaced = False
    for field, raw in zip(fields, headers, strict=True):
        if field.key != b"content-transfer-encoding":
            out.append(raw)
        elif not replaced:
            out.append(b"Content-Transfer-Encoding: " + cte + CRLF)
            replaced = True
    return out, replaced


def _charset(data: bytes) -> bytes:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return UNKNOWN_8BIT
    return UTF8


def _qp_encode(data: bytes) -> bytes:
    """Quoted-printable for text: LF or CRLF are line breaks (written CRLF); a bare CR is data."""
    lines = data.split(b"\n")
    encoded = []
    for index, line in enumerate(lines):
        if index < len(lines) - 1 and line.endswith(b"\r"):
            line = line[:-1]
        encoded.append(_qp_line(line))
    return CRLF.join(encoded)


def _qp_line(line: bytes) -> bytes:
    text = _QP_ESCAPE.sub(lambda m: b"=%02X" % m.group()[0], line)
    if text.endswith((b" ", b"\t")):  # RFC 2045 §6.7 (3): trailing white space is encoded
        text = text[:-1] + b"=%02X" % text[-1]
    pieces = []
    while len(text) > QP_LINE:
        cut = QP_LINE - 1  # room for the soft line break "="
        if text[cut - 1] == ord("="):
            cut -= 1
        elif text[cut - 2] == ord("="):
            cut -= 2
        pieces.append(text[:cut] + b"=")
        text = text[cut:]
    pieces.append(text)
    return CRLF.join(pieces)


def _b64_encode(data: bytes) -> bytes:
    encoded = base64.b64encode(data)
    return b"".join(encoded[i : i + B64_LINE] + CRLF for i in range(0, len(encoded), B64_LINE))


# --- header fields -----------------------------------------------------------------------------------------


def _rewrite_field(field: _Field) -> bytes:
    """A 7-bit replacement for one header field with 8-bit octets in its value."""
    key = field.key
    if key in ADDRESS_FIELDS:
        return _rewrite_address_field(field)
    if key in PARAMETER_FIELDS:
        return _rewrite_parameter_field(field)
    if key in NO_ENCODED_WORD_FIELDS or key.startswith((b"arc-", b"x-original-message-id")):
        raise DowngradeError(f"8-bit octets in the {field.name!r} field need SMTPUTF8", "5.6.9")
    return _rewrite_unstructured_field(field)


class _Folder:
    """Writes one header field, folding at white space so lines stay within 78 octets where possible."""

    def __init__(self, name: bytes, charset: bytes) -> None:
        self._out = bytearray(name + b":")
        self._column = len(self._out)
        self._start = self._column
        self._space = b" "  # white space waiting before the next unit; a fold may go there
        self._charset = charset

    def space(self, ws: bytes) -> None:
        self._space += ws

    def add(self, unit: bytes) -> None:
        if (
            self._space
            and self._column > self._start
            and self._column + len(self._space) + len(unit) > FOLD_AT
        ):
            self._fold()
        self._emit(unit)

    def add_encoded(self, text: bytes) -> None:
        """`text` as encoded-words, each at most 75 octets and holding whole characters (RFC 2047 §5)."""
        chars = _characters(text, self._charset)
        overhead = len(self._charset) + 7  # =?charset?b?...?=
        smallest = overhead + 8  # one character of up to 4 octets
        i = 0
        while i < len(chars):
            room = min(ENCODED_WORD_MAX, FOLD_AT - self._column - len(self._space))
            if room < smallest and self._space and self._column > self._start:
                self._fold()
                room = min(ENCODED_WORD_MAX, FOLD_AT - len(self._space))
            room = max(room, smallest)
            j, size = i + 1, len(chars[i])
            while j < len(chars) and overhead + 4 * ((size + len(chars[j]) + 2) // 3) <= room:
                size += len(chars[j])
                j += 1
            self._emit(b"=?%s?b?%s?=" % (self._charset, base64.b64encode(b"".join(chars[i:j]))))
            if j < len(chars):
                self._space = b" "  # white space between adjacent encoded-words is not displayed
            i = j

    def result(self) -> bytes:
        return bytes(self._out) + CRLF

    def _fold(self) -> None:
        self._out += CRLF
        self._column = 0

    def _emit(self, unit: bytes) -> None:
        self._out += self._space + unit
        self._column += len(self._space) + len(unit)
        self._space = b""


def _characters(text: bytes, charset: bytes) -> list[bytes]:
    if charset == UTF8:
        return [c.encode() for c in text.decode("utf-8")]
    return [bytes([octet]) for octet in text]


def _rewrite_unstructured_field(field: _Field) -> bytes:
    """Encode each run of 8-bit words; 7-bit words stay literal (RFC 2047 §5 (1))."""
    value = field.value.strip(b" \t")
    folder = _Folder(field.name, _charset(value))
    words: list[tuple[bytes, bytes]] = []  # (white space before, word)
    ws = b""
    for token in _UNSTRUCTURED_TOKEN.findall(value):
        if token[0] in b" \t":
            ws = token
        else:
            words.append((ws, token))
            ws = b""
    i = 0
    while i < len(words):
        ws, word = words[i]
        if _is_7bit(word):
            folder.space(ws)
            folder.add(word)
            i += 1
            continue
        j = i + 1
        while j < len(words) and not _is_7bit(words[j][1]):
            j += 1
        text = word + b"".join(w + t for w, t in words[i + 1 : j])
        # White space between two encoded-words is dropped by decoders: keep it inside the encoded text.
        if i > 0 and _ENCODED_WORD.fullmatch(words[i - 1][1]):
            text = ws + text
        if j < len(words) and _ENCODED_WORD.fullmatch(words[j][1]):
            text += words[j][0]
        folder.space(ws)
        folder.add_encoded(text)
        i = j
    return folder.result()


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # "ws" | "comment" | "quoted" | "angle" | "literal" | "special" | "atom"
    raw: bytes

    @property
    def dirty(self) -> bool:
        return not _is_7bit(self.raw)


def _tokenize(value: bytes, specials: bytes, addresses: bool) -> list[_Token]:
    tokens = []
    i = 0
    while i < len(value):
        c = value[i : i + 1]
        if c in b" \t":
            j = i
            while j < len(value) and value[j] in b" \t":
                j += 1
            kind = "ws"
        elif c == b"(":
            j, kind = _scan_comment(value, i), "comment"
        elif c == b'"':
            j, kind = _scan_until(value, i + 1, b'"', "quoted string"), "quoted"
        elif addresses and c == b"<":
            j, kind = _scan_until(value, i + 1, b">", "angle address"), "angle"
        elif addresses and c == b"[":
            j, kind = _scan_until(value, i + 1, b"]", "domain literal"), "literal"
        elif c in specials:
            j, kind = i + 1, "special"
        else:
            j = i
            while j < len(value) and value[j] not in b' \t("' and value[j : j + 1] not in specials:
                j += 1
            kind = "atom"
        tokens.append(_Token(kind, value[i:j]))
        i = j
    return tokens


def _scan_comment(value: bytes, start: int) -> int:
    depth = 0
    i = start
    while i < len(value):
        c = value[i : i + 1]
        if c == b"\\":
            i += 1
        elif c == b"(":
            depth += 1
        elif c == b")":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise DowngradeError("unterminated comment in a header field")


def _scan_until(value: bytes, start: int, closing: bytes, what: str) -> int:
    """Past the `closing` octet, skipping quoted-pairs (and quoted strings inside an angle address)."""
    i = start
    while i < len(value):
        c = value[i : i + 1]
        if c == b"\\":
            i += 1
        elif c == closing:
            return i + 1
        elif c == b'"' and closing == b">":
            i = _scan_until(value, i + 1, b'"', "quoted string") - 1
        i += 1
    raise DowngradeError(f"unterminated {what} in a header field")


def _unquote(token: _Token) -> bytes:
    inner = token.raw[1:-1] if token.kind in ("quoted", "comment") else token.raw
    return _QUOTED_PAIR.sub(rb"\1", inner)


def _rewrite_address_field(field: _Field) -> bytes:
    """Encode 8-bit display names and comments; an 8-bit address itself needs SMTPUTF8."""
    value = field.value.strip(b" \t")
    folder = _Folder(field.name, _charset(value))
    pending: list[_Token] = []
    for token in _tokenize(value, _ADDRESS_SPECIALS, addresses=True):
        if token.kind == "angle" or token.raw in (b":", b",", b";"):
            # Before "<addr>" or a group's ":" comes a display name; before "," or ";" an addr-spec.
            _emit_address_tokens(folder, pending, phrase=token.kind == "angle" or token.raw == b":")
            pending = []
            if token.dirty:
                raise _address_error(field)
            folder.add(token.raw)
        else:
            pending.append(token)
    _emit_address_tokens(folder, pending, phrase=False)
    return folder.result()


def _address_error(field: _Field) -> DowngradeError:
    return DowngradeError(
        f"8-bit octets in an address in the {field.name!r} field: it needs SMTPUTF8 (RFC 6531)", "5.6.7"
    )


def _emit_address_tokens(folder: _Folder, tokens: list[_Token], phrase: bool) -> None:
    run: list[_Token] = []
    for token in [*tokens, None]:
        if token is not None and token.kind != "comment":
            run.append(token)
            continue
        if any(t.dirty for t in run):
            if not phrase:
                raise DowngradeError("8-bit octets in an address: it needs SMTPUTF8 (RFC 6531)", "5.6.7")
            _emit_phrase(folder, run)
        else:
            for t in run:
                if t.kind == "ws":
                    folder.space(t.raw)
                else:
                    folder.add(t.raw)
        run = []
        if token is not None:
            _emit_comment(folder, token)


def _emit_phrase(folder: _Folder, run: list[_Token]) -> None:
    """A display name with 8-bit octets becomes encoded-words of its text (RFC 2047 §5 (3))."""
    start, end = 0, len(run)
    while run[start].kind == "ws":
        start += 1
    while run[end - 1].kind == "ws":
        end -= 1
    text = b"".join(b" " if t.kind == "ws" else _unquote(t) for t in run[start:end])
    for t in run[:start]:
        folder.space(t.raw)
    folder.add_encoded(text)
    for t in run[end:]:
        folder.space(t.raw)


def _emit_comment(folder: _Folder, token: _Token) -> None:
    if not token.dirty:
        folder.add(token.raw)
        return
    folder.add(b"(")
    folder.add_encoded(_unquote(token))  # encoded-words are allowed in comments (RFC 2047 §5 (2))
    folder.add(b")")


def _rewrite_parameter_field(field: _Field) -> bytes:
    """Content-Type / Content-Disposition: 8-bit parameter values become RFC 2231 extended values."""
    value = field.value.strip(b" \t")
    charset = _charset(value)
    segments: list[list[_Token]] = [[]]
    for token in _tokenize(value, _PARAMETER_SPECIALS, addresses=False):
        if token.raw == b";":
            segments.append([])
        else:
            segments[-1].append(token)
    folder = _Folder(field.name, charset)
    main = b"".join(t.raw for t in segments[0]).strip(b" \t")
    if not _is_7bit(main):
        raise DowngradeError(f"8-bit octets in the {field.name!r} value itself", "5.6.9")
    folder.add(main)
    for segment in segments[1:]:
        folder.add(b";")
        raw = b"".join(t.raw for t in segment).strip(b" \t")
        pieces = [raw] if _is_7bit(raw) else _rfc2231(field, segment, charset)
        for index, piece in enumerate(pieces):
            if index:
                folder.add(b";")
            if piece:
                folder.space(b" ")
                folder.add(piece)
    return folder.result()


def _rfc2231(field: _Field, segment: list[_Token], charset: bytes) -> list[bytes]:
    """`name*=charset''%XX...`, split into `name*0*=`, `name*1*=`... continuations when long."""
    meaningful = [t for t in segment if t.kind not in ("ws", "comment")]
    bad = (
        len(meaningful) != 3
        or meaningful[0].kind != "atom"
        or meaningful[1].raw != b"="
        or meaningful[2].kind not in ("atom", "quoted")
        or any(t.dirty for t in segment if t.kind == "comment")
    )
    if bad or not _is_7bit(meaningful[0].raw):
        raise DowngradeError(
            f"8-bit octets in a comment or a malformed parameter of the {field.name!r} field", "5.6.9"
        )
    name = meaningful[0].raw
    if b"*" in name or name.lower() in (b"boundary", b"charset"):
        raise DowngradeError(f"8-bit octets in the {name!r} parameter of the {field.name!r} field", "5.6.9")
    encoded = [bytes([c]) if c in _RFC2231_SAFE else b"%%%02X" % c for c in _unquote(meaningful[2])]
    whole = b"".join(encoded)
    if len(name) + len(charset) + len(whole) <= 60:
        return [name + b"*=" + charset + b"''" + whole]
    pieces: list[bytes] = [b""]
    for octet in encoded:
        if len(pieces[-1]) + len(octet) > 48:
            pieces.append(b"")
        pieces[-1] += octet
    return [
        name + b"*%d*=" % index + (charset + b"''" if index == 0 else b"") + piece
        for index, piece in enumerate(pieces)
    ]
