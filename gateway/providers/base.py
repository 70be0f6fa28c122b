"""The small typed interface every provider module implements.

A provider turns one canonical (OpenAI-shaped) request into an answer from its
upstream, in OpenAI's shape: a complete `Completion`, or a `ChunkStream` of
ready-to-send SSE bytes. Translation is re-run per attempt from the original
request, so a later fallback starts clean. Errors leave a provider only as
`GatewayError`s (see `errors`), already sanitized.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import GatewayError
from ..pipeline.endpoints import Endpoint
from ..policy.compiled import ProviderConfig
from ..schemas.openai import Usage

__all__ = ["Call", "ChunkStream", "Completion", "Provider"]


@dataclass(slots=True)
class Call:
    """One attempt against one upstream."""

    endpoint: Endpoint
    body: dict[str, Any]  # the client's request, `model` already set to the upstream's name
    stream: bool
    request_id: str

    @property
    def client_wants_usage(self) -> bool:
        options = self.body.get("stream_options")
        return isinstance(options, dict) and options.get("include_usage") is True


@dataclass(slots=True)
class Completion:
    """A complete answer: the body to send as is, and the usage read from it."""

    body: bytes
    usage: Usage | None


class ChunkStream(Protocol):
    """A started stream: the upstream's headers have arrived and said 200.

    Iterating yields bytes holding one or more whole SSE events, in the order and
    at the pace the upstream sent them. `usage` is set once a usage chunk has
    passed. `aclose` releases the upstream connection; it is safe to call twice.
    An error after the start ends the iteration with an error event, not an
    exception, because the client already has a 200.
    """

    usage: Usage | None
    error: GatewayError | None  # set when the stream ended on an error event

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class Provider(Protocol):
    name: str
    config: ProviderConfig

    async def start(self) -> None:
        """Open pools, load what is needed; called once at app start-up."""

    async def close(self) -> None:
        """Release every connection."""

    async def complete(self, call: Call) -> Completion: ...

    async def open_stream(self, call: Call) -> ChunkStream:
        """Return once the upstream has accepted the stream, or raise `GatewayError`."""
        ...
