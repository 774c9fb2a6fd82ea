"""8-bit to 7-bit MIME conversion for peers without 8BITMIME (RFC 6152, the KB286673 failure)."""

from __future__ import annotations

import email
import email.policy
import io
import re
from email.message import EmailMessage
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from smtpsvc.delivery.downgrade import MAX_NESTING, DowngradeError, downgrade_to_7bit, needs_downgrade

BOUNDARY = b"xyzzy-boundary-1"


def crlf(text: str) -> bytes:
    """Test messages are written with \\n and sent with CRLF, as the spool holds them."""
    return text.replace("\n", "\r\n").encode("utf-8")


def parse(message: bytes) -> EmailMessage:
    parsed = email.message_from_bytes(message, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def assert_7bit_transport_clean(message: bytes) -> None:
    assert all(0 < octet < 128 for octet in message)
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", message) is None, "a bare CR or LF"
    assert max(len(line) for line in message.split(b"\r\n")) <= 998


def subparts(message: EmailMessage) -> list[EmailMessage]:
    payload: Any = message.get_payload()
    assert isinstance(payload, list)
    assert all(isinstance(part, EmailMessage) for part in payload)
    return payload


def header_block(message: bytes) -> bytes:
    return message.split(b"\r\n\r\n", 1)[0] + b"\r\n"


def body_of(message: bytes) -> bytes:
    return message.split(b"\r\n\r\n", 1)[1]


def multipart(*parts: bytes, subtype: str = "mixed", preamble: bytes = b"", epilogue: bytes = b"") -> bytes:
    boundary = BOUNDARY.decode()
    head = crlf(f'MIME-Version: 1.0\nContent-Type: multipart/{subtype}; boundary="{boundary}"\n\n')
    body = preamble + b"".join(b"--" + BOUNDARY + b"\r\n" + part + b"\r\n" for part in parts)
    return head + body + b"--" + BOUNDARY + b"--\r\n" + epilogue


TEXT_PART = crlf("Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\nGrüße, wörld\n")
ASCII_PART = crlf("Content-Type: text/plain; charset=us-ascii\n\nplain old ascii\n")


# --- needs_downgrade ---------------------------------------------------------------------------------------


def test_a_7bit_message_needs_no_downgrade() -> None:
    assert not needs_downgrade(crlf("Subject: hi\n\nhello\n"))


@pytest.mark.parametrize("message", [crlf("Subject: hi\n\nhéllo\n"), crlf("Subject: hé\n\nhello\n")])
def test_an_8bit_octet_in_headers_or_body_needs_downgrade(message: bytes) -> None:
    assert needs_downgrade(message)


def test_a_nul_needs_downgrade() -> None:
    assert needs_downgrade(b"Subject: hi\r\n\r\nnul \0 here\r\n")


def test_needs_downgrade_streams_a_file_and_restores_its_position() -> None:
    spool = io.BytesIO(b"Subject: big\r\n\r\n" + b"a" * 200_000 + b"\xe9\r\n")
    spool.seek(3)
    assert needs_downgrade(spool)
    assert spool.tell() == 3
    assert not needs_downgrade(io.BytesIO(b"Subject: big\r\n\r\n" + b"a" * 200_000))


# --- bodies ------------------------------------------------------------------------------------------------


def test_an_already_7bit_message_is_returned_byte_for_byte() -> None:
    message = multipart(
        ASCII_PART, crlf("Content-Type: application/pdf\nContent-Transfer-Encoding: base64\n\nJVBE\n")
    )
    assert downgrade_to_7bit(message) == message


def test_an_8bit_text_body_becomes_quoted_printable_that_decodes_to_the_original() -> None:
    text = "Grüße aus Köln,\nça va? 日本語\n"
    message = crlf(
        f"From: a@example.com\nSubject: hi\nMIME-Version: 1.0\n"
        f"Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n{text}"
    )
    out = downgrade_to_7bit(message)
    assert_7bit_transport_clean(out)
    parsed = parse(out)
    assert parsed["Content-Transfer-Encoding"] == "quoted-printable"
    assert parsed.get_content().replace("\r\n", "\n") == text


def test_only_the_transfer_encoding_header_of_a_converted_part_changes() -> None:
    message = crlf(
        "Received: from a\n\tby b; Mon, 1 Jan 2024 00:00:00 +0000\nSubject: hi\nMIME-Version: 1.0\n"
        "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\nX-Last: 1\n\nhé\n"
    )
    out = downgrade_to_7bit(message)
    assert header_block(out) == header_block(message).replace(b"8bit", b"quoted-printable")


def test_quoted_printable_lines_are_at_most_76_with_trailing_white_space_encoded() -> None:
    message = crlf(
        "MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n\n" + "é" * 500 + " \n=\tend\t\n"
    )
    body = body_of(downgrade_to_7bit(message))
    lines = body.split(b"\r\n")
    assert max(len(line) for line in lines) <= 76
    assert all(not line.endswith((b" ", b"\t")) for line in lines)
    assert lines[-3].endswith(b"=20")
    assert lines[-2:] == [b"=3D\tend=09", b""]


def test_a_non_mime_message_gets_mime_headers_and_quoted_printable() -> None:
    message = crlf("From: a@example.com\nSubject: hi\n\nhéllo\n")
    out = downgrade_to_7bit(message)
    assert header_block(out) == crlf(
        "From: a@example.com\nSubject: hi\nMIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n"
        "Content-Transfer-Encoding: quoted-printable\n"
    )
    assert parse(out).get_content() == "héllo\r\n"


def test_a_non_mime_body_that_is_not_utf8_is_labelled_unknown_8bit() -> None:
    out = downgrade_to_7bit(b"Subject: hi\r\n\r\nh\xe9llo\r\n")
    assert b"Content-Type: text/plain; charset=unknown-8bit\r\n" in out
    assert body_of(out) == b"h=E9llo\r\n"


def test_an_8bit_binary_attachment_becomes_base64_of_the_exact_bytes() -> None:
    pdf = b"%PDF-1.7\r\n%\xe2\xe3\xcf\xd3\r\n\x00\x01\xff\nstream\rend"
    attachment = (
        crlf(
            "Content-Type: application/pdf\nContent-Disposition: attachment; filename=a.pdf\n"
            "Content-Transfer-Encoding: binary\n\n"
        )
        + pdf
    )
    out = downgrade_to_7bit(multipart(ASCII_PART, attachment))
    assert_7bit_transport_clean(out)
    part = subparts(parse(out))[1]
    assert part["Content-Transfer-Encoding"] == "base64"
    assert part.get_payload(decode=True) == pdf
    encoded = part.get_payload()
    assert isinstance(encoded, str)
    assert all(len(line) <= 76 for line in encoded.splitlines())


def test_a_7bit_part_next_to_a_converted_one_is_byte_identical() -> None:
    out = downgrade_to_7bit(
        multipart(TEXT_PART, ASCII_PART, preamble=b"preamble\r\n", epilogue=b"epilogue\r\n")
    )
    assert b"\r\n--" + BOUNDARY + b"\r\n" + ASCII_PART + b"\r\n--" + BOUNDARY + b"--\r\nepilogue\r\n" in out
    assert body_of(out).startswith(b"preamble\r\n--" + BOUNDARY + b"\r\n")
    first, second = subparts(parse(out))
    assert first.get_content() == "Grüße, wörld\r\n"
    assert second.get_content() == "plain old ascii\r\n"


def test_8bit_octets_in_a_preamble_become_question_marks() -> None:
    out = downgrade_to_7bit(multipart(TEXT_PART, preamble=b"Pr\xc3\xa9ambule\r\n"))
    assert body_of(out).startswith(b"Pr??ambule\r\n--")


def test_a_nested_multipart_is_converted_inside_and_relabelled_7bit() -> None:
    inner = multipart(TEXT_PART, ASCII_PART, subtype="alternative").replace(BOUNDARY, b"inner-boundary")
    inner = inner.replace(b"MIME-Version: 1.0\r\n", b"Content-Transfer-Encoding: 8bit\r\n")
    out = downgrade_to_7bit(multipart(ASCII_PART, inner))
    assert_7bit_transport_clean(out)
    _, alternative = subparts(parse(out))
    assert alternative["Content-Transfer-Encoding"] == "7bit"
    converted, _ = subparts(alternative)
    assert converted["Content-Transfer-Encoding"] == "quoted-printable"
    assert converted.get_content() == "Grüße, wörld\r\n"
    assert ASCII_PART in out


def test_an_attached_message_with_an_8bit_body_is_converted_inside() -> None:
    attached = crlf(
        "From: b@example.com\nSubject: inner\nMIME-Version: 1.0\n"
        "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\nInnen: äöü\n"
    )
    part = crlf("Content-Type: message/rfc822\nContent-Transfer-Encoding: 8bit\n\n") + attached
    out = downgrade_to_7bit(multipart(ASCII_PART, part))
    assert_7bit_transport_clean(out)
    rfc822 = subparts(parse(out))[1]
    assert rfc822["Content-Transfer-Encoding"] == "7bit"
    inner = subparts(rfc822)[0]
    assert inner["Subject"] == "inner"
    assert inner["Content-Transfer-Encoding"] == "quoted-printable"
    assert inner.get_content() == "Innen: äöü\r\n"


def test_an_attached_message_with_8bit_headers_is_refused() -> None:
    part = crlf("Content-Type: message/rfc822\n\nSubject: Grüße\n\nbody\n")
    with pytest.raises(DowngradeError):
        downgrade_to_7bit(multipart(ASCII_PART, part))


def test_a_base64_part_with_8bit_junk_is_re_encoded_as_the_data_it_denotes() -> None:
    part = (
        b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\naGVs\xe9bG8=\r\n"
    )
    out = downgrade_to_7bit(multipart(part))
    assert_7bit_transport_clean(out)
    assert subparts(parse(out))[0].get_payload(decode=True) == b"hello"


def test_nesting_deeper_than_the_limit_is_refused() -> None:
    message = TEXT_PART
    for level in range(MAX_NESTING + 4):
        message = multipart(message).replace(BOUNDARY, b"b%d" % level).replace(b"MIME-Version: 1.0\r\n", b"")
    with pytest.raises(DowngradeError, match="nesting"):
        downgrade_to_7bit(message)


def test_nesting_within_the_limit_is_converted() -> None:
    message = TEXT_PART
    for level in range(MAX_NESTING - 1):
        message = multipart(message).replace(BOUNDARY, b"b%d" % level).replace(b"MIME-Version: 1.0\r\n", b"")
    assert_7bit_transport_clean(downgrade_to_7bit(b"MIME-Version: 1.0\r\n" + message))


def test_a_multipart_without_its_boundary_is_refused() -> None:
    message = crlf('MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="nowhere"\n\nhé\n')
    with pytest.raises(DowngradeError, match="boundary"):
        downgrade_to_7bit(message)


# --- headers -----------------------------------------------------------------------------------------------


def test_an_8bit_subject_becomes_encoded_words_that_decode_back() -> None:
    subject = "Grüße aus Köln — " + "ü" * 90
    out = downgrade_to_7bit(crlf(f"Subject: {subject}\nTo: a@example.com\n\nbody\n"))
    assert_7bit_transport_clean(out)
    assert out.startswith(b"Subject: =?utf-8?b?")
    assert all(len(line) <= 78 for line in header_block(out).split(b"\r\n"))
    assert parse(out)["Subject"] == subject
    assert body_of(out) == b"body\r\n"  # a 7-bit body is not touched, nor made MIME


def test_a_subject_that_is_not_utf8_is_encoded_as_unknown_8bit() -> None:
    out = downgrade_to_7bit(b"Subject: caf\xe9\r\n\r\nbody\r\n")
    assert out == b"Subject: =?unknown-8bit?b?Y2Fm6Q==?=\r\n\r\nbody\r\n"


def test_an_8bit_display_name_is_encoded_and_the_address_kept() -> None:
    out = downgrade_to_7bit(
        crlf('From: Jöhn Müller <j@example.com>\nTo: "Zoë, Ann" <z@example.com>, b@example.com\n\nbody\n')
    )
    assert_7bit_transport_clean(out)
    parsed = parse(out)
    assert parsed["From"].addresses[0].display_name == "Jöhn Müller"
    assert parsed["From"].addresses[0].addr_spec == "j@example.com"
    assert [a.display_name for a in parsed["To"].addresses] == ["Zoë, Ann", ""]
    assert [a.addr_spec for a in parsed["To"].addresses] == ["z@example.com", "b@example.com"]


def test_an_8bit_local_part_in_from_is_refused_as_needing_smtputf8() -> None:
    with pytest.raises(DowngradeError) as error:
        downgrade_to_7bit(crlf("From: Jöhn <jöhn@example.com>\n\nbody\n"))
    assert error.value.status == "5.6.7"


def test_an_8bit_bare_address_is_refused() -> None:
    with pytest.raises(DowngradeError):
        downgrade_to_7bit(crlf("To: a@example.com, zoë@example.com\n\nbody\n"))


def test_an_8bit_message_id_is_refused() -> None:
    with pytest.raises(DowngradeError) as error:
        downgrade_to_7bit(crlf("Message-ID: <ü@example.com>\n\nbody\n"))
    assert error.value.status == "5.6.9"


def test_an_8bit_header_field_name_is_refused() -> None:
    with pytest.raises(DowngradeError, match="field name"):
        downgrade_to_7bit(crlf("X-Grüße: hi\n\nbody\n"))


def test_an_8bit_attachment_filename_becomes_an_rfc2231_parameter() -> None:
    filename = "Rechnung für März " + "ä" * 40 + ".pdf"
    attachment = crlf(
        f'Content-Type: application/pdf; name="{filename}"\n'
        f'Content-Disposition: attachment; filename="{filename}"\n'
        "Content-Transfer-Encoding: base64\n\nJVBE\n"
    )
    out = downgrade_to_7bit(multipart(ASCII_PART, attachment))
    assert_7bit_transport_clean(out)
    part = subparts(parse(out))[1]
    assert part.get_filename() == filename
    assert part.get_param("name") == filename
    assert part.get_payload(decode=True) == b"%PD"


# --- properties --------------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(text=st.text(st.characters(exclude_categories=["Cs"]), max_size=3000))
def test_any_utf8_text_body_comes_out_7bit_and_decodes_to_the_same_octets(text: str) -> None:
    body = re.sub(r"\r\n|\r|\n", "\r\n", text + "é").encode("utf-8")  # the spool holds CRLF only
    out = downgrade_to_7bit(crlf("MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n\n") + body)
    assert_7bit_transport_clean(out)
    assert parse(out).get_payload(decode=True) == body


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=5000).map(lambda data: data + b"\xff"))
def test_any_binary_attachment_comes_out_7bit_and_decodes_to_the_same_octets(data: bytes) -> None:
    attachment = crlf("Content-Type: application/octet-stream\nContent-Transfer-Encoding: binary\n\n") + data
    out = downgrade_to_7bit(multipart(TEXT_PART, attachment))
    assert_7bit_transport_clean(out)
    text, binary = subparts(parse(out))
    assert binary.get_payload(decode=True) == data
    assert text.get_content() == "Grüße, wörld\r\n"


@settings(max_examples=100, deadline=None)
@given(subject=st.text(st.characters(exclude_categories=["Cs", "Cc", "Zl", "Zp"]), min_size=1, max_size=300))
def test_any_subject_comes_out_7bit_and_decodes_back(subject: str) -> None:
    subject = " ".join(subject.split())  # the header parser collapses folding white space
    assume("=?" not in subject)  # a literal encoded-word would be decoded by the reader
    message = f"Subject: {subject}é\r\n\r\nbody\r\n".encode()
    out = downgrade_to_7bit(message)
    assert_7bit_transport_clean(out)
    assert parse(out)["Subject"] == f"{subject}é"
