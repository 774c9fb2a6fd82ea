"""Reply rendering, validation and the catalogue wording."""

from __future__ import annotations

import pytest

from smtpsvc.protocol import Reply
from smtpsvc.protocol import replies as R


def test_single_line_reply_bytes() -> None:
    assert R.OK.to_bytes() == b"250 2.0.0 OK\r\n"


def test_enhanced_code_is_put_on_every_line() -> None:
    reply = Reply(214, "2.0.0", "first", ("second", "third"))
    assert reply.to_bytes() == b"214-2.0.0 first\r\n214-2.0.0 second\r\n214 2.0.0 third\r\n"


def test_enhanced_code_can_be_left_out() -> None:
    assert (
        R.RELAY_DENIED("a@b.example").to_bytes(enhanced_codes=False)
        == b"550 Unable to relay for <a@b.example>\r\n"
    )


def test_reply_without_enhanced_code() -> None:
    reply = R.EHLO_REPLY("mx.test", "192.0.2.1", ["PIPELINING", "SIZE"])
    assert reply.to_bytes() == b"250-mx.test Hello [192.0.2.1]\r\n250-PIPELINING\r\n250 SIZE\r\n"


def test_str_is_the_wire_form_without_crlf() -> None:
    assert str(R.RELAY_DENIED("a@b")) == "550 5.7.1 Unable to relay for <a@b>"
    assert str(Reply(250, "", "a", ("b",))) == "250-a\n250 b"


def test_utf8_text_is_encoded() -> None:
    assert R.RCPT_OK("jösé@example.com").to_bytes() == "250 2.1.5 <jösé@example.com>\r\n".encode()


@pytest.mark.parametrize("code", [199, 600, 0, -250])
def test_code_out_of_range_is_refused(code: int) -> None:
    with pytest.raises(ValueError):
        Reply(code, "", "x")


@pytest.mark.parametrize("text", ["a\r\nb", "a\nb", "a\rb"])
def test_cr_or_lf_in_text_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        Reply(250, "", text)
    with pytest.raises(ValueError):
        Reply(250, "", "ok", ("fine", text))


@pytest.mark.parametrize("enhanced", ["2.0", "2.0.0.0", "3.0.0", "2.1000.0", "x.y.z", "5.0.0"])
def test_malformed_or_mismatched_enhanced_code_is_refused(enhanced: str) -> None:
    with pytest.raises(ValueError):
        Reply(250, enhanced, "x")


@pytest.mark.parametrize(
    ("reply", "positive", "intermediate", "transient", "permanent"),
    [
        (R.OK, True, False, False, False),
        (R.START_DATA, False, True, False, False),
        (R.TEMP_FAILURE, False, False, True, False),
        (R.UNRECOGNIZED, False, False, False, True),
    ],
)
def test_reply_classes(
    reply: Reply, positive: bool, intermediate: bool, transient: bool, permanent: bool
) -> None:
    assert (reply.is_positive, reply.is_intermediate, reply.is_transient, reply.is_permanent) == (
        positive,
        intermediate,
        transient,
        permanent,
    )


@pytest.mark.parametrize(
    ("reply", "wire"),
    [
        (R.OK, "250 2.0.0 OK"),
        (R.SENDER_OK("a@b"), "250 2.1.0 <a@b>....Sender OK"),
        (R.RCPT_OK("a@b"), "250 2.1.5 <a@b>"),
        (R.START_DATA, "354 Start mail input; end with <CRLF>.<CRLF>"),
        (R.RESET, "250 2.0.0 Resetting"),
        (R.QUIT_REPLY("mx"), "221 2.0.0 mx Service closing transmission channel"),
        (R.QUEUED("ID1"), "250 2.6.0 <ID1> Queued mail for delivery"),
        (R.GREETING("mx"), "220 mx smtpsvc ESMTP ready"),
        (R.NEED_HELO, "503 5.5.1 Send hello first"),
        (R.NEED_MAIL, "503 5.5.1 Need mail command"),
        (R.NEED_RCPT, "503 5.5.1 Need rcpt command"),
        (R.NO_VALID_RCPT, "554 5.5.1 No valid recipients"),
        (R.SYNTAX, "501 5.5.2 Syntax error in parameters or arguments"),
        (R.BAD_ADDRESS, "501 5.1.3 Invalid address"),
        (R.UNRECOGNIZED, "500 5.5.1 Unrecognized command"),
        (R.LINE_TOO_LONG, "500 5.5.2 Line too long"),
        (R.BAD_CHARS, "500 5.5.2 Invalid character in command"),
        (R.PARAM_UNKNOWN, "555 5.5.4 Unsupported parameter"),
        (R.TOO_BIG, "552 5.3.4 Message size exceeds fixed maximum message size"),
        (R.TOO_MANY_RCPTS, "452 4.5.3 Too many recipients"),
        (R.NOT_IMPLEMENTED, "502 5.5.1 Command not implemented"),
        (R.SHUTTING_DOWN, "421 4.3.2 Service shutting down"),
        (R.TOO_MANY_CONNECTIONS, "421 4.7.0 Too many connections, try again later"),
        (R.TOO_MANY_ERRORS, "421 4.7.0 Too many errors"),
        (R.RELAY_DENIED("a@b"), "550 5.7.1 Unable to relay for <a@b>"),
        (R.VRFY_CANNOT, "252 2.1.5 Cannot VRFY user, but will accept message and attempt delivery"),
    ],
)
def test_catalogue_wording(reply: Reply, wire: str) -> None:
    assert str(reply) == wire


