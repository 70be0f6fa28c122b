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

Two more handles name state the account keeps, whoever made it, and are checked the same way. An image generation
call sent back by its `id` without its `result` (`{"type": "image_generation_call", "id": "ig_..."}`, OpenAI's
multi-turn image editing) has OpenAI load the stored image of that id: the ids of the `image_generation_call` items
of each answer recorded are recorded with it (`image_key`), and such an item must name one of its own tenant's
(else 400, naming the item); one that carries its `result` is self-contained. A container named by id (a
`code_interpreter` tool's `container` string, a `shell` tool's `environment` of type `container_reference`) runs the
request's code in that container, among the files of whoever's code ran there before: the containers an answer's
code ran in (a `code_interpreter_call`'s `container_id`, a `shell_call`'s `environment.container_id`) are recorded
for its tenant (`container_key`), with `store: false` too (the container is made all the same), and a container
named by id, in a tool (`tools[i].container`, `tools[i].environment`: else 400 naming it) or in an input item (a
`code_interpreter_call`'s `container_id`, a `shell_call`'s `environment`, which OpenAI may run on in: `input[i]`),
must be one of its own tenant's. A `container` given as an object (`{"type": "auto", ...}`) makes a new one: it goes
on. Ids of state made through APIs the gateway does not serve (files, vector stores, skills, prompts: `file_id`,
`file_ids`, `vector_store_ids`, `skill_id`, `prompt.id`) are not checked: docs/security.md lists them.

Called by `stages.Authorize` for the Responses endpoint only, and only under `auth: keys` where callers may belong
to different tenants (the policy names more than one, or `dynamic_keys` is on): under `auth: none` every caller is
the one tenant, `anonymous`, and with one tenant named there is nothing to keep apart either, so nothing is checked
or recorded (and a continuation then works with `--workers` on the memory store). A response made while there was
one tenant is recorded for no one: once a reload names a second, it cannot be continued (nor its reasoning items and
images sent back by id, nor its containers named). Other endpoints pay one comparison. A Responses answer costs one
store write (none with `store: false`: the upstream keeps nothing, but for the containers its code ran in), a
streamed one a second at its end (the record's value, the answer's size in tokens, known once its usage came), and
one more key per reasoning item (at most `MAX_REASONING_IDS`), image and container (at most `MAX_HOSTED_IDS`) it
has, written with its owner record (streamed: with the batch of events naming it), overlapping (`_WRITES_AT_ONCE` at
a time); a continuation, or a request naming stored items or containers by id, one read (`get_many` for all); a
request naming none reads nothing. The write is awaited before the answer (or, streamed, the event naming the
response or the item) reaches the client, so that the id can be continued (or sent back, or its container named) as
soon as the client has it, on any replica sharing the store.

