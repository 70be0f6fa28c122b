"""The non-proxied routes: model listing (in OpenAI's shape, or Anthropic's: `api/models.py`), health, readiness,
metrics."""

from __future__ import annotations

import hmac
from typing import Any, Protocol

import msgspec
from litestar import HttpMethod, Request, Response, get, route

from ..auth.dynamic import find_key
from ..errors import AmbiguousCredentials, AuthenticationFailed, GatewayError, NotFound
from ..guards.runtime import GuardRuntime
from ..pipeline.stages import authenticate, model_not_found
from ..policy.compiled import ModelRoute
from ..runtime import Runtime
from ..telemetry.metrics import CONTENT_TYPE, Metrics
from ..translate.anthropic_errors import anthropic_error_body
from .asgi import RequestHeaders, RequestIds, error_header_map
from .models import anthropic_client, anthropic_model, anthropic_page, openai_model

__all__ = ["OpsHost", "bearer_matches", "ops_routes"]

_encode = msgspec.json.Encoder().encode


class OpsHost(Protocol):
    """What these routes need from the gateway: handed in, never imported."""

    request_ids: RequestIds
    runtime: Runtime
    metrics: Metrics
    started: bool
    draining: bool
    last_reload: dict[str, Any] | None

    def acquire_runtime(self) -> Runtime:
        """The runtime in force, held until `release()`: a route that awaits (a store call) holds it so that a
        reload retires it only after the route is done, not with its store closed under it."""
        ...


def _json(data: Any, request_id: str, status: int = 200) -> Response[bytes]:
    return Response(_encode(data), status_code=status, media_type="application/json",
                    headers={"x-request-id": request_id})


def bearer_matches(headers: RequestHeaders, token: str | None) -> bool:
    """Constant-time check of a presented bearer token against a configured one."""
    presented = headers.credential
    if not token or presented is None:
        return False
    return hmac.compare_digest(presented.encode(), token.encode())


