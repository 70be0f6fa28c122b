"""The non-proxied routes: model listing, health, readiness, metrics."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec
from litestar import Request, Response, get

from ..errors import ModelNotFound
from ..pipeline.stages import authenticate
from ..telemetry.metrics import CONTENT_TYPE
from .asgi import RequestHeaders

if TYPE_CHECKING:
    from ..app import Gateway

__all__ = ["ops_routes"]

_encode = msgspec.json.Encoder().encode


def _json(data: Any, request_id: str, status: int = 200) -> Response[bytes]:
    return Response(_encode(data), status_code=status, media_type="application/json",
                    headers={"x-request-id": request_id})


def ops_routes(gateway: Gateway) -> list[Any]:
    """Route handlers bound to one gateway (no module globals)."""

    def visible_models(request: Request[Any, Any, Any]) -> tuple[str, list[dict[str, Any]]]:
        headers = RequestHeaders(request.scope["headers"])
        runtime = gateway.runtime
        key = authenticate(runtime.policy, headers.credential)
        models = [
            {"id": alias, "object": "model", "created": runtime.created, "owned_by": route.provider}
            for alias, route in runtime.policy.models.items()
            if key is None or key.allows(alias)
        ]
        return headers.request_id, models

    @get("/v1/models", sync_to_thread=False)
    def list_models(request: Request[Any, Any, Any]) -> Response[bytes]:
        request_id, models = visible_models(request)
        return _json({"object": "list", "data": models}, request_id)

    @get("/v1/models/{model_id:path}", sync_to_thread=False)
    def get_model(request: Request[Any, Any, Any], model_id: str) -> Response[bytes]:
        request_id, models = visible_models(request)
        wanted = model_id.lstrip("/")
        for model in models:
            if model["id"] == wanted:
                return _json(model, request_id)
        raise ModelNotFound(f"the model `{wanted[:64]}` does not exist", param="model")

    @get("/healthz", sync_to_thread=False)
    def healthz(request: Request[Any, Any, Any]) -> Response[bytes]:
        return _json({"status": "ok"}, RequestHeaders(request.scope["headers"]).request_id)

    @get("/readyz", sync_to_thread=False)
    def readyz(request: Request[Any, Any, Any]) -> Response[bytes]:
        request_id = RequestHeaders(request.scope["headers"]).request_id
        if gateway.draining or not gateway.started:
            state = "draining" if gateway.draining else "starting"
            return _json({"status": state}, request_id, status=503)
        return _json({"status": "ready", "policy_version": gateway.runtime.policy.version}, request_id)

    @get("/metrics", sync_to_thread=False)
    def metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
        return Response(gateway.metrics.render(), media_type=CONTENT_TYPE,
                        headers={"x-request-id": RequestHeaders(request.scope["headers"]).request_id})

    routes: list[Any] = [list_models, get_model, healthz, readyz]
    if gateway.runtime.policy.server.metrics:
        routes.append(metrics)
    return routes
