"""Per-request state, and the reply a pipeline produces.

Stages are stateless; everything that belongs to one request lives on its
`RequestContext`, created by the HTTP layer and dropped when the response ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..auth.keys import VirtualKey
from ..policy.compiled import ModelRoute
from ..schemas.openai import Usage
from .endpoints import Endpoint
from .streams import StreamWatch

if TYPE_CHECKING:
    from ..app import Runtime
    from ..providers.base import Provider

__all__ = ["Reply", "RequestContext"]


@dataclass(slots=True)
class Reply:
    """What goes back to the client: a complete body, or a stream of SSE bytes."""

    body: bytes | None = None
    stream: StreamWatch | None = None
    status: int = 200


@dataclass(slots=True, eq=False)
class RequestContext:
    request_id: str
    endpoint: Endpoint
    runtime: Runtime
    raw_body: bytes
    credential: str | None  # the presented virtual key, if any: never logged
    started: float  # perf_counter at arrival
    body: dict[str, Any] = field(default_factory=dict)
    stream: bool = False
    key: VirtualKey | None = None
    route: ModelRoute | None = None
    provider: Provider | None = None
    upstream_started: float = 0.0
    upstream_seconds: float = 0.0
    first_chunk_seconds: float | None = None
    status: int = 200
    error_code: str | None = None
    usage: Usage | None = None

    @property
    def tenant(self) -> str:
        return self.key.tenant if self.key is not None else "anonymous"

    @property
    def alias_label(self) -> str:
        """The model label for metrics: a policy alias or "unknown", never client text."""
        return self.route.alias if self.route is not None else "unknown"
