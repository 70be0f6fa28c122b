"""The small typed interface every provider module implements.

A provider turns one canonical (OpenAI-shaped) request into an answer from its
upstream: a complete `Completion` in OpenAI's shape, or an `EventSource` of typed
stream events (`schemas.events`). Translation is re-run per attempt from the
original request, so a later fallback starts clean. Errors leave a provider only
as `GatewayError`s (see `errors`), already sanitized. Providers import nothing
from the pipeline: they sit below it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

from ..errors import Unsupported
from ..policy.compiled import ProviderConfig, Timeouts
from ..schemas.endpoints import Endpoint
from ..schemas.events import EventSource
from ..schemas.openai import ChoicePeek, Usage

__all__ = ["ALL_ENDPOINTS", "Call", "Completion", "Provider", "check_endpoint"]

_decode = msgspec.json.Decoder(dict[str, Any]).decode


@dataclass(slots=True)
class Call:
    """One attempt against one upstream."""

    endpoint: Endpoint
    body: dict[str, Any]  # the client's request, `model` already set to the upstream's name
    stream: bool
    request_id: str
    timeouts: Timeouts | None = None  # a target's own timeouts; None: the provider's
    traceparent: bytes | None = None  # W3C trace context to forward (tracing on)
    read_choices: bool = False  # a stage reads the text: the peek decodes choices (`Chunk.choices`, `Completion`'s)
    tracestate: bytes | None = None  # the client's W3C `tracestate`, forwarded beside `traceparent` (tracing on)

    @property
    def client_wants_usage(self) -> bool:
        options = self.body.get("stream_options")
        return isinstance(options, dict) and options.get("include_usage") is True


class Completion:
    """A complete answer: the body to send as is, the usage read from it, its decoded form on demand."""

    __slots__ = ("_data", "body", "choices", "usage")

    def __init__(self, body: bytes, usage: Usage | None, data: dict[str, Any] | None = None,
                 choices: list[ChoicePeek] | None = None) -> None:
        self.body = body
        self.usage = usage
        self._data = data
        # The typed view of the body's choices, when the provider decoded them with its usage (`Call.read_choices`).
        self.choices = choices

    def data(self) -> dict[str, Any]:
        if self._data is None:
            self._data = _decode(self.body)
        return self._data


ALL_ENDPOINTS = frozenset(Endpoint)


def check_endpoint(provider: Provider, endpoint: Endpoint) -> None:
    """A clear 400 when this provider's upstream API has no such endpoint (never a silent translation). Raised
    before anything is sent, as an `Unsupported`: routing counts it no attempt and tries the next target (which may
    serve it); the client gets it, `unsupported_endpoint`, when none does."""
    if endpoint not in provider.endpoints:
        raise Unsupported(
            f"the routed target's provider `{provider.name}` (kind `{provider.config.kind}`) cannot serve "
            f"/v1/{endpoint.path}; route this model to a provider that does", param="model",
            code="unsupported_endpoint")


class Provider(Protocol):
    name: str
    config: ProviderConfig
    endpoints: frozenset[Endpoint]  # the endpoints its upstream API serves

    async def start(self) -> None:
        """Open pools, load what is needed; called once when its runtime starts."""

    async def close(self) -> None:
        """Release every connection."""

    async def complete(self, call: Call) -> Completion: ...

    async def open_stream(self, call: Call) -> EventSource:
        """Return once the upstream has accepted the stream, or raise `GatewayError`."""
