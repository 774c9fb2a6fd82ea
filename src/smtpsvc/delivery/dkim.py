"""DKIM signing (RFC 6376, RFC 8463) of what the SMTP transport puts on the wire.

Pure: keys arrive as bytes (the transport reads the files), messages as bytes, and what comes back is the
DKIM-Signature header fields to put on top. The signing itself is dkimpy's; what is ours is the choice of
key (by the domain of the From: header, the identifier DMARC aligns with), the list of headers signed and
over-signed (RFC 6376 §5.4), and turning any key file an administrator may have into the form dkimpy takes.
"""

from __future__ import annotations

import base64
import dataclasses
import email.utils
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import dkim as dkimpy
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

KEY_UNUSABLE = "dkim-key-unusable"
ALGORITHMS = ("rsa-sha256", "ed25519-sha256")
DEFAULT_SIGNER = "*"
MAX_KEY_FILE = 64 * 1024  # a PEM key is a few KiB; anything larger is the wrong file
MIN_RSA_BITS = 1024  # RFC 8301 §3.2: verifiers must not accept smaller keys

# RFC 6376 §5.4.1: the header fields a signer should sign, lower case (dkimpy matches case-insensitively).
SIGNED = (
    "from",
    "to",
    "cc",
    "subject",
    "date",
    "message-id",
    "reply-to",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "in-reply-to",
    "references",
)
# §5.4.2: listed once more than they occur, so that adding one (a second From:, a Subject: where there was
# none) breaks the signature instead of changing what the reader sees.
OVER_SIGNED = frozenset({"from", "to", "subject", "date"})

_HEADER_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:")


class KeyUnusable(Exception):
    """The key file cannot be used for signing; the text names the problem, never the key."""


@dataclass(frozen=True, slots=True)
class SigningKey:
    domain: str  # d=
    selector: str  # s=
    algorithm: str  # a=: "rsa-sha256" or "ed25519-sha256"
    private: bytes  # in dkimpy's form: PKCS#1 PEM (RSA) or the base64 seed (Ed25519)
    public: str  # the p= of the DNS record
    key_file: str  # where it came from, for messages

    def __repr__(self) -> str:  # never the key, whoever prints this object
        return f"SigningKey({self.domain!r}, {self.selector!r}, {self.algorithm!r}, {self.key_file!r})"


@dataclass(frozen=True, slots=True)
class KeyRef:
    """One [[dkim]] table as the chooser needs it (config.DkimKey has these fields)."""

    domain: str
    selector: str
    key_file: str
    algorithm: str


# ------------------------------------------------------------------------------------------ choosing


def header_block(message: bytes) -> bytes:
    """The header section of a message (up to the first empty line)."""
    match = re.search(rb"\r?\n\r?\n", message)
    return message[: match.start() + 1] if match else message


def from_domain(headers: bytes) -> str | None:
    """The domain of the (first) address of the first From: header field, lower case; None without one."""
    value: list[bytes] = []
    found = False
    for line in re.split(rb"\r?\n", headers):
        if found:
            if line[:1] in (b" ", b"\t"):
                value.append(line)
                continue
            break
        match = _HEADER_NAME.match(line)
        if match and match.group(1).lower() == b"from":
            found = True
            value.append(line[match.end() :])
    if not found:
        return None
    text = b" ".join(value).decode("utf-8", "replace")
    for _, address in email.utils.getaddresses([text]):
        if "@" in address:
            domain = address.rsplit("@", 1)[1].strip().strip(".").lower()
            return domain or None
    return None


def keys_for(domain: str | None, keys: Sequence[KeyRef]) -> list[KeyRef]:
    """The keys that sign mail from `domain`: those of the domain itself; else those of the nearest parent
    domain that has keys (a signature by example.com is aligned with From: news.example.com under DMARC's
    relaxed alignment, the default); else the default signer's (domain = "*"). Several keys of one domain
    all sign (dual signing: RSA and Ed25519)."""
    if domain:
        labels = domain.split(".")
        for start in range(len(labels) - 1):
            candidate = ".".join(labels[start:])
            chosen = [key for key in keys if key.domain == candidate]
            if chosen:
                return chosen
    return [key for key in keys if key.domain == DEFAULT_SIGNER]


