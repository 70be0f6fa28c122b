"""Anthropic's 400s that refuse the gateway's account, not the client's request.

Anthropic answers an account that cannot be served with HTTP 400 `invalid_request_error`, the status of a request
the client got wrong: "Your credit balance is too low to access the Anthropic API...", "You have reached your
specified API usage limits. You will regain access on ...", "This organization has been disabled.". Read as the
client's fault, such a 400 was never retried on the alias's next target, counted as a success for the target's
circuit breaker, and told every tenant that its request was invalid until someone topped the account up. It is the
gateway's credential failing, as Gemini's 400 for a bad key is (`gemini._BAD_KEY`): a `CredentialsRejected`, which
routing falls back from at once and counts against the target's breaker (`routing.attempts.classify`).
"""

from __future__ import annotations

import re

from ..errors import CredentialsRejected

__all__ = ["anthropic_account_refusal"]

# Anthropic's wording for each account state, and what the error says of it (never the upstream's own text: it
# speaks to the account's owner, "Your credit balance", and would read as the tenant's).
_STATES = (
    (re.compile(r"credit\s+balance\s+is\s+too\s+low", re.IGNORECASE), "its credit balance is too low"),
    (re.compile(r"reached\s+your\s+specified\s+API\s+usage\s+limits", re.IGNORECASE), "its API usage limit is reached"),
    (re.compile(r"organization\s+has\s+been\s+disabled", re.IGNORECASE), "its organization is disabled"),
)
_READ = 2000  # how much of the message is searched (an upstream controls its length)


def anthropic_account_refusal(provider: str, status: int, message: str) -> CredentialsRejected | None:
    """The error for Anthropic's 400 whose `message` (the upstream's own, unsanitized) refuses the gateway's account,
    naming the provider and the account's state; None for any other answer (the client's error, mapped as usual)."""
    if status != 400 or not message:
        return None
    head = message[:_READ]
    for pattern, state in _STATES:
        if pattern.search(head):
            return CredentialsRejected(f"upstream `{provider}` refused the gateway's account (HTTP {status}): {state}")
    return None
