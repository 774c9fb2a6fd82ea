"""ClientConnection: reply parsing, reply/command matching, DATA, Capabilities, argument helpers."""

from __future__ import annotations

import pytest

from smtpsvc.protocol import (
    NEED_DATA,
    Capabilities,
    ClientConnection,
    ConnectionClosed,
    DataChunk,
    DataEnd,
    LocalProtocolError,
    Mail,
    Rcpt,
    RemoteProtocolError,
    Reply,
    ServerReply,
    mail_arg,
    rcpt_arg,
)
from smtpsvc.protocol import replies as R

from .drive import Session


def client_after_greeting() -> ClientConnection:
    client = ClientConnection()
    client.receive_data(b"220 mx.test ESMTP\r\n")
    assert client.next_event() == ServerReply(Reply(220, "", "mx.test ESMTP"), "GREETING")
    return client


def test_first_reply_is_matched_to_the_greeting() -> None:
    client = ClientConnection()
    assert client.pending == 1
    client.receive_data(b"220 mx.test ESMTP\r\n")
    event = client.next_event()
    assert isinstance(event, ServerReply)
    assert event.command == "GREETING"
    assert client.pending == 0


def test_incomplete_reply_needs_data() -> None:
    client = ClientConnection()
    client.receive_data(b"220 mx.te")
    assert client.next_event() is NEED_DATA
    client.receive_data(b"st\r\n")
    assert isinstance(client.next_event(), ServerReply)


def test_multi_line_reply_is_one_event() -> None:
    client = client_after_greeting()
    client.send_command("EHLO", "me.test")
    client.receive_data(b"250-mx.test Hello\r\n250-PIPELINING\r\n")
    assert client.next_event() is NEED_DATA
    client.receive_data(b"250-SIZE 1000\r\n250 HELP\r\n")
    assert client.next_event() == ServerReply(
        Reply(250, "", "mx.test Hello", ("PIPELINING", "SIZE 1000", "HELP")), "EHLO"
    )


def test_multi_line_reply_fed_byte_by_byte() -> None:
    client = client_after_greeting()
    client.send_command("HELP")
    events = []
    for byte in b"214-2.0.0 a\r\n214 2.0.0 b\r\n":
        client.receive_data(bytes([byte]))
        events.append(client.next_event())
    assert events[:-1] == [NEED_DATA] * (len(events) - 1)
    assert events[-1] == ServerReply(Reply(214, "2.0.0", "a", ("b",)), "HELP")


def test_enhanced_code_is_taken_from_the_text() -> None:
    client = client_after_greeting()
    client.send_command("MAIL", "FROM:<a@example.org>")
    client.receive_data(b"550 5.7.1 Unable to relay\r\n")
    event = client.next_event()
    assert isinstance(event, ServerReply)
    assert event.reply == R.Reply(550, "5.7.1", "Unable to relay")
    assert str(event.reply) == "550 5.7.1 Unable to relay"


def test_enhanced_code_of_another_class_stays_text() -> None:
    client = client_after_greeting()
    client.send_command("NOOP")
    client.receive_data(b"250 5.0.0 odd\r\n")
    event = client.next_event()
    assert isinstance(event, ServerReply)
    assert (event.reply.enhanced, event.reply.text) == ("", "5.0.0 odd")


def test_reply_without_text_is_accepted() -> None:
    client = client_after_greeting()
    client.send_command("NOOP")
    client.receive_data(b"250\r\n")
    assert client.next_event() == ServerReply(Reply(250, "", ""), "NOOP")


def test_bare_lf_line_ends_are_tolerated() -> None:
    client = ClientConnection()
    client.receive_data(b"220-a\n220 b\n")
    assert client.next_event() == ServerReply(Reply(220, "", "a", ("b",)), "GREETING")