# ------------------------------------------------------------------------------------------ keys


def load_key(ref: KeyRef, data: bytes, signing_domain: str) -> SigningKey:
    """The key of `ref` from the bytes of its key_file: a PEM private key (PKCS#1 or PKCS#8, as OpenSSL and
    `smtpsvc dkim keygen` write them) or, for Ed25519, the bare base64 seed that dkimpy's dknewkey writes.
    `signing_domain` is the d= (the From: domain for the default signer). Raises KeyUnusable."""
    where = f"DKIM key_file {ref.key_file} (domain {ref.domain}, selector {ref.selector})"
    text = data.strip()
    if not text:
        raise KeyUnusable(f"{where} is empty")
    key: object
    if text.startswith(b"-----BEGIN"):
        if b"ENCRYPTED" in text:
            raise KeyUnusable(f"{where} is encrypted with a passphrase; store it unencrypted, mode 0600")
        try:
            key = serialization.load_pem_private_key(text, password=None)
        except (ValueError, TypeError) as exc:
            raise KeyUnusable(f"{where} is not a readable PEM private key ({_first_line(exc)})") from None
    else:
        try:
            seed = base64.b64decode(text, validate=True)
        except ValueError:
            seed = b""
        if len(seed) != 32:
            raise KeyUnusable(f"{where} holds no PEM private key (no -----BEGIN line)")
        key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    if isinstance(key, rsa.RSAPrivateKey):
        if ref.algorithm != "rsa-sha256":
            raise KeyUnusable(f'{where} is an RSA key, but algorithm = "{ref.algorithm}"; use "rsa-sha256"')
        if key.key_size < MIN_RSA_BITS:
            raise KeyUnusable(
                f"{where} is an RSA key of {key.key_size} bits; receivers refuse fewer than {MIN_RSA_BITS}"
                " (use 2048)"
            )
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        public_der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        public = base64.b64encode(public_der).decode("ascii")
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        if ref.algorithm != "ed25519-sha256":
            raise KeyUnusable(
                f'{where} is an Ed25519 key, but algorithm = "{ref.algorithm}"; use "ed25519-sha256"'
            )
        raw = key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        private = base64.b64encode(raw)
        public_raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        public = base64.b64encode(public_raw).decode("ascii")
    else:
        raise KeyUnusable(f"{where} is a {type(key).__name__.lstrip('_')}, not an RSA or Ed25519 key")
    return SigningKey(signing_domain, ref.selector, ref.algorithm, private, public, ref.key_file)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def generate(algorithm: str, bits: int = 2048) -> bytes:
    """A new private key as PKCS#8 PEM (what `smtpsvc dkim keygen` writes)."""
    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if algorithm == "ed25519-sha256":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def record_value(key: SigningKey) -> str:
    """The TXT record to publish at <selector>._domainkey.<domain>."""
    kind = "ed25519" if key.algorithm == "ed25519-sha256" else "rsa"
    return f"v=DKIM1; k={kind}; p={key.public}"


def txt_strings(value: str) -> list[str]:
    """A TXT value as the character-strings of one record: at most 255 octets each (RFC 1035 §3.3);
    receivers join them without a separator (RFC 6376 §3.6.2.2)."""
    return [value[start : start + 255] for start in range(0, len(value), 255)] or [""]


def record_problem(published: Sequence[str], key: SigningKey) -> str:
    """ "" when one of the published TXT records (each its strings joined) carries this key's public key,
    else what is wrong, in words."""
    if not published:
        return "no TXT record is published there"
    tags_seen: list[dict[str, str]] = []
    for record in published:
        tags = _tags(record)
        if tags.get("v", "DKIM1") != "DKIM1":
            continue
        tags_seen.append(tags)
        kind = tags.get("k", "rsa")
        want = "ed25519" if key.algorithm == "ed25519-sha256" else "rsa"
        if re.sub(r"\s", "", tags.get("p", "")) == key.public and kind == want:
            return ""
    if not tags_seen:
        return "the TXT record there is not a DKIM key record (no v=DKIM1)"
    tags = tags_seen[0]
    if not tags.get("p"):
        return "the published record has an empty p= (the key was revoked)"
    want = "ed25519" if key.algorithm == "ed25519-sha256" else "rsa"
    if tags.get("k", "rsa") != want:
        return f"the published record is k={tags.get('k', 'rsa')}, the configured key is {want}"
    return "the published public key (p=) is not the one of the configured key_file"


