#!/usr/bin/env python3
"""CPU cost of the sans-I/O protocol core per SMTP session, without sockets, asyncio or the queue.

Drives `ServerConnection` through the exact session Postfix's ``smtp-source -l 1024`` makes (one connection
per message, no pipelining): greeting, EHLO, MAIL FROM, RCPT TO, DATA, a 1 KiB message ending in
CRLF.CRLF, QUIT. The client's input is fed as the client sends it: one command per `receive_data`, the
message (headers, body and the final ".") as one chunk. Every event is answered the way
`smtpsvc.server.session` answers it, with the same replies (GREETING, EHLO_REPLY with `ehlo_keywords()`,
SENDER_OK, RCPT_OK, START_DATA, QUEUED, QUIT_REPLY) and the options `server_options()` computes for the
built-in default configuration; `send()` renders each reply to bytes as the session does.

Prints microseconds per session (best of --repeats timed runs of --sessions sessions each) and Python
function calls per session (one cProfile run, builtins included), then the functions called most often
(--top). It also checks each session's replies and prints a digest of them, so that a change to the core
that alters any byte on the wire shows up here as a different digest. A benchmark, not a test: it asserts
nothing about speed. Stdlib only; runs in a few seconds.

    .venv/bin/python bench/core.py [--sessions 2000] [--repeats 5] [--top 15]

With --body it measures the DATA content codecs instead, on a realistic BODY_LENGTH message (headers, lines of
76 characters, a few lines starting with "."): the server's `DotUnstuffer` (the limits of `server_options()`)
fed the stuffed message in reads of SERVER_READ octets, followed by a pipelined QUIT, and the delivery
client's `DotStuffer` fed the stored (CRLF-normalised) message in one chunk of up to CLIENT_CHUNK octets.
Prints microseconds per message for each direction (best of --repeats runs of --messages messages) and a
digest of both outputs, and checks that they round-trip.

    .venv/bin/python bench/core.py --body [--messages 500] [--repeats 5]
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import os
import pstats
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, cast

from smtpsvc.config import load_config
from smtpsvc.protocol import (
    NEED_DATA,
    ConnectionClosed,
    Data,
    DataChunk,
    DataEnd,
    DotStuffer,
    DotUnstuffer,
    Ehlo,
    Event,
    Mail,
    Quit,
    Rcpt,
    Reply,
    ServerConnection,
    ServerOptions,
    replies,
)
from smtpsvc.server.session import SessionContext, server_options

HOSTNAME = "mx.example.com"
CLIENT_IP = "192.0.2.10"
SENDER = "foo@client.example.net"
RECIPIENT = "foo@example.com"
QUEUE_ID = "0123456789ABCDEF"
MESSAGE_LENGTH = 1024


def options() -> ServerOptions:
    """What `server_options()` gives a remote client under the built-in default configuration (no users,
    no certificate)."""
    config = load_config(None, env={})
    context = SimpleNamespace(
        config=config, users=SimpleNamespace(has_users=False), certificate=SimpleNamespace(context=None)
    )
    return server_options(cast(SessionContext, context), CLIENT_IP)


def message() -> bytes:
    """smtp-source's message: four header lines, an empty line, MESSAGE_LENGTH octets of "X" in lines of
    80, then the end of data."""
    headers = (
        f"From: <{SENDER}>\r\n"
        f"To: <{RECIPIENT}>\r\n"
        "Date: Sun, 22 Nov 2026 12:00:00 +0000 (UTC)\r\n"
        "Message-Id: <0001.0002.0003@client.example.net>\r\n"
        "\r\n"
    )
    lines = [b"X" * min(80, MESSAGE_LENGTH - start) for start in range(0, MESSAGE_LENGTH, 80)]
    return headers.encode("ascii") + b"\r\n".join(lines) + b"\r\n.\r\n"


CLIENT_INPUT: tuple[bytes, ...] = (
    b"EHLO client.example.net\r\n",
    f"MAIL FROM:<{SENDER}>\r\n".encode("ascii"),
    f"RCPT TO:<{RECIPIENT}>\r\n".encode("ascii"),
    b"DATA\r\n",
    message(),
    b"QUIT\r\n",
)
EXPECTED_CODES = [b"220", b"250", b"250", b"250", b"354", b"250", b"221"]


# The reply `Session._answer` gives to each event of this session; a dict on the exact type, so that the
# driver adds little to what is measured.
# (The event is typed Any: the dict's key says what it is.)
ANSWERS: dict[type[Event], Callable[[ServerConnection, Any], Reply]] = {
    Ehlo: lambda conn, event: replies.EHLO_REPLY(HOSTNAME, CLIENT_IP, conn.ehlo_keywords()),
    Mail: lambda conn, event: replies.SENDER_OK(event.address),
    Rcpt: lambda conn, event: replies.RCPT_OK(event.address),
    Data: lambda conn, event: replies.START_DATA,
    DataEnd: lambda conn, event: event.error or replies.QUEUED(QUEUE_ID),
    Quit: lambda conn, event: replies.QUIT_REPLY(HOSTNAME),
}


def session(opts: ServerOptions) -> list[bytes]:
    """One smtp-source session; the bytes written to the client, one item per reply."""
    conn = ServerConnection(opts)
    out = [conn.greeting(replies.GREETING(HOSTNAME))]
    content = 0
    for data in CLIENT_INPUT:
        conn.receive_data(data)
        while (event := conn.next_event()) is not NEED_DATA:
            kind = type(event)
            if type(event) is DataChunk:
                content += len(event.data)  # the session streams it into the spool
            elif kind is ConnectionClosed:
                break  # after the 221: the session closes the connection
            elif kind in ANSWERS:
                out.append(conn.send(ANSWERS[kind](conn, event)))
            else:
                raise AssertionError(f"unexpected event {event!r}")
    if content < MESSAGE_LENGTH:
        raise AssertionError(f"only {content} octets of content")
    return out


def run(opts: ServerOptions, sessions: int) -> None:
    for _ in range(sessions):
        session(opts)


def check(opts: ServerOptions) -> str:
    """Run one session, check its reply codes, and return a digest of everything written."""
    out = session(opts)
    codes = [reply[:3] for reply in out]
    if codes != EXPECTED_CODES:
        raise AssertionError(f"unexpected replies: {out!r}")
    return hashlib.sha256(b"".join(out)).hexdigest()[:16]


# --- DATA content (--body) ---------------------------------------------------------------------------------

BODY_LENGTH = 100 * 1024
SERVER_READ = 64 * 1024  # the largest read a server session hands to the protocol core
CLIENT_CHUNK = 256 * 1024  # smtpsvc.delivery.smtp.BODY_CHUNK
PIPELINED = b"QUIT\r\n"


def body_message() -> bytes:
    """A stored message: headers, then BODY_LENGTH octets of text with full stops in lines of 76 characters
    (pseudo-random, deterministic), every 97th line starting with "." (so some dots get stuffed), CRLF line
    ends."""
    headers = (
        f"Return-Path: <{SENDER}>\r\n"
        f"Received: from client.example.net (client.example.net [{CLIENT_IP}])\r\n"
        f"\tby {HOSTNAME} (smtpsvc) with ESMTP id {QUEUE_ID}\r\n"
        "\tfor <foo@example.com>; Sun, 22 Nov 2026 12:00:00 +0000\r\n"
        f"From: <{SENDER}>\r\n"
        f"To: <{RECIPIENT}>\r\n"
        "Subject: quarterly figures\r\n"
        "Date: Sun, 22 Nov 2026 12:00:00 +0000 (UTC)\r\n"
        "Message-Id: <0001.0002.0003@client.example.net>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
    ).encode("ascii")
    words = tuple(b"the of and to in is that for it as was with be by on not he this are".split(b" "))
    lines: list[bytes] = []
    size, seed = len(headers), hashlib.sha256(b"body").digest()
    while size < BODY_LENGTH:
        seed = hashlib.sha256(seed).digest()
        line = b" ".join(words[b % len(words)] + (b"." if b % 11 == 0 else b"") for b in seed)[:76]
        if len(lines) % 97 == 40:
            line = b"." + line[1:]
        lines.append(line)
        size += len(line) + 2
    return headers + b"\r\n".join(lines) + b"\r\n"


def unstuff_message(reads: list[bytes], max_line: int, max_size: int) -> tuple[list[bytes], int]:
    """The server side: the content a DotUnstuffer returns for the reads, and the octets it consumed."""
    unstuffer = DotUnstuffer(max_line, max_size)
    out, used = [], 0
    for data in reads:
        content, consumed = unstuffer.feed(data)
        out.append(content)
        used += consumed
        if unstuffer.done:
            break
    if not unstuffer.done or unstuffer.error is not None:
        raise AssertionError(f"unstuffer: done={unstuffer.done} error={unstuffer.error}")
    return out, used


def stuff_message(content: bytes) -> list[bytes]:
    """The client side: what a DotStuffer sends for the stored message, chunked as delivery does."""
    stuffer = DotStuffer()
    out = [
        stuffer.feed(content[start : start + CLIENT_CHUNK]) for start in range(0, len(content), CLIENT_CHUNK)
    ]
    out.append(stuffer.finish())
    return out


def best_time(repeats: int, messages: int, one: Callable[[], object]) -> float:
    """Best of `repeats` timed runs of `messages` calls; seconds per call."""
    for _ in range(min(messages, 50)):  # warm-up
        one()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(messages):
            one()
        best = min(best, time.perf_counter() - start)
    return best / messages


def body_main(messages: int, repeats: int) -> None:
    opts = options()
    content = body_message()
    wire = b"".join(stuff_message(content))
    stream = wire + PIPELINED
    reads = [stream[start : start + SERVER_READ] for start in range(0, len(stream), SERVER_READ)]
    max_line, max_size = opts.max_text_line, opts.max_message_size

    received, used = unstuff_message(reads, max_line, max_size)
    if b"".join(received) != content or stream[used:] != PIPELINED:
        raise AssertionError("the DotUnstuffer does not give back the stored message")
    sent = stuff_message(content)
    if b"".join(sent) != wire or wire.count(b"\r\n..") != content.count(b"\r\n."):
        raise AssertionError("the DotStuffer output changed between runs")
    digest = hashlib.sha256()
    for piece in [*received, used.to_bytes(8, "big"), *sent]:
        digest.update(len(piece).to_bytes(8, "big") + piece)

    server = best_time(repeats, messages, lambda: unstuff_message(reads, max_line, max_size))
    client = best_time(repeats, messages, lambda: stuff_message(content))
    print(f"body digest:          {digest.hexdigest()[:16]}")
    print(f"message:              {len(content)} octets stored, {len(wire)} on the wire")
    print(
        f"server microseconds/message: {server * 1e6:.1f}  (DotUnstuffer, {len(reads)} reads of <= "
        f"{SERVER_READ}, max_line {max_line}, max_size {max_size}; best of {repeats} x {messages})"
    )
    print(
        f"client microseconds/message: {client * 1e6:.1f}  (DotStuffer, chunks of <= {CLIENT_CHUNK}; "
        f"best of {repeats} x {messages})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--sessions", type=int, default=2000, help="sessions per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs; the best one counts")
    parser.add_argument("--top", type=int, default=15, help="functions to list by call count (0: none)")
    parser.add_argument("--body", action="store_true", help="measure the DATA content codecs instead")
    parser.add_argument("--messages", type=int, default=500, help="--body: messages per timed run")
    args = parser.parse_args()
    if args.body:
        body_main(max(1, min(args.messages, 100_000)), max(1, min(args.repeats, 100)))
        return
    sessions = max(1, min(args.sessions, 1_000_000))
    repeats = max(1, min(args.repeats, 100))

    opts = options()
    digest = check(opts)
    run(opts, min(sessions, 200))  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run(opts, sessions)
        best = min(best, time.perf_counter() - start)

    profiled = min(sessions, 500)
    profile = cProfile.Profile()
    profile.runcall(run, opts, profiled)
    stats = vars(pstats.Stats(profile))  # total_calls and stats: documented, but not in typeshed
    # The run() call itself is the one call per profile that is not part of a session.
    calls = (stats["total_calls"] - 1) / profiled

    print(f"replies digest:       {digest}")
    print(f"microseconds/session: {best / sessions * 1e6:.1f}  (best of {repeats} x {sessions} sessions)")
    print(f"calls/session:        {calls:.1f}  (cProfile, {profiled} sessions, builtins included)")
    if args.top > 0:
        raw: dict[tuple[str, int, str], tuple[int, int, float, float, object]] = stats["stats"]
        counts = sorted(((nc, where) for where, (_, nc, *_) in raw.items()), reverse=True)
        print(f"top {args.top} functions by calls/session:")
        for nc, (file, line, function) in counts[: args.top]:
            place = f"{os.path.basename(file)}:{line}" if line else "builtin"
            print(f"  {nc / profiled:7.1f}  {function}  ({place})")


if __name__ == "__main__":
    main()
