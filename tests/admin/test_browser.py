"""The web queue viewer in a real headless browser (Debian's chromium, driven by Playwright): a deferred
message is listed under its link; freezing the link from the page stops its delivery; thaw and retry deliver
it once the peer is back; a Badmail item replays; a screenshot of the queue page is kept as an artifact
(artifacts/queue-page.png, or $SMTPSVC_ARTIFACTS). Chromium is installed by .ci/run; without it this test
fails, it never skips."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from tests.admin.conftest import Admin
from tests.admin.test_api import deferred
from tests.conftest import wait_until

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",  # the tests run as root in CI
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",  # no calls home: the machine has no internet
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(os.environ.get("SMTPSVC_ARTIFACTS", Path(__file__).parents[2] / "artifacts"))


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise AssertionError("no chromium on PATH: `apt-get install chromium` (.ci/run does)")


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:  # Playwright gives chromium a fresh, empty profile of its own
        launched = await pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


async def sign_in(page: Page, admin: Admin) -> None:
    await page.goto(admin.url + "/")
    await expect(page.get_by_text("read-only")).to_be_visible()
    await page.get_by_role("link", name="sign in with the admin token").click()
    await page.get_by_label("Admin token").fill(admin.token)
    await page.get_by_role("button", name="sign in").click()
    await expect(page.get_by_text("signed in with the admin token")).to_be_visible()


async def test_the_queue_viewer_freezes_thaws_retries_and_replays(admin: Admin, browser: Browser) -> None:
    queue_id = await deferred(admin)
    service = admin.service
    page = await browser.new_page(viewport={"width": 1280, "height": 800})
    await sign_in(page, admin)

    link = page.locator('tbody[data-link="smarthost"]')
    await expect(link.locator("tr.link-row")).to_contain_text("retry")
    await expect(link.locator(f'tr[data-id="{queue_id}"]')).to_contain_text("x@remote.test")
    await expect(link.locator(f'tr[data-id="{queue_id}"]')).to_contain_text("450 4.3.2")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "queue-page.png"), full_page=True)

    # Freeze the link from the page: the peer comes back, yet nothing is delivered while it is frozen.
    await link.locator('button[name="freeze-link"]').click()
    await expect(page.get_by_role("status")).to_contain_text("link smarthost: freeze done")
    await expect(link.locator("tr.link-row")).to_contain_text("frozen")
    admin.sink.handler.defer_everything = False
    await link.locator('button[name="retry-link"]').click()
    await expect(page.get_by_role("status")).to_contain_text("is frozen; thaw it first")
    assert service.queue.next_due() is None and not admin.sink.messages

    # Thaw: the message waits for its next retry time; retry from the page delivers it now.
    await link.locator('button[name="thaw-link"]').click()
    await expect(link.locator("tr.link-row")).to_contain_text("retry")
    assert not admin.sink.messages
    await link.locator('button[name="retry-link"]').click()
    await wait_until(lambda: admin.sink.messages, what="delivery after thaw and retry from the page")
    await wait_until(lambda: not service.queue.list(), what="the queue to empty")
    await page.goto(admin.url + "/")
    await expect(page.locator("#empty-queue")).to_be_visible()

    # A Badmail item replays through Pickup from the page.
    bad = service.folders["badmail"]
    (bad / "B7.bad").write_bytes(b"From: <postmaster@relay.test>\r\nSubject: stuck report\r\n\r\nx\r\n")
    (bad / "B7.bdr").write_text("Unable to deliver the report. 5.1.1\r\n")
    (bad / "B7.bdp").write_text(json.dumps({"sender": "", "recipients": [{"address": "carol@local.test"}]}))
    await page.reload()
    row = page.locator('tr[data-badmail="B7"]')
    await expect(row).to_contain_text("5.1.1")
    await row.get_by_role("button", name="replay").click()
    await expect(page.get_by_role("status")).to_contain_text("Badmail B7 replayed")
    [dropped] = await wait_until(
        lambda: list(service.folders["drop"].glob("*.eml")), what="the replayed item"
    )
    assert b"X-Receiver: <carol@local.test>" in dropped.read_bytes()
    await page.reload()
    await expect(page.locator("#empty-badmail")).to_be_visible()
    await expect(page.locator("#events")).to_contain_text("Queue administration: link smarthost frozen")


async def test_the_message_page_shows_transcript_and_deletes_with_ndr(admin: Admin, browser: Browser) -> None:
    queue_id = await deferred(admin)
    page = await browser.new_page()
    await sign_in(page, admin)
    await page.get_by_role("link", name=queue_id).click()
    await expect(page.locator("#recipients")).to_contain_text("x@remote.test")
    await expect(page.locator("#transcript")).to_contain_text("RCPT TO:<x@remote.test>")
    await expect(page.locator("#headers")).to_contain_text("Subject: hello")
    page.on("dialog", lambda dialog: dialog.accept())
    await page.get_by_role("button", name="delete with NDR").click()
    await expect(page.get_by_role("status")).to_contain_text("an NDR goes to the sender")
    [ndr] = await wait_until(lambda: list(admin.service.folders["drop"].glob("*.eml")), what="the NDR")
    assert "Status: 4.3.2" in ndr.read_text()
