"""The core stages, in pipeline order: admit, authenticate, ingress, authorize, select, call.

Telemetry, the outermost stage, lives in `telemetry.stage`. The key is checked
before the body is read or parsed, so a caller without a key learns nothing
about the parser. Authorization (may this key use this alias?) is apart from
target selection, so that a cache lookup can sit between them: after the key's
rights are known, before any upstream is chosen.

Every stage here but `Ingress` (which awaits the body) only looks before it passes the request
on: they return `call_next(ctx)` unawaited, one coroutine frame fewer each (`pipeline.runner`);
`Authorize` keeps a frame for a keyed Responses request only (`response_owners`, which records its answer).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import msgspec

from ..auth.dynamic import DynamicKeys, find_key
from ..auth.keys import VirtualKey
from ..errors import (
    AmbiguousCredentials,
    AuthenticationFailed,
    BodyTooLarge,
    GatewayBusy,
    HeadersTooLarge,
    InvalidRequest,
    MethodNotAllowed,
    ModelNotFound,
)
from ..policy.compiled import Policy
from ..sanitize import printable, validation_error
from ..schemas.endpoints import Endpoint
from ..schemas.openai import StreamOptions
from ..translate.common import MARKS
from .context import AMBIGUOUS, Reply, RequestContext
from .response_owners import guarded as owned_responses_only
from .runner import Next

if TYPE_CHECKING:
    from ..routing.router import Router
    from .streams import StreamEnd

__all__ = [
    "BODIES",
    "MAX_JSON_CONTAINERS",
    "MAX_JSON_DEPTH",
    "TOO_DEEP",
    "TOO_MANY_CONTAINERS",
    "Admit",
    "Authenticate",
    "Authorize",
    "BodiesInFlight",
    "CallUpstream",
    "Ingress",
    "SelectTarget",
    "authenticate",
    "check_containers",
    "check_depth",
    "model_not_found",
]

_decode_json = msgspec.json.Decoder().decode
# Arrays and objects a request body may nest (its own object is the first): every deeper one is a 400. Far more
# than any API's request needs, far less than what re-encoding it deeper in the stack could survive (Python's
# recursion limit, about 1,000 levels less the frames below). serde_json's default is the same 128.
MAX_JSON_DEPTH = 128
TOO_DEEP = f"the request body nests arrays and objects more than {MAX_JSON_DEPTH} deep"
# Arrays and objects a request body may hold in all: each costs the event loop about half a microsecond to decode
# and as much again to walk for its depth, all in one go (msgspec holds the GIL), so a 4 MiB body of 2 million empty
# arrays held every request of the process for seconds. Far more than any API's request needs (2,048 embedding
# inputs as token arrays are 2,049; a long agent conversation with its tools' schemas, a few thousand); at most
# some 30 ms of the loop.
MAX_JSON_CONTAINERS = 50_000
TOO_MANY_CONTAINERS = f"the request body holds more than {MAX_JSON_CONTAINERS} arrays and objects"


class BodiesInFlight:
    """The bytes of request bodies that requests in flight hold, in this process (`server.max_body_bytes_in_flight`).

    Process-wide, not per runtime: requests of a retiring runtime still hold theirs. A body counts from the
    moment it is read (its Content-Length before, when given) until its request ends: its reply returned by
    the pipeline, or its stream ended (`_BodyHeld`); `read_body` adds, the caller gives back.
    """

    __slots__ = ("held",)

    def __init__(self) -> None:
        self.held = 0


BODIES = BodiesInFlight()


class Admit:
    """Refuse what no endpoint serves: oversized headers (431), a method other than POST (405)."""

    name = "admit"

    def __call__(self, ctx: RequestContext, call_next: Next) -> Awaitable[Reply]:
        limit = ctx.runtime.policy.server.max_header_bytes  # `http_server` refuses larger heads before
        if ctx.head.header_bytes > limit:  # buffering them; this covers a server without it
            raise HeadersTooLarge(f"request headers exceed {limit} bytes")
        if ctx.head.method != "POST":
            path = "messages" if ctx.dialect is not None else ctx.endpoint.path  # (the client's path, not ours)
            raise MethodNotAllowed(f"use POST for /v1/{path}", headers={"Allow": "POST"})
        return call_next(ctx)


class Authenticate:
    """Virtual key to tenant (401 when missing or unknown). `auth: none` lets everyone in.

    With keys created at run time (`dynamic`), a key the policy does not list is looked up there
    (`auth.dynamic`); without them, authentication is the policy's key ring alone, no store call.
    """

    name = "auth"

    def __init__(self, dynamic: DynamicKeys | None = None) -> None:
        self.dynamic = dynamic

    def __call__(self, ctx: RequestContext, call_next: Next) -> Awaitable[Reply]:
        if ctx.head.credential is AMBIGUOUS:  # two different keys: which tenant pays must not be the gateway's guess
            raise AmbiguousCredentials()
        if self.dynamic is None:
            ctx.key = authenticate(ctx.runtime.policy, ctx.head.credential)
            return call_next(ctx)
        return self._dynamic(ctx, call_next, self.dynamic)

    @staticmethod
    async def _dynamic(ctx: RequestContext, call_next: Next, dynamic: DynamicKeys) -> Reply:
        ctx.key = await find_key(ctx.runtime.policy, ctx.head.credential, dynamic)
        return await call_next(ctx)


def authenticate(policy: Policy, credential: str | None) -> VirtualKey | None:
    """The key record for a presented credential; None under `auth: none`."""
    if policy.auth == "none":
        return None
    if not credential:
        raise AuthenticationFailed("missing API key: send it as `Authorization: Bearer <key>`", code="missing_api_key")
    key = policy.keys.find(credential)
    if key is None:
        raise AuthenticationFailed("invalid API key")
    return key


class Ingress:
    """Read the body (size limit), decode it, check it against the endpoint's schema, keep both forms.

    The body's bytes count as held in flight (`BODIES`) until the request ends: here when the pipeline
    returns a whole reply or fails, at the end of its stream otherwise."""

    name = "ingress"

    async def __call__(self, ctx: RequestContext, call_next: Next) -> Reply:
        server = ctx.runtime.policy.server
        raw = ctx.raw_body = await read_body(ctx.receive, ctx.head.content_length, server.max_body_bytes,
                                             server.max_body_bytes_in_flight)
        try:
            ctx.lifecycle.watch(ctx.receive)  # from here to the last byte, a client that leaves cancels the request
            if ctx.dialect is None:
                ctx.body, ctx.request = decode_body(raw, ctx.endpoint)
            else:  # another API's request (Anthropic's Messages): translated once, here, into the internal one
                ctx.body, ctx.request = ctx.dialect.decode(raw, ctx.head.raw_headers)
            if ctx.endpoint.streams:
                ctx.stream = getattr(ctx.request, "stream", False) is True
                options = getattr(ctx.request, "stream_options", None)
                ctx.wants_usage = isinstance(options, StreamOptions) and options.include_usage is True
            reply = await call_next(ctx)
        except BaseException:
            BODIES.held -= len(raw)
            raise
        if reply.stream is None:
            BODIES.held -= len(raw)
        else:
            reply.stream.add(_BodyHeld(len(raw)))
        return reply


class _BodyHeld:
    """A streamed reply's end hook: its request's body is no longer held in flight."""

    __slots__ = ("size",)
    reads_events = False

    def __init__(self, size: int) -> None:
        self.size = size

    async def on_events(self, ctx: RequestContext, events: list[Any]) -> list[Any]:
        return events

    async def on_end(self, ctx: RequestContext, end: StreamEnd) -> None:
        BODIES.held -= self.size


class ClientGone(Exception):
    """The client closed the connection before its body arrived."""


async def read_body(receive: Any, content_length: int | None, limit: int, held_limit: int) -> bytes:
    """The request body: 413 past `limit` bytes; 503 when holding it would take the bytes of bodies in flight
    past `held_limit` while another body is held (before reading it when its Content-Length says so, else
    as it arrives). Its bytes are added to `BODIES.held` as they arrive, not as its Content-Length declares
    them: a few heads declaring the largest bodies and sending none held the whole bound, and every other request
    got the 503, until their body timeouts. The caller takes `len(body)` off when done with it (on any failure
    here, they are taken off here)."""
    bodies = BODIES
    claimed = 0
    if content_length is not None:
        if content_length < 0:
            raise InvalidRequest("invalid Content-Length header")
        if content_length > limit:
            raise BodyTooLarge(f"the request body exceeds the limit of {limit} bytes")
        held = bodies.held
        if held + content_length > held_limit and held:
            raise _too_many_bodies()
    chunks: list[bytes] = []
    size = 0
    try:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise BodyTooLarge(f"the request body exceeds the limit of {limit} bytes")
                held = bodies.held
                if held + len(chunk) > held_limit and held > claimed:
                    raise _too_many_bodies()
                bodies.held = held + len(chunk)
                claimed = size
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
    except BaseException:
        bodies.held -= claimed
        raise
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _too_many_bodies() -> GatewayBusy:
    return GatewayBusy("the gateway holds too many request bodies in flight; retry shortly", code="server_overloaded",
                       headers={"Retry-After": "1"})


_MISSING = re.compile(r"Object missing required field `([^`]+)`")


def decode_body(raw: bytes, endpoint: Endpoint) -> tuple[dict[str, Any], msgspec.Struct]:
    """The body as a dict (forwarded, unknown fields and all) and as the endpoint's typed struct."""
    if not raw:
        raise InvalidRequest("the request body is empty; expected a JSON object")
    check_containers(raw)
    try:
        body = _decode_json(raw)
    except RecursionError as exc:
        raise InvalidRequest(TOO_DEEP) from exc
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        reason = "not UTF-8" if isinstance(exc, UnicodeDecodeError) else str(exc)
        raise InvalidRequest(f"the request body is not valid JSON: {reason}") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    if not MARKS.isdisjoint(body):  # the gateway's own marks (`translate.common.MARKS`): one C call a request
        field = min(MARKS.intersection(body))
        raise InvalidRequest(f"`{field}` is the gateway's own field; a request may not set it", param=field)
    check_depth(raw, body)
    try:
        typed = msgspec.convert(body, endpoint.request_type, str_keys=True)
    except msgspec.ValidationError as exc:
        message, where = validation_error(exc)  # msgspec quotes the bad value: bounded, printable
        at = where or None
        param = at
        missing = _MISSING.match(message)  # a required field absent: the parameter is that field, where it belongs
        if missing is not None:
            param = f"{at}.{missing[1]}" if at else missing[1]
        raise InvalidRequest(f"invalid request: {message}" + (f" at `{at}`" if at else ""), param=param) from exc
    return body, typed


