"""Anthropic's and Gemini's errors that refuse the gateway's account, not the client's request.

Anthropic answers an account that cannot be served with HTTP 400 `invalid_request_error`, the status of a request
the client got wrong: "Your credit balance is too low to access the Anthropic API...", "You have reached your
specified API usage limits. You will regain access on ...", "This organization has been disabled.". Read as the
client's fault, such a 400 was never retried on the alias's next target, counted as a success for the target's
circuit breaker, and told every tenant that its request was invalid until someone topped the account up. It is the
gateway's credential failing, as Gemini's 400 for a bad key is (`gemini._BAD_KEY`): a `CredentialsRejected`, which
routing falls back from at once and counts against the target's breaker (`routing.attempts.classify`).

Gemini does the same with other statuses: a 402 `RESOURCE_EXHAUSTED` for a prepaid account out of credit ("Your
prepayment credit balance is depleted"), and a 400 `FAILED_PRECONDITION` where the API is not served to the gateway's
network location or its project's free tier ("User location is not supported for the API use.", "Gemini API free
tier is not available in your country. Please enable billing..."). Those were a 502 that routing read as the
client's 4xx (no fallback, a success for the breaker) and a 400 `invalid_request_error` to every tenant.
"""

from __future__ import annotations

import re

from ..errors import CredentialsRejected

__all__ = ["anthropic_account_refusal", "gemini_account_refusal"]

# Each provider's wording for each account state, by the status it sends it with, and what the error says of it
# (never the upstream's own text: it speaks to the account's owner, "Your credit balance", and would read as the
# tenant's). Gemini's `FAILED_PRECONDITION` is also a file not yet processed: the client's, so its wording decides.
_State = tuple[re.Pattern[str], str]
_ANTHROPIC: dict[int, tuple[_State, ...]] = {
    400: ((re.compile(r"credit\s+balance\s+is\s+too\s+low", re.IGNORECASE), "its credit balance is too low"),
          (re.compile(r"reached\s+your\s+specified\s+API\s+usage\s+limits", re.IGNORECASE),
           "its API usage limit is reached"),
          (re.compile(r"organization\s+has\s+been\s+disabled", re.IGNORECASE), "its organization is disabled")),
}
_GEMINI: dict[int, tuple[_State, ...]] = {
    402: ((re.compile(r"prepayment\s+credit\s+balance\s+is\s+depleted", re.IGNORECASE),
           "its prepaid credit is depleted"),),
    400: ((re.compile(r"user\s+location\s+is\s+not\s+supported", re.IGNORECASE),
           "the API is not served to the gateway's location"),
          (re.compile(r"free\s+tier\s+is\s+not\s+available", re.IGNORECASE),
           "its free tier is not available in the gateway's country (billing is not enabled)")),
}
_READ = 2000  # how much of the message is searched (an upstream controls its length)


def anthropic_account_refusal(provider: str, status: int, message: str) -> CredentialsRejected | None:
    """The error for Anthropic's 400 whose `message` (the upstream's own, unsanitized) refuses the gateway's account,
    naming the provider and the account's state; None for any other answer (the client's error, mapped as usual)."""
    return _refusal(_ANTHROPIC, provider, status, message)


def gemini_account_refusal(provider: str, status: int, message: str) -> CredentialsRejected | None:
    """The error for Gemini's 402 or 400 whose `message` (the upstream's own, unsanitized) refuses the gateway's
    account or its location, naming the provider and that state; None for any other answer (a 402 of another wording
    is still the account's: `status_errors.status_error`)."""
    return _refusal(_GEMINI, provider, status, message)


def _refusal(table: dict[int, tuple[_State, ...]], provider: str, status: int, message: str,
             ) -> CredentialsRejected | None:
    states = table.get(status)
    if states is None or not message:
        return None
    head = message[:_READ]
    for pattern, state in states:
        if pattern.search(head):
            return CredentialsRejected(f"upstream `{provider}` refused the gateway's account (HTTP {status}): {state}")
    return None
