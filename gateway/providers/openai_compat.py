"""Any upstream that speaks OpenAI's API: OpenAI, Azure-style deployments, vLLM, Ollama, LM Studio, Groq...

Translation is nearly the identity: the request goes out as the client sent it
with `model` set to the upstream's name, and the answer comes back as is. What
this module adds is the discipline around it: per-phase timeouts, mapping of
upstream statuses to the gateway's errors with sanitized messages, usage read
from the answer, and streams forwarded event by event as they arrive.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec

from ..errors import (
    BodyTooLarge,
    GatewayError,
    InvalidRequest,
    RateLimited,
    UpstreamError,
    UpstreamTimeout,
    sanitize_upstream_message,
)
from ..pipeline.endpoints import Endpoint
from ..policy.compiled import ProviderConfig
from ..schemas.openai import ChunkPeek, Usage, UsagePeek
from ..upstream.client import new_session, transport_error
from ..upstream.sse import DONE, DONE_EVENT, SSEDecoder, data_event, error_event
from .base import Call, Completion

__all__ = ["OpenAICompatProvider"]

_encode = msgspec.json.Encoder().encode
_peek_usage = msgspec.json.Decoder(UsagePeek).decode
_peek_chunk = msgspec.json.Decoder(ChunkPeek).decode
_peek_error = msgspec.json.Decoder(dict[str, Any]).decode
_MAX_ERROR_BODY = 64 * 1024
_MAX_RESPONSE_BODY = 64 * 1024 * 1024


class OpenAICompatProvider:
    def __init__(self, config: ProviderConfig) -> None:
        self.name = config.name
        self.config = config
        self._urls = {endpoint: f"{config.base_url}/{endpoint.path}" for endpoint in Endpoint}
        self._query = dict(config.query) or None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is None:
            self._session = new_session(self.config)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _payload(self, call: Call) -> bytes:
        body = call.body
        if call.stream and self.config.stream_usage and not call.client_wants_usage:
            # Ask for the usage chunk so that accounting has real figures; it is not
            # forwarded to a client that did not ask for it (see `_OpenAIStream`).
            options = body.get("stream_options")
            body = {**body, "stream_options": {**(options if isinstance(options, dict) else {}), "include_usage": True}}
        return _encode(body)

    async def _send(self, call: Call) -> tuple[aiohttp.ClientResponse, float]:
        """POST and wait for the response headers (connect + first byte); map failures."""
        assert self._session is not None, "provider not started"
        timeouts = self.config.timeouts
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeouts.total_s
        try:
            async with asyncio.timeout(timeouts.first_byte_s):
                response = await self._session.post(
                    self._urls[call.endpoint],
                    data=self._payload(call),
                    params=self._query,
                    headers={"X-Request-Id": call.request_id},
                )
        except GatewayError:
            raise
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise transport_error(exc, self.name, "waiting for the response") from exc
        if response.status != 200:
            try:
                raise await self._status_error(response)
            finally:
                response.close()
        return response, deadline

    async def complete(self, call: Call) -> Completion:
        response, deadline = await self._send(call)
        try:
            async with asyncio.timeout_at(deadline):
                body = await response.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            response.close()
            raise transport_error(exc, self.name, "reading the response") from exc
        finally:
            response.release()
        if len(body) > _MAX_RESPONSE_BODY:
            raise UpstreamError(f"upstream `{self.name}` answered with an oversized body")
        try:
            usage = _peek_usage(body).usage
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise UpstreamError(f"upstream `{self.name}` answered with invalid JSON") from exc
        return Completion(body, usage)

    async def open_stream(self, call: Call) -> _OpenAIStream:
        response, deadline = await self._send(call)
        content_type = response.headers.get("Content-Type", "")
        if not content_type.startswith("text/event-stream"):
            response.close()
            raise UpstreamError(f"upstream `{self.name}` did not answer with an event stream")
        hide_usage = self.config.stream_usage and not call.client_wants_usage
        return _OpenAIStream(self.name, response, deadline, self.config.timeouts.idle_s, hide_usage)

    async def _status_error(self, response: aiohttp.ClientResponse) -> GatewayError:
        """Turn a non-200 answer into the gateway error a client should see."""
        try:
            async with asyncio.timeout(self.config.timeouts.idle_s):
                raw = await response.content.read(_MAX_ERROR_BODY)
            detail = _peek_error(raw).get("error")
            message = detail.get("message") if isinstance(detail, dict) else detail
        except (aiohttp.ClientError, OSError, TimeoutError, msgspec.DecodeError, msgspec.ValidationError):
            message = None
        return status_error(self.name, response.status, message, response.headers.get("Retry-After"))


def status_error(provider: str, status: int, message: object, retry_after: str | None) -> GatewayError:
    """The client-facing error for an upstream's HTTP status."""
    detail = sanitize_upstream_message(message)
    suffix = f": {detail}" if detail else ""
    if status == 429:
        headers = {"Retry-After": retry_after} if retry_after and _safe_retry_after(retry_after) else {}
        return RateLimited(f"upstream `{provider}` is rate limited{suffix}", headers=headers)
    if status in (400, 422):
        return InvalidRequest(f"upstream `{provider}` rejected the request{suffix}")
    if status == 413:
        return BodyTooLarge(f"upstream `{provider}` rejected the request as too large")
    if status in (408, 504):
        return UpstreamTimeout(f"upstream `{provider}` timed out (HTTP {status})")
    if status in (401, 403):
        return UpstreamError(f"upstream `{provider}` rejected the gateway's credentials (HTTP {status})")
    return UpstreamError(f"upstream `{provider}` failed with HTTP {status}{suffix}")


