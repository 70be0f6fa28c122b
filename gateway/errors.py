"""The gateway's one error tree.

Every failure a client can see is a `GatewayError`. Each subclass fixes the HTTP
status and the OpenAI error `type`, so that the official SDKs raise the matching
exception class (`BadRequestError` for 400, `AuthenticationError` for 401, ...).
Foreign exceptions (transport, JSON, policy) are mapped to this tree at the
boundary where they happen and re-raised `from exc`; nothing else reaches the
client. Messages are written by the gateway, never copied from an upstream
without going through `sanitize.sanitize_upstream_message`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

if TYPE_CHECKING:
    from .schemas.openai import Usage

__all__ = [
    "AllTargetsFailed",
    "AmbiguousCredentials",
    "AuthenticationFailed",
    "BodyTooLarge",
    "BudgetExceeded",
    "ContentPolicyViolation",
    "ContextLengthExceeded",
    "CredentialsRejected",
    "GatewayBusy",
    "GatewayError",
    "HeadersTooLarge",
    "InternalError",
    "InvalidRequest",
    "KeyConflict",
    "KeysUnavailable",
    "LimitsUnavailable",
    "MethodNotAllowed",
    "ModelNotFound",
    "NoRoute",
    "NotFound",
    "PermissionDenied",
    "RateLimited",
    "ShuttingDown",
    "Unsupported",
    "UnusableAnswer",
    "UpstreamError",
    "UpstreamOverloaded",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "error_body",
    "with_detail",
]


class ErrorDetail(msgspec.Struct, omit_defaults=False):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorEnvelope(msgspec.Struct):
    error: ErrorDetail


_encoder = msgspec.json.Encoder()


class GatewayError(Exception):
    """Base of every client-visible error: a status, an OpenAI type, a safe message."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None
    # The upstream's HTTP status, when it answered with an error; or its answer's 2xx, when the answer was cut after its
    # head (`upstream.client.transport_error`: the upstream had the request and was sending, which it bills: `at_work`).
    upstream_status: int | None = None
    # `code` is the upstream's own (passed on to the client: `OpenAICompatProvider._pass_fields`), not one of the
    # gateway's: telemetry labels the error by its `type` instead (`label`), so an upstream cannot add series.
    passed_code: bool = False
    # The usage an upstream reported with an answer the gateway refused (Gemini's `MALFORMED_FUNCTION_CALL`, ...):
    # generated, so billed by the provider. Set by the translator that refused it; routing keeps it with the
    # attempt, and the request's cost counts it (`accounting.cost.request_cost`). A class attribute: no error
    # pays for it unless set.
    usage: Usage | None = None
    # The message without the upstream's own words where they were appended to it (`with_detail`), else None: what a
    # request with an enforcing output guard is told instead (`guards.stream.withhold`): an upstream's error may quote
    # the answer's text, which no guard reads. A class attribute: most errors hold no upstream words.
    bare: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.param, self.code)

    @property
    def label(self) -> str:
        """What the metrics and the access log call this error: its code, or its type (no code, or the
        upstream's own)."""
        return self.type if self.passed_code or not self.code else self.code


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class AmbiguousCredentials(InvalidRequest):
    """400: the request carries two different credentials (`Authorization`, `api-key`, `x-api-key`): whichever the
    gateway picked, a front proxy that adds its own would decide which tenant pays."""

    code = "ambiguous_credentials"

    def __init__(self) -> None:
        super().__init__("the request carries two different credentials (Authorization, api-key, x-api-key): send one")


class Unsupported(InvalidRequest):
    """400: the routed target's API has no equivalent for something the request asks (a field, a value), which
    another target of the alias may have: routing tries the next target, and answers this only when none could."""

    code = "unsupported_parameter"


class ContentPolicyViolation(GatewayError):
    """400: a guard blocked the request. The message names the guard and the entity types, never the text."""

    status = 400
    type = "invalid_request_error"
    code = "content_policy_violation"


class ContextLengthExceeded(InvalidRequest):
    """400: the upstream said the prompt does not fit its context window (routing may fall back)."""

    code = "context_length_exceeded"


class NoRoute(InvalidRequest):
    """400: a routing rule refuses this request (its message is the policy's)."""

    code = "no_route"


class BodyTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class HeadersTooLarge(GatewayError):
    status = 431
    type = "invalid_request_error"
    code = "headers_too_large"