def check_containers(raw: bytes) -> None:
    """400 when `raw` holds more than `MAX_JSON_CONTAINERS` arrays and objects, before it is decoded.

    Free for a body shorter than twice the limit (each takes two bytes at least): nearly every body, one
    comparison. A longer one has its `[` and `{` bytes counted (in C: about 0.3 ms a MB each); only when those
    are more than the limit are the ones inside strings told apart (`_containers`).
    """
    if len(raw) > 2 * MAX_JSON_CONTAINERS and _containers(raw) > MAX_JSON_CONTAINERS:
        raise InvalidRequest(TOO_MANY_CONTAINERS)


def _containers(raw: bytes) -> int:
    """The `[` and `{` of `raw` outside its strings: its arrays and objects, when it is JSON at all.

    Escaped backslashes, then escaped quotes, are taken out, so that the quotes left delimit the strings: every
    other piece between them is outside one. All in C: a few ms a MB, at worst some 20 ms a MB for a body of
    nothing but one-character strings (which takes some 7 ms a MB to decode).
    """
    count = raw.count(b"[") + raw.count(b"{")
    if count <= MAX_JSON_CONTAINERS:
        return count
    outside = b"".join(raw.replace(b"\\\\", b"").replace(b'\\"', b"").split(b'"')[::2])
    return outside.count(b"[") + outside.count(b"{")


