"""The admin API: off unless the policy names a token variable (`server.admin_token_env`) that is set.

`POST /admin/reload` loads, checks and swaps in the policy file's current version.
With several workers, the worker that takes the call reloads and tells the
supervisor, which signals every worker (SIGHUP), so that they all serve the same
version. `/admin/keys` (`admin_keys.py`) manages keys created at run time.

Off, every method of every admin path answers as a path that does not exist: 404, no `Allow` (`while_admin_on`).
"""

from __future__ import annotations

from typing import Any, Protocol

import msgspec
from litestar import Litestar, Request, Response, asgi, post
from litestar.handlers import HTTPRouteHandler

from ..errors import AuthenticationFailed, NotFound
from .admin_keys import key_routes
from .asgi import RequestHeaders
from .errors import error_handlers
from .routes import OpsHost, bearer_matches

__all__ = ["admin_routes", "while_admin_on"]

_encode = msgspec.json.Encoder().encode
_MAX_BODY = 64 * 1024  # as the gateway's own app (`app.create_app`): the admin routes take no body worth more


class AdminHost(OpsHost, Protocol):
    async def reload(self, trigger: str) -> dict[str, Any]: ...


def admin_routes(host: AdminHost) -> list[Any]:
    def check(request: Request[Any, Any, Any]) -> str:
        headers = RequestHeaders(request.scope["headers"], host.request_ids)
        token = host.runtime.policy.admin_token
        if token is None:  # off: answer as if the route did not exist
            raise NotFound(f"no route for {request.method} {request.url.path[:200]}")
        if not bearer_matches(headers, token):
            raise AuthenticationFailed("the admin API needs `Authorization: Bearer <admin token>`",
                                       code="invalid_admin_token")
        return headers.request_id

    @post("/admin/reload", status_code=200)
    async def reload(request: Request[Any, Any, Any]) -> Response[bytes]:
        request_id = check(request)
        result = await host.reload("admin")
        notify = getattr(host, "reload_requested", None)
        if notify is not None and result["result"] in ("ok", "unchanged"):
            notify()  # the other workers
        status = 200 if result["result"] in ("ok", "unchanged") else 422
        return Response(_encode(result), status_code=status, media_type="application/json",
                        headers={"x-request-id": request_id})

    return while_admin_on(host, [reload, *key_routes(check, host.acquire_runtime, host.metrics)])


def while_admin_on(host: OpsHost, handlers: list[HTTPRouteHandler]) -> list[Any]:
    """Routes for `handlers`' paths that serve them while the admin API is on, and answer every method with 404 while
    it is off (the policy in force, read on each request: a reload turns it on or off).

    Why not a check in each handler: litestar matches the method first, so with the API off another method got 405
    with `Allow` and OPTIONS 204 with `Allow`, telling anyone which admin routes exist. Here each path is an ASGI
    route, which takes every method the HTTP parser accepts (a path with parameters: a mount at the part before
    them, as litestar's ASGI routes take no parameters with a method); on, it hands the request to an app of
    `handlers` alone, which answers as the gateway's app did, its 405s and OPTIONS included. Admin traffic is
    rare: one more hop."""
    inner = Litestar(route_handlers=handlers, exception_handlers=error_handlers(host.request_ids),
                     request_max_body_size=_MAX_BODY, openapi_config=None, logging_config=None, debug=False)

    def gate(path: str, mount: str | None) -> Any:
        async def admin_path(scope: Any, receive: Any, send: Any) -> None:
            if mount is not None:  # litestar handed the mount the rest of the path: the inner app routes it whole
                scope["path"] = mount + scope["path"].rstrip("/")
            if host.runtime.policy.admin_token is None:  # off: answer as if the route did not exist
                raise NotFound(f"no route for {scope['method']} {scope['path'][:200]}")
            await inner(scope, receive, send)

        return asgi(path, is_mount=mount is not None, copy_scope=False)(admin_path)

    routes: dict[str, str | None] = {}  # route path: itself if a mount (it then takes the path too), else None
    for handler in handlers:
        for path in sorted(handler.paths):
            if "{" in path:
                mount = path.partition("{")[0].rstrip("/")
                routes[mount] = mount
            else:
                routes.setdefault(path, None)
    return [gate(path, mount) for path, mount in routes.items()]
