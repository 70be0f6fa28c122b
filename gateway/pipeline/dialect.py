"""A client wire format other than OpenAI's, spoken at the edge (Anthropic's Messages on `/v1/messages`).

A dialect decodes the client's request into the internal OpenAI-shaped request
that every stage reads, and encodes what the pipeline answers (a body, a stream,
an error) back into the client's format. The pipeline in between is the same for
every client, so a policy's keys, guards, limits, cache and routing apply alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from ..errors import GatewayError
from ..schemas.events import StreamEvent

if TYPE_CHECKING:
    from .context import RequestContext

__all__ = ["Dialect", "StreamFramer"]


class StreamFramer(Protocol):
    """Per stream: typed events in, the client's bytes out."""

    def frame(self, events: list[StreamEvent]) -> bytes: ...


class Dialect(Protocol):
    """A dialect may also have `translate(body) -> Callable[[RequestContext], bytes]`: a complete answer translated
    within its attempt (`routing.exchange`, which looks for it by name), an `UpstreamError` when it cannot be (the
    attempt's failure), else the writer of the client's body that the edge calls instead of `reply`."""

    label: str  # the endpoint's metric label

    def decode(self, raw: bytes, headers: Any) -> tuple[dict[str, Any], msgspec.Struct]:
        """The internal request (dict and typed struct) for a client body (and its request's raw headers), or an
        `InvalidRequest`."""

    def reply(self, ctx: RequestContext, body: bytes) -> bytes:
        """A complete answer in the client's format."""

    def framer(self, ctx: RequestContext) -> StreamFramer: ...

    def error_body(self, error: GatewayError) -> bytes: ...
