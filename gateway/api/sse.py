"""Server-Sent Events framing at the HTTP edge, for Chat Completions and Completions streams.

Stages and providers deal in typed events; here they are written as OpenAI
writes them (the Responses API's named events are framed in
`responses_frames.py`, the Messages API's in `translate/anthropic_answer.py`).
A usage report is forwarded only to a client that asked for usage
(`stream_options.include_usage`), so the gateway's own request for usage never
shows; an error becomes the in-band `data: {"error": ...}` event that the SDKs
raise as `APIError`.
"""

from __future__ import annotations

import msgspec

from ..errors import GatewayError
from ..schemas.events import Chunk, StreamError, StreamEvent, UsageReport

__all__ = ["DONE_FRAME", "error_frame", "frame"]

DONE_FRAME = b"data: [DONE]\n\n"
_encoder = msgspec.json.Encoder()


def error_frame(error: GatewayError) -> bytes:
    body = {"error": {"message": error.message, "type": error.type, "param": None, "code": error.code}}
    return b"data: " + _encoder.encode(body) + b"\n\n"


def frame(events: list[StreamEvent], wants_usage: bool) -> bytes:
    """The bytes for one batch of events."""
    if len(events) == 1 and type(event := events[0]) is Chunk:  # a slow stream's every batch: no list, no join
        return b"data: %b\n\n" % event.payload
    parts: list[bytes] = []
    for event in events:
        if isinstance(event, Chunk):
            parts.append(b"data: " + event.payload + b"\n\n")
        elif isinstance(event, UsageReport):
            if wants_usage and event.payload is not None:
                parts.append(b"data: " + event.payload + b"\n\n")
        elif isinstance(event, StreamError):
            parts.append(error_frame(event.error))
        else:
            parts.append(DONE_FRAME)
    return parts[0] if len(parts) == 1 else b"".join(parts)
