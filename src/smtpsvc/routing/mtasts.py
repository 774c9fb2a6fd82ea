"""MTA-STS (RFC 8461): what a domain publishes, fetched, cached and matched against its MX hosts.

Pure parts first (no I/O): `parse_sts_record` reads the ``_mta-sts`` TXT record (``v=STSv1; id=...``),
`parse_policy` the policy file, `mx_allowed` matches an MX host name against the policy's ``mx:`` patterns
(``*.`` stands for exactly one leftmost label, §4.1), `parse_tlsrpt_record` the ``_smtp._tls`` TXT record of
TLS reporting (RFC 8460 §3).

`MtaSts` does the I/O: the TXT lookup through the service's resolver (`routing/mx.py`), the HTTPS fetch of
``https://mta-sts.<domain>/.well-known/mta-sts.txt`` (the name resolved by that same resolver, the
certificate checked for ``mta-sts.<domain>`` against the system CAs or ``delivery.mta_sts_ca_file``, no
redirect followed, at most 64 KiB within `FETCH_TIMEOUT`, §3.3), and a persistent cache (a JSON file in the
mailroot's queue folder) honouring ``max_age`` and the record's ``id``: the policy is fetched again when the
id changes, and an unexpired cached policy stays in force when DNS or the fetch fails (§5.1), so an attacker
who blocks the lookup cannot turn enforcement off. `refresh` fetches policies again before they expire.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import ssl
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from smtpsvc.routing.mx import DnsError, MxResolver
from smtpsvc.safeio import replace_file

MODES = ("enforce", "testing", "none")
MAX_AGE_LIMIT = 31557600  # §3.2: max_age at most one year
POLICY_SIZE_LIMIT = 64 * 1024  # §3.3: senders may limit the policy's size; 64 KiB is what KumoMTA allows
FETCH_TIMEOUT = 30.0  # §3.3: a fetch must be bounded in time ("a reasonable timeout")
FAILED_FETCH_HOLD = 300.0  # a failed fetch is not tried again for the same id for this long (seconds)
ERROR_REPORT_INTERVAL = 3600.0  # an administrator hears of a domain's unusable policy at most this often
REFRESH_AHEAD = 0.5  # refresh a cached policy when less than this share of its max_age is left
WELL_KNOWN = "/.well-known/mta-sts.txt"

_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")
_KEY = re.compile(r"^[A-Za-z0-9_.-]+$")


class PolicyError(ValueError):
    """A policy (or a TXT record) that RFC 8461 says to ignore; the text says why."""


@dataclass(frozen=True, slots=True)
class Policy:
    """One domain's MTA-STS policy as fetched: `id` is the TXT record's id at fetch time."""

    domain: str
    id: str
    mode: str  # "enforce" | "testing" | "none"
    mx: tuple[str, ...]
    max_age: int
    fetched_at: float
    text: str = field(default="", compare=False)  # the policy file as served (for TLS-RPT's policy-string)

    @property
    def expires_at(self) -> float:
        return self.fetched_at + self.max_age

    def fresh(self, now: float) -> bool:
        return now < self.expires_at

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        data["mx"] = list(self.mx)
        return data

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Policy:
        mx = data["mx"]
        assert isinstance(mx, list)
        return cls(
            domain=str(data["domain"]),
            id=str(data["id"]),
            mode=str(data["mode"]),
            mx=tuple(str(m) for m in mx),
            max_age=int(str(data["max_age"])),
            fetched_at=float(str(data["fetched_at"])),
            text=str(data.get("text", "")),
        )


def _fields(record: str) -> dict[str, str]:
    """``k=v; k=v`` of a TXT record (RFC 8461 §3.1, RFC 8460 §3), keys lower-cased."""
    out: dict[str, str] = {}
    for part in record.split(";"):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise PolicyError(f"{part!r} is not key=value")
        out.setdefault(key.strip().lower(), value.strip())
    return out


def parse_sts_record(texts: Sequence[str]) -> str | None:
    """The policy id of a domain's ``_mta-sts`` TXT records; None when the domain publishes no MTA-STS.

    §3.1: only records starting with ``v=STSv1``; more than one such record is as good as none."""
    records = [t for t in texts if t.startswith("v=STSv1")]
    if len(records) != 1:
        return None
    try:
        fields = _fields(records[0])
    except PolicyError:
        return None
    policy_id = fields.get("id", "")
    return policy_id if _ID.match(policy_id) else None


def parse_tlsrpt_record(texts: Sequence[str]) -> list[str]:
    """The ``rua`` URIs of a domain's ``_smtp._tls`` TXT records (RFC 8460 §3); [] when none is valid."""
    records = [t for t in texts if t.startswith("v=TLSRPTv1")]
    if len(records) != 1:
        return []
    try:
        fields = _fields(records[0])
    except PolicyError:
        return []
    return [uri.strip() for uri in fields.get("rua", "").split(",") if uri.strip()]


