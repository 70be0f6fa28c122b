"""`/v1/models` in the two shapes its clients read: OpenAI's, and Anthropic's Models API for a request that carries
`anthropic-version`, which Anthropic's SDKs send on every request and OpenAI's never do. The path is the same, so
the header tells them apart: the Anthropic SDK types `created_at`, `display_name` and `type` as required and reads
a page by `has_more` and `last_id`, which OpenAI's shape does not have; its errors it reads from Anthropic's
envelope. The route, the key's look-up and which aliases it sees are the same for both (`api/routes.py`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from ..errors import InvalidRequest
from ..pipeline.stages import model_not_found
from ..policy.compiled import ModelRoute

__all__ = ["anthropic_client", "anthropic_model", "anthropic_page", "openai_model"]

_VERSION_HEADER = b"anthropic-version"
_LIMIT_DEFAULT = 20  # Anthropic's: 20 a page unless `limit` says, from 1 to 1000
_LIMIT_MAX = 1000


def anthropic_client(raw: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether the request comes from an Anthropic client: it carries `anthropic-version` (ASGI's header names are
    lower-case). Read on `/v1/models` only, never on the proxied endpoints."""
    return any(name == _VERSION_HEADER for name, _ in raw)


def openai_model(route: ModelRoute, created: int) -> dict[str, Any]:
    return {"id": route.alias, "object": "model", "created": created, "owned_by": route.provider}


def anthropic_model(route: ModelRoute, created: int) -> dict[str, Any]:
    """A `ModelInfo`: `created_at` the same instant as OpenAI's `created` (when this runtime's policy was loaded),
    as RFC 3339 UTC; `display_name` the alias (never its `description`: a note for the policy's readers, which may
    name what is behind it). `lifecycle` is `active`: a key is shown only aliases it may call."""
    return {"type": "model", "id": route.alias, "display_name": route.alias,
            "created_at": datetime.fromtimestamp(created, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "lifecycle": "active"}


def anthropic_page(routes: list[ModelRoute], created: int, query: Mapping[str, str]) -> dict[str, Any]:
    """One page of the list, in policy order, as Anthropic pages it: `limit` models after the `after_id` one, the
    `limit` just before the `before_id` one, or the first `limit`; `has_more` whether more lie that way past the
    page, `first_id` and `last_id` its ends (the SDK's cursors for the page before and after; null when empty).

    A `limit` out of 1..1000, both cursors at once, or a cursor that is not one of the aliases the key sees (the
    same answer for one that does not exist and one hidden from the key) is a 400."""
    limit = _limit(query.get("limit"))
    after, before = query.get("after_id"), query.get("before_id")
    if after is not None and before is not None:
        raise InvalidRequest("give `after_id` or `before_id`, not both", param="after_id")
    ids = [route.alias for route in routes]
    if after is not None:
        start = _cursor(ids, after, "after_id") + 1
        page, has_more = routes[start:start + limit], start + limit < len(routes)
    elif before is not None:
        end = _cursor(ids, before, "before_id")
        page, has_more = routes[max(0, end - limit):end], end - limit > 0
    else:
        page, has_more = routes[:limit], limit < len(routes)
    return {"data": [anthropic_model(route, created) for route in page], "has_more": has_more,
            "first_id": page[0].alias if page else None, "last_id": page[-1].alias if page else None}


def _limit(value: str | None) -> int:
    if value is None:
        return _LIMIT_DEFAULT
    if not (value.isascii() and value.isdigit() and len(value) <= 4 and 1 <= int(value) <= _LIMIT_MAX):
        raise InvalidRequest(f"`limit` must be an integer from 1 to {_LIMIT_MAX}", param="limit")
    return int(value)


def _cursor(ids: list[str], model_id: str, param: str) -> int:
    try:
        return ids.index(model_id)
    except ValueError:
        raise InvalidRequest(f"`{param}`: {model_not_found(model_id).message}", param=param) from None