def test_pipelined_replies_match_their_commands_in_order() -> None:
    client = client_after_greeting()
    wire = (
        client.send_command("MAIL", mail_arg("a@example.org"))
        + client.send_command("RCPT", rcpt_arg("b@example.com"))
        + client.send_command("RCPT", rcpt_arg("c@example.com"))
        + client.send_command("DATA")
    )
    assert (
        wire == b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nRCPT TO:<c@example.com>\r\nDATA\r\n"
    )
    assert client.pending == 4
    client.receive_data(b"250 2.1.0 ok\r\n550 5.1.1 no such user\r\n250 2.1.5 ok\r\n354 go ahead\r\n")
    commands = []
    while (event := client.next_event()) is not NEED_DATA:
        assert isinstance(event, ServerReply)
        commands.append((event.command, event.reply.code))
    assert commands == [("MAIL", 250), ("RCPT", 550), ("RCPT", 250), ("DATA", 354)]


def test_data_content_is_stuffed_and_the_dot_reply_matched() -> None:
    client = client_after_greeting()
    client.send_command("DATA")
    client.receive_data(b"354 go\r\n")
    client.next_event()
    stuffer = client.start_data()
    wire = stuffer.feed(b"a\r\n.b\r\n") + client.end_data(stuffer)
    assert wire == b"a\r\n..b\r\n.\r\n"
    client.receive_data(b"250 2.6.0 queued\r\n")
    event = client.next_event()
    assert isinstance(event, ServerReply)
    assert event.command == "DOT"


def test_start_data_needs_a_354_to_data() -> None:
    client = client_after_greeting()
    with pytest.raises(LocalProtocolError):
        client.start_data()
    client.send_command("DATA")
    client.receive_data(b"554 5.5.1 No valid recipients\r\n")
    client.next_event()
    with pytest.raises(LocalProtocolError):
        client.start_data()


def test_send_command_during_data_is_a_local_error() -> None:
    client = client_after_greeting()
    client.send_command("DATA")
    client.receive_data(b"354 go\r\n")
    client.next_event()
    client.start_data()
    with pytest.raises(LocalProtocolError):
        client.send_command("NOOP")


def test_end_data_without_start_data_is_a_local_error() -> None:
    from smtpsvc.protocol import DotStuffer

    with pytest.raises(LocalProtocolError):
        client_after_greeting().end_data(DotStuffer())


@pytest.mark.parametrize("arg", ["FROM:<a@b>\r\nRSET", "x\n", "x\r", "a\x00b"])
def test_cr_lf_or_nul_in_an_argument_is_refused(arg: str) -> None:
    with pytest.raises(ValueError):
        client_after_greeting().send_command("MAIL", arg)


@pytest.mark.parametrize("verb", ["", "MA IL", "MAIL\r\n", "-X"])
def test_bad_verbs_are_refused(verb: str) -> None:
    with pytest.raises(ValueError):
        client_after_greeting().send_command(verb)


def test_verbs_are_sent_upper_case() -> None:
    client = client_after_greeting()
    assert client.send_command("ehlo", "me.test") == b"EHLO me.test\r\n"


@pytest.mark.parametrize(
    "wire",
    [
        b"hello\r\n",
        b"25 x\r\n",
        b"2500 x\r\n",
        b"250x\r\n",
        b"150 x\r\n",
        b"650 x\r\n",
        b"abc x\r\n",
        b"250-a\r\n251 b\r\n",
        b"250 a\rb\r\n",
    ],
)
def test_garbage_replies_raise_remote_protocol_error(wire: bytes) -> None:
    client = client_after_greeting()
    client.send_command("NOOP")
    client.receive_data(wire)
    with pytest.raises(RemoteProtocolError):
        client.next_event()


def test_errors_are_sticky() -> None:
    client = client_after_greeting()
    client.send_command("NOOP")
    client.receive_data(b"garbage\r\n250 ok\r\n")
    for _ in range(2):
        with pytest.raises(RemoteProtocolError):
            client.next_event()


def test_reply_line_over_4096_octets_is_refused_before_its_end() -> None:
    client = client_after_greeting()
    client.send_command("NOOP")
    client.receive_data(b"250 " + b"x" * 5000)
    with pytest.raises(RemoteProtocolError):
        client.next_event()


