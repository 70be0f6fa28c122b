"""Which tenant each Responses API answer belongs to, so that no tenant continues another's (`POST /v1/responses`).

Every tenant's requests go out under the gateway's one provider account, and OpenAI keeps each response (`store`
defaults to true) for 30 days, for anyone on that account who names its id: `previous_response_id` continues it,
its input and output included. So a tenant holding an id of another's (from a log, a trace, a support ticket)
would read that conversation back through its own key. Here, each Responses answer the gateway passes on is
recorded in the store under its tenant (`record_key`), and a request that names a `previous_response_id` not
recorded for its own tenant gets OpenAI's own answer for an unknown one (400 `previous_response_not_found`),
which names no other tenant, and is never forwarded.

State the gateway cannot tie to a tenant is refused (400, naming the field): a `conversation` (an id of the
Conversations API, which the gateway does not serve: such an id was made outside it, under the provider's key)
and an item reference (a stored item named by id, another response's as well): an input item of type
`item_reference`, or one with no `type` (or null, whose default that type is) naming an `id` that is not a message.

Called by `stages.Authorize` for the Responses endpoint only, and only under `auth: keys` where callers may belong
to different tenants (the policy names more than one, or `dynamic_keys` is on): under `auth: none` every caller is
the one tenant, `anonymous`, and with one tenant named there is nothing to keep apart either, so nothing is
checked or recorded (and a continuation then works with `--workers` on the memory store). A response made while
there was one tenant is recorded for no one: once a reload names a second, it cannot be continued.
Other endpoints pay one comparison. A Responses answer costs one store write (none with `store:
false`: the upstream keeps nothing), a streamed one a second at its end (the record's value, the answer's size in
tokens, known once its usage came); a continuation, one read. The write is awaited before the answer (or,
streamed, its first event naming the response) reaches the client, so that the id can be continued as soon as
the client has it, on any replica sharing the store.

With the store down: a continuation cannot be checked, so it gets 503 `store_unavailable` with `Retry-After: 1`
whatever `state.on_unavailable` says, as a run-time key a replica has not seen does (`auth.dynamic`): an
unchecked id would be the very leak this module stops. A new response is served all the same (it is made and
paid for), but its owner is not recorded: continuing it later gets 400 (send the conversation whole in `input`).
"""

from __future__ import annotations

import hashlib
import logging
from base64 import urlsafe_b64encode
from typing import Any

import msgspec

from ..errors import GatewayError, InvalidRequest, Unsupported
from ..schemas.events import Chunk, StreamEvent
from ..schemas.openai import MAX_USAGE_TOKENS
from ..store.base import StoreUnavailable
from .context import Reply, RequestContext
from .runner import Next
from .streams import StreamEnd

__all__ = ["OWNER_TTL_S", "ResponseStoreUnavailable", "guarded", "record_key"]

log = logging.getLogger("gateway.responses")

OWNER_TTL_S = 30 * 86_400.0
"""How long a response's owner is kept: as long as OpenAI keeps a stored response (30 days), so that whatever
the upstream can still continue, its tenant can. About 150 to 200 bytes of Redis memory per Responses answer
(the key prefix included)."""


class ResponseStoreUnavailable(GatewayError):
    """503: the store that records whose each response is did not answer; the continuation was not checked."""

    status = 503
    type = "server_error"
    code = "store_unavailable"


class _IdPeek(msgspec.Struct):
    id: Any = None


class _EventPeek(msgspec.Struct):
    """A stream event, as far as this module reads it: the response it names (`response.created`, ...)."""

    response: _IdPeek | None = None


_peek_answer = msgspec.json.Decoder(_IdPeek).decode
_peek_event = msgspec.json.Decoder(_EventPeek).decode


def record_key(tenant: str, response_id: str) -> str:
    """The record of `tenant`'s response: length-prefixed (no tenant name can forge another's key); the id hashed,
    so that the key's length is bounded whatever a client sends, and the store holds no id one could continue."""
    digest = urlsafe_b64encode(hashlib.blake2b(response_id.encode(errors="surrogatepass"), digest_size=16).digest())
    return f"resp:{len(tenant)}:{tenant}:{digest.decode()}"


async def guarded(ctx: RequestContext, call_next: Next) -> Reply:
    """A Responses request of a keyed tenant: its references to upstream state checked, its answer recorded."""
    body = ctx.body
    tenant = ctx.tenant
    _refuse_untied(body)
    previous = body.get("previous_response_id")
    if previous is not None:
        await _check(ctx, tenant, previous)
    reply = await call_next(ctx)
    if reply.status != 200 or body.get("store") is False:
        return reply
    if reply.stream is not None:
        reply.stream.add(_RecordFirstId(tenant))
    elif reply.body is not None:
        await _record(ctx, tenant, _answer_id(reply.body), _size(ctx))
    return reply


