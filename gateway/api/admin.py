"""The admin API: off unless the policy names a token variable (`server.admin_token_env`) that is set.

`POST /admin/reload` loads, checks and swaps in the policy file's current version.
With several workers, the worker that takes the call reloads and tells the
supervisor, which signals every worker (SIGHUP), so that they all serve the same
version. `/admin/keys` (`admin_keys.py`) manages keys created at run time.
"""

from __future__ import annotations

from typing import Any, Protocol

import msgspec
from litestar import Request, Response, post

from ..errors import AuthenticationFailed, NotFound
from .admin_keys import key_routes
from .asgi import RequestHeaders
from .routes import OpsHost, bearer_matches

__all__ = ["admin_routes"]

_encode = msgspec.json.Encoder().encode


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

    return [reload, *key_routes(check, lambda: host.runtime, host.metrics)]
