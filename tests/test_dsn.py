"""RFC 3464 report builder: its output is parsed back with the stdlib `email` package, field by field."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage, Message
from typing import Any

import pytest

from smtpsvc import dsn
from smtpsvc.dsn import ReportedRecipient, build_report, header_block_end, should_report, split_headers
from smtpsvc.model import Envelope, Recipient

NOW = 1_700_000_200.0
RECEIVED = 1_700_000_000.0
HEADERS = (
    b"From: Alice <alice@example.test>\r\nTo: bob@remote.test, carol@other.test\r\n"
    b"Subject: quarterly numbers\r\nMessage-ID: <orig-1@example.test>\r\n\r\n"
)
BODY = b"Hello Bob,\r\n\r\nthe numbers are attached.\r\n.leading dot stays\r\n"

BOB = ReportedRecipient(
    address="bob@remote.test",
    action="failed",
    status="5.1.1",
    diagnostic="550 5.1.1 <bob@remote.test>: Recipient address rejected: User unknown",
    remote_mta="mx1.remote.test",
    last_attempt=NOW - 60,
)
CAROL = ReportedRecipient(
    address="carol@other.test",
    action="failed",
    status="4.4.7",
    diagnostic="451 4.4.1 connection timed out",
    remote_mta="",
)


def envelope(**kw: Any) -> Envelope:
    fields: dict[str, Any] = {
        "id": "0000018BD5A1C2F80001ABCDEF",
        "sender": "alice@example.test",
        "recipients": [Recipient("bob@remote.test"), Recipient("carol@other.test")],
        "received_at": RECEIVED,
    }
    fields.update(kw)
    return Envelope(**fields)


def report(
    *,
    original: Envelope | None = None,
    recipients: tuple[ReportedRecipient, ...] = (BOB, CAROL),
    kind: str = "failure",
    headers: bytes = HEADERS,
    body: bytes | None = BODY,
    **kw: Any,
) -> bytes:
    return build_report(
        reporting_mta="relay.example.test",
        original=original or envelope(),
        original_headers=headers,
        original_body=body,
        recipients=recipients,
        kind=kind,
        now=NOW,
        message_id_domain="relay.example.test",
        postmaster="postmaster@relay.example.test",
        **kw,
    )


def parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def parts(data: bytes) -> list[EmailMessage]:
    msg = parse(data)
    assert msg.get_content_type() == "multipart/report"
    return list(msg.iter_parts())  # type: ignore[arg-type]


def status_blocks(data: bytes) -> list[Message]:
    """The delivery-status part as the stdlib sees it: per-message block first, then one per recipient."""
    payload = parts(data)[1].get_payload()
    assert isinstance(payload, list)
    return [block for block in payload if isinstance(block, Message)]


def assert_wire_clean(data: bytes) -> None:
    assert data.endswith(b"\r\n")
    assert b"\n" not in data.replace(b"\r\n", b"") and b"\r" not in data.replace(b"\r\n", b"")
    for line in data.split(b"\r\n"):
        assert len(line) <= 998


# --- structure and headers ------------------------------------------------------------------------


def test_failure_report_is_a_multipart_report_with_three_parts() -> None:
    msg = parse(report())
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert not msg.defects
    assert [p.get_content_type() for p in msg.iter_parts()] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]


def test_report_headers() -> None:
    data = report()
    msg = parse(data)
    assert msg["From"] == "Mail Delivery System <postmaster@relay.example.test>"
    assert b"\r\nTo: <alice@example.test>\r\n" in data
    assert msg["To"] == "alice@example.test"
    assert msg["Subject"] == "Delivery Status Notification (Failure)"
    assert msg["Date"] == "Tue, 14 Nov 2023 22:16:40 +0000"
    assert msg["MIME-Version"] == "1.0"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Message-ID"].startswith("<") and msg["Message-ID"].endswith("@relay.example.test>")


def test_subject_names_the_kind() -> None:
    delayed = ReportedRecipient("bob@remote.test", "delayed", "4.4.1", "")
    delivered = ReportedRecipient("bob@remote.test", "delivered", "2.0.0", "250 2.0.0 OK")
    assert parse(report(kind="delay", recipients=(delayed,)))["Subject"].endswith("(Delay)")
    assert parse(report(kind="success", recipients=(delivered,)))["Subject"].endswith("(Success)")


def test_same_inputs_give_the_same_bytes_and_message_id_depends_on_kind() -> None:
    assert report() == report()
    failure_id = parse(report())["Message-ID"]
    delayed = ReportedRecipient("b@r.test", "delayed", "4.0.0", "")
    delay_id = parse(report(kind="delay", recipients=(delayed,)))["Message-ID"]
    assert failure_id != delay_id


def test_message_id_can_be_given() -> None:
    msg = parse(report(message_id="abc.123@relay.example.test"))
    assert msg["Message-ID"] == "<abc.123@relay.example.test>"


def test_text_part_is_first_and_in_the_iis_wording() -> None:
    text = parts(report())[0]
    assert text.get_content_charset() == "us-ascii"
    assert text.get_payload(decode=True) == (
        b"This is an automatically generated Delivery Status Notification.\r\n"
        b"\r\n"
        b"Delivery to the following recipients failed.\r\n"
        b"\r\n"
        b"       bob@remote.test\r\n"
        b"           Reason: 550 5.1.1 <bob@remote.test>: Recipient address rejected:\r\n"
        b"               User unknown\r\n"
        b"           Remote server: mx1.remote.test\r\n"
        b"\r\n"
        b"       carol@other.test\r\n"
        b"           Reason: 451 4.4.1 connection timed out\r\n"
    )


# --- message/delivery-status ----------------------------------------------------------------------


def test_per_message_fields() -> None:
    per_message = status_blocks(report())[0]
    assert per_message["Reporting-MTA"] == "dns; relay.example.test"
    assert per_message["Arrival-Date"] == "Tue, 14 Nov 2023 22:13:20 +0000"
    assert per_message["Original-Envelope-Id"] is None
    assert per_message["Received-From-MTA"] is None


def test_received_from_mta_names_the_client() -> None:
    original = envelope(helo="client.example.test", client_ip="192.0.2.5")
    per_message = status_blocks(report(original=original))[0]
    assert per_message["Received-From-MTA"] == "dns; client.example.test ([192.0.2.5])"


def test_per_recipient_blocks_of_a_two_recipient_ndr() -> None:
    blocks = status_blocks(report())
    assert len(blocks) == 3
    bob, carol = blocks[1], blocks[2]
    assert bob["Final-Recipient"] == "rfc822; bob@remote.test"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; mx1.remote.test"
    assert bob["Diagnostic-Code"] == (
        "smtp; 550 5.1.1 <bob@remote.test>: Recipient address rejected: User unknown"
    )
    assert bob["Last-Attempt-Date"] == "Tue, 14 Nov 2023 22:15:40 +0000"
    assert bob["Original-Recipient"] is None
    assert carol["Final-Recipient"] == "rfc822; carol@other.test"
    assert carol["Status"] == "4.4.7"
    assert carol["Remote-MTA"] is None
    assert carol["Diagnostic-Code"] == "smtp; 451 4.4.1 connection timed out"
    assert carol["Last-Attempt-Date"] is None
    assert carol["Will-Retry-Until"] is None


def test_status_part_golden() -> None:
    data = report(recipients=(BOB,))
    start = data.index(b"Reporting-MTA:")
    end = data.index(b"\r\n--", start)
    assert data[start:end] == (
        b"Reporting-MTA: dns; relay.example.test\r\n"
        b"Arrival-Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
        b"\r\n"
        b"Final-Recipient: rfc822; bob@remote.test\r\n"
        b"Action: failed\r\n"
        b"Status: 5.1.1\r\n"
        b"Remote-MTA: dns; mx1.remote.test\r\n"
        b"Diagnostic-Code: smtp; 550 5.1.1 <bob@remote.test>: Recipient address\r\n"
        b" rejected: User unknown\r\n"
        b"Last-Attempt-Date: Tue, 14 Nov 2023 22:15:40 +0000\r\n"
    )


def test_envid_and_orcpt_are_echoed() -> None:
    rcpt = ReportedRecipient(
        "bob@remote.test", "failed", "5.1.1", "550 5.1.1 unknown", orcpt="rfc822;Bob.Original@remote.test"
    )
    blocks = status_blocks(report(original=envelope(envid="QQ314159"), recipients=(rcpt,)))
    assert blocks[0]["Original-Envelope-Id"] == "QQ314159"
    assert blocks[1]["Original-Recipient"] == "rfc822; Bob.Original@remote.test"
    assert blocks[1]["Final-Recipient"] == "rfc822; bob@remote.test"


def test_our_own_diagnosis_gets_an_x_diagnostic_type() -> None:
    rcpt = ReportedRecipient("bob@remote.test", "failed", "5.4.4", "no MX or A record for remote.test")
    assert status_blocks(report(recipients=(rcpt,)))[1]["Diagnostic-Code"] == (
        "X-smtpsvc; no MX or A record for remote.test"
    )


def test_no_diagnostic_no_diagnostic_code() -> None:
    rcpt = ReportedRecipient("bob@remote.test", "failed", "5.0.0", "")
    assert status_blocks(report(recipients=(rcpt,)))[1]["Diagnostic-Code"] is None


def test_multi_line_reply_is_joined_on_one_field() -> None:
    rcpt = ReportedRecipient(
        "bob@remote.test",
        "failed",
        "5.7.1",
        "550-5.7.1 Message rejected\r\n550 5.7.1 see https://help.remote.test",
    )
    data = report(recipients=(rcpt,))
    assert status_blocks(data)[1]["Diagnostic-Code"] == (
        "smtp; 550-5.7.1 Message rejected 550 5.7.1 see https://help.remote.test"
    )
    assert_wire_clean(data)


def test_remote_mta_with_address_and_port_is_reduced_to_the_host_name() -> None:
    rcpt = ReportedRecipient(
        "bob@remote.test", "failed", "5.1.1", "550 5.1.1 x", remote_mta="mx1.remote.test[192.0.2.25]:25"
    )
    assert status_blocks(report(recipients=(rcpt,)))[1]["Remote-MTA"] == "dns; mx1.remote.test"


def test_missing_or_malformed_status_falls_back_to_the_action_class() -> None:
    rcpt = ReportedRecipient("bob@remote.test", "failed", "", "550 no")
    odd = ReportedRecipient("carol@other.test", "delayed", "4.x", "")
    blocks = status_blocks(report(recipients=(rcpt, odd)))
    assert [b["Status"] for b in blocks[1:]] == ["5.0.0", "4.0.0"]


# --- the returned original ------------------------------------------------------------------------


def test_ret_full_embeds_the_original_byte_exact() -> None:
    data = report(original=envelope(ret="FULL"))
    assert HEADERS + BODY in data
    returned = parts(data)[2]
    assert returned.get_content_type() == "message/rfc822"
    assert returned["Content-Description"] == "Undelivered Message"
    inner = returned.get_content()
    assert inner["Subject"] == "quarterly numbers"
    assert inner["Message-ID"] == "<orig-1@example.test>"


def test_ret_full_original_without_final_crlf_is_still_exact() -> None:
    data = report(original=envelope(ret="FULL"), body=b"no final newline")
    assert HEADERS + b"no final newline\r\n--=_dsn_" in data


def test_ret_absent_returns_headers_only() -> None:
    data = report(original=envelope(ret=""))
    returned = parts(data)[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert HEADERS in data
    assert BODY not in data
    assert b"the numbers are attached" not in data


def test_ret_hdrs_returns_headers_only() -> None:
    data = report(original=envelope(ret="HDRS"))
    assert parts(data)[2].get_content_type() == "text/rfc822-headers"
    assert b"the numbers are attached" not in data


def test_ret_full_without_the_body_at_hand_returns_headers() -> None:
    returned = parts(report(original=envelope(ret="FULL"), body=None))[2]
    assert returned.get_content_type() == "text/rfc822-headers"


def test_ret_full_applies_to_failures_only() -> None:
    delayed = ReportedRecipient("bob@remote.test", "delayed", "4.4.1", "")
    data = report(original=envelope(ret="FULL"), kind="delay", recipients=(delayed,))
    assert parts(data)[2].get_content_type() == "text/rfc822-headers"
    assert b"the numbers are attached" not in data


def test_lf_only_original_is_returned_with_crlf() -> None:
    headers = HEADERS.replace(b"\r\n", b"\n")
    body = BODY.replace(b"\r\n", b"\n")
    data = report(original=envelope(ret="FULL"), headers=headers, body=body)
    assert HEADERS + BODY in data
    assert_wire_clean(data)


def test_ret_full_with_an_overlong_line_returns_headers_and_says_why() -> None:
    data = report(original=envelope(ret="FULL"), body=b"x" * 1500 + b"\r\n")
    assert parts(data)[2].get_content_type() == "text/rfc822-headers"
    assert b"longer than 998 octets" in data
    assert_wire_clean(data)


def test_a_large_original_is_checked_in_linear_time() -> None:
    body = (b"x" * 900 + b"\r\n") * 5_000  # 4.5 MB of 900-octet lines (a regex scan took seconds)
    data = report(original=envelope(ret="FULL"), body=body)
    assert b"\r\nContent-Type: message/rfc822\r\n" in data
    assert HEADERS + body in data


def test_eight_bit_original_is_declared_8bit() -> None:
    body = "Grüße\r\n".encode()
    data = report(original=envelope(ret="FULL"), body=body)
    assert HEADERS + body in data
    assert parts(data)[2]["Content-Transfer-Encoding"] == "8bit"
    assert dsn.requires_8bitmime(data)
    assert not dsn.requires_8bitmime(report())


# --- the other kinds ------------------------------------------------------------------------------


def test_delay_report() -> None:
    rcpt = ReportedRecipient(
        "bob@remote.test",
        "delayed",
        "4.4.1",
        "451 4.4.1 try later",
        remote_mta="mx1.remote.test",
        last_attempt=NOW - 600,
        will_retry_until=NOW + 86400,
    )
    data = report(kind="delay", recipients=(rcpt,))
    text, _, returned = parts(data)
    assert text.get_payload(decode=True) == (
        b"This is an automatically generated Delivery Status Notification.\r\n"
        b"\r\n"
        b"THIS IS A WARNING MESSAGE ONLY.\r\n"
        b"\r\n"
        b"YOU DO NOT NEED TO RESEND YOUR MESSAGE.\r\n"
        b"\r\n"
        b"Delivery to the following recipients has been delayed.\r\n"
        b"\r\n"
        b"       bob@remote.test\r\n"
        b"           Reason: 451 4.4.1 try later\r\n"
        b"           Remote server: mx1.remote.test\r\n"
        b"           Will retry until: Wed, 15 Nov 2023 22:16:40 +0000\r\n"
    )
    block = status_blocks(data)[1]
    assert block["Action"] == "delayed"
    assert block["Status"] == "4.4.1"
    assert block["Will-Retry-Until"] == "Wed, 15 Nov 2023 22:16:40 +0000"
    assert block["Last-Attempt-Date"] == "Tue, 14 Nov 2023 22:06:40 +0000"
    assert returned["Content-Description"] == "Original Message Headers"


def test_will_retry_until_is_only_for_delayed_recipients() -> None:
    rcpt = ReportedRecipient("bob@remote.test", "failed", "5.1.1", "550 x", will_retry_until=NOW + 10)
    assert status_blocks(report(recipients=(rcpt,)))[1]["Will-Retry-Until"] is None


def test_success_report() -> None:
    rcpt = ReportedRecipient(
        "bob@remote.test", "delivered", "2.0.0", "250 2.0.0 Ok: queued as 4F1", remote_mta="mx1.remote.test"
    )
    relayed = ReportedRecipient("carol@other.test", "relayed", "2.0.0", "250 2.0.0 OK")
    data = report(kind="success", recipients=(rcpt, relayed))
    text = parts(data)[0].get_payload(decode=True)
    assert isinstance(text, bytes)
    assert b"Delivery to the following recipients succeeded.\r\n\r\n       bob@remote.test\r\n" in text
    assert b"has been relayed" in text and b"       carol@other.test\r\n" in text
    assert b"WARNING" not in text
    blocks = status_blocks(data)
    assert [(b["Action"], b["Status"]) for b in blocks[1:]] == [("delivered", "2.0.0"), ("relayed", "2.0.0")]
    assert blocks[1]["Diagnostic-Code"] == "smtp; 250 2.0.0 Ok: queued as 4F1"


# --- wire safety ----------------------------------------------------------------------------------


def test_boundary_collision_is_avoided() -> None:
    first = dsn._boundary(dsn._seed(envelope(), "failure", NOW, (BOB, CAROL)), 0)
    body = b"--" + first.encode() + b"\r\nplanted boundary\r\n--" + first.encode() + b"--\r\n"
    data = report(original=envelope(ret="FULL"), body=body)
    boundary = parse(data).get_boundary()
    assert boundary is not None and boundary != first
    assert data.count(boundary.encode()) == 5  # the header parameter, three delimiters, the close
    assert HEADERS + body in data
    assert [p.get_content_type() for p in parts(data)] == [
        "text/plain",
        "message/delivery-status",
        "message/rfc822",
    ]


def test_lines_are_crlf_and_bounded_even_with_a_huge_diagnostic() -> None:
    spaced = ReportedRecipient("bob@remote.test", "failed", "5.0.0", "550 " + "word " * 3000)
    unbroken = ReportedRecipient(
        "carol@other.test", "failed", "5.0.0", "550 " + "y" * 5000, remote_mta="z" * 1200
    )
    long_header = b"X-Long: " + b"a" * 1500 + b"\r\nX-Long-Spaced: " + b"b " * 800 + b"\r\n\r\n"
    data = report(recipients=(spaced, unbroken), headers=HEADERS[:-2] + long_header)
    assert_wire_clean(data)
    blocks = status_blocks(data)
    assert blocks[1]["Diagnostic-Code"].startswith("smtp; 550 word word")
    assert blocks[1]["Diagnostic-Code"].endswith("...[truncated]")
    assert len(str(blocks[2]["Diagnostic-Code"])) < 2100
    returned = parts(data)[2].get_payload(decode=True)
    assert isinstance(returned, bytes)
    assert b"X-Long-Spaced: b b" in returned and b"Subject: quarterly numbers" in returned


def test_non_ascii_addresses_and_diagnostics_stay_ascii_in_the_report() -> None:
    rcpt = ReportedRecipient("jörg@bücher.test", "failed", "5.1.1", "550 5.1.1 Benutzer unbekannt: jörg")
    data = report(original=envelope(sender="sénder@example.test", smtputf8=True), recipients=(rcpt,))
    head, _, rest = data.partition(b"\r\n\r\n")
    assert "To: <sénder@example.test>".encode() in head  # RFC 6532 header for an SMTPUTF8 sender
    assert rest.isascii()
    block = status_blocks(data)[1]
    assert block["Final-Recipient"] == "utf-8; j\\x{F6}rg@b\\x{FC}cher.test"
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 Benutzer unbekannt: j\\x{F6}rg"


def test_control_characters_cannot_inject_fields() -> None:
    rcpt = ReportedRecipient("bob@remote.test", "failed", "5.1.1", "550 no\r\nAction: delivered\r\n\r\nX: y")
    blocks = status_blocks(report(recipients=(rcpt,), original=envelope(envid="E1\r\nBcc: x@y")))
    assert len(blocks) == 2
    assert blocks[1]["Action"] == "failed"
    assert blocks[0]["Bcc"] is None


# --- misuse ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bounce", "FAILURE", ""])
def test_unknown_kind_is_refused(kind: str) -> None:
    with pytest.raises(ValueError):
        report(kind=kind)


def test_unknown_action_is_refused() -> None:
    with pytest.raises(ValueError):
        ReportedRecipient("bob@remote.test", "bounced", "5.0.0", "")


def test_a_report_without_recipients_is_refused() -> None:
    with pytest.raises(ValueError):
        report(recipients=())


# --- should_report --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sender", "dsn_kind", "notify", "kind", "expected"),
    [
        ("alice@example.test", "", (), "failure", True),  # default NOTIFY: FAILURE,DELAY
        ("alice@example.test", "", (), "delay", True),
        ("alice@example.test", "", (), "success", False),
        ("", "", (), "failure", False),  # never to the null sender
        ("", "", ("SUCCESS",), "success", False),
        ("alice@example.test", "", ("NEVER",), "failure", False),
        ("alice@example.test", "", ("NEVER",), "delay", False),
        ("alice@example.test", "", ("SUCCESS",), "success", True),
        ("alice@example.test", "", ("SUCCESS",), "failure", False),  # SUCCESS only
        ("alice@example.test", "", ("SUCCESS",), "delay", False),
        ("alice@example.test", "", ("FAILURE",), "failure", True),
        ("alice@example.test", "", ("FAILURE",), "delay", False),
        ("alice@example.test", "", ("DELAY",), "delay", True),
        ("alice@example.test", "", ("DELAY",), "failure", False),
        ("alice@example.test", "", ("success", "failure"), "failure", True),  # case-insensitive
        ("alice@example.test", "", ("SUCCESS", "FAILURE", "DELAY"), "delay", True),
        ("postmaster@relay.example.test", "failure", (), "failure", False),  # no report on a report
        ("postmaster@relay.example.test", "delay", ("SUCCESS",), "success", False),
    ],
)
def test_should_report(
    sender: str, dsn_kind: str, notify: tuple[str, ...], kind: str, expected: bool
) -> None:
    rcpt = Recipient("bob@remote.test", notify=notify)
    env = envelope(sender=sender, recipients=[rcpt], dsn_kind=dsn_kind)
    assert should_report(env, rcpt, kind) is expected


def test_should_report_refuses_an_unknown_kind() -> None:
    with pytest.raises(ValueError):
        should_report(envelope(), Recipient("bob@remote.test"), "bounce")


# --- header section helpers -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "end"),
    [
        (b"A: 1\r\nB: 2\r\n\r\nbody\r\n", 14),
        (b"A: 1\nB: 2\n\nbody\n", 11),
        (b"A: 1\r\n\nbody", 7),
        (b"\r\nbody only", 2),
        (b"\nbody only", 1),
        (b"A: 1\r\nB: 2\r\n", None),
        (b"", None),
    ],
)
def test_header_block_end(data: bytes, end: int | None) -> None:
    assert header_block_end(data) == end


def test_split_headers_stops_at_the_first_empty_line() -> None:
    assert split_headers(HEADERS + BODY) == HEADERS
    assert split_headers(HEADERS + BODY, complete=True) == HEADERS


def test_split_headers_of_a_prefix_cut_in_the_headers_keeps_whole_lines() -> None:
    assert split_headers(b"A: 1\r\nB: 2\r\nC: par") == b"A: 1\r\nB: 2\r\n"
    assert split_headers(b"A: 1\r\nB: 2\r\nC: par", complete=True) == b"A: 1\r\nB: 2\r\nC: par"