def _safe_retry_after(value: str) -> bool:
    return len(value) <= 40 and (value.isdigit() or value[:3].isalpha())


class _OpenAIStream:
    """A started OpenAI SSE stream, forwarded event by event (see `ChunkStream`)."""

    def __init__(
        self, provider: str, response: aiohttp.ClientResponse, deadline: float, idle_s: float, hide_usage: bool
    ) -> None:
        self.usage: Usage | None = None
        self.error: GatewayError | None = None
        self._provider = provider
        self._response = response
        self._deadline = deadline
        self._idle_s = idle_s
        self._hide_usage = hide_usage

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._events()

    async def aclose(self) -> None:
        self._response.close()

    async def _events(self) -> AsyncIterator[bytes]:
        decoder = SSEDecoder()
        content = self._response.content
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    async with asyncio.timeout_at(min(self._deadline, loop.time() + self._idle_s)):
                        data = await content.readany()
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    yield self._fail(transport_error(exc, self._provider, "mid-stream"))
                    return
                payloads = decoder.feed(data) if data else decoder.flush()
                out, finished = self._forward(payloads)
                if out:
                    yield out
                if finished:
                    return
                if not data:  # the upstream ended without [DONE]: end the client's stream properly
                    yield DONE_EVENT
                    return
        except ValueError as exc:
            yield self._fail(UpstreamError(f"upstream `{self._provider}` sent an invalid stream: {exc}"))
        finally:
            self._response.close()

    def _fail(self, error: GatewayError) -> bytes:
        """Remember why the stream ended and make the error event that tells the client."""
        self.error = error
        return error_event(error.message, error.type, error.code)

    def _forward(self, payloads: list[bytes]) -> tuple[bytes, bool]:
        """The bytes to send for these events, and whether the stream is over."""
        out = []
        for payload in payloads:
            if payload == DONE:
                out.append(DONE_EVENT)
                return b"".join(out), True
            try:
                peek = _peek_chunk(payload)
            except (msgspec.DecodeError, msgspec.ValidationError):
                out.append(self._fail(UpstreamError(f"upstream `{self._provider}` sent a malformed stream event")))
                return b"".join(out), True
            if peek.error is not None:
                detail = sanitize_upstream_message(peek.error.message)
                out.append(self._fail(UpstreamError(f"upstream `{self._provider}` failed mid-stream: {detail}")))
                return b"".join(out), True
            if peek.usage is not None:
                self.usage = peek.usage
                if self._hide_usage and not peek.choices:
                    continue
            out.append(data_event(payload))
        return b"".join(out), False


