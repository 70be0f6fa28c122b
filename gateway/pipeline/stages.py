"""The core stages: ingress, auth, route, upstream call.

Telemetry, the outermost stage, lives in `telemetry.stage`. Later capabilities
(limits, guards, cache) are new stages placed between these, see
`docs/architecture.md`.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from ..auth.keys import VirtualKey
from ..errors import AuthenticationFailed, InvalidRequest, ModelNotFound, PermissionDenied
from ..policy.compiled import Policy
from ..providers.base import Call, ChunkStream
from .context import Reply, RequestContext
from .runner import Next
from .streams import StreamWatch

__all__ = ["Authenticate", "CallUpstream", "Ingress", "Route", "authenticate"]

_decode_json = msgspec.json.Decoder().decode


class Ingress:
    """Decode and check the body: a JSON object that fits the endpoint's schema."""

    name = "ingress"

    async def __call__(self, ctx: RequestContext, call_next: Next) -> Reply:
        ctx.body = decode_body(ctx)
        ctx.stream = ctx.endpoint.streams and ctx.body.get("stream") is True
        return await call_next(ctx)


def decode_body(ctx: RequestContext) -> dict[str, Any]:
    if not ctx.raw_body:
        raise InvalidRequest("the request body is empty; expected a JSON object")
    try:
        body = _decode_json(ctx.raw_body)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        reason = {UnicodeDecodeError: "not UTF-8", RecursionError: "nested too deeply"}.get(type(exc), str(exc))
        raise InvalidRequest(f"the request body is not valid JSON: {reason}") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    try:
        msgspec.convert(body, ctx.endpoint.request_type, str_keys=True)
    except msgspec.ValidationError as exc:
        message, _, where = str(exc).partition(" - at `$")
        param = where.rstrip("`").lstrip(".") or None
        raise InvalidRequest(f"invalid request: {message}" + (f" at `{param}`" if param else ""), param=param) from exc
    return body


class Authenticate:
    """Virtual key to tenant (401 when missing or unknown). `auth: none` lets everyone in."""

    name = "auth"

    async def __call__(self, ctx: RequestContext, call_next: Next) -> Reply:
        ctx.key = authenticate(ctx.runtime.policy, ctx.credential)
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


class Route:
    """Alias to its route and provider: 404 for an unknown alias, 403 for one the key may not use."""

    name = "route"

    async def __call__(self, ctx: RequestContext, call_next: Next) -> Reply:
        alias = ctx.body["model"]
        route = ctx.runtime.policy.models.get(alias)
        if route is None:
            raise ModelNotFound(f"the model `{_printable(alias)}` does not exist", param="model")
        if ctx.key is not None and not ctx.key.allows(alias):
            raise PermissionDenied(f"this key may not use the model `{alias}`", param="model")
        ctx.route = route
        ctx.provider = ctx.runtime.providers[route.provider]
        return await call_next(ctx)


def _printable(text: str) -> str:
    short = text[:64]
    return "".join(c if c.isprintable() else "?" for c in short) + ("..." if len(text) > 64 else "")


class CallUpstream:
    """The terminal stage: one call to the routed provider, timed."""

    name = "upstream"

    async def __call__(self, ctx: RequestContext, call_next: Next) -> Reply:
        assert ctx.route is not None and ctx.provider is not None
        call = Call(ctx.endpoint, {**ctx.body, "model": ctx.route.upstream_model}, ctx.stream, ctx.request_id)
        ctx.upstream_started = time.perf_counter()
        try:
            if ctx.stream:
                stream = await ctx.provider.open_stream(call)
                return Reply(stream=_tap(ctx, stream))
            completion = await ctx.provider.complete(call)
            ctx.usage = completion.usage
            return Reply(body=completion.body)
        finally:
            ctx.upstream_seconds = time.perf_counter() - ctx.upstream_started


def _tap(ctx: RequestContext, stream: ChunkStream) -> StreamWatch:
    """Follow a provider stream: first-chunk time, then usage and a mid-stream error at its end."""

    def on_chunk(chunk: bytes) -> None:
        if ctx.first_chunk_seconds is None:
            ctx.first_chunk_seconds = time.perf_counter() - ctx.started

    def on_end(reason: BaseException | None) -> None:
        ctx.upstream_seconds = time.perf_counter() - ctx.upstream_started
        ctx.usage = stream.usage
        if stream.error is not None:
            ctx.status, ctx.error_code = stream.error.status, stream.error.code

    return StreamWatch(stream, on_end, on_chunk)