def ops_routes(host: OpsHost) -> list[Any]:
    """Route handlers bound to one gateway (closures over `host`, so several gateways can share a process)."""

    async def visible_models(headers: RequestHeaders) -> tuple[int, list[ModelRoute]]:
        """The runtime's `created` and the routes of the aliases the request's key may use, in policy order (no
        key or a wrong one is refused: `authenticate`)."""
        runtime = host.acquire_runtime()  # a key created at run time is looked up in its store
        try:
            if runtime.dynamic_keys is None:
                key = authenticate(runtime.policy, headers.credential)
            else:
                key = await find_key(runtime.policy, headers.credential, runtime.dynamic_keys)
            routes = [route for alias, route in runtime.policy.models.items() if key is None or key.allows(alias)]
            return runtime.created, routes
        finally:
            runtime.release()

    @get("/v1/models")
    async def list_models(request: Request[Any, Any, Any]) -> Response[bytes]:
        headers = RequestHeaders(request.scope["headers"], host.request_ids)
        if anthropic_client(request.scope["headers"]):
            return await anthropic_models(request, headers, None)
        created, routes = await visible_models(headers)
        return _json({"object": "list", "data": [openai_model(model, created) for model in routes]},
                     headers.request_id)

    @get("/v1/models/{model_id:path}")
    async def get_model(request: Request[Any, Any, Any], model_id: str) -> Response[bytes]:
        headers = RequestHeaders(request.scope["headers"], host.request_ids)
        wanted = model_id.lstrip("/")
        if anthropic_client(request.scope["headers"]):
            return await anthropic_models(request, headers, wanted)
        created, routes = await visible_models(headers)
        for model in routes:
            if model.alias == wanted:
                return _json(openai_model(model, created), headers.request_id)
        raise model_not_found(wanted)

    async def anthropic_models(request: Request[Any, Any, Any], headers: RequestHeaders,
                               wanted: str | None) -> Response[bytes]:
        """Anthropic's Models API: the list (`wanted` None) or one model; a refusal in Anthropic's envelope with
        `request-id`, as `/v1/messages` answers (the app's error handlers choose the envelope by the path alone)."""
        request_id = headers.request_id
        try:
            created, routes = await visible_models(headers)
            if wanted is None:
                body = anthropic_page(routes, created, request.query_params)
            else:
                model = next((model for model in routes if model.alias == wanted), None)
                if model is None:
                    raise model_not_found(wanted)
                body = anthropic_model(model, created)
        except GatewayError as error:
            return Response(anthropic_error_body(error, request_id), status_code=error.status,
                            media_type="application/json",
                            headers={**error_header_map(error, request_id), "request-id": request_id})
        return Response(_encode(body), media_type="application/json",
                        headers={"x-request-id": request_id, "request-id": request_id})

    # GET and HEAD: load balancers' health checks use either (HEAD: the same status and headers, no body).
    @route("/healthz", http_method=[HttpMethod.GET, HttpMethod.HEAD], sync_to_thread=False)
    def healthz(request: Request[Any, Any, Any]) -> Response[bytes]:
        return _json({"status": "ok"}, RequestHeaders(request.scope["headers"], host.request_ids).request_id)

    @route("/readyz", http_method=[HttpMethod.GET, HttpMethod.HEAD], sync_to_thread=False)
    def readyz(request: Request[Any, Any, Any]) -> Response[bytes]:
        headers = RequestHeaders(request.scope["headers"], host.request_ids)
        request_id = headers.request_id
        runtime = host.runtime
        detail: dict[str, Any] = {
            "policy_version": runtime.policy.version,
            "store": {"backend": runtime.policy.state.backend, "healthy": runtime.store.healthy},
        }
        if host.last_reload is not None:
            detail["last_reload"] = _reload_shown(host.last_reload, headers, runtime.policy.admin_token)
        guards = next((service for service in runtime.services if isinstance(service, GuardRuntime)), None)
        if guards is not None:
            pool = guards.pool
            detail["guard_pool"] = {"kind": pool.spec.kind, "healthy": pool.healthy, "replacements": pool.replacements}
        if host.draining or not host.started:
            state = "draining" if host.draining else "starting"
            return _json({"status": state, **detail}, request_id, status=503)
        if guards is not None and not guards.pool.healthy:  # this replica's workers died and are not replaced yet
            return _json({"status": "unhealthy", **detail}, request_id, status=503)
        return _json({"status": "ready", **detail}, request_id)

    # GET and HEAD, as /healthz: the `max_requests` gate lets both through (`http_replies._PROBES`).
    @route("/metrics", http_method=[HttpMethod.GET, HttpMethod.HEAD], sync_to_thread=False)
    def metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
        headers = RequestHeaders(request.scope["headers"], host.request_ids)
        policy = host.runtime.policy
        if not policy.server.metrics:
            raise NotFound("metrics are turned off in this policy (server.metrics)")
        if request.scope.get("raw_path") not in _METRICS_PATHS:  # litestar matches `/metrics/` and `/metrics//` too
            raise NotFound("no route here; the metrics are at /metrics")  # (a balancer hiding `/metrics` missed them)
        if policy.metrics_token is not None and not bearer_matches(headers, policy.metrics_token):
            raise _unauthorized("/metrics needs `Authorization: Bearer <metrics token>`")
        host.metrics.store_up.labels(policy.state.backend).set(1 if host.runtime.store.healthy else 0)
        # The content type as a header, as is: given as the media type, litestar appends a second `; charset=utf-8`
        # (it adds one to every `text/` type, and the exposition format's already names its charset).
        return Response(host.metrics.render(),
                        headers={"content-type": CONTENT_TYPE, "x-request-id": headers.request_id})

    return [list_models, get_model, healthz, readyz, metrics]


# What /readyz shows anyone of the last reload. Its errors quote the policy (every alias of a mistyped one, provider
# names, file paths, what was pasted into a field), which a caller without a key, or with a key that may see only
# some aliases, must not read: anyone sees how many there were; the admin token, what they say.
_RELOAD_PUBLIC = ("result", "trigger", "version", "previous")


_METRICS_PATHS = (b"/metrics", None)  # as the client sent it (ASGI's `raw_path`; None: a server that gives none)


def _reload_shown(last: dict[str, Any], headers: RequestHeaders, admin_token: str | None) -> dict[str, Any]:
    """The last reload as /readyz shows it: its errors counted for anyone (a probe with no or another credential
    is not refused: it sees the count), and in full too for the admin token's bearer."""
    errors = last.get("errors")
    if errors is None:
        return last
    try:
        admin = bearer_matches(headers, admin_token)
    except AmbiguousCredentials:  # (two credentials that differ: not the admin's, and a probe is not refused)
        admin = False
    if admin:
        return {**last, "error_count": len(errors)}
    return {**{field: last[field] for field in _RELOAD_PUBLIC if field in last}, "error_count": len(errors)}


def _unauthorized(message: str) -> GatewayError:
    return AuthenticationFailed(message, code="invalid_token")