def _refuse_untied(body: dict[str, Any]) -> None:
    if body.get("conversation") is not None:
        raise Unsupported(
            "`conversation` is not supported by this gateway: it does not serve the Conversations API, so it cannot "
            "tell whose conversation this is. Chain responses with `previous_response_id`, or send the conversation "
            "in `input`.", param="conversation")
    items = body.get("input")
    if type(items) is list:  # (a list of objects: ingress checked it)
        for at, item in enumerate(items):
            if _names_a_stored_item(item):
                raise Unsupported(
                    "input items of type `item_reference` (or with no `type` that name an item by `id`) are not "
                    "supported by this gateway: it cannot tell whose stored item this is. Send the item itself.",
                    param=f"input[{at}]")


def _names_a_stored_item(item: dict[str, Any]) -> bool:
    """An item reference, which OpenAI resolves against the provider account's stored items, whoever's: `type:
    "item_reference"`, or no `type` (or null: the type's default is `item_reference`, OpenAI's schema and SDKs
    send `{"id": ...}` alone) on an item with an `id` that is not a message (a `role` and its `content`: a message
    may leave out its `type` too, and carries its text itself)."""
    kind: object = item.get("type")
    if kind is None:
        return "id" in item and not ("role" in item and "content" in item)
    return kind == "item_reference"


async def _check(ctx: RequestContext, tenant: str, previous: Any) -> None:
    if type(previous) is not str or not previous:
        raise InvalidRequest("`previous_response_id` must be a response's id (a non-empty string)",
                             param="previous_response_id")
    try:
        owned = await ctx.runtime.store.get(record_key(tenant, previous))
    except StoreUnavailable as exc:
        raise ResponseStoreUnavailable("the gateway's store did not answer, so `previous_response_id` could not be "
                                       "checked; retry shortly", headers={"Retry-After": "1"}) from exc
    if owned is None:  # never made for this tenant (another's, expired, `store: false`, or unknown): OpenAI's words
        raise InvalidRequest(f"Previous response with id '{_printable(previous)}' not found.",
                             param="previous_response_id", code="previous_response_not_found")
    if owned.isdigit():  # its size (`_size`): what the upstream bills this request's input at least
        ctx.continued_tokens = min(int(owned), MAX_USAGE_TOKENS)


def _answer_id(body: bytes) -> Any:
    try:
        return _peek_answer(body).id
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def _size(ctx: RequestContext) -> int:
    """The tokens of the context a continuation of this answer carries at the upstream: its input and its output
    (which the upstream bills as the continuation's input), as far as they are known (else 1)."""
    usage = ctx.usage
    if usage is None or not usage.usable():
        return 1
    return max(1, usage.prompt_tokens + usage.completion_tokens)


async def _record(ctx: RequestContext, tenant: str, response_id: Any, size: int = 1) -> None:
    """The record's value is the answer's size in tokens (`_size`): a continuation's bill, when the upstream's
    usage never comes (the client left first), counts at least that as its input (`ctx.continued_tokens`)."""
    if type(response_id) is not str or not response_id:
        return
    try:
        await ctx.runtime.store.set(record_key(tenant, response_id), str(size).encode(), OWNER_TTL_S)
    except StoreUnavailable:  # the answer is made and paid for: served; only its continuation will be refused
        log.warning("a response's owner was not recorded (the store did not answer): it cannot be continued",
                    extra={"fields": {"request_id": ctx.request_id}})


class _RecordFirstId:
    """A streamed answer's stage: records the response the first event naming one names (`response.created`, at
    OpenAI), before that event goes on to the client; then only passes batches."""

    __slots__ = ("done", "tenant")
    reads_events = True

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self.done: Any = False  # then the id recorded

    async def on_events(self, ctx: RequestContext, events: list[StreamEvent]) -> list[StreamEvent]:
        if self.done:
            return events
        for event in events:
            if type(event) is Chunk:
                response_id = _event_response_id(event.payload)
                if response_id is not None:
                    self.done = response_id
                    await _record(ctx, self.tenant, response_id)
                    break
        return events

    async def on_end(self, ctx: RequestContext, end: StreamEnd) -> None:
        """The record again, with the answer's size, once its usage came (a second write, at the stream's end)."""
        if self.done is not False and end.outcome == "done" and ctx.usage is not None:
            await _record(ctx, self.tenant, self.done, _size(ctx))


def _event_response_id(payload: bytes) -> Any:
    try:
        response = _peek_event(payload).response
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return response.id if response is not None else None


def _printable(text: str) -> str:
    short = text[:64]
    return "".join(c if c.isprintable() else "?" for c in short) + ("..." if len(text) > 64 else "")
