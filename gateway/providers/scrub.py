"""Upstream error objects that reach a client inside the upstream's own bytes, scrubbed there.

Most upstream failures reach a client as the gateway's own error, the upstream's
message already through the provider's `sanitize` (`status_error`, a `StreamError`).
A few travel inside a body or an event that the gateway forwards as it is: a
Responses answer with `"status": "failed"` and its `error` object, a Responses
stream event whose `response` carries one (`response.failed`), and a 200 answer an
OpenAI-compatible server fills with `{"error": ...}` or writes as a flat error (`"object": "error"`, its
`message` beside it: vLLM's before 0.10 and other servers; the provider makes both its own error, a 502,
`OpenAICompatProvider._completion`). The strings of those error
objects go through the same `sanitize` here, so that no configured secret, internal
address or host name an upstream echoes reaches a client on any path
(docs/security.md); every other string of such a body or event, at any depth and keys
too, loses the configured secrets only (`unsecret`): an upstream may echo one beside its
error, and the shape rules would mangle the rest of an answer (ids, code, instructions).

A body or event is decoded and re-encoded only when one of its error strings
actually changes: a clean one, the common case, goes on byte for byte.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from ..schemas.openai import UsageChoicesPeek, UsagePeek
from ..schemas.responses import ResponsesEventPeek, ResponsesPeek

__all__ = ["AnswerChoicesPeek", "AnswerPeek", "ResponsesAnswerPeek", "ResponsesEventScrubPeek", "scrub_strings",
           "scrubbed_error"]

Sanitize = Callable[[object], str]

# How much of an error object is read. OpenAI's and the Responses API's errors are flat
# and hold four strings, Azure's `innererror` two levels and a dozen more. An upstream
# controls the shape, so the work is bounded: a container nested deeper than
# `_MAX_DEPTH` becomes null and a string past the first `_MAX_STRINGS` becomes "",
# rather than being walked (what is not read cannot be shown scrubbed).
_MAX_DEPTH = 8
_MAX_STRINGS = 64

_decode = msgspec.json.Decoder(dict[str, Any]).decode
_encode = msgspec.json.Encoder().encode


# The peeks the providers decode anyway, each with the `error` that may ride along, and the `object` and `message`
# of an error written flat (`{"object": "error", "message": ..., "type": ..., "code": ...}`): reading them costs no
# second pass over the body (`error` and `message` are absent, or null, and `object` a short string, in the common
# case). `object` and `message` are read as anything: an answer's own `object` of an unusual type is not malformed.


class AnswerPeek(UsagePeek):
    """A complete answer's usage, and the `{"error": ...}` or the flat error some OpenAI-compatible servers answer
    with a 200."""

    error: Any = None
    object: Any = None
    message: Any = None


class AnswerChoicesPeek(UsageChoicesPeek, gc=False):
    """`AnswerPeek` with the choices read too (`UsageChoicesPeek`)."""

    error: Any = None
    object: Any = None
    message: Any = None


class ResponsesAnswerPeek(ResponsesPeek):
    """A Responses answer (or the `response` of a stream event): its usage and its `error`, null unless it failed;
    `object` and `message` those of a flat error, which is no Response (whose `object` is `"response"`)."""

    error: Any = None
    object: Any = None
    message: Any = None


class ResponsesEventScrubPeek(ResponsesEventPeek):
    """A Responses stream event, with what may carry an upstream's error text: `response.error`, the
    `error` object some servers nest an `error` event's message in, and the `"object": "error"` of an error
    written flat (vLLM's before 0.10: its message beside it, its `type` the server's own)."""

    response: ResponsesAnswerPeek | None = None
    error: Any = None
    object: Any = None


def scrub_strings(value: Any, sanitize: Sanitize) -> bool:
    """Put every string inside `value` (a decoded JSON object or array) through `sanitize`, in place.

    Returns whether anything changed. Keys are left as they are (an error object's keys are the
    upstream's field names); past the bounds above, containers become null and strings ""."""
    return _scrub(value, sanitize, 0, [_MAX_STRINGS])


def _scrub(value: Any, sanitize: Sanitize, depth: int, budget: list[int]) -> bool:
    if isinstance(value, dict):
        keys: list[Any] | range = list(value)
    elif isinstance(value, list):
        keys = range(len(value))
    else:
        return False
    changed = False
    for key in keys:
        item = value[key]
        if isinstance(item, str):
            budget[0] -= 1
            clean = sanitize(item) if budget[0] >= 0 else ""
            if clean != item:
                value[key] = clean
                changed = True
        elif isinstance(item, (dict, list)):
            if depth >= _MAX_DEPTH:
                value[key] = None
                changed = True
            elif _scrub(item, sanitize, depth + 1, budget):
                changed = True
    return changed


def scrubbed_error(body: bytes, sanitize: Sanitize, unsecret: Callable[[str], str], within: str | None = None
                   ) -> bytes:
    """`body` (a JSON object) with its `error` (or `within`'s `error`) scrubbed (`sanitize`: credentials,
    addresses, key shapes), and every other string of it, keys included, at any depth, rid of the configured
    credentials alone (`unsecret`: an upstream may echo one in `detail`, `incomplete_details` or metadata; the shape
    rules would mangle an answer's ids, code or instructions); `body` itself when nothing changes. Raises msgspec's
    errors for a body that is not a JSON object (a `RecursionError` for one nested past the decoder's limit)."""
    data = _decode(body)
    holder = data.get(within) if within is not None else data
    if not isinstance(holder, dict):
        return body
    error = holder.get("error")
    if isinstance(error, str):
        holder["error"] = clean = sanitize(error)
        changed = clean != error
    else:
        changed = scrub_strings(error, sanitize)  # False for null, a number, a boolean
    if _unsecret(data, unsecret):  # (the error's strings again, clean already: its keys are what this adds)
        changed = True
    return _encode(data) if changed else body


def _unsecret(value: Any, unsecret: Callable[[str], str]) -> bool:
    """Every string inside `value` (a decoded JSON object or array), keys too, through `unsecret`, in place.

    No depth bound, unlike `_scrub`: an upstream echoes a request (its metadata, a tool's schema) at any
    depth, and what is not walked is not rid of a credential; nulling it would mangle an answer. The walk
    keeps its own stack, so no nesting the decoder accepted can exhaust Python's, and the body's size,
    capped by `max_response_bytes`, bounds the work."""
    changed = False
    pending = [value]
    while pending:
        container = pending.pop()
        keys: Any
        if isinstance(container, dict):
            keys = list(container)
            renamed = [unsecret(key) for key in keys]
            if renamed != keys:  # (rare: an echoed header map keyed by the credential) rebuilt, order kept
                items = list(container.values())
                container.clear()
                container.update(zip(renamed, items, strict=True))
                keys = renamed
                changed = True
        else:
            keys = range(len(container))
        for key in keys:
            item = container[key]
            if isinstance(item, str):
                clean = unsecret(item)
                if clean != item:
                    container[key] = clean
                    changed = True
            elif isinstance(item, (dict, list)):
                pending.append(item)
    return changed