def parse_policy(domain: str, policy_id: str, text: str, now: float) -> Policy:
    """The policy file (§3.2): ``key: value`` lines, CRLF or LF; raises `PolicyError`."""
    values: dict[str, str] = {}
    mx: list[str] = []
    for raw in text.replace("\r\n", "\n").split("\n"):
        line = raw.strip()
        if not line:
            continue
        key, sep, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if not sep or not _KEY.match(key):
            raise PolicyError(f"the line {line[:80]!r} is not 'key: value'")
        if key == "mx":
            mx.append(value.lower().rstrip("."))
        else:
            values.setdefault(key, value)  # §3.2: the first occurrence counts
    if values.get("version") != "STSv1":
        raise PolicyError("the policy has no 'version: STSv1' line")
    mode = values.get("mode", "")
    if mode not in MODES:
        raise PolicyError(f"the policy's mode {mode!r} is not enforce, testing or none")
    age = values.get("max_age", "")
    if not age.isdigit() or len(age) > 10:
        raise PolicyError(f"the policy's max_age {age!r} is not a number of seconds")
    if mode != "none" and not mx:
        raise PolicyError(f"a policy in mode {mode} must list its MX hosts (mx: lines)")
    return Policy(domain, policy_id, mode, tuple(mx), min(int(age), MAX_AGE_LIMIT), now, text)


def mx_allowed(patterns: Sequence[str], host: str) -> bool:
    """Whether the MX host `host` matches one of the policy's ``mx`` patterns (§4.1): exact, or ``*.`` for
    exactly one leftmost label (``*.example.test`` matches ``mx.example.test``, not ``a.b.example.test``)."""
    name = host.lower().rstrip(".")
    for pattern in patterns:
        if pattern.startswith("*."):
            label, dot, rest = name.partition(".")
            if dot and label and rest == pattern[2:]:
                return True
        elif name == pattern:
            return True
    return False


@dataclass(frozen=True, slots=True)
class Lookup:
    """What the domain's MTA-STS says now: the policy in force (None: none), and why a fresh one could not be
    had (`error`, "" when nothing went wrong; a cached policy may still be in force)."""

    policy: Policy | None
    published_id: str | None = None  # the TXT record's id; None when none was found
    error: str = ""
    report: bool = False  # the error is new for this domain (or not reported for an hour): tell the operator