def test_reply_line_of_4096_octets_is_accepted() -> None:
    client = client_after_greeting()
    client.send_command("NOOP")
    client.receive_data(b"250 " + b"x" * 4090 + b"\r\n")
    assert isinstance(client.next_event(), ServerReply)


def test_reply_of_more_than_100_lines_is_refused() -> None:
    client = client_after_greeting()
    client.send_command("HELP")
    client.receive_data(b"214-x\r\n" * 100 + b"214 end\r\n")
    with pytest.raises(RemoteProtocolError):
        client.next_event()


def test_reply_of_100_lines_is_accepted() -> None:
    client = client_after_greeting()
    client.send_command("HELP")
    client.receive_data(b"214-x\r\n" * 99 + b"214 end\r\n")
    event = client.next_event()
    assert isinstance(event, ServerReply)
    assert len(event.reply.lines) == 100


def test_unsolicited_421_is_reported_with_empty_command() -> None:
    client = client_after_greeting()
    client.receive_data(b"421 4.3.2 shutting down\r\n")
    assert client.next_event() == ServerReply(Reply(421, "4.3.2", "shutting down"), "")


def test_unsolicited_other_reply_is_a_remote_error() -> None:
    client = client_after_greeting()
    client.receive_data(b"250 surprise\r\n")
    with pytest.raises(RemoteProtocolError):
        client.next_event()


def test_eof_gives_connection_closed() -> None:
    client = client_after_greeting()
    client.send_command("QUIT")
    client.receive_data(b"221 bye\r\n")
    client.receive_data(b"")
    assert isinstance(client.next_event(), ServerReply)
    assert client.next_event() == ConnectionClosed()
    assert client.next_event() == ConnectionClosed()


def test_eof_mid_reply_gives_connection_closed() -> None:
    client = client_after_greeting()
    client.send_command("NOOP")
    client.receive_data(b"250-partial\r\n250 ha")
    client.receive_data(b"")
    assert client.next_event() == ConnectionClosed()


# --- Capabilities ------------------------------------------------------------------------------------------


EHLO = Reply(
    250,
    "",
    "mx.test Hello [192.0.2.1]",
    (
        "PIPELINING",
        "SIZE 2097152",
        "8bitmime",
        "AUTH LOGIN PLAIN",
        "AUTH=LOGIN",
        "DSN",
        "ENHANCEDSTATUSCODES",
    ),
)


def test_capabilities_are_case_insensitive() -> None:
    caps = Capabilities.from_ehlo(EHLO)
    assert caps.has("8BITMIME")
    assert caps.has("pipelining")
    assert not caps.has("STARTTLS")


def test_capability_parameters() -> None:
    caps = Capabilities.from_ehlo(EHLO)
    assert caps.params("auth") == ["LOGIN", "PLAIN"]
    assert caps.params("SIZE") == ["2097152"]
    assert caps.params("STARTTLS") == []


def test_old_style_auth_equals_is_understood() -> None:
    caps = Capabilities.from_ehlo(Reply(250, "", "mx", ("AUTH=LOGIN PLAIN",)))
    assert caps.params("AUTH") == ["LOGIN", "PLAIN"]


@pytest.mark.parametrize(
    ("line", "limit"), [("SIZE 1000", 1000), ("SIZE", None), ("SIZE 0", None), ("SIZE lots", None)]
)
def test_size_limit(line: str, limit: int | None) -> None:
    assert Capabilities.from_ehlo(Reply(250, "", "mx", (line,))).size_limit == limit


def test_no_size_keyword_means_no_limit() -> None:
    assert Capabilities.from_ehlo(Reply(250, "", "mx")).size_limit is None


def test_failed_ehlo_means_no_extensions() -> None:
    caps = Capabilities.from_ehlo(Reply(502, "5.5.1", "EHLO not supported"))
    assert not caps.has("PIPELINING")


