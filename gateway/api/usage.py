"""`GET /admin/usage`: spend and tokens per key, tenant or alias, per UTC day or month (admin token).

Off, like every admin route, unless the policy names an admin token that is set (otherwise 404, to every method:
`admin.while_admin_on`); a wrong token is 401; a bad parameter is 400. Rows come from the store
(`accounting/report.py`), so with Redis they cover every replica; this replica's last second is flushed first, the
others' may be up to a second behind.

    curl -H "Authorization: Bearer $ADMIN" 'http://127.0.0.1:8080/admin/usage?scope=tenant&period=month'
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
from litestar import Request, Response, get

from ..accounting.report import ReportPeriod, ScopeKind, UnreadableCounter, days_of, names_of, read_usage
from ..accounting.stage import Accounting
from ..errors import AuthenticationFailed, InvalidRequest, LimitsUnavailable, NotFound
from ..runtime import Runtime
from ..store.base import StoreUnavailable
from .admin import while_admin_on
from .asgi import RequestHeaders
from .routes import OpsHost, bearer_matches

__all__ = ["usage_routes"]

_encode = msgspec.json.Encoder().encode
_SCOPES: dict[str, ScopeKind] = {"key": "key", "tenant": "tenant", "model": "model"}
_PERIODS: dict[str, ReportPeriod] = {"day": "day", "month": "month"}


def usage_routes(host: OpsHost) -> list[Any]:
    @get("/admin/usage")
    async def usage(request: Request[Any, Any, Any]) -> Response[bytes]:
        headers = RequestHeaders(request.scope["headers"], host.request_ids)
        runtime = host.acquire_runtime()  # held to the end: a reload closes its store only after this call
        try:
            return await _report(request, headers, runtime)
        finally:
            runtime.release()

    return while_admin_on(host, [usage])


async def _report(request: Request[Any, Any, Any], headers: RequestHeaders, runtime: Runtime) -> Response[bytes]:
    """The answer, from `runtime` alone (the one the call holds): token, names, ledger and store agree."""
    token = runtime.policy.admin_token
    if token is None:
        raise NotFound(f"no route for {request.method} {request.url.path[:200]}")
    if not bearer_matches(headers, token):
        raise AuthenticationFailed("the admin API needs `Authorization: Bearer <admin token>`",
                                   code="invalid_admin_token")
    query = request.query_params
    scope, period = _SCOPES.get(query.get("scope", "tenant")), _PERIODS.get(query.get("period", "day"))
    if scope is None:
        raise InvalidRequest(f"`scope` must be one of {', '.join(_SCOPES)}", param="scope")
    if period is None:
        raise InvalidRequest(f"`period` must be one of {', '.join(_PERIODS)}", param="period")
    try:
        label, days = days_of(period, query.get("date"), time.time())
    except ValueError:
        form = "YYYY-MM-DD" if period == "day" else "YYYY-MM"
        raise InvalidRequest(f"`date` must be {form}", param="date") from None
    name = query.get("name")
    if name is not None and not (0 < len(name) <= 256):
        raise InvalidRequest("`name` must be 1 to 256 characters", param="name")
    names = [name] if name is not None else names_of(runtime.policy, scope)
    for service in runtime.services:
        if isinstance(service, Accounting):
            await service.ledger.flush()
    try:
        rows = await read_usage(runtime.store, scope, names, days)
    except UnreadableCounter as exc:  # the store answers, and a counter is not a count: retrying will not help
        raise LimitsUnavailable(f"a usage counter in the store does not hold a count: `{exc.key}` (also in the "
                                "gateway's log); delete or repair it", code="store_unavailable") from exc
    except StoreUnavailable as exc:
        raise LimitsUnavailable("the store that keeps usage did not answer; retry shortly",
                                code="store_unavailable", headers={"Retry-After": "1"}) from exc
    body = {"scope": scope, "period": period, "date": label, "usage": rows}
    return Response(_encode(body), media_type="application/json",
                    headers={"x-request-id": headers.request_id})

