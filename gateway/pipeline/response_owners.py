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

A reasoning item sent back by its `id` alone (no `encrypted_content`) is an item reference too: OpenAI loads the
stored reasoning of that id (whoever's answer made it) into the request's context. Refusing it would break the usual
tool loop, whose client appends an answer's `output` (its reasoning items included) to its next `input`; so the ids
of the reasoning items of each answer recorded are recorded with it, under its tenant (`reasoning_key`), and a
reasoning item with an `id` and no `encrypted_content` must name one of its own tenant's (else 400, naming the item).
One that carries its `encrypted_content` is self-contained (OpenAI decrypts it; nothing stored is read): it goes on.

Called by `stages.Authorize` for the Responses endpoint only, and only under `auth: keys` where callers may belong
to different tenants (the policy names more than one, or `dynamic_keys` is on): under `auth: none` every caller is
the one tenant, `anonymous`, and with one tenant named there is nothing to keep apart either, so nothing is checked
or recorded (and a continuation then works with `--workers` on the memory store). A response made while there was
one tenant is recorded for no one: once a reload names a second, it cannot be continued (nor its reasoning items
sent back by id). Other endpoints pay one comparison. A Responses answer costs one store write (none with `store:
false`: the upstream keeps nothing), a streamed one a second at its end (the record's value, the answer's size in
tokens, known once its usage came), and one more key per reasoning item it has (at most `MAX_REASONING_IDS`),
written with its owner record (streamed: with the batch of events naming it), overlapping (`_WRITES_AT_ONCE` at a
time); a continuation, or a request sending reasoning items back by id, one read (`get_many` for both). The write is
awaited before the answer (or, streamed, the event naming the response or the reasoning item) reaches the client, so
that the id can be continued (or sent back) as soon as the client has it, on any replica sharing the store.

With the store down: a continuation (or a reasoning item sent back by id) cannot be checked, so it gets 503
`store_unavailable` with `Retry-After: 1` whatever `state.on_unavailable` says, as a run-time key a replica has not
seen does (`auth.dynamic`): an unchecked id would be the very leak this module stops. A new response is served all
the same (it is made and paid for), but its owner is not recorded: continuing it later gets 400 (send the
conversation whole in `input`), and neither are its reasoning items (sent back by id later: 400; send their
`encrypted_content`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from base64 import urlsafe_b64encode
from typing import Any

import msgspec

from ..errors import GatewayError, InvalidRequest, Unsupported
from ..sanitize import printable
from ..schemas.events import Chunk, StreamEvent
from ..schemas.openai import MAX_USAGE_TOKENS
from ..store.base import StoreUnavailable
from .context import Reply, RequestContext
from .runner import Next
from .streams import StreamEnd

__all__ = ["MAX_REASONING_IDS", "OWNER_TTL_S", "ResponseStoreUnavailable", "guarded", "reasoning_key", "record_key"]

log = logging.getLogger("gateway.responses")

OWNER_TTL_S = 30 * 86_400.0
"""How long a response's owner is kept: as long as OpenAI keeps a stored response (30 days), so that whatever
the upstream can still continue, its tenant can. About 150 to 200 bytes of Redis memory per Responses answer
(the key prefix included). A reasoning item's record (`reasoning_key`) is kept as long, for as long as OpenAI keeps
the item (with its response), at about as much memory each."""

MAX_REASONING_IDS = 64
"""Reasoning items recorded per answer at most (an answer has one per reasoning step: one or a few as a rule): so
that an answer's records are bounded whatever the upstream sends. One beyond them, sent back by id, gets 400."""

_WRITES_AT_ONCE = 8
"""A remote store's writes of one answer's records in flight together (one round trip's wait for them): no more,
so that an answer with many reasoning items does not take the connection pool's every connection."""


class ResponseStoreUnavailable(GatewayError):
    """503: the store that records whose each response is did not answer; the continuation was not checked."""

    status = 503
    type = "server_error"
    code = "store_unavailable"


class _IdPeek(msgspec.Struct):
    id: Any = None


class _ItemPeek(msgspec.Struct):
    type: Any = None
    id: Any = None


class _AnswerPeek(msgspec.Struct):
    """An answer, as far as this module reads it: its id and its output items' types and ids."""

    id: Any = None
    output: list[_ItemPeek] | None = None


class _EventPeek(msgspec.Struct):
    """A stream event, as far as this module reads it: the response it names (`response.created`, ...)."""

    response: _IdPeek | None = None


class _ItemEventPeek(msgspec.Struct):
    """A stream event naming an output item (`response.output_item.added`, `.done`): its type and the item's."""

    type: Any = None
    item: _ItemPeek | None = None


_peek_answer = msgspec.json.Decoder(_IdPeek).decode
_peek_answer_items = msgspec.json.Decoder(_AnswerPeek).decode
_peek_event = msgspec.json.Decoder(_EventPeek).decode
_peek_item_event = msgspec.json.Decoder(_ItemEventPeek).decode
_ITEM_EVENTS = ("response.output_item.added", "response.output_item.done")  # (a tuple: a type of any JSON value)


def _digest(upstream_id: str) -> str:
    return urlsafe_b64encode(
        hashlib.blake2b(upstream_id.encode(errors="surrogatepass"), digest_size=16).digest()).decode()


def record_key(tenant: str, response_id: str) -> str:
    """The record of `tenant`'s response: length-prefixed (no tenant name can forge another's key); the id hashed,
    so that the key's length is bounded whatever a client sends, and the store holds no id one could continue."""
    return f"resp:{len(tenant)}:{tenant}:{_digest(response_id)}"


def reasoning_key(tenant: str, item_id: str) -> str:
    """The record of `tenant`'s reasoning item, as `record_key` (`rs:`: apart from responses', whose keys go on with
    a length: a reasoning item's id never passes for a response's, nor the other way round)."""
    return f"resp:rs:{len(tenant)}:{tenant}:{_digest(item_id)}"


async def guarded(ctx: RequestContext, call_next: Next) -> Reply:
    """A Responses request of a keyed tenant: its references to upstream state checked, its answer recorded."""
    body = ctx.body
    tenant = ctx.tenant
    named = _refuse_untied(body)
    previous = body.get("previous_response_id")
    if previous is not None or named:
        await _check(ctx, tenant, previous, named)
    reply = await call_next(ctx)
    if reply.status != 200 or body.get("store") is False:
        return reply
    if reply.stream is not None:
        reply.stream.add(_RecordIds(tenant))
    elif reply.body is not None:
        response_id, reasoning = _answer_ids(reply.body)
        await _record(ctx, tenant, response_id, _size(ctx), reasoning)
    return reply


def _refuse_untied(body: dict[str, Any]) -> dict[Any, int] | None:
    """Refuses what cannot be tied to a tenant; answers the reasoning items named by id alone (each id, and where in
    `input` it first is), which `_check` checks are the tenant's own (None: none, the usual request)."""
    if body.get("conversation") is not None:
        raise Unsupported(
            "`conversation` is not supported by this gateway: it does not serve the Conversations API, so it cannot "
            "tell whose conversation this is. Chain responses with `previous_response_id`, or send the conversation "
            "in `input`.", param="conversation")
    items = body.get("input")
    named: dict[Any, int] | None = None
    if type(items) is list:  # (a list of objects: ingress checked it)
        for at, item in enumerate(items):
            if _names_a_stored_item(item):
                raise Unsupported(
                    "input items of type `item_reference` (or with no `type` that name an item by `id`) are not "
                    "supported by this gateway: it cannot tell whose stored item this is. Send the item itself.",
                    param=f"input[{at}]")
            if item.get("type") == "reasoning" and item.get("id") is not None:
                encrypted = item.get("encrypted_content")
                if type(encrypted) is not str or not encrypted:  # OpenAI would load the stored item of that id
                    item_id = item["id"]
                    if type(item_id) is not str or not item_id:  # (unhashable, or no id the gateway records)
                        raise _not_recorded(at)
                    if named is None:
                        named = {}
                    named.setdefault(item_id, at)
    return named


def _not_recorded(at: int) -> Unsupported:
    """A reasoning item named by id that the gateway did not record for this tenant (another's, expired, made
    outside the gateway, or while the store was down): naming no one."""
    return Unsupported(
        "this reasoning item is named by `id` without its `encrypted_content`, and the gateway did not pass on an "
        "answer with it to this tenant, so it cannot tell whose stored item it is. Send the item's "
        "`encrypted_content` (request `include: [\"reasoning.encrypted_content\"]`), or continue the response with "
        "`previous_response_id`.", param=f"input[{at}]")


def _names_a_stored_item(item: dict[str, Any]) -> bool:
    """An item reference, which OpenAI resolves against the provider account's stored items, whoever's: `type:
    "item_reference"`, or no `type` (or null: the type's default is `item_reference`, OpenAI's schema and SDKs
    send `{"id": ...}` alone) on an item with an `id` that is not a message (a `role` and its `content`: a message
    may leave out its `type` too, and carries its text itself)."""
    kind: object = item.get("type")
    if kind is None:
        return "id" in item and not ("role" in item and "content" in item)
    return kind == "item_reference"


async def _check(ctx: RequestContext, tenant: str, previous: Any, named: dict[Any, int] | None) -> None:
    """The continued response and the reasoning items named by id must be the tenant's own: one read for all."""
    keys: list[str] = []
    if previous is not None:
        if type(previous) is not str or not previous:
            raise InvalidRequest("`previous_response_id` must be a response's id (a non-empty string)",
                                 param="previous_response_id")
        keys.append(record_key(tenant, previous))
    if named:
        keys += [reasoning_key(tenant, item_id) for item_id in named]
    store = ctx.runtime.store
    try:
        found = [await store.get(keys[0])] if len(keys) == 1 else await store.get_many(keys)
    except StoreUnavailable as exc:
        what = "`previous_response_id`" if previous is not None else "the reasoning items named by `id`"
        raise ResponseStoreUnavailable(f"the gateway's store did not answer, so {what} could not be checked; retry "
                                       "shortly", headers={"Retry-After": "1"}) from exc
    if previous is not None:
        owned = found[0]
        if owned is None:  # never made for this tenant (another's, expired, `store: false`, unknown): OpenAI's words
            raise InvalidRequest(f"Previous response with id '{printable(previous)}' not found.",
                                 param="previous_response_id", code="previous_response_not_found")
        if owned.isdigit():  # its size (`_size`): what the upstream bills this request's input at least
            ctx.continued_tokens = min(int(owned), MAX_USAGE_TOKENS)
    if named:
        missing = [at for at, value in zip(named.values(), found[len(found) - len(named):], strict=True)
                   if value is None]
        if missing:
            raise _not_recorded(min(missing))


def _answer_ids(body: bytes) -> tuple[Any, list[str]]:
    """The answer's id, and its reasoning items' (only an answer that has the word decodes its output items)."""
    if b'"reasoning"' in body:
        try:
            answer = _peek_answer_items(body)
        except (msgspec.DecodeError, msgspec.ValidationError):
            pass
        else:
            return answer.id, _reasoning_ids(answer.output or ())
    try:
        return _peek_answer(body).id, []
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None, []


def _reasoning_ids(items: Any) -> list[str]:
    found: list[str] = []
    for item in items:
        if item.type == "reasoning" and type(item.id) is str and item.id and item.id not in found:
            found.append(item.id)
            if len(found) == MAX_REASONING_IDS:
                break
    return found


def _size(ctx: RequestContext) -> int:
    """The tokens of the context a continuation of this answer carries at the upstream: its input and its output
    (which the upstream bills as the continuation's input), as far as they are known (else 1)."""
    usage = ctx.usage
    if usage is None or not usage.usable():
        return 1
    return max(1, usage.prompt_tokens + usage.completion_tokens)


async def _record(ctx: RequestContext, tenant: str, response_id: Any, size: int = 1,
                  reasoning: list[str] | tuple[()] = ()) -> None:
    """The record's value is the answer's size in tokens (`_size`): a continuation's bill, when the upstream's
    usage never comes (the client left first), counts at least that as its input (`ctx.continued_tokens`). Its
    reasoning items' records (`reasoning_key`) are written with it, overlapping on a remote store."""
    records: list[tuple[str, bytes]] = []
    if type(response_id) is str and response_id:
        records.append((record_key(tenant, response_id), str(size).encode()))
    records += [(reasoning_key(tenant, item_id), b"1") for item_id in reasoning]
    store = ctx.runtime.store
    try:
        if len(records) == 1 or store.in_process:  # (nothing to overlap in memory)
            for key, value in records:
                await store.set(key, value, OWNER_TTL_S)
        else:
            for start in range(0, len(records), _WRITES_AT_ONCE):
                results = await asyncio.gather(
                    *(store.set(key, value, OWNER_TTL_S) for key, value in records[start:start + _WRITES_AT_ONCE]),
                    return_exceptions=True)
                for result in results:
                    if isinstance(result, BaseException):
                        raise result
    except StoreUnavailable:  # the answer is made and paid for: served; only its continuation will be refused
        log.warning("a response's owner (or its reasoning items) was not recorded (the store did not answer): it "
                    "cannot be continued", extra={"fields": {"request_id": ctx.request_id}})


class _RecordIds:
    """A streamed answer's stage: records the response the first event naming one names (`response.created`, at
    OpenAI), and each reasoning item its `response.output_item.added` (or `.done`) names, before that event goes on
    to the client. An event is decoded only until the response is named, and then only if it has both an output
    item event's type and the word `"reasoning"` (a JSON string of its own: an escaped one in a text is not)."""

    __slots__ = ("done", "reasoning", "tenant")
    reads_events = True

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self.done: Any = False  # then the id recorded
        self.reasoning: set[str] = set()  # the reasoning items recorded

    async def on_events(self, ctx: RequestContext, events: list[StreamEvent]) -> list[StreamEvent]:
        response_id = None
        reasoning: list[str] = []
        for event in events:
            if type(event) is not Chunk:
                continue
            payload = event.payload
            if self.done is False:
                response_id = _event_response_id(payload)
                if response_id is not None:
                    self.done = response_id
                    continue
            if b'"reasoning"' in payload and b".output_item." in payload:
                item_id = _event_reasoning_id(payload)
                if item_id is not None and item_id not in self.reasoning and len(self.reasoning) < MAX_REASONING_IDS:
                    self.reasoning.add(item_id)
                    reasoning.append(item_id)
        if response_id is not None or reasoning:  # one write (or a few, overlapping) for the batch
            await _record(ctx, self.tenant, response_id, reasoning=reasoning)
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


def _event_reasoning_id(payload: bytes) -> str | None:
    try:
        event = _peek_item_event(payload)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    item = event.item
    if event.type not in _ITEM_EVENTS or item is None or item.type != "reasoning":
        return None
    return item.id if type(item.id) is str and item.id else None
