"""Per-request state, and the reply a pipeline produces.

Stages are stateless; everything that belongs to one request lives on its
`RequestContext`, created by the HTTP edge and dropped when the response ends.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from ..auth.keys import VirtualKey
from ..policy.compiled import ModelRoute, Target
from ..schemas.endpoints import Endpoint
from ..schemas.openai import ChoicePeek, Usage
from .lifecycle import Lifecycle

if TYPE_CHECKING:
    from ..cache.control import CacheResult
    from ..guards.session import GuardSession
    from ..providers.base import Provider
    from ..runtime import Runtime
    from .dialect import Dialect
    from .streams import ReplyStream

__all__ = ["Reply", "RequestContext", "RequestHead"]


# A request's `credential` when it carried two different ones (`api.asgi.RequestHeaders`): compared by identity, and
# refused by `Authenticate` (inside the telemetry stage, so the refusal is logged and counted as every answer is).
AMBIGUOUS = "\x00two credentials"


@dataclass(slots=True)
class RequestHead:
    """What the edge read from the request line and headers (one pass, see `api.asgi`)."""

    method: str
    credential: str | None  # the presented virtual key, if any (`AMBIGUOUS`: two): never logged
    content_length: int | None
    header_bytes: int
    raw_headers: Sequence[tuple[bytes, bytes]] = ()  # the ASGI list as received (rules and sticky read it)


@dataclass(slots=True)
class Reply:
    """What goes back to the client: a complete body, or a stream of typed events."""

    body: bytes | None = None
    stream: ReplyStream | None = None
    status: int = 200
    # The upstream's body and its choices as the provider decoded them (`Completion.choices`): valid while
    # `body` is still that body (a stage that rewrites the body leaves them behind).
    choices_of: tuple[bytes, list[ChoicePeek]] | None = None


@dataclass(slots=True, eq=False)
class RequestContext:
    request_id: str
    endpoint: Endpoint
    runtime: Runtime  # held for the whole request: a reload never changes it mid-way
    head: RequestHead
    receive: Any  # the ASGI receive callable, for the body
    lifecycle: Lifecycle
    started: float  # perf_counter at arrival
    raw_body: bytes = b""
    body: dict[str, Any] = field(default_factory=dict)  # what is forwarded (unknown fields included)
    request: msgspec.Struct | None = None  # the same body, typed: what stages read
    stream: bool = False
    wants_usage: bool = False  # the client asked for the usage chunk itself
    key: VirtualKey | None = None
    route: ModelRoute | None = None  # the alias asked for
    plan: ModelRoute | None = None  # where routing sends it (the alias, or a rule's alias or targets)
    candidates: Sequence[Target] = ()  # in the order the fallback walks them
    rule: str | None = None  # the rule that matched
    # The prompt's token count as routing rules weigh it (`routing.rules.Facts.of`), once a stage needed it: counted
    # once for the guard and cache stages and the router alike (each matches the rules), with `route`'s tokenizer (set
    # before them all). None until then, and again once a guard rewrote the body.
    prompt_tokens: int | None = None
    # A Responses continuation's context kept at the upstream, in tokens (`pipeline.response_owners`: the size of the
    # response it continues, where tenants are apart), which the upstream bills as input: an estimate counts it.
    continued_tokens: int = 0
    target: Target | None = None  # the target that answered (or was tried last)
    attempt_count: int = 0
    attempts: list[tuple[str, str, float]] | None = None  # (target, outcome, ms) once more than one ran
    fallback_reason: str | None = None
    provider: Provider | None = None
    upstream_started: float = 0.0
    # An attempt's request went out (its head was being written: `upstream.request.SENDING`, marked only where the
    # accounting stage asks) and no attempt has failed since (the alias's deadline cutting it is no failure: the
    # upstream goes on): a request left now leaves an upstream at work. Set again when the walk ends (its error, the
    # request cancelled) after an attempt that failed with its upstream at work (`routing.router._left_at_work`).
    upstream_sent: bool = False
    upstream_seconds: float = 0.0
    first_chunk_seconds: float | None = None
    read_choices: bool = False  # a stage reads every chunk's text (quality signals): see `Call.read_choices`
    quality_reader: Any = None  # a common stream's quality reader, ended by the telemetry stage (`read_stream`)
    chunks: int = 0  # the source's chunks, before stages hold or merge them (a token estimate without usage)
    status: int = 200
    error_code: str | None = None
    usage: Usage | None = None
    # The usage upstreams reported with answers the gateway refused (`GatewayError.usage`), with each attempt's
    # target, in order: billed by the provider, so counted in the request's cost and tokens (`accounting.cost`).
    # None on a request that had none (every successful first attempt).
    rejected: list[tuple[Target, Usage]] | None = None
    usage_estimated: bool = False
    # The usage the client is shown when it is not the one billed: a cache hit's, the stored answer's own (the
    # gateway's estimate included), while `usage` is zero (a hit spends nothing). Read by a dialect that writes an
    # answer's usage where the upstream sent none (`api.anthropic`).
    shown_usage: Usage | None = None
    headers: list[tuple[bytes, bytes]] | None = None  # extra response headers set by stages (x-gateway-guards)
    cost_usd: float | None = None  # what the answer cost, once accounting knows (the access log reads it)
    cache_result: str | None = None  # hit, miss, bypass... once the cache stage knows (the access log reads it)
    traceparent: bytes | None = None  # W3C trace context sent upstream (tracing on): the gateway's span as parent
    tracestate: bytes | None = None  # the client's W3C `tracestate`, sent upstream with it (a trace that goes on)
    dialect: Dialect | None = None  # the client's wire format when it is not OpenAI's (/v1/messages)
    cache: CacheResult | None = None  # what the response cache did and what a hit saved (`cache_result`: its status)
    on_finish: Callable[[], None] | None = None  # run once the request left every stage (the cache stores a miss)
    guard_session: GuardSession | None = None  # what the guards did to this request (the cache never stores changes)
    # A stream's answer text, collected as it passes when its provider reports no usage (`telemetry.usage.StreamText`):
    # one collector for the stages that count it (the accounting stage's bill, then `CountTokens`).
    answer_text: Any = None

    @property
    def tenant(self) -> str:
        return self.key.tenant if self.key is not None else "anonymous"

    @property
    def endpoint_label(self) -> str:
        """The endpoint label for metrics: the client's API (`messages`) when it is not OpenAI's."""
        return self.dialect.label if self.dialect is not None else self.endpoint.label

    @property
    def alias_label(self) -> str:
        """The model label for metrics: a policy alias or "unknown", never client text."""
        return self.route.alias if self.route is not None else "unknown"
