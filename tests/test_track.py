"""Message tracking (`smtpsvc track`, GET /api/track, the viewer's /track page): the pure join of the event
log and the protocol log (tables), and the real service, as a subprocess with the protocol log switched on,
delivering to a real SMTP peer on loopback (aiosmtpd, tests/sink.py) and answering "what happened to this
mail?" after it has left the queue; the protocol log rotating at its size limit; AUTH secrets never in it."""

from __future__ import annotations

import asyncio
import json
import smtplib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from smtpsvc import protolog
from smtpsvc.admin import tracking
from smtpsvc.admin.access import ADMIN_ADDRESS_FILE
from smtpsvc.admin.tracking import TrackQuery, parse_since
from smtpsvc.protolog import OUTBOUND_COMMAND, OUTBOUND_RESPONSE, LogLine
from tests.conftest import StartService, base_sections, smtp_port, wait_until, write_config
from tests.process import ServiceProcess
from tests.sink import Sink
from tests.test_delivery_routes import Tls, users_file
from tests.test_workers import wait_for

NOW = 1_780_000_000.0  # 2026-05-28 20:26:40 UTC
MX = "mx.remote.test[192.0.2.7]:25"


# -- the join, with tables ------------------------------------------------------------------------------


def event(event_id: int, queue_id: str, text: str, track: str = "", second: int = 0) -> dict[str, Any]:
    record: dict[str, Any] = {
        "time": f"2026-05-28T20:26:{40 + second:02d}.000+00:00",
        "id": event_id,
        "text": text,
        "queue_id": queue_id,
    }
    if track:
        record["track"] = track
    return record


def queued(queue_id: str, sender: str, second: int = 0) -> dict[str, Any]:
    track = f"from=<{sender}>, size=120, nrcpt=1, source=smtp"
    return event(3001, queue_id, "Message queued from smtp client 192.0.2.9", track, second)


def delivered(queue_id: str, rcpt: str) -> dict[str, Any]:
    track = f"to=<{rcpt}>, relay={MX}, delay=0.2, dsn=2.0.0, status=sent (250 2.0.0 Ok)"
    return event(3002, queue_id, f"Message delivered to {rcpt}", track, 1)


def bounced(queue_id: str, rcpt: str) -> dict[str, Any]:
    track = f"to=<{rcpt}>, relay={MX}, delay=0.2, dsn=5.1.1, status=bounced (550 5.1.1 no)"
    return event(3004, queue_id, f"Delivery to {rcpt} failed permanently: 550 5.1.1 no", track, 1)


def w3c(kind: str, method: str, query: str, status: int, queue_id: str, ip: str = "192.0.2.9") -> LogLine:
    """One protocol log line as written and read back."""
    text = protolog.line(
        NOW,
        client_ip=ip,
        username=kind,
        computer="relay.test",
        server_ip="-",
        server_port=25,
        method=method,
        query=query,
        status=status,
        sc_bytes=0,
        cs_bytes=0,
        taken_ms=0,
        queue_id=queue_id,
    )
    [parsed] = protolog.parse_lines([text])
    return parsed


def inbound(method: str, query: str, status: int, queue_id: str) -> LogLine:
    return w3c("client.example", method, query, status, queue_id)


def out_cmd(method: str, query: str, queue_id: str) -> LogLine:
    return w3c(OUTBOUND_COMMAND, method, query, 0, queue_id, "192.0.2.7")


def out_reply(text: str, status: int, queue_id: str) -> LogLine:
    return w3c(OUTBOUND_RESPONSE, "", text, status, queue_id, "192.0.2.7")


def run_track(
    records: list[dict[str, Any]],
    lines: tuple[LogLine, ...] | list[LogLine] = (),
    in_queue: tuple[str, ...] = (),
) -> dict[str, tracking.TrackedMessage]:
    return {m.id: m for m in tracking.track(records, lines, TrackQuery(), queued=in_queue)}