def test_capabilities_from_our_own_server() -> None:
    s = Session.start()
    client = ClientConnection()
    client.receive_data(bytes(s.output))
    client.next_event()
    s.feed(client.send_command("EHLO", "me.test"))
    client.receive_data(bytes(s.output[len(b"220 mx.test smtpsvc ESMTP ready\r\n") :]))
    event = client.next_event()
    assert isinstance(event, ServerReply)
    caps = Capabilities.from_ehlo(event.reply)
    assert all(caps.has(k.split()[0]) for k in s.conn.ehlo_keywords())


# --- Argument helpers --------------------------------------------------------------------------------------


def test_mail_arg_formats_parameters() -> None:
    assert mail_arg("a@example.org", {"SIZE": "123", "BODY": "8BITMIME", "SMTPUTF8": None}) == (
        "FROM:<a@example.org> SIZE=123 BODY=8BITMIME SMTPUTF8"
    )
    assert mail_arg("") == "FROM:<>"


def test_rcpt_arg_formats_parameters() -> None:
    assert rcpt_arg("b@example.com", {"NOTIFY": "NEVER", "ORCPT": "rfc822;b@example.com"}) == (
        "TO:<b@example.com> NOTIFY=NEVER ORCPT=rfc822;b@example.com"
    )


@pytest.mark.parametrize("params", [{"SIZE": "1 2"}, {"BAD KEY": None}, {"ENVID": "a=b"}, {"X": ""}])
def test_argument_helpers_refuse_unsendable_parameters(params: dict[str, str | None]) -> None:
    with pytest.raises(ValueError):
        mail_arg("a@example.org", params)


# --- Client against our own server -------------------------------------------------------------------------


def test_client_and_server_talk_a_whole_transaction() -> None:
    server = Session.start()
    client = ClientConnection()
    sent = 0

    def exchange(wire: bytes) -> list[ServerReply]:
        nonlocal sent
        if wire:
            server.feed(wire)
        client.receive_data(bytes(server.output[sent:]))
        sent = len(server.output)
        got = []
        while isinstance(event := client.next_event(), ServerReply):
            got.append(event)
        return got

    assert [e.command for e in exchange(b"")] == ["GREETING"]
    assert exchange(client.send_command("EHLO", "me.test"))[0].reply.code == 250
    batch = (
        client.send_command("MAIL", mail_arg("a@example.org", {"BODY": "8BITMIME"}))
        + client.send_command("RCPT", rcpt_arg("b@example.com", {"NOTIFY": "NEVER"}))
        + client.send_command("DATA")
    )
    assert [(e.command, e.reply.code) for e in exchange(batch)] == [
        ("MAIL", 250),
        ("RCPT", 250),
        ("DATA", 354),
    ]
    stuffer = client.start_data()
    body = b"Subject: t\r\n\r\n.hidden\r\n.\r\nend"
    replies = exchange(stuffer.feed(body) + client.end_data(stuffer))
    assert [(e.command, e.reply.code) for e in replies] == [("DOT", 250)]
    assert server.content() == b"Subject: t\r\n\r\n.hidden\r\n.\r\nend\r\n"
    assert [type(e) for e in server.events if isinstance(e, Mail | Rcpt | DataEnd | DataChunk)] == [
        Mail,
        Rcpt,
        DataChunk,
        DataEnd,
    ]


# --- BDAT, STARTTLS, AUTH ----------------------------------------------------------------------------------


def test_send_bdat_frames_the_chunk_and_expects_a_bdat_reply() -> None:
    client = client_after_greeting()
    assert client.send_bdat(b"ab\r\n.\r\n", last=False) == b"BDAT 7\r\nab\r\n.\r\n"
    assert client.send_bdat(b"", last=True) == b"BDAT 0 LAST\r\n"
    client.receive_data(b"250 2.0.0 7 octets received\r\n250 2.6.0 <X> Queued mail for delivery\r\n")
    assert [e.command for e in (client.next_event(), client.next_event())] == ["BDAT", "BDAT"]  # type: ignore[union-attr]


