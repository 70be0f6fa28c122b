"""`/admin/keys`: create, list, get, revoke and rotate virtual keys at run time (see docs/admin-api.md).

Behind the admin token like every admin route, and answered 404 unless the policy turns run-time
keys on (`dynamic_keys.enabled`). A new secret appears in exactly two answers, the creation's and
the rotation's; no answer ever carries a digest. Field errors are 400 naming the field, a name in
use or a concurrent change 409, an unreachable store 503: never a 500.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import msgspec
from litestar import Request, Response, delete, get, post
from litestar.exceptions import HTTPException
from msgspec import Meta, Struct

from ..auth.records import CorruptRecord, is_key_id, public_view
from ..auth.registry import KeyRegistry, LeftBehind
from ..errors import GatewayError, InvalidRequest, KeysUnavailable, NotFound
from ..policy.accounting_schema import BudgetSpec, LimitSpec
from ..runtime import Runtime
from ..sanitize import printable, validation_error
from ..store.base import StoreUnavailable
from ..telemetry.metrics import Metrics

__all__ = ["CreateKey", "RotateKey", "key_routes"]

log = logging.getLogger("gateway.keys")
T = TypeVar("T")
Name = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}(?!\n)$")]
Alias = Annotated[str, Meta(min_length=1, max_length=256)]
_HUNDRED_YEARS_S = 100 * 366 * 86_400.0
_UNKNOWN_FIELD = re.compile(r"unknown field `([^`]{0,200})`")
_encode = msgspec.json.Encoder().encode


class CreateKey(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """POST /admin/keys."""

    tenant: Name
    name: Name | None = None  # default: the key's id
    models: Annotated[list[Alias], Meta(min_length=1, max_length=1_000)] = msgspec.field(
        default_factory=lambda: ["*"])
    expires_at: Annotated[float, Meta(gt=0)] | None = None  # unix seconds
    ttl_s: Annotated[float, Meta(gt=0, le=_HUNDRED_YEARS_S)] | None = None
    limits: LimitSpec | None = None
    budget: BudgetSpec | None = None


class RotateKey(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """POST /admin/keys/{id}/rotate: the old secret keeps working `grace_s` more seconds (0: stops now)."""

    grace_s: Annotated[float, Meta(ge=0, le=7 * 86_400)] = 0.0


def key_routes(check: Callable[[Request[Any, Any, Any]], str], acquire_runtime: Callable[[], Runtime],
               metrics: Metrics) -> list[Any]:
    """The handlers; `check` is the admin token check (returns the request id), `acquire_runtime` holds the
    runtime in force until its `release()`.

    Each call holds the runtime it started with to its end, as a proxied request does: a reload during the call
    retires that runtime (and closes its store) only after the call, so that no change to a key is cut half-way
    by a closed store while Redis itself is fine."""

    def registry(current: Runtime) -> KeyRegistry:
        dynamic = current.dynamic_keys
        if dynamic is None:
            raise NotFound("keys created at run time are off in this policy (set dynamic_keys.enabled)")
        policy = current.policy
        return KeyRegistry(current.store, max_keys=policy.dynamic_keys.max_keys, static_names=policy.keys.names,
                           dynamic=dynamic)

    async def run(operation: str, request: Request[Any, Any, Any],
                  work: Callable[[str, Runtime], Awaitable[T]]) -> T:
        status = "500"
        try:
            request_id = check(request)
            runtime = acquire_runtime()
            try:
                result = await work(request_id, runtime)
            finally:
                runtime.release()
            status = "ok"
            return result
        except GatewayError as exc:
            status = str(exc.status)
            raise
        except HTTPException as exc:  # litestar's own, e.g. 413 from `request.body()`: its real status
            status = str(exc.status_code)
            raise
        except StoreUnavailable as exc:
            status = "503"
            left = f" ({exc.left})" if isinstance(exc, LeftBehind) else ""
            raise KeysUnavailable(f"the key store cannot be reached; retry shortly{left}",
                                  headers={"Retry-After": "1"}) from exc
        except CorruptRecord as exc:
            status = "503"
            raise KeysUnavailable("the key store holds a value this gateway cannot read") from exc
        finally:
            metrics.admin_key_operations.labels(operation, status).inc()

    @post("/admin/keys", status_code=201)
    async def create_key(request: Request[Any, Any, Any]) -> Response[bytes]:
        async def work(request_id: str, current: Runtime) -> Response[bytes]:
            keys = registry(current)
            spec = _decode(await request.body(), CreateKey)
            models = _check_create(spec, current)
            now = time.time()
            expires_at = spec.expires_at if spec.ttl_s is None else now + spec.ttl_s
            if expires_at is not None and not (now < expires_at <= now + _HUNDRED_YEARS_S):
                if spec.ttl_s is not None:  # now plus it is now (a unix time float: steps of ~0.24 µs)
                    raise InvalidRequest("ttl_s is too small: the expiry it gives is not after now", param="ttl_s")
                raise InvalidRequest("expires_at must be a future unix time (seconds), within 100 years",
                                     param="expires_at")
            record, secret = await keys.create(tenant=spec.tenant, name=spec.name, models=models,
                                               expires_at=expires_at, limits=spec.limits, budget=spec.budget)
            _audit("key created", record.id, request_id, tenant=record.tenant, name=record.name)
            return _json({**public_view(record, now), "key": secret}, request_id, 201)

        return await run("create", request, work)

    @get("/admin/keys")
    async def list_keys(request: Request[Any, Any, Any]) -> Response[bytes]:
        async def work(request_id: str, current: Runtime) -> Response[bytes]:
            keys = registry(current)
            query = request.query_params
            tenant, after = query.get("tenant"), query.get("after")
            limit = _limit(query.get("limit"))
            if tenant is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}", tenant):
                raise InvalidRequest("tenant: not a tenant name", param="tenant")
            if after is not None and not is_key_id(after):
                raise InvalidRequest("after: not a key id (`vk_` and 16 hex digits)", param="after")
            records, more = await keys.page(tenant, limit=limit, after=after)
            now = time.time()
            data = [public_view(record, now) for record in records]
            return _json({"object": "list", "data": data, "has_more": more,
                          "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None},
                         request_id)

        return await run("list", request, work)

    @get("/admin/keys/{key_id:str}")
    async def get_key(request: Request[Any, Any, Any], key_id: str) -> Response[bytes]:
        async def work(request_id: str, current: Runtime) -> Response[bytes]:
            keys = registry(current)
            return _json(public_view(_found(await keys.get(key_id), key_id), time.time()), request_id)

        return await run("get", request, work)

    @delete("/admin/keys/{key_id:str}", status_code=200)
    async def revoke_key(request: Request[Any, Any, Any], key_id: str) -> Response[bytes]:
        async def work(request_id: str, current: Runtime) -> Response[bytes]:
            keys = registry(current)
            if not await keys.revoke(key_id):
                raise _no_such_key(key_id)
            _audit("key revoked", key_id, request_id)
            return _json({"id": key_id, "object": "gateway.key.deleted", "deleted": True}, request_id)

        return await run("revoke", request, work)

    @post("/admin/keys/{key_id:str}/rotate", status_code=200)
    async def rotate_key(request: Request[Any, Any, Any], key_id: str) -> Response[bytes]:
        async def work(request_id: str, current: Runtime) -> Response[bytes]:
            keys = registry(current)
            raw = await request.body()
            spec = _decode(raw, RotateKey) if raw.strip() else RotateKey()
            record, secret = _found(await keys.rotate(key_id, spec.grace_s), key_id)
            _audit("key rotated", key_id, request_id, grace_s=spec.grace_s)
            return _json({**public_view(record, time.time()), "key": secret}, request_id)

        return await run("rotate", request, work)

    return [create_key, list_keys, get_key, revoke_key, rotate_key]


def _audit(event: str, key_id: str, request_id: str, **fields: Any) -> None:
    """One log line per change to a key: its id and owner, never its secret or digest."""
    log.info(event, extra={"fields": {"key_id": key_id, "request_id": request_id, **fields}})


def _check_create(spec: CreateKey, runtime: Runtime) -> list[str] | None:
    """What types cannot say: aliases that exist, one expiry, a budget that makes sense. The models as
    the record keeps them (None: every alias)."""
    if spec.expires_at is not None and spec.ttl_s is not None:
        raise InvalidRequest("give expires_at or ttl_s, not both", param="ttl_s")
    if spec.expires_at is not None and not math.isfinite(spec.expires_at):
        raise InvalidRequest("expires_at must be a finite unix time", param="expires_at")
    aliases = runtime.policy.models
    if "*" in spec.models:
        if len(spec.models) > 1:
            raise InvalidRequest('"*" (every alias) cannot be listed with other aliases', param="models")
        models = None
    else:
        for index, alias in enumerate(spec.models):
            if alias not in aliases:
                raise InvalidRequest(f"models[{index}]: no alias `{printable(alias)}` in the policy",
                                     param=f"models[{index}]")
        models = list(dict.fromkeys(spec.models))
    budget = spec.budget
    if budget is not None:
        if (budget.period == "rolling") != (budget.window_s is not None):
            raise InvalidRequest("budget.window_s is needed with `period: rolling`, and only then",
                                 param="budget.window_s")
        if budget.downgrade is not None and budget.downgrade.alias not in aliases:
            missing = printable(budget.downgrade.alias)
            raise InvalidRequest(f"budget.downgrade.alias: no alias `{missing}` in the policy",
                                 param="budget.downgrade.alias")
    return models


def _decode(raw: bytes, kind: type[T]) -> T:
    if not raw.strip():
        raise InvalidRequest("the request body is empty; expected a JSON object")
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as exc:
        message, where = validation_error(exc)  # msgspec quotes the bad value: bounded, printable
        param = where or None
        unknown = _UNKNOWN_FIELD.search(message)
        if unknown is not None:
            param = ".".join(p for p in (param, unknown.group(1)) if p)
            raise InvalidRequest(f"invalid request: unknown field `{param}`", param=param) from exc
        raise InvalidRequest(f"invalid request: {message}" + (f" at `{param}`" if param else ""), param=param) from exc
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidRequest("the request body is not valid JSON") from exc


def _limit(value: str | None) -> int:
    if value is None:
        return 100
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= 1_000:  # (`"²".isdigit()`: not int())
        raise InvalidRequest("limit: a whole number from 1 to 1000", param="limit")
    return int(value)


def _found(found: T | None, key_id: str) -> T:
    if found is None:
        raise _no_such_key(key_id)
    return found


def _no_such_key(key_id: str) -> NotFound:
    return NotFound(f"no key `{printable(key_id)}` (never created, or revoked)", code="key_not_found")


def _json(data: dict[str, Any], request_id: str, status: int = 200) -> Response[bytes]:
    return Response(_encode(data), status_code=status, media_type="application/json",
                    headers={"x-request-id": request_id, "cache-control": "no-store"})

