"""What a smart host's reply about our login means, and what the operator does about it: the named causes of
Microsoft 365's and Google's refusals (pure: a reply in, a cause and a line of advice out).

The cause goes into the events (4006, 4000, 7004); the advice is appended to the reply that becomes the
recipient's last error (`queue show`, the NDR), so whoever reads either knows what to change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from smtpsvc.tokens import CAUSE_TOKEN_FAILED

BASIC_AUTH_DISABLED = "basic-auth-disabled"
SMTP_AUTH_DISABLED_FOR_MAILBOX = "smtp-auth-disabled-for-mailbox"
SENDAS_DENIED = "sendas-denied"
OAUTH_TOKEN_FAILED = CAUSE_TOKEN_FAILED
OAUTH_TOKEN_REFUSED = "oauth-token-refused"

_ENHANCED = re.compile(r"\d{3}[ -]([245]\.\d{1,3}\.\d{1,3})\b")


@dataclass(frozen=True, slots=True)
class Diagnosis:
    cause: str
    advice: str

    def explain(self, reply: str) -> str:
        """The reply with the cause and what to do after it (the recipient's last error, the NDR text)."""
        return f"{reply} [{self.cause}: {self.advice}]"


BASIC_AUTH_ADVICE = (
    "Microsoft 365 no longer accepts a password for SMTP AUTH: configure an [oauth.NAME] profile and "
    'auth = { mechanism = "xoauth2", user = "<mailbox>", oauth = "NAME" }'
)
MAILBOX_ADVICE = (
    "enable SMTP AUTH for the mailbox: Set-CASMailbox -Identity <mailbox> -SmtpClientAuthenticationDisabled "
    "$false (tenant-wide: Set-TransportConfig -SmtpClientAuthenticationDisabled $false)"
)
SENDAS_ADVICE = (
    "the envelope sender (and From) is not a mailbox the login may send as: send from the login's mailbox, "
    "or grant it: Add-RecipientPermission -Identity <sender> -Trustee <login> -AccessRights SendAs"
)
TOKEN_REFUSED_ADVICE = (
    "the server refused a freshly issued token too: check that the application has SMTP.SendAsApp with "
    "admin consent, that its service principal is registered in Exchange Online (New-ServicePrincipal) and "
    "has FullAccess to the mailbox named by user (Add-MailboxPermission), and that user is that mailbox"
)


def enhanced_status(reply: str) -> str:
    """The enhanced status code of a reply text ("535 5.7.3 ..." → "5.7.3"), "" when it has none."""
    match = _ENHANCED.match(reply)
    return match.group(1) if match else ""


def diagnose(reply: str) -> Diagnosis | None:
    """The named cause of a reply to AUTH, MAIL or the data, when it is one of the providers' login
    refusals; None for anything else (the reply then speaks for itself)."""
    status = enhanced_status(reply)
    code = status[2:]
    lowered = reply.lower()
    if code == "7.30" or "basic authentication is not supported" in lowered:
        return Diagnosis(BASIC_AUTH_DISABLED, BASIC_AUTH_ADVICE)
    if code == "7.139" or "smtpclientauthentication is disabled" in lowered:
        return Diagnosis(SMTP_AUTH_DISABLED_FOR_MAILBOX, MAILBOX_ADVICE)
    if code == "7.60" or "sendasdenied" in lowered:
        return Diagnosis(SENDAS_DENIED, SENDAS_ADVICE)
    return None
