"""Wiring: build one gateway (policy, providers, metrics, pipeline) into a litestar app.

No module globals: everything a request needs hangs off the `Gateway` object
created here, so tests can run several gateways in one process, and a policy
reload is one attribute swap (`Gateway.runtime`).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from litestar import Litestar, Request, Response, asgi
from litestar.exceptions import HTTPException

from .api.asgi import RequestHeaders, error_header_map
from .api.proxy import ProxyEndpoint
from .api.routes import ops_routes
from .errors import (
    BodyTooLarge,
    GatewayError,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
)
from .pipeline.endpoints import Endpoint
from .pipeline.runner import Pipeline
from .pipeline.stages import Authenticate, CallUpstream, Ingress, Route
from .policy import Policy, load_policy
from .providers import Provider, build_provider
from .signals import install_drain_signal
from .telemetry.metrics import Metrics
from .telemetry.stage import Telemetry
from .telemetry.tokens import TokenCounter

__all__ = ["Gateway", "Runtime", "app_from_env", "create_app"]

log = logging.getLogger("gateway")
POLICY_ENV = "GATEWAY_POLICY"


@dataclass(frozen=True, slots=True)
class Runtime:
    """One policy and the provider objects built for it: swapped whole on reload."""

    policy: Policy
    providers: Mapping[str, Provider]
    created: int


class Gateway:
    def __init__(self, policy: Policy, tokens: TokenCounter | None = None) -> None:
        self.tokens = tokens or TokenCounter()
        self.runtime = Runtime(
            policy, {name: build_provider(cfg, self.tokens) for name, cfg in policy.providers.items()}, int(time.time())
        )
        self.metrics = Metrics()
        self.pipeline = Pipeline([
            Telemetry(self.metrics, policy.server.access_log),
            Ingress(),
            Authenticate(),
            Route(),
            CallUpstream(),
        ])
        self.started = False
        self.draining = False

    async def start(self) -> None:
        install_drain_signal(self.mark_draining)
        await asyncio.gather(*(provider.start() for provider in self.runtime.providers.values()))
        # Everything built so far lives as long as the process: move it out of the
        # collector's reach, so that full collections stay short (bench: p99 at 16
        # connections fell from ~30 ms to ~6 ms on a pass-through).
        gc.collect()
        gc.freeze()
        self.started = True

    def mark_draining(self) -> None:
        self.draining = True

    async def stop(self) -> None:
        self.draining = True
        await asyncio.gather(*(provider.close() for provider in self.runtime.providers.values()),
                             return_exceptions=True)


def _error_response(error: GatewayError, request: Request[Any, Any, Any]) -> Response[bytes]:
    request_id = RequestHeaders(request.scope["headers"]).request_id
    return Response(error.body(), status_code=error.status, media_type="application/json",
                    headers=error_header_map(error, request_id))


def _http_exception(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    """Litestar's own errors (no route, wrong method, ...) in OpenAI's shape."""
    status = exc.status_code
    error: GatewayError
    if status == 404:
        error = NotFound(f"no route for {request.method} {request.url.path[:200]}")
    elif status == 405:
        error = MethodNotAllowed(f"method {request.method} is not allowed here")
    elif status == 413:
        error = BodyTooLarge("the request body is too large")
    elif status < 500:
        error = InvalidRequest(str(exc.detail)[:200] if exc.detail else "invalid request")
        error.status = status
    else:
        error = InternalError("the gateway failed to handle this request")
    return _error_response(error, request)


def _gateway_error(request: Request[Any, Any, Any], exc: GatewayError) -> Response[bytes]:
    return _error_response(exc, request)


def _unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    log.error("unhandled error: %s", type(exc).__name__, exc_info=exc)
    return _error_response(InternalError("the gateway failed to handle this request"), request)


def _proxy_route(gateway: Gateway, endpoint: Endpoint) -> Any:
    handler = ProxyEndpoint(gateway, endpoint)

    async def proxy(scope: Any, receive: Any, send: Any) -> None:
        await handler(scope, receive, send)

    return asgi(f"/v1/{endpoint.path}", copy_scope=False, name=endpoint.label)(proxy)


def create_app(policy: Policy, gateway: Gateway | None = None) -> Litestar:
    """A litestar app serving `policy`. The `Gateway` is on `app.state.gateway`."""
    gateway = gateway or Gateway(policy)
    app = Litestar(
        route_handlers=[*(_proxy_route(gateway, e) for e in Endpoint), *ops_routes(gateway)],
        exception_handlers={
            GatewayError: _gateway_error,
            HTTPException: _http_exception,
            Exception: _unexpected,
        },
        on_startup=[gateway.start],
        on_shutdown=[gateway.stop],
        openapi_config=None,
        request_max_body_size=policy.server.max_body_bytes,
        logging_config=None,
        debug=False,
    )
    app.state.gateway = gateway
    for warning in policy.warnings:
        log.warning("%s", warning)
    return app


def app_from_env() -> Litestar:
    """Factory for ASGI servers and worker processes: the policy path comes from GATEWAY_POLICY."""
    return create_app(load_policy(os.environ.get(POLICY_ENV, "policies/gateway.yaml")))
