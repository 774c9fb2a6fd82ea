"""The named causes of a provider's login refusals (delivery/authcauses.py): a reply in, a cause out."""

from __future__ import annotations

import pytest

from smtpsvc.delivery.authcauses import diagnose, enhanced_status


@pytest.mark.parametrize(
    ("reply", "cause"),
    [
        ("550 5.7.30 Basic authentication is not supported for Client Submission.", "basic-auth-disabled"),
        ("535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox.",
         "smtp-auth-disabled-for-mailbox"),
        ("535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.",
         "smtp-auth-disabled-for-mailbox"),
        ("550 5.7.60 SMTP; Client does not have permissions to send as this sender", "sendas-denied"),
        ("554 5.2.0 STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied; Failed",
         "sendas-denied"),
        ("535 5.7.3 Authentication unsuccessful", None),  # a token or password problem: no named cause
        ("535-5.7.8 Username and Password not accepted.", None),
        ("550 5.1.1 User unknown", None),
        ("250 2.0.0 OK", None),
    ],
)  # fmt: skip
def test_diagnose(reply: str, cause: str | None) -> None:
    diagnosis = diagnose(reply)
    assert (diagnosis.cause if diagnosis else None) == cause


def test_an_explained_reply_keeps_the_reply_first_and_says_what_to_do() -> None:
    diagnosis = diagnose("550 5.7.30 Basic authentication is not supported for Client Submission.")
    assert diagnosis is not None
    explained = diagnosis.explain("550 5.7.30 Basic authentication is not supported for Client Submission.")
    assert explained.startswith(
        "550 5.7.30 Basic authentication"
    )  # still an SMTP reply (the NDR's smtp; code)
    assert "[basic-auth-disabled: " in explained and "[oauth.NAME]" in explained


@pytest.mark.parametrize(
    ("reply", "status"), [("535 5.7.3 x", "5.7.3"), ("535-5.7.8 x", "5.7.8"), ("535 failed", ""), ("", "")]
)
def test_enhanced_status(reply: str, status: str) -> None:
    assert enhanced_status(reply) == status