@pytest.mark.parametrize(
    ("reply", "wire"),
    [
        (R.MUST_STARTTLS, "530 5.7.0 Must issue a STARTTLS command first"),
        (R.READY_TLS, "220 2.0.0 Ready to start TLS"),
        (R.TLS_ACTIVE, "503 5.5.1 TLS already active"),
        (R.TLS_NOT_AVAILABLE, "454 4.7.0 TLS not available due to temporary reason"),
        (R.AUTH_OK, "235 2.7.0 Authentication successful"),
        (R.AUTH_FAILED, "535 5.7.8 Authentication credentials invalid"),
        (R.AUTH_CANCELLED, "501 5.0.0 Authentication cancelled"),
        (R.AUTH_BAD_RESPONSE, "501 5.5.2 Cannot decode response"),
        (R.AUTH_ENCRYPTION_REQUIRED, "538 5.7.11 Encryption required for requested authentication mechanism"),
        (R.AUTH_MECH_UNKNOWN, "504 5.5.4 Unrecognized authentication type"),
        (R.AUTH_LINE_TOO_LONG, "500 5.5.6 Authentication Exchange line is too long"),
        (R.AUTH_TEMP_FAILURE, "454 4.7.0 Temporary authentication failure"),
        (R.AUTH_TOO_MANY_FAILURES, "421 4.7.0 Too many authentication failures"),
        (R.ALREADY_AUTHENTICATED, "503 5.5.1 Already authenticated"),
        (R.AUTH_CHALLENGE(), "334 "),
        (R.AUTH_CHALLENGE("abc="), "334 abc="),
        (R.LOGIN_USERNAME, "334 VXNlcm5hbWU6"),
        (R.LOGIN_PASSWORD, "334 UGFzc3dvcmQ6"),
        (R.NEED_AUTH_XEXCH50, "504 5.7.4 Need to authenticate first"),
        (R.XEXCH50_GO, "354 Send binary data"),
        (R.BDAT_OK(1024), "250 2.0.0 1024 octets received"),
        (R.BINARYMIME_NEEDS_BDAT, "503 5.5.1 BINARYMIME requires BDAT"),
        (R.ETRN_OK("example.com"), "250 2.0.0 Queuing for node example.com started"),
        (R.ETRN_NOTHING("example.com"), "251 2.0.0 OK, no messages waiting for node example.com"),
        (R.ETRN_UNKNOWN("example.com"), "458 4.0.0 Unable to queue messages for node example.com"),
        (R.ETRN_NOT_ALLOWED("example.com"), "459 4.0.0 Node example.com not allowed"),
    ],
)
def test_extension_catalogue_wording(reply: Reply, wire: str) -> None:
    assert str(reply) == wire


def test_auth_challenge_bytes_carry_no_enhanced_code() -> None:
    assert R.LOGIN_USERNAME.to_bytes() == b"334 VXNlcm5hbWU6\r\n"


def test_timeout_reply_is_421_4_4_2() -> None:
    assert (R.SERVICE_CLOSING_TIMEOUT.code, R.SERVICE_CLOSING_TIMEOUT.enhanced) == (421, "4.4.2")
    assert "timeout" in R.SERVICE_CLOSING_TIMEOUT.text.lower()


def test_help_reply_is_multi_line_214() -> None:
    assert R.HELP_REPLY.code == 214
    assert len(R.HELP_REPLY.lines) > 1


def test_temp_failure_is_451_4_3_0() -> None:
    assert (R.TEMP_FAILURE.code, R.TEMP_FAILURE.enhanced) == (451, "4.3.0")