class AuthenticationFailed(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status = 403
    type = "invalid_request_error"
    code = "model_not_allowed"


class ModelNotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RateLimited(GatewayError):
    """429: the upstream (or, later, the gateway's own limits) refused for rate."""

    status = 429
    type = "rate_limit_exceeded"
    code = "rate_limit_exceeded"


class UpstreamError(GatewayError):
    """502: the upstream failed, answered garbage or went away."""

    status = 502
    type = "upstream_error"
    code = "upstream_error"


class CredentialsRejected(UpstreamError):
    """502: the upstream refused the gateway's own credential or account (a 401, 402 or 403; Gemini's 400 for a bad key,
    or for a location or free tier it does not serve; Anthropic's 400 for an account out of credit or disabled), not
    the client's request: nothing the client can change, and the target is unusable until its key or account is
    fixed, so routing falls back to the next target and counts it against this one's breaker
    (`routing.attempts.classify`). Its message names the provider, the status and an account's state, never the key."""


class UnusableAnswer(UpstreamError):
    """502: the upstream answered, but the model's answer cannot be used (Gemini's `MALFORMED_FUNCTION_CALL`: a call
    that is not valid; `UNEXPECTED_TOOL_CALL`, `TOO_MANY_TOOL_CALLS`, `MALFORMED_RESPONSE`, `NO_IMAGE`, an empty answer
    with a reason that says nothing). Retried and fallen back from as any 502 (a second try usually succeeds), but a
    verdict of health for the target's circuit breaker, not against it: the model misbehaved, the endpoint served."""


class AnswerTooLarge(UpstreamError):
    """502: the upstream's complete answer passed its provider's `max_response_bytes` while it was read. The request
    itself asked for that much (2,048 inputs at 3,072 dimensions is an 80 MB embeddings answer), so every target
    and every retry would answer as large: not retried nor fallen back from, no verdict against the target's
    circuit breaker (it answered: one tenant's big requests must not open a breaker every tenant shares), and
    `x-should-retry: false` (`routing.attempts`). The upstream generated, and bills, the answer: accounting bills
    its prompt estimate, as for an answer waited for in vain."""

    code = "upstream_answer_too_large"


class AllTargetsFailed(UpstreamError):
    """502: every target of an alias was tried and failed (the message lists the attempts)."""

    code = "all_targets_failed"


class UpstreamTimeout(GatewayError):
    status = 504
    type = "timeout"
    code = "upstream_timeout"


class UpstreamConnectTimeout(UpstreamTimeout):
    """504: no connection to the upstream within its connect timeout (every attempt's, when several ran): the
    request was never sent, so the upstream did no work for it (accounting bills it nothing, where a request that
    timed out waiting for its answer is billed its prompt). Routing treats it as any timeout."""


class StreamDeadlinePassed(GatewayError):
    """504: a stream's exchange deadline (`total_s`) passed while the gateway was not waiting on the upstream but
    held by its own side (writing to a client that reads slowly: `upstream.read_timer`). The stream ends as it
    would at the upstream's timeout, but not as the upstream's failure: not an `UpstreamTimeout`, so the routing
    passes no verdict on the target (`routing.verdicts.stream_outcome`) and nothing retries it."""

    status = 504
    type = "timeout"
    code = "stream_deadline_passed"


class UpstreamUnavailable(UpstreamError):
    """502: could not connect to the upstream at all."""

    code = "upstream_unavailable"


class GatewayBusy(GatewayError):
    """503: the gateway cannot take this request now (a full upstream pool); retry shortly."""

    status = 503
    type = "server_error"
    code = "gateway_busy"


class ShuttingDown(GatewayError):
    """503: the gateway is draining for shutdown and cut this request at the deadline."""

    status = 503
    type = "server_error"
    code = "shutting_down"


class InternalError(GatewayError):
    """A bug in the gateway. The message is generic; details go to the log only."""

    status = 500
    type = "server_error"
    code = "internal_error"


# -- keys created at run time (admin API, `auth.dynamic`) ---------------------------------------------------


class KeysUnavailable(GatewayError):
    """503: the key store cannot be reached to check a key (or to change one); retry shortly."""

    status = 503
    type = "server_error"
    code = "key_store_unavailable"


class KeyConflict(GatewayError):
    """409: an admin change to a key collided with another (a name in use, a concurrent change, the key cap)."""

    status = 409
    type = "invalid_request_error"
    code = "conflict"


# -- providers (Anthropic, Azure, Gemini) --------------------------------------------------------------


class UpstreamOverloaded(UpstreamError):
    """503: the upstream says it is overloaded (Anthropic's 529 `overloaded_error`); routing retries it
    and falls back like any server error, and the client may retry."""

    status = 503
    code = "upstream_overloaded"


# -- accounting: limits and budgets (gateway/accounting/) ----------------------------------------------


class BudgetExceeded(RateLimited):
    """429: a hard budget (of the key, its tenant or the alias) has no room for this request."""

    code = "budget_exceeded"


class LimitsUnavailable(GatewayError):
    """503: the shared state that limits and budgets live in did not answer, and they fail closed."""

    status = 503
    type = "server_error"
    code = "limits_unavailable"


E = TypeVar("E", bound=GatewayError)


def with_detail(kind: type[E], base: str, detail: str, **kwargs: Any) -> E:
    """A `kind` error saying `base`, then the upstream's own words (`detail`, sanitized already) when it gave any;
    its `bare` message is `base` then (see `GatewayError.bare`)."""
    if not detail:
        return kind(base, **kwargs)
    error = kind(f"{base}: {detail}", **kwargs)
    error.bare = base
    return error


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> bytes:
    """The OpenAI error envelope, as bytes."""
    return _encoder.encode(ErrorEnvelope(ErrorDetail(message, type_, param, code)))