def test_send_bdat_during_data_is_a_local_error() -> None:
    client = client_after_greeting()
    client.send_command("DATA")
    client.receive_data(b"354 go\r\n")
    client.next_event()
    client.start_data()
    with pytest.raises(LocalProtocolError):
        client.send_bdat(b"x", last=True)


def test_capabilities_auth_mechanisms() -> None:
    assert Capabilities.from_ehlo(EHLO).auth_mechanisms == ("LOGIN", "PLAIN")
    assert Capabilities.from_ehlo(Reply(250, "", "mx", ("AUTH plain cram-md5",))).auth_mechanisms == (
        "PLAIN",
        "CRAM-MD5",
    )
    assert Capabilities.from_ehlo(Reply(250, "", "mx", ("PIPELINING",))).auth_mechanisms == ()


def client_after_starttls(wire: bytes = b"220 2.0.0 Ready to start TLS\r\n") -> ClientConnection:
    client = client_after_greeting()
    client.send_command("STARTTLS")
    client.receive_data(wire)
    event = client.next_event()
    assert isinstance(event, ServerReply)
    assert (event.command, event.reply.code) == ("STARTTLS", 220)
    return client


def test_replies_after_the_220_to_starttls_are_dropped() -> None:
    client = client_after_starttls(b"220 2.0.0 Ready to start TLS\r\n250 2.0.0 injected\r\n")
    assert client.awaiting_tls
    assert client.next_event() is NEED_DATA
    client.receive_data(b"250 2.0.0 also injected\r\n")
    assert client.next_event() is NEED_DATA
    client.tls_established()
    assert client.tls
    client.send_command("EHLO", "me.test")
    client.receive_data(b"250 mx.test\r\n")
    assert client.next_event() == ServerReply(Reply(250, "", "mx.test"), "EHLO")


def test_after_tls_the_next_command_must_be_ehlo() -> None:
    client = client_after_starttls()
    client.tls_established()
    with pytest.raises(LocalProtocolError):
        client.send_command("MAIL", mail_arg("a@example.org"))
    client.send_command("EHLO", "me.test")
    client.send_command("MAIL", mail_arg("a@example.org"))


def test_nothing_may_be_sent_while_starttls_is_in_progress() -> None:
    client = client_after_greeting()
    client.send_command("STARTTLS")
    with pytest.raises(LocalProtocolError):
        client.send_command("NOOP")
    client.receive_data(b"220 go ahead\r\n")
    client.next_event()
    with pytest.raises(LocalProtocolError):
        client.send_bdat(b"x", last=True)


def test_refused_starttls_leaves_the_session_in_plaintext() -> None:
    client = client_after_greeting()
    client.send_command("STARTTLS")
    client.receive_data(b"454 4.7.0 TLS not available due to temporary reason\r\n")
    assert isinstance(client.next_event(), ServerReply)
    assert not client.awaiting_tls
    client.send_command("MAIL", mail_arg("a@example.org"))


def test_tls_established_without_a_220_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        client_after_greeting().tls_established()


def test_client_sends_bdat_chunks_to_our_own_server() -> None:
    from smtpsvc.protocol import ServerOptions

    server = Session.start(ServerOptions(chunking=True))
    client = ClientConnection()
    wire = (
        client.send_command("EHLO", "me.test")
        + client.send_command("MAIL", mail_arg("a@example.org"))
        + client.send_command("RCPT", rcpt_arg("b@example.com"))
        + client.send_bdat(b"\x00\r\n.\r\n", last=False)
        + client.send_bdat(b"tail", last=True)
    )
    server.feed(wire)
    client.receive_data(bytes(server.output))
    got = []
    while isinstance(event := client.next_event(), ServerReply):
        got.append((event.command, event.reply.code))
    assert got == [
        ("GREETING", 220),
        ("EHLO", 250),
        ("MAIL", 250),
        ("RCPT", 250),
        ("BDAT", 250),
        ("BDAT", 250),
    ]
    assert server.content() == b"\x00\r\n.\r\ntail"