class MtaSts:
    """Policies by domain: looked up, fetched, cached in `cache_path`; see the module docstring.

    `port` is the HTTPS port of the policy host: 443, changed only by tests (``delivery.mta_sts_port``).
    """

    def __init__(self, resolver: MxResolver, cache_path: Path, *, ca_file: str = "", port: int = 443) -> None:
        self.resolver = resolver
        self.cache_path = cache_path
        self.ca_file = ca_file
        self.port = port
        self._cache: dict[str, Policy] = self._load()
        self._locks: dict[str, asyncio.Lock] = {}
        # domain -> (policy id, until, error) of a failed fetch: the messages of the next minutes do not each
        # wait for the same failing server (they go on as without a policy, or with the cached one).
        self._failed: dict[str, tuple[str, float, str]] = {}
        self._reported: dict[str, float] = {}  # domain -> when its last error was reported

    def _load(self) -> dict[str, Policy]:
        try:
            data = json.loads(self.cache_path.read_text(encoding="utf-8"))
            return {domain: Policy.from_json(entry) for domain, entry in data.items()}
        except (OSError, ValueError, KeyError, TypeError, AssertionError):
            return {}  # no cache yet, or an unreadable one: policies are fetched again

    def _save(self) -> None:
        payload = json.dumps({d: p.to_json() for d, p in sorted(self._cache.items())}, indent=1)
        # A full disk: the policies stay in memory, and are fetched again after a restart.
        with contextlib.suppress(OSError):
            replace_file(self.cache_path, payload.encode("utf-8"), mode=0o644)

    def cached(self, domain: str) -> Policy | None:
        return self._cache.get(domain.lower().rstrip("."))

    async def lookup(self, domain: str, now: float | None = None, *, refetch: bool = False) -> Lookup:
        """The policy in force for `domain` (§5.1). DNS and fetch failures never raise: they are `error`.
        `refetch`: fetch even when the cached policy has the published id (a refresh before expiry)."""
        domain = domain.lower().rstrip(".")
        now = time.time() if now is None else now
        lock = self._locks.setdefault(domain, asyncio.Lock())
        async with lock:  # one fetch per domain at a time: the messages waiting for it share its result
            cached = self._cache.get(domain)
            if cached is not None and not cached.fresh(now):
                cached = None
            try:
                published = parse_sts_record(await self.resolver.txt_records(f"_mta-sts.{domain}"))
            except DnsError as exc:
                if exc.permanent:  # NXDOMAIN: nothing published (a cached policy still holds, §5.1)
                    return Lookup(cached)
                return Lookup(cached, error=f"the _mta-sts TXT lookup failed: {exc.text} ({exc})")
            if published is None:
                return Lookup(cached)
            if cached is not None and cached.id == published and not refetch:
                return Lookup(cached, published)
            failed = self._failed.get(domain)
            if failed is not None and failed[0] == published and now < failed[1] and not refetch:
                return Lookup(cached, published, failed[2])
            try:
                text = await self.fetch(domain)
                policy = parse_policy(domain, published, text, now)
            except (PolicyError, FetchError) as exc:
                error = f"the MTA-STS policy of {domain} could not be fetched: {exc}"
                self._failed[domain] = (published, now + FAILED_FETCH_HOLD, error)
                report = now - self._reported.get(domain, float("-inf")) >= ERROR_REPORT_INTERVAL
                if report:
                    self._reported[domain] = now
                return Lookup(cached, published, error, report)
            self._failed.pop(domain, None)
            if policy.max_age == 0 or policy.mode == "none":
                self._cache.pop(domain, None)  # §5: mode none (or max_age 0) withdraws the policy
            else:
                self._cache[domain] = policy
            self._save()
            return Lookup(policy if policy.mode != "none" else None, published)

    async def refresh(self, now: float | None = None) -> None:
        """Fetch again the cached policies that are past half their max_age (§5.1.2), so a policy never
        lapses while the domain still publishes one."""
        now = time.time() if now is None else now
        for domain, policy in list(self._cache.items()):
            if policy.expires_at - now < policy.max_age * REFRESH_AHEAD:
                # §3.2: max_age counts from the last fetch, so the policy is fetched (whatever its id);
                # a failure keeps the cached one until it expires.
                await self.lookup(domain, now, refetch=True)

    def _context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        if self.ca_file:
            context.load_verify_locations(cafile=self.ca_file)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context

    async def fetch(self, domain: str) -> str:
        """The policy file of `domain` over HTTPS; raises `FetchError`."""
        host = f"mta-sts.{domain}"
        try:
            hops = await self.resolver.resolve_host(host, self.port)
        except DnsError as exc:
            raise FetchError(f"{host} cannot be found in DNS ({exc})") from exc
        try:
            context = self._context()
        except (OSError, ssl.SSLError) as exc:
            raise FetchError(f"delivery.mta_sts_ca_file {self.ca_file!r} cannot be used: {exc}") from exc
        address = hops[0].address
        literal = f"[{address}]" if ":" in address else address
        url = f"https://{literal}:{self.port}{WELL_KNOWN}"
        try:
            async with asyncio.timeout(FETCH_TIMEOUT):
                async with httpx.AsyncClient(
                    verify=context, follow_redirects=False, timeout=FETCH_TIMEOUT, trust_env=False
                ) as client:
                    request = client.build_request(
                        "GET", url, headers={"Host": host}, extensions={"sni_hostname": host}
                    )
                    response = await client.send(request, stream=True)
                    try:
                        body = await _read_limited(response)
                    finally:
                        await response.aclose()
        except TimeoutError as exc:
            raise FetchError(f"https://{host}{WELL_KNOWN} did not answer within {FETCH_TIMEOUT:g}s") from exc
        except httpx.HTTPError as exc:
            raise FetchError(f"https://{host}{WELL_KNOWN}: {_http_reason(exc)}") from exc
        if response.status_code != 200:
            # §3.3: no redirect is followed; any answer but 200 means no policy.
            raise FetchError(f"https://{host}{WELL_KNOWN} answered HTTP {response.status_code}, not 200")
        media = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media != "text/plain":
            raise FetchError(f"https://{host}{WELL_KNOWN} is {media or 'untyped'}, not text/plain")
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FetchError(f"https://{host}{WELL_KNOWN} is not UTF-8 text") from exc


class FetchError(Exception):
    """The policy could not be fetched; the text says why, in words for an administrator."""


async def _read_limited(response: httpx.Response) -> bytes:
    body = bytearray()
    async for chunk in response.aiter_raw():
        body += chunk
        if len(body) > POLICY_SIZE_LIMIT:
            raise FetchError(f"the policy is larger than {POLICY_SIZE_LIMIT // 1024} KiB")
    return bytes(body)


def _http_reason(exc: httpx.HTTPError) -> str:
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"the certificate is not valid ({cause.verify_message})"
        cause = cause.__cause__ or cause.__context__
    return f"{type(exc).__name__}: {exc}"