@pytest.mark.parametrize(
    ("records", "in_queue", "state"),
    [
        ([queued("A", "s@x.test"), delivered("A", "r@remote.test")], (), tracking.DELIVERED),
        (
            [
                queued("A", "s@x.test"),
                bounced("A", "r@remote.test"),
                event(3004, "A", "Non-delivery report B sent to s@x.test for r@remote.test"),
            ],
            (),
            tracking.BOUNCED,
        ),
        ([queued("A", ""), bounced("A", "r@remote.test")], (), tracking.FAILED),  # no report to <>
        ([queued("A", "s@x.test")], ("A",), tracking.QUEUED),
        ([queued("A", "s@x.test")], (), tracking.UNKNOWN),  # not queued, no outcome: the logs were cut
        (
            [queued("A", "s@x.test"), event(9006, "A", "Queue administration: A deleted without an NDR")],
            (),
            tracking.DELETED,
        ),
    ],
)
def test_the_state_of_a_message_is_what_its_events_say(
    records: list[dict[str, Any]], in_queue: tuple[str, ...], state: str
) -> None:
    assert run_track(records, in_queue=in_queue)["A"].state == state


def test_a_message_with_one_recipient_delivered_and_one_failed_is_partly_delivered() -> None:
    lines = [
        inbound("MAIL", "FROM:<s@x.test>", 250, "A"),
        inbound("RCPT", "TO:<ok@remote.test>", 250, "A"),
        inbound("RCPT", "TO:<no@remote.test>", 250, "A"),
        inbound("DATA", "", 250, "A"),
    ]
    records = [queued("A", "s@x.test"), delivered("A", "ok@remote.test"), bounced("A", "no@remote.test")]
    found = run_track(records, lines)["A"]
    assert found.state == tracking.PARTLY
    assert found.recipients["ok@remote.test"].startswith("delivered (250 2.0.0 Ok) by mx.remote.test")
    assert found.recipients["no@remote.test"].startswith("bounced (550 5.1.1 no)")


def test_a_message_the_client_sent_and_we_refused_is_refused() -> None:
    lines = [
        inbound("MAIL", "FROM:<s@x.test>", 250, "A"),
        inbound("RCPT", "TO:<r@remote.test>", 250, "A"),
        inbound("DATA", "", 554, "A"),
    ]
    found = run_track([], lines)["A"]
    assert found.state == tracking.REFUSED
    assert found.sender == "s@x.test" and list(found.recipients) == ["r@remote.test"]
    assert found.client == "SMTP client 192.0.2.9 (HELO client.example)"


def test_recipients_of_a_message_still_queued_come_from_the_clients_rcpt_lines() -> None:
    lines = [inbound("RCPT", "TO:<wait@remote.test>", 250, "A"), inbound("RCPT", "TO:<no@x.test>", 550, "A")]
    found = run_track([queued("A", "s@x.test")], lines, in_queue=("A",))["A"]
    assert found.recipients == {"wait@remote.test": ""}  # a refused RCPT is no recipient
    assert found.state == tracking.QUEUED


def test_each_delivery_attempt_is_its_own_conversation() -> None:
    lines = [
        out_reply("220 mx.remote.test ESMTP", 220, "A"),
        out_cmd("EHLO", "relay.test", "A"),
        out_reply("250 STARTTLS", 250, "A"),
        out_cmd("STARTTLS", "", "A"),
        out_reply("220 go ahead", 220, "A"),  # TLS's 220 is no new connection
        out_cmd("MAIL", "FROM:<s@x.test>", "A"),
        out_reply("451 4.3.0 later", 451, "A"),
        out_reply("220 mx.remote.test ESMTP", 220, "A"),  # the retry: a new connection
        out_cmd("MAIL", "FROM:<s@x.test>", "A"),
        out_reply("250 OK", 250, "A"),
    ]
    found = run_track([queued("A", "s@x.test")], lines)["A"]
    assert [len(a.lines) for a in found.attempts] == [7, 3]
    assert found.attempts[0].lines[:2] == ["< 220 mx.remote.test ESMTP", "> EHLO relay.test"]
    assert found.attempts[1].host == "192.0.2.7:25"