def _tags(record: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in record.split(";"):
        name, sep, value = part.partition("=")
        if sep:
            out[name.strip()] = value.strip()
    return out


# ------------------------------------------------------------------------------------------ signing


def signed_headers(headers: bytes) -> list[bytes]:
    """The h= list for this message: each field of SIGNED as often as it occurs, the OVER_SIGNED ones once
    more (so none can be added after signing)."""
    counts: dict[bytes, int] = {}
    for line in re.split(rb"\r?\n", headers):
        match = _HEADER_NAME.match(line)
        if match:
            name = match.group(1).lower()
            counts[name] = counts.get(name, 0) + 1
    out: list[bytes] = []
    for name in SIGNED:
        wire = name.encode("ascii")
        out += [wire] * (counts.get(wire, 0) + (1 if name in OVER_SIGNED else 0))
    return out


def sign(message: bytes, keys: Sequence[SigningKey]) -> bytes:
    """The DKIM-Signature header fields (CRLF-terminated, one per key, in the order of `keys`) for
    `message`, exactly the bytes that go on the wire. c=relaxed/relaxed: the canonical forms survive the
    header re-folding and trailing-space changes some relays make. Raises ValueError when the message
    cannot be signed (no header section dkimpy can read; a key dkimpy refuses, which load_key checked)."""
    include = signed_headers(header_block(message))
    out: list[bytes] = []
    for key in keys:
        try:
            out.append(
                dkimpy.sign(
                    message,
                    key.selector.encode("ascii"),
                    key.domain.encode("ascii"),
                    key.private,
                    canonicalize=(b"relaxed", b"relaxed"),
                    signature_algorithm=key.algorithm.encode("ascii"),
                    include_headers=include,
                )
            )
        except dkimpy.KeyFormatError as exc:
            raise ValueError(f"DKIM key_file {key.key_file} cannot sign: {_first_line(exc)}") from None
        except dkimpy.DKIMException as exc:
            raise ValueError(_first_line(exc)) from None
    return b"".join(out)


# ------------------------------------------------------------------------------------------ key files


class KeyFiles:
    """The I/O edge: reads [[dkim]] key files, keeps each parsed key until its file changes (size or
    modification time), so a message costs a stat, not a PEM parse; a replaced file is read again."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str], tuple[tuple[int, int], SigningKey]] = {}

    def load(self, refs: Sequence[KeyRef], from_domain: str) -> list[SigningKey]:
        """The signing keys of `refs` for mail from `from_domain`. Raises KeyUnusable (the first key that
        cannot be used: unreadable file, not a key, wrong algorithm)."""
        keys: list[SigningKey] = []
        for ref in refs:
            signing_domain = from_domain if ref.domain == DEFAULT_SIGNER else ref.domain
            where = f"DKIM key_file {ref.key_file} (domain {ref.domain}, selector {ref.selector})"
            try:
                stat = os.stat(ref.key_file)
            except OSError as exc:
                raise KeyUnusable(f"{where} cannot be read: {exc.strerror or exc}") from None
            stamp = (stat.st_mtime_ns, stat.st_size)
            cached = self._cache.get((ref.key_file, ref.algorithm))
            if cached is not None and cached[0] == stamp:
                key = cached[1]
            else:
                try:
                    with open(ref.key_file, "rb") as handle:
                        data = handle.read(MAX_KEY_FILE + 1)
                except OSError as exc:
                    raise KeyUnusable(f"{where} cannot be read: {exc.strerror or exc}") from None
                if len(data) > MAX_KEY_FILE:
                    raise KeyUnusable(f"{where} is larger than {MAX_KEY_FILE} bytes: not a private key")
                key = load_key(ref, data, ref.domain)
                if len(self._cache) >= 256:
                    self._cache.clear()
                self._cache[(ref.key_file, ref.algorithm)] = (stamp, key)
            keys.append(dataclasses.replace(key, domain=signing_domain, selector=ref.selector))
        return keys