def check_depth(raw: bytes, body: Any) -> None:
    """400 when `body`, decoded from `raw`, nests arrays and objects more than `MAX_JSON_DEPTH` deep.

    Cheap for nearly every body: one shorter than twice the limit, or holding no more `{` and `[` bytes
    than the limit (found with memchr), cannot be that deep; only the others are walked, level by level.
    """
    deeper = MAX_JSON_DEPTH + 1
    if len(raw) >= 2 * deeper and _openers_reach(raw, deeper) and _deeper_than(body, MAX_JSON_DEPTH):
        raise InvalidRequest(TOO_DEEP)


def _openers_reach(raw: bytes, count: int) -> bool:
    for opener in b"{[":
        at = raw.find(opener)
        while at >= 0:
            count -= 1
            if count <= 0:
                return True
            at = raw.find(opener, at + 1)
    return False


def _deeper_than(value: Any, depth: int) -> bool:
    level = [value]
    for _ in range(depth):
        level = [item for outer in level for item in (outer.values() if type(outer) is dict else outer)
                 if type(item) is dict or type(item) is list]
        if not level:
            return False
    return True


class Authorize:
    """Alias to its route, if this key may use it. An alias that does not exist and one the key
    may not use get the same 404, as OpenAI answers, so that a key cannot enumerate aliases.

    A keyed Responses request may also use only its own tenant's responses kept at the upstream, where
    callers may belong to different tenants (`response_owners`: checked here, before limits, guards or
    cache see it; its answer recorded)."""

    name = "authorize"

    def __call__(self, ctx: RequestContext, call_next: Next) -> Awaitable[Reply]:
        alias = ctx.body["model"]
        route = ctx.runtime.policy.models.get(alias)
        key = ctx.key
        if route is None or (key is not None and not key.allows(alias)):
            raise model_not_found(alias)
        ctx.route = route
        if ctx.endpoint is _RESPONSES and key is not None and _tenants_apart(ctx.runtime.policy):
            return owned_responses_only(ctx, call_next)
        return call_next(ctx)


_RESPONSES = Endpoint.RESPONSES


def _tenants_apart(policy: Any) -> bool:
    """Whether callers may belong to different tenants: the policy names more than one, or keys are made at run
    time (each with a tenant of its own). With one tenant there is no one to keep its responses from, and a
    continuation must not depend on which worker of a memory store made the response."""
    return len(policy.tenant_names) > 1 or policy.dynamic_keys.enabled


def model_not_found(alias: str) -> ModelNotFound:
    return ModelNotFound(
        f"The model `{printable(alias)}` does not exist or you do not have access to it.", param="model",
    )


class SelectTarget:
    """Rules, then the alias's strategy: the candidate targets in the order to try them (`routing`)."""

    name = "select"

    def __init__(self, router: Router) -> None:
        self.router = router

    def __call__(self, ctx: RequestContext, call_next: Next) -> Awaitable[Reply]:
        self.router.select(ctx)
        return call_next(ctx)


class CallUpstream:
    """The terminal stage: the candidates, with retries and fallbacks, until one answers (`routing`)."""

    name = "upstream"

    def __init__(self, router: Router) -> None:
        self.router = router

    def __call__(self, ctx: RequestContext, call_next: Next) -> Awaitable[Reply]:
        return self.router.call(ctx)