@pytest.mark.parametrize(
    ("query", "found"),
    [
        (TrackQuery(), ["B", "A"]),  # the newest first
        (TrackQuery(sender="alice@x.test"), ["A"]),
        (TrackQuery(sender="ALICE@X.TEST"), ["A"]),
        (TrackQuery(sender="x.test"), ["B", "A"]),  # a domain finds all its mail
        (TrackQuery(recipient="bob@remote.test"), ["A"]),
        (TrackQuery(recipient="carol"), ["B"]),
        (TrackQuery(queue_id="b"), ["B"]),
        (TrackQuery(sender="alice@x.test", recipient="carol@remote.test"), []),
        (TrackQuery(since=NOW + 5), ["B"]),
        (TrackQuery(since=NOW + 60), []),
    ],
)
def test_a_search_finds_the_messages_that_match_every_criterion(query: TrackQuery, found: list[str]) -> None:
    records = [
        queued("A", "alice@x.test"),
        delivered("A", "bob@remote.test"),
        queued("B", "dave@x.test", second=10),
        delivered("B", "carol@remote.test"),
    ]
    assert [m.id for m in tracking.track(records, [], query, queued=())] == found


@pytest.mark.parametrize(
    ("text", "seconds_ago"),
    [("30m", 1800), ("2h", 7200), ("1d", 86400), ("1w", 604800), ("90s", 90), ("1.5h", 5400)],
)
def test_since_takes_a_time_ago(text: str, seconds_ago: float) -> None:
    assert parse_since(text, NOW) == NOW - seconds_ago


@pytest.mark.parametrize(
    ("text", "epoch"),
    [
        ("2026-05-28T20:26:40", NOW),  # no zone: UTC
        ("2026-05-28T22:26:40+02:00", NOW),
        ("2026-05-28", NOW - (20 * 3600 + 26 * 60 + 40)),
    ],
)
def test_since_takes_an_iso_time(text: str, epoch: float) -> None:
    assert parse_since(text, NOW) == epoch


def test_since_refuses_what_it_cannot_read_and_says_what_it_takes() -> None:
    with pytest.raises(ValueError, match=r"30m, 2h, 1d, 1w.*ISO"):
        parse_since("yesterday", NOW)


# -- the real service --------------------------------------------------------------------------------------


@pytest.fixture
def processes() -> Iterator[list[ServiceProcess]]:
    started: list[ServiceProcess] = []
    yield started
    for proc in started:
        proc.kill()


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "smtpsvc", *args, "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def track_json(config: Path, *args: str) -> dict[str, Any]:
    done = cli(config, "track", "--json", *args)
    assert done.returncode == 0, done.stderr
    document: dict[str, Any] = json.loads(done.stdout)
    return document