With the store down: a continuation (or a stored item or container named by id) cannot be checked, so it gets 503
`store_unavailable` with `Retry-After: 1` whatever `state.on_unavailable` says, as a run-time key a replica has not
seen does (`auth.dynamic`): an unchecked id would be the very leak this module stops. A new response is served all
the same (it is made and paid for), but its owner is not recorded: continuing it later gets 400 (send the
conversation whole in `input`), and neither are its reasoning items, images and containers (sent back or named
by id later: 400; send their `encrypted_content`, the image's `result`, or let the tool make a new container).
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

__all__ = [
    "MAX_HOSTED_IDS", "MAX_REASONING_IDS", "OWNER_TTL_S", "ResponseStoreUnavailable", "container_key", "guarded",
    "image_key", "reasoning_key", "record_key",
]

log = logging.getLogger("gateway.responses")

OWNER_TTL_S = 30 * 86_400.0
"""How long a response's owner is kept: as long as OpenAI keeps a stored response (30 days), so that whatever
the upstream can still continue, its tenant can. About 150 to 200 bytes of Redis memory per Responses answer
(the key prefix included). A reasoning item's record (`reasoning_key`) and an image's (`image_key`) are kept as long,
for as long as OpenAI keeps the item (with its response), at about as much memory each; a container's
(`container_key`) too, written again by each answer whose code runs in it (a container OpenAI keeps while it is used,
and drops after 20 idle minutes)."""

MAX_REASONING_IDS = 64
"""Reasoning items recorded per answer at most (an answer has one per reasoning step: one or a few as a rule): so
that an answer's records are bounded whatever the upstream sends. One beyond them, sent back by id, gets 400."""

MAX_HOSTED_IDS = 64
"""Images and containers recorded per answer at most, together (an answer has one image per generation, and one
container for all its code runs, as a rule): bounded as `MAX_REASONING_IDS`. One beyond them, named later, gets 400."""

_REASONING, _IMAGE, _CONTAINER = "reasoning", "image", "container"
"""What a handle on stored state names: a reasoning item, an image (its `image_generation_call`), a container."""

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
    """An output item, as far as this module reads it: what may name state a tenant names again later."""

    type: Any = None
    id: Any = None
    container_id: Any = None  # a `code_interpreter_call`'s
    environment: Any = None  # a `shell_call`'s: {"type": "container_reference", "container_id": ...}


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
_ITEM_WORDS = (b'"reasoning"', b'"image_generation_call"', b'"container_id"')
"""An answer (or an item event) without one of these (each a JSON string of its own) names nothing to record."""
_CONTAINER_WORDS = (b'"container_id"',)
"""The same, with `store: false`: only its containers outlive the answer."""


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


def image_key(tenant: str, item_id: str) -> str:
    """The record of `tenant`'s image (an `image_generation_call` item's id), as `reasoning_key` (`ig:`)."""
    return f"resp:ig:{len(tenant)}:{tenant}:{_digest(item_id)}"


def container_key(tenant: str, container_id: str) -> str:
    """The record of a container `tenant`'s code ran in, as `reasoning_key` (`cn:`)."""
    return f"resp:cn:{len(tenant)}:{tenant}:{_digest(container_id)}"


_KEY_OF = {_REASONING: reasoning_key, _IMAGE: image_key, _CONTAINER: container_key}


async def guarded(ctx: RequestContext, call_next: Next) -> Reply:
    """A Responses request of a keyed tenant: its references to upstream state checked, its answer recorded."""
    body = ctx.body
    tenant = ctx.tenant
    named = _refuse_untied(body)
    previous = body.get("previous_response_id")
    if previous is not None or named:
        await _check(ctx, tenant, previous, named)
    reply = await call_next(ctx)
    if reply.status != 200:
        return reply
    stored = body.get("store") is not False
    if reply.stream is not None:
        # (`store: false`: only a container outlives the answer, made only by a tool, or one a prompt brings)
        if stored or body.get("tools") or body.get("prompt") is not None:
            reply.stream.add(_RecordIds(tenant, stored))
    elif reply.body is not None:
        response_id, handles = _answer_ids(reply.body, stored)
        if stored:
            await _record(ctx, tenant, response_id, _size(ctx), handles)
        elif handles:
            await _record(ctx, tenant, None, handles=handles)
    return reply


def _refuse_untied(body: dict[str, Any]) -> dict[tuple[str, str], str] | None:
    """Refuses what cannot be tied to a tenant; answers the stored items and containers named by id (each, and the
    field that first names it), which `_check` checks are the tenant's own (None: none, the usual request)."""
    if body.get("conversation") is not None:
        raise Unsupported(
            "`conversation` is not supported by this gateway: it does not serve the Conversations API, so it cannot "
            "tell whose conversation this is. Chain responses with `previous_response_id`, or send the conversation "
            "in `input`.", param="conversation")
    items = body.get("input")
    named: dict[tuple[str, str], str] | None = None
    if type(items) is list:  # (a list of objects: ingress checked it)
        for at, item in enumerate(items):
            if _names_a_stored_item(item):
                raise Unsupported(
                    "input items of type `item_reference` (or with no `type` that name an item by `id`) are not "
                    "supported by this gateway: it cannot tell whose stored item this is. Send the item itself.",
                    param=f"input[{at}]")
            kind = item.get("type")
            if kind == "reasoning":
                if item.get("id") is not None and not _filled(item.get("encrypted_content")):
                    named = _name(named, _REASONING, item["id"], f"input[{at}]")  # OpenAI would load the stored item
            elif kind == "image_generation_call":
                if item.get("id") is not None and not _filled(item.get("result")):
                    named = _name(named, _IMAGE, item["id"], f"input[{at}]")  # OpenAI would load the stored image
            container = _container_named(item)
            if container is not None:
                named = _name(named, _CONTAINER, container, f"input[{at}]")
    tools = body.get("tools")
    if tools:  # (a list of objects: ingress checked it)
        for at, tool in enumerate(tools):
            container = tool.get("container")
            if type(container) is dict:  # `{"type": "auto", ...}`: a new container (unless it names one by id)
                container = container.get("container_id")
            if container is not None:  # (a code interpreter's container id)
                named = _name(named, _CONTAINER, container, f"tools[{at}].container")
            container = _container_named(tool)
            if container is not None:
                named = _name(named, _CONTAINER, container, f"tools[{at}].environment")
    return named


def _filled(value: Any) -> bool:
    """Whether an item carries its content itself (`encrypted_content`, an image's `result`): nothing stored read."""
    return type(value) is str and value != ""


def _container_named(item: dict[str, Any]) -> Any:
    """The container an input item or a tool names by id, if any: an item's `container_id` (a
    `code_interpreter_call`'s, whose container `{"type": "auto"}` may run on in), or its `environment`'s (a
    `shell_call`'s or a `shell` tool's, of type `container_reference`); None: none (a new one, or a local shell)."""
    container = item.get("container_id")
    if container is not None:
        return container
    environment = item.get("environment")
    if type(environment) is dict:
        return environment.get("container_id")
    return None


def _name(named: dict[tuple[str, str], str] | None, kind: str, value: Any,
          param: str) -> dict[tuple[str, str], str]:
    """`named` with the handle added (where it is first named); an id the gateway cannot have recorded (not a
    non-empty string: unhashable, or no id an answer has) is refused at once."""
    if type(value) is not str or not value:
        raise _not_recorded(kind, param)
    if named is None:
        named = {}
    named.setdefault((kind, value), param)
    return named


def _not_recorded(kind: str, param: str) -> Unsupported:
    """A stored item or container named by id that the gateway did not record for this tenant (another's, expired,
    made outside the gateway, or while the store was down): naming no one."""
    if kind == _IMAGE:
        message = (
            "this `image_generation_call` item is named by `id` without its `result`, and the gateway did not pass "
            "on an answer with it to this tenant, so it cannot tell whose stored image it is. Send the item with "
            "its `result` (the image, base64), or continue the response with `previous_response_id`.")
    elif kind == _CONTAINER:
        message = (
            "this names a container by id that no answer the gateway passed on to this tenant ran code in, so it "
            "cannot tell whose container (and files) it is. Let the tool make a new one (a code interpreter's "
            "`\"container\": {\"type\": \"auto\"}`, a shell's `environment` of type `container_auto`), or name one "
            "an answer to this tenant ran code in; leave out an input item that names another.")
    else:
        message = (
            "this reasoning item is named by `id` without its `encrypted_content`, and the gateway did not pass on "
            "an answer with it to this tenant, so it cannot tell whose stored item it is. Send the item's "
            "`encrypted_content` (request `include: [\"reasoning.encrypted_content\"]`), or continue the response "
            "with `previous_response_id`.")
    return Unsupported(message, param=param)


def _names_a_stored_item(item: dict[str, Any]) -> bool:
    """An item reference, which OpenAI resolves against the provider account's stored items, whoever's: `type:
    "item_reference"`, or no `type` (or null: the type's default is `item_reference`, OpenAI's schema and SDKs
    send `{"id": ...}` alone) on an item with an `id` that is not a message (a `role` and its `content`: a message
    may leave out its `type` too, and carries its text itself)."""
    kind: object = item.get("type")
    if kind is None:
        return "id" in item and not ("role" in item and "content" in item)
    return kind == "item_reference"


async def _check(ctx: RequestContext, tenant: str, previous: Any,
                 named: dict[tuple[str, str], str] | None) -> None:
    """The continued response and the items and containers named by id must be the tenant's own: one read for
    all; the first field naming one that is not, in the request's order, is the one refused."""
    keys: list[str] = []
    if previous is not None:
        if type(previous) is not str or not previous:
            raise InvalidRequest("`previous_response_id` must be a response's id (a non-empty string)",
                                 param="previous_response_id")
        keys.append(record_key(tenant, previous))
    if named:
        keys += [_KEY_OF[kind](tenant, value) for kind, value in named]
    store = ctx.runtime.store
    try:
        found = [await store.get(keys[0])] if len(keys) == 1 else await store.get_many(keys)
    except StoreUnavailable as exc:
        what = "`previous_response_id`" if previous is not None else "the stored items or containers named by id"
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
        for (kind, _), param, value in zip(named, named.values(), found[len(found) - len(named):], strict=True):
            if value is None:
                raise _not_recorded(kind, param)


def _answer_ids(body: bytes, stored: bool) -> tuple[Any, list[tuple[str, str]]]:
    """The answer's id, and what of its output items a tenant may name again (only an answer that has one of the
    words decodes its output items); with `store: false`, no id (nothing kept) and its containers alone."""
    words = _ITEM_WORDS if stored else _CONTAINER_WORDS
    if any(word in body for word in words):
        try:
            answer = _peek_answer_items(body)
        except (msgspec.DecodeError, msgspec.ValidationError):
            pass
        else:
            return (answer.id if stored else None), _handles(answer.output or (), stored)
    if not stored:
        return None, []
    try:
        return _peek_answer(body).id, []
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None, []


def _handles(items: Any, stored: bool) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    reasoning = hosted = 0
    for item in items:
        handle = _item_handle(item, stored)
        if handle is None or handle in found:
            continue
        if handle[0] == _REASONING:
            if reasoning == MAX_REASONING_IDS:
                continue
            reasoning += 1
        else:
            if hosted == MAX_HOSTED_IDS:
                continue
            hosted += 1
        found.append(handle)
    return found


def _item_handle(item: _ItemPeek, stored: bool) -> tuple[str, str] | None:
    """What an output item lets its tenant name by id later: a reasoning item, an image (kept with the response:
    not with `store: false`), or the container its code ran in (kept whatever `store` says)."""
    kind = item.type
    if kind == "reasoning" or kind == "image_generation_call":
        if stored and type(item.id) is str and item.id:
            return (_REASONING if kind == "reasoning" else _IMAGE), item.id
        return None
    container = item.container_id
    if container is None and type(item.environment) is dict:
        container = item.environment.get("container_id")
    return (_CONTAINER, container) if type(container) is str and container else None


def _size(ctx: RequestContext) -> int:
    """The tokens of the context a continuation of this answer carries at the upstream: its input and its output
    (which the upstream bills as the continuation's input), as far as they are known (else 1)."""
    usage = ctx.usage
    if usage is None or not usage.usable():
        return 1
    return max(1, usage.prompt_tokens + usage.completion_tokens)


async def _record(ctx: RequestContext, tenant: str, response_id: Any, size: int = 1,
                  handles: list[tuple[str, str]] | tuple[()] = ()) -> None:
    """The record's value is the answer's size in tokens (`_size`): a continuation's bill, when the upstream's
    usage never comes (the client left first), counts at least that as its input (`ctx.continued_tokens`). Its
    items' and containers' records (`reasoning_key`, `image_key`, `container_key`) are written with it, overlapping
    on a remote store."""
    records: list[tuple[str, bytes]] = []
    if type(response_id) is str and response_id:
        records.append((record_key(tenant, response_id), str(size).encode()))
    records += [(_KEY_OF[kind](tenant, value), b"1") for kind, value in handles]
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
        log.warning("a response's owner (or its items or containers) was not recorded (the store did not answer): "
                    "it cannot be continued", extra={"fields": {"request_id": ctx.request_id}})


class _RecordIds:
    """A streamed answer's stage: records the response the first event naming one names (`response.created`, at
    OpenAI), and each reasoning item, image and container its `response.output_item.added` (or `.done`) names,
    before that event goes on to the client. An event is decoded only until the response is named, and then only if
    it has both an output item event's type and one of `_ITEM_WORDS` (each a JSON string of its own: an escaped one
    in a text is not). With `store: false` (`stored` False) only containers are recorded: nothing else is kept."""

    __slots__ = ("done", "hosted", "reasoning", "stored", "tenant", "words")
    reads_events = True

    def __init__(self, tenant: str, stored: bool = True) -> None:
        self.tenant = tenant
        self.stored = stored
        self.words = _ITEM_WORDS if stored else _CONTAINER_WORDS
        self.done: Any = False  # then the id recorded
        self.reasoning: set[str] = set()  # the reasoning items recorded
        self.hosted: set[tuple[str, str]] = set()  # the images and containers recorded

    async def on_events(self, ctx: RequestContext, events: list[StreamEvent]) -> list[StreamEvent]:
        response_id = None
        handles: list[tuple[str, str]] = []
        for event in events:
            if type(event) is not Chunk:
                continue
            payload = event.payload
            if self.stored and self.done is False:
                response_id = _event_response_id(payload)
                if response_id is not None:
                    self.done = response_id
                    continue
            if b".output_item." in payload and any(word in payload for word in self.words):
                handle = _event_handle(payload, self.stored)
                if handle is None:
                    continue
                if handle[0] == _REASONING:
                    if handle[1] in self.reasoning or len(self.reasoning) == MAX_REASONING_IDS:
                        continue
                    self.reasoning.add(handle[1])
                else:
                    if handle in self.hosted or len(self.hosted) == MAX_HOSTED_IDS:
                        continue
                    self.hosted.add(handle)
                handles.append(handle)
        if response_id is not None or handles:  # one write (or a few, overlapping) for the batch
            await _record(ctx, self.tenant, response_id, handles=handles)
        return events

    async def on_end(self, ctx: RequestContext, end: StreamEnd) -> None:
        """The record again, with the answer's size, once its usage came (a second write, at the stream's end)."""
        if self.stored and self.done is not False and end.outcome == "done" and ctx.usage is not None:
            await _record(ctx, self.tenant, self.done, _size(ctx))


def _event_response_id(payload: bytes) -> Any:
    try:
        response = _peek_event(payload).response
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return response.id if response is not None else None


def _event_handle(payload: bytes, stored: bool) -> tuple[str, str] | None:
    try:
        event = _peek_item_event(payload)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    item = event.item
    if event.type not in _ITEM_EVENTS or item is None:
        return None
    return _item_handle(item, stored)
