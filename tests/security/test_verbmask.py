"""The verb mask (SmtpInboundCommandSupportOptions): KB286673's 3503297 removes 8BITMIME from EHLO, and a
client that uses BODY=8BITMIME anyway gets 555 instead of having 8-bit mail taken on a false promise."""

from __future__ import annotations

import pytest

from tests.conftest import StartService
from tests.security.helpers import greeted, keywords


@pytest.mark.parametrize(
    ("mask", "advertised", "reply"),
    [(7697601, True, "250 2.1.0"), (3503297, False, "555 5.5.4")],
    ids=["default-7697601", "kb286673-3503297"],
)
async def test_verb_mask_controls_8bitmime_in_ehlo_and_at_mail(
    start_service: StartService, mask: int, advertised: bool, reply: str
) -> None:
    service = await start_service(server={"inbound_command_support_options": mask})
    client = await greeted(service)
    assert ("8BITMIME" in keywords(await client.command("EHLO client.test"))) is advertised
    assert (await client.command("MAIL FROM:<a@local.test> BODY=8BITMIME")).startswith(reply)
    await client.close()