def send_one(port: int, sender: str, recipient: str) -> str:
    """One message by smtplib (an independent client); returns its queue id from the 250 reply."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        client.mail(sender)
        client.rcpt(recipient)
        code, reply = client.data(b"Subject: tracked\r\n\r\nWhere did it go?\r\n")
        assert code == 250
    return reply.decode().split("<", 1)[1].split(">", 1)[0]


def test_a_delivered_message_is_found_by_sender_recipient_and_id_with_its_conversation(
    tmp_path: Path, sink: Sink, processes: list[ServiceProcess]
) -> None:
    root = tmp_path / "mailroot"
    sections = base_sections(
        root,
        delivery={"smart_host": f"[127.0.0.1]:{sink.port}"},
        admin={"listen": "127.0.0.1:0"},
        protocol_log={"enabled": True},
    )
    config = write_config(tmp_path / "smtpsvc.toml", sections)
    service = ServiceProcess(config, root).start()
    processes.append(service)
    queue_id = send_one(service.port, "tracked.sender@local.test", "far.away@remote.test")
    wait_for(lambda: sink.messages, "the delivery to the peer")

    def delivered_by_sender() -> dict[str, Any] | None:
        [found] = track_json(config, "--sender", "tracked.sender@local.test")["messages"] or [None]
        return found if found and found["state"] == "delivered" and found["attempts"] else None

    # While the service runs: through its admin API (the CLI's way to a running service)
    by_sender = wait_for(delivered_by_sender, "the message tracked as delivered")
    assert by_sender["id"] == queue_id
    assert cli(config, "queue", "list").stdout.strip() == "the queue is empty"  # it has left the queue
    by_recipient = track_json(config, "--recipient", "far.away@remote.test")["messages"]
    by_id = track_json(config, "--id", queue_id)["messages"]
    assert [m["id"] for m in by_recipient] == [m["id"] for m in by_id] == [queue_id]
    assert by_id[0]["recipients"][0]["address"] == "far.away@remote.test"
    assert by_id[0]["recipients"][0]["result"].startswith("delivered (250")
    assert by_id[0]["client"] == "SMTP client 127.0.0.1 (HELO client.test)"
    assert any(line.endswith("MAIL FROM:<tracked.sender@local.test> -> 250") for line in by_id[0]["inbound"])
    conversation = by_id[0]["attempts"][0]["conversation"]
    assert by_id[0]["attempts"][0]["host"] == f"127.0.0.1:{sink.port}"
    assert conversation[0].startswith("< 220 ")
    assert "> EHLO relay.test" in conversation
    assert "> MAIL FROM:<tracked.sender@local.test>" in conversation
    assert "> RCPT TO:<far.away@remote.test>" in conversation
    assert "> <message body> ." in conversation
    assert any(line.startswith("< 250 ") and "queued" in line.lower() for line in conversation[-4:])

    # The API and the viewer's search answer with the same message
    address = (root / ADMIN_ADDRESS_FILE).read_text().strip()
    api = httpx.get(f"http://{address}/api/track", params={"sender": "tracked.sender@local.test"}, timeout=30)
    assert api.status_code == 200
    assert api.json()["messages"] == by_id
    page = httpx.get(f"http://{address}/track", params={"recipient": "far.away@remote.test"}, timeout=30)
    assert page.status_code == 200
    assert f'data-id="{queue_id}"' in page.text and "delivered" in page.text
    assert "&gt; RCPT TO:&lt;far.away@remote.test&gt;" in page.text
    bad = httpx.get(f"http://{address}/api/track", params={"since": "yesterday"}, timeout=30)
    assert bad.status_code == 400 and "1d" in bad.json()["error"]

    # And from the files once the service has stopped
    assert service.terminate() == 0
    offline = cli(config, "track", "--id", queue_id[:12])
    assert offline.returncode == 0, offline.stderr
    assert f"Message {queue_id}: delivered" in offline.stdout
    assert "> RCPT TO:<far.away@remote.test>" in offline.stdout
    assert "3002 Message delivered to far.away@remote.test" in offline.stdout
    assert "Traceback" not in offline.stderr


def test_the_protocol_log_of_the_running_service_rotates_at_its_size_limit(
    tmp_path: Path, sink: Sink, processes: list[ServiceProcess]
) -> None:
    root = tmp_path / "mailroot"
    sections = base_sections(
        root,
        delivery={"smart_host": f"[127.0.0.1]:{sink.port}"},
        protocol_log={"enabled": True, "max_size": "4KB", "max_files": 2},
    )
    config = write_config(tmp_path / "smtpsvc.toml", sections)
    service = ServiceProcess(config, root).start()
    processes.append(service)
    folder = root / "log" / "protocol"
    ids = [send_one(service.port, f"s{n}@local.test", f"r{n}@remote.test") for n in range(12)]
    wait_for(lambda: len(sink.messages) >= 12, "12 deliveries")
    wait_for(lambda: len(protolog.rotated_files(folder)) == 2, "the protocol log rotated twice")
    assert service.terminate() == 0
    files = protolog.log_files(folder)
    assert len(files) == 3  # max_files rotated ones and the one being written
    for path in files:
        text = path.read_text()
        assert text.startswith("#Software: smtpsvc\n#Version: 1.0\n#Date: ")
        assert "#Fields: date time c-ip cs-username" in text
    # the newest message is still found with its conversation
    [newest] = track_json(config, "--id", ids[-1])["messages"]
    assert newest["state"] == "delivered" and newest["attempts"]


async def test_auth_secrets_never_reach_the_protocol_log_in_or_out(
    start_service: StartService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tls = Tls(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(tls.ca_pem))
    password = "pa55word"
    secret_file = tmp_path / "smarthost.password"
    secret_file.write_text(password + "\n")
    peer = await start_service(
        domains={"local": ["remote.test"]},
        tls=tls.section,
        auth={"users_file": users_file(tmp_path, "relayuser", password)},
        protocol_log={"enabled": True},
    )
    relay = await start_service(
        delivery={
            "smart_host": f"[127.0.0.1]:{smtp_port(peer)}",
            "smart_host_auth": {"user": "relayuser", "password_file": str(secret_file), "mechanism": "login"},
        },
        protocol_log={"enabled": True},
    )

    def send_with_auth() -> None:  # and the client's own AUTH PLAIN to the relay's peer, inbound
        with smtplib.SMTP("127.0.0.1", smtp_port(peer), timeout=30) as client:
            client.starttls()
            client.login("relayuser", password)
            client.sendmail("a@local.test", ["x@remote.test"], b"Subject: direct\r\n\r\nhi\r\n")

    def send_through_relay() -> None:  # which logs in to the peer as its smart host, outbound
        with smtplib.SMTP("127.0.0.1", smtp_port(relay), timeout=30) as client:
            client.sendmail("alice@local.test", ["x@remote.test"], b"Subject: relayed\r\n\r\nhi\r\n")

    await asyncio.to_thread(send_with_auth)  # both services run in this event loop: the clients may not
    await asyncio.to_thread(send_through_relay)
    await wait_until(lambda: len(list((peer.folders["drop"]).glob("*.eml"))) >= 2, what="both deliveries")
    assert peer.protocol_log is not None and relay.protocol_log is not None
    peer.protocol_log.flush()
    relay.protocol_log.flush()

    def logs() -> tuple[str, str] | None:
        """Both logs once the SMTP workers, which write their lines within a second, have written them."""
        inbound = (peer.root / "log" / "protocol" / "smtp.log").read_text()
        outbound = (relay.root / "log" / "protocol" / "smtp.log").read_text()
        done = " AUTH PLAIN+*** 235 " in inbound and " AUTH *** 235 " in inbound and " AUTH *** " in outbound
        return (inbound, outbound) if done else None

    inbound_log, outbound_log = await wait_until(logs, what="the AUTH lines in both protocol logs")
    for text in (inbound_log, outbound_log):
        assert password not in text
        for encoded in ("cGE1NXdvcmQ", "cmVsYXl1c2Vy"):  # the password and the user name in base64
            assert encoded not in text
    assert " AUTH PLAIN+*** 235 " in inbound_log  # smtplib's PLAIN carries the secret in the command line
    assert " AUTH LOGIN 334 " in inbound_log and " AUTH *** 235 " in inbound_log  # the relay's, inbound
    assert " OutboundConnectionCommand relay.test - " in outbound_log
    assert " AUTH LOGIN " in outbound_log and " AUTH *** " in outbound_log


def test_with_smtp_workers_the_clients_and_our_conversations_land_in_the_one_log(
    tmp_path: Path, sink: Sink, processes: list[ServiceProcess]
) -> None:
    # The workers receive (their lines: inbound), the main process delivers (outbound) and rotates.
    root = tmp_path / "mailroot"
    sections = base_sections(
        root,
        server={"workers": 2},
        delivery={"smart_host": f"[127.0.0.1]:{sink.port}"},
        admin={"listen": "127.0.0.1:0"},
        protocol_log={"enabled": True},
    )
    config = write_config(tmp_path / "smtpsvc.toml", sections)
    service = ServiceProcess(config, root).start()
    processes.append(service)
    ids = [send_one(service.port, "w@local.test", f"r{n}@remote.test") for n in range(4)]
    wait_for(lambda: len(sink.messages) >= 4, "4 deliveries")

    def all_tracked() -> list[dict[str, Any]] | None:
        found = track_json(config, "--sender", "w@local.test")["messages"]
        done = [m for m in found if m["state"] == "delivered" and m["inbound"] and m["attempts"]]
        return done if len(done) == 4 else None

    tracked = wait_for(all_tracked, "the 4 messages tracked with both conversations")
    assert sorted(m["id"] for m in tracked) == sorted(ids)
    assert service.terminate() == 0
    [active] = protolog.log_files(root / "log" / "protocol")
    assert active.read_text().count("#Software:") == 1  # one header: no worker wrote its own
