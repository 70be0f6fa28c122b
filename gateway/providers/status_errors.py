"""The client-facing error for an upstream's HTTP status, shared by every provider kind.

A status maps to the gateway error whose status, code and retry policy fit it: a 429 is rate limited (its wait
passed on), a 400 naming the context window is `context_length_exceeded` (routing may fall back to a larger
window), a 3xx is the upstream's failure (never followed), a 401 or 403 the gateway's credentials rejected, a 402
(Payment Required: Gemini's prepaid account out of credit, an OpenAI-compatible reseller's) the gateway's account.
"""

from __future__ import annotations

import re

from ..errors import (
    BodyTooLarge,
    ContextLengthExceeded,
    CredentialsRejected,
    GatewayError,
    InvalidRequest,
    RateLimited,
    UpstreamError,
    UpstreamTimeout,
    with_detail,
)
from ..upstream.retry_after import retry_after_seconds, wait_headers

__all__ = ["status_error"]

# How OpenAI, vLLM, Azure, Anthropic and others word a prompt that does not fit the model's window (Anthropic's
# "prompt is too long: ..." and "input length and `max_tokens` exceed context limit: 199759 + 4096 > 200000").
_CONTEXT_LENGTH = re.compile(r"context[ _]length|context window|context limit|maximum context|prompt is too long",
                             re.IGNORECASE)


def status_error(
    provider: str, status: int, detail: str, retry_after: str | float | None, code: str | None = None,
    raw: str = "",
) -> GatewayError:
    """The client-facing error for an upstream's HTTP status (`detail` already sanitized; `code` and `raw`,
    the upstream's own error code and message, are only read to recognise a context window overflow), with
    the upstream's wait when it is a 429 or a server error: `retry_after` a `Retry-After` value as sent, or the
    seconds already read (`upstream_wait`), passed on as `Retry-After` and `retry-after-ms` (`wait_headers`)."""
    if status in (400, 413, 422) and (code == "context_length_exceeded" or _CONTEXT_LENGTH.search(raw[:2000])):
        return with_detail(ContextLengthExceeded, f"upstream `{provider}` rejected the request: the prompt exceeds its "
                           "context window", detail)
    hint = retry_after_seconds(retry_after) if isinstance(retry_after, str) else retry_after
    headers = wait_headers(hint) if hint is not None else {}
    if status == 429:
        return with_detail(RateLimited, f"upstream `{provider}` is rate limited", detail, headers=headers)
    if 300 <= status < 400:  # not followed (`_send`); its body and Location are not repeated: they name a host
        return UpstreamError(f"upstream `{provider}` answered with a redirect (HTTP {status}), which the gateway "
                             "does not follow")
    if status in (400, 422):
        return with_detail(InvalidRequest, f"upstream `{provider}` rejected the request", detail)
    if status == 413:
        return BodyTooLarge(f"upstream `{provider}` rejected the request as too large")
    if status in (408, 504):
        return UpstreamTimeout(f"upstream `{provider}` timed out (HTTP {status})")
    if status in (401, 403):
        return CredentialsRejected(f"upstream `{provider}` rejected the gateway's credentials (HTTP {status})")
    if status == 402:  # the account that pays is the gateway's: the next target may serve (its message not repeated)
        return CredentialsRejected(f"upstream `{provider}` refused the gateway's account (HTTP 402): payment required")
    # A server error's Retry-After (a 503's above all) is the routing's wait before a retry, up to the target's
    # `retry_after_max_s`, and the client's when this is the answer it gets, as a 429's and a 529's are.
    return with_detail(UpstreamError, f"upstream `{provider}` failed with HTTP {status}", detail,
                       headers=headers if status >= 500 else None)
