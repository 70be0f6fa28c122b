"""Any OpenAI-compatible upstream: OpenAI itself, Azure-style deployments, vLLM, Ollama...

The request is the client's own body with `model` rewritten, so nothing is lost
in translation. This module adds the discipline around it: a bounded wait for a
pooled connection, per-phase timeouts, mapping of upstream statuses to the
gateway's errors with sanitized messages, usage read from the answer, and streams
turned into typed events as they arrive (`openai_stream`), their bytes untouched
unless the gateway itself changed what the upstream sends (the usage it asked for).
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import msgspec

from ..errors import (
    AnswerTooLarge,
    CredentialsRejected,
    GatewayError,
    InvalidRequest,
    UpstreamConnectTimeout,
    UpstreamError,
    with_detail,
)
from ..policy.compiled import ProviderConfig
from ..policy.provider_schema import AzureSpec, OpenAISpec
from ..sanitize import prepare_secrets, remove_secrets, sanitize_upstream_message
from ..schemas.endpoints import Endpoint
from ..schemas.events import EventSource
from ..schemas.openai import listed_prompts
from ..schemas.responses import responses_usage
from ..secret_removal import use_secrets
from ..translate.cache_control import CACHE_MARK, without_cache_control, without_extra_content
from ..upstream.client import ConnectionGate, new_session, transport_error
from ..upstream.request import SENDING
from ..upstream.retry_after import upstream_wait
from .base import ALL_ENDPOINTS, Call, Completion, check_endpoint
from .deadline import deadline_in
from .openai_stream import OpenAIStream
from .scrub import AnswerChoicesPeek, AnswerPeek, ResponsesAnswerPeek, scrubbed_error
from .status_errors import status_error
from .streaming import ResponsesEvents, TranslatedStream

__all__ = ["CredentialsRejected", "OpenAICompatProvider", "status_error", "without_bom"]

_encode = msgspec.json.Encoder().encode
# Read per request: an attribute of an enum class goes through its metaclass's `__getattr__` hook on
# CPython 3.11 (about 900 instructions), a module global does not.
_RESPONSES = Endpoint.RESPONSES
_CHAT = Endpoint.CHAT


class _ShapedAnswerPeek(AnswerPeek):
    """`AnswerPeek`, and `choices` an array when present (each choice left raw, unread): an answer of another shape
    (`"choices": "x"`) is malformed, a 502, not an answer the client's SDK cannot read (`_completion`)."""

    choices: list[msgspec.Raw] | None = None


_peek_usage = msgspec.json.Decoder(_ShapedAnswerPeek).decode
_peek_usage_choices = msgspec.json.Decoder(AnswerChoicesPeek).decode  # when a stage reads the answer's text


_peek_responses = msgspec.json.Decoder(ResponsesAnswerPeek).decode
_peek_error = msgspec.json.Decoder(dict[str, Any] | list[Any]).decode  # (a list: `_error_object`)
_MAX_ERROR_BODY = 64 * 1024
_BOM = b"\xef\xbb\xbf"  # UTF-8's byte order mark (`without_bom`)
_ERROR_CODE = re.compile(r"[a-z][a-z0-9_.-]{0,63}")  # OpenAI's codes: `invalid_value`, `unsupported_parameter`...
_ERROR_PARAM = re.compile(r"[A-Za-z_][A-Za-z0-9_.\[\]-]{0,127}")  # a request field's path: `messages[0].content`
# Google's own OpenAI-compatible APIs (Gemini's, Vertex AI's): they read a tool call's `extra_content` (`_payload`).
_GOOGLE_HOSTS = ("generativelanguage.googleapis.com", "aiplatform.googleapis.com")


class OpenAICompatProvider:
    endpoints = ALL_ENDPOINTS
    passes_error_fields = True  # a rejected request's `code` and `param` reach the client (`_pass_fields`)
    keeps_cache_control = False  # Anthropic's `cache_control` is removed before sending (`translate.cache_control`)

    def __init__(self, config: ProviderConfig, gate: ConnectionGate) -> None:
        self.name = config.name
        self.config = config
        self.stream_usage_expected = config.stream_usage  # set False once the upstream ignores the request
        self._urls = {endpoint: f"{config.base_url}/{endpoint.path}" for endpoint in Endpoint}
        self._query = dict(config.query) or None
        self._gate = gate
        self._session: aiohttp.ClientSession | None = None
        self._keeps_extra_content = (urlsplit(config.base_url).hostname or "").endswith(_GOOGLE_HOSTS)
        # (decided per provider when the policy compiles: by host for `kind: openai`, `OpenAISpec.for_host`)
        options = config.options
        self._sends_max_completion_tokens = (isinstance(options, (OpenAISpec, AzureSpec))
                                             and options.max_tokens_field == "max_completion_tokens")

    async def start(self) -> None:
        if self._session is None:
            self._session = new_session(self.config)
        # The credentials' removal pattern, built off the loop now rather than on it at the first upstream error
        # (`sanitize.prepare_secrets`: tenths of a second for a long token).
        await asyncio.to_thread(prepare_secrets, self.secrets())
        use_secrets(self, self.secrets())  # kept while this provider uses it (dropped at close: a reload)

    async def close(self) -> None:
        use_secrets(self, None)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _url(self, call: Call) -> str:
        return self._urls[call.endpoint]

    def _params(self, call: Call) -> dict[str, str] | None:
        return self._query

    def _payload(self, call: Call) -> bytes:
        body = call.body
        if not self._keeps_extra_content:  # Gemini's thought signature on a tool call, from a Gemini answer
            body = without_extra_content(body)  # (`translate.cache_control`: the same body when there is none)
        if self._sends_max_completion_tokens and "max_tokens" in body and call.endpoint is _CHAT:
            body = with_max_completion_tokens(body)
        if self._asks_for_usage(call):
            # Ask for the usage chunk so that accounting has real figures; the stream undoes
            # every trace of this request before the client sees it (see `OpenAIStream`).
            options = body.get("stream_options")
            body = {**body, "stream_options": {**(options if isinstance(options, dict) else {}), "include_usage": True}}
        return _encode(body)

    def _headers(self, call: Call) -> dict[str, str]:
        """Every kind's request headers (the others add theirs): with tracing on, the W3C trace context too."""
        if call.traceparent is None:
            return {"X-Request-Id": call.request_id}
        if call.tracestate is None:
            return {"X-Request-Id": call.request_id, "traceparent": call.traceparent.decode("ascii")}
        return {"X-Request-Id": call.request_id, "traceparent": call.traceparent.decode("ascii"),
                "tracestate": call.tracestate.decode("ascii")}

    def _asks_for_usage(self, call: Call) -> bool:
        """Whether the gateway adds `stream_options.include_usage` itself (Chat and Completions streams)."""
        return (call.stream and self.config.stream_usage and not call.client_wants_usage
                and call.endpoint is not _RESPONSES)

    def secrets(self) -> tuple[str, ...]:
        """The credentials an upstream's text must never carry to a client (`sanitize`, `unsecret`)."""
        return tuple(self.config.secrets)

    def sanitize(self, message: object) -> str:
        return sanitize_upstream_message(message, secrets=self.secrets(), public_hosts=self.config.public_hosts)

    def unsecret(self, text: str) -> str:
        """`text` without the credentials (the text beside an error: `scrub.scrubbed_error`)."""
        return remove_secrets(text, self.secrets())

    async def _send(self, call: Call) -> tuple[aiohttp.ClientResponse, float]:
        """POST and wait for the response headers (connect + first byte); map failures.

        The caller holds a connection permit from the gate and must release it.
        """
        assert self._session is not None, "provider not started"
        timeouts = call.timeouts or self.config.timeouts
        deadline = asyncio.get_running_loop().time() + timeouts.total_s
        extra: dict[str, Any] = {}
        if CACHE_MARK in call.body and not self.keeps_cache_control:  # only `/v1/messages` requests carry the mark
            call = replace(call, body=without_cache_control(call.body))
        if call.timeouts is not None and call.timeouts.connect_s != self.config.timeouts.connect_s:
            extra["timeout"] = aiohttp.ClientTimeout(total=None, connect=None, sock_connect=call.timeouts.connect_s)
        try:
            async with deadline_in(timeouts.first_byte_s):  # asyncio.timeout's semantics, less of its cost
                # `_request` itself, as `post` calls it: not through its context manager (three calls fewer)
                # Redirects are not followed: the prompt and the provider's credentials would go to wherever
                # the upstream points (aiohttp drops only `Authorization` on another host, not `api-key` and
                # the like); a 3xx is the upstream's error (`status_error`).
                response = await self._session._request(
                    "POST", self._url(call), data=self._payload(call), params=self._params(call),
                    headers=self._headers(call), allow_redirects=False, **extra,
                )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            if type(exc) is TimeoutError and not _sent():  # the first-byte timer, which runs while connecting too
                raise UpstreamConnectTimeout(f"upstream `{self.name}` timed out (connecting: its first-byte "
                                             "timeout passed before the connection was made)") from exc
            raise transport_error(exc, self.name, "waiting for the response") from exc
        if response.status != 200:
            try:
                raise await self._status_error(response, deadline, timeouts.idle_s)
            finally:
                response.close()
        return response, deadline

    async def complete(self, call: Call) -> Completion:
        check_endpoint(self, call.endpoint)
        await self._gate.acquire()
        try:
            response, deadline = await self._send(call)
            body = await self._read_body(response, deadline, (call.timeouts or self.config.timeouts).idle_s)
        finally:
            self._gate.release()
        return self._completion(call, body)

    def _completion(self, call: Call, body: bytes) -> Completion:
        """The answer for the client from the upstream's body (here: as it is, with its usage read).

        A failed Responses answer (`"status": "failed"`, its `error` object) reaches the client inside that
        body: its strings are scrubbed like any upstream error message (`scrub`), the rest of the body kept. A
        chat, completions or embeddings answer that is `{"error": ...}` with a 200 is the upstream's failure, as
        the same object in a stream is (`_in_band_error`): retried and fallen back from, never cached or billed; so is
        an error written flat, `{"object": "error", "message": ...}` (vLLM's before 0.10, other servers), on every
        endpoint, the Responses API's too (it is no Response); so is one whose `choices` is not an array, or whose
        usage is not OpenAI's (a malformed answer). A body that is
        not UTF-8 is refused (the peeks skip what they do not read): checked only when it is not ASCII
        (`isascii`: C). A UTF-8 byte order mark before the JSON (some servers and proxies write one) is dropped, from
        the client's answer as well: JSON has none (RFC 8259 8.1), but a parser may ignore one."""
        if not body.isascii():
            try:
                body.decode()
            except UnicodeDecodeError as exc:  # it would reach the client (and the cache) as charset=utf-8
                raise UpstreamError(f"upstream `{self.name}` answered with invalid UTF-8") from exc
        try:
            if call.endpoint is _RESPONSES:
                answer = _peek_responses(body)
                if answer.object == "error":  # a flat error: no Response (a failed one's `object` is "response")
                    raise self._in_band_error(answer.error if answer.error is not None else answer.message)
                if answer.error is not None:  # `"error": null` unless the response failed
                    body = scrubbed_error(body, self.sanitize, self.unsecret)
                return Completion(body, responses_usage(answer.usage))
            if call.read_choices:  # a stage reads the answer's text: its choices in the same decode
                try:
                    peek = _peek_usage_choices(body)
                    if peek.error is not None or peek.object == "error":
                        raise self._in_band_error(peek.error if peek.error is not None else peek.message)
                    return Completion(body, peek.usage, choices=peek.choices or [])
                except msgspec.ValidationError:
                    pass  # choices of unusual types: the usage alone (the stage reads the body its own way)
            plain = _peek_usage(body)
            if plain.error is not None or plain.object == "error":  # absent from an answer, in the common case
                raise self._in_band_error(plain.error if plain.error is not None else plain.message)
        except msgspec.ValidationError as exc:  # JSON of another shape than an answer's (`"choices": "x"`)
            raise UpstreamError(f"upstream `{self.name}` answered with a malformed answer ({exc})") from exc
        except (msgspec.DecodeError, RecursionError) as exc:  # (Recursion: nested too deep)
            bare = without_bom(body)  # (looked for only once the decoding failed)
            if bare is not None:
                return self._completion(call, bare)
            raise UpstreamError(f"upstream `{self.name}` answered with invalid JSON") from exc
        return Completion(body, plain.usage)

    def _in_band_error(self, error: Any) -> UpstreamError:
        """A 200 answer that is an error (`{"error": {"message": ...}}` or `{"error": "..."}`: vLLM, proxies,
        overloaded servers; or flat, `{"object": "error", "message": "..."}`, its `message` given here): a 502 with
        its message scrubbed, as a stream's in-band error ends the stream (`openai_stream`)."""
        message = error.get("message") if isinstance(error, dict) else error
        message = message if isinstance(message, str) else ""
        base = f"upstream `{self.name}` answered 200 with an error"
        return with_detail(UpstreamError, base, self.sanitize(message)[:500]) if message else UpstreamError(
            f"{base}: no message")

    async def _read_body(self, response: aiohttp.ClientResponse, deadline: float, idle_s: float) -> bytes:
        """Read a whole body with the idle timeout between reads and the size cap while reading.

        What has already arrived is taken without a timer: only a read that waits can time out, and a
        small answer usually comes whole with its headers. An `asyncio.timeout` per read armed and
        cancelled a loop timer and read its enum state about nine times (slow on CPython 3.11)."""
        loop = asyncio.get_running_loop()
        content = response.content
        parts: list[bytes] = []
        size = 0
        try:
            while True:
                data = content.read_nowait()
                if not data:
                    if content.at_eof():
                        break
                    async with asyncio.timeout_at(min(deadline, loop.time() + idle_s)):
                        data = await content.readany()
                    if not data:
                        break
                size += len(data)
                if size > self.config.max_response_bytes:
                    raise AnswerTooLarge(f"upstream `{self.name}` answered with a body of more than "
                                         f"{self.config.max_response_bytes} bytes (its `max_response_bytes`)")
                parts.append(data)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            response.close()
            # (cut after its head, by a stall or a reset alike: an answer begun, which the upstream bills: `at_work`)
            raise transport_error(exc, self.name, "reading the response", response.status) from exc
        except BaseException:
            # An oversized body, or this task cancelled (the alias's deadline, the client gone): the connection
            # is closed now, not left to the upstream, which would otherwise hold it, outside the gate's count
            # (`complete` gives the permit back), until it finishes sending.
            response.close()
            raise
        response.release()
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def open_stream(self, call: Call) -> EventSource:
        check_endpoint(self, call.endpoint)
        await self._gate.acquire()
        try:
            response, deadline = await self._send(call)
        except BaseException:
            self._gate.release()
            raise
        kind = response.headers.get("Content-Type", "")
        if not kind.startswith("text/event-stream") and not kind.lower().startswith("text/event-stream"):  # (any case)
            response.close()
            self._gate.release()
            raise UpstreamError(f"upstream `{self.name}` did not answer with an event stream")
        return self._stream(call, response, deadline, (call.timeouts or self.config.timeouts).idle_s)

    def _stream(self, call: Call, response: aiohttp.ClientResponse, deadline: float, idle_s: float) -> EventSource:
        """The started stream's events (here: OpenAI's chunks, or the Responses API's events)."""
        if call.endpoint is _RESPONSES:
            return TranslatedStream(self, response, deadline, idle_s, ResponsesEvents(self))
        return OpenAIStream(self, response, deadline, self._asks_for_usage(call), idle_s, call.read_choices,
                            _answers(call.body))

    def release(self) -> None:
        """Give back the connection permit a started stream held."""
        self._gate.release()

    async def _status_error(self, response: aiohttp.ClientResponse, deadline: float, idle_s: float) -> GatewayError:
        """Turn a non-200 answer into the gateway error a client should see.

        Its body is read to its end (up to `_MAX_ERROR_BODY`) however many reads it arrives in, each read
        under the call's idle timeout and all of them within its total: a JSON error cut at its first read
        would not parse, and a context window overflow would go unrecognised. The wait handed on is strictly
        read (`upstream.retry_after`): `retry-after-ms`, else `Retry-After`, capped, or none."""
        peeked: dict[str, Any] = {}
        try:
            body = await _error_body(response, deadline, idle_s)
            peeked = _error_object(_peek_error(without_bom(body) or body))  # (a mark before it: `without_bom`)
            message, code = self._error_detail(peeked)
        except (aiohttp.ClientError, OSError, TimeoutError, msgspec.DecodeError, msgspec.ValidationError,
                RecursionError):  # (a body nested too deep to decode: no message)
            message = code = None
        hint = self._retry_hint(response, peeked)
        error = self._map_status(response.status, self.sanitize(message), hint,
                                 code if isinstance(code, str) else None, message if isinstance(message, str) else "")
        error.upstream_status = response.status
        if type(error) is InvalidRequest and self.passes_error_fields:
            self._pass_fields(error, peeked, code)
        return error

    def _pass_fields(self, error: GatewayError, peeked: dict[str, Any], code: object) -> None:
        """An OpenAI-shaped upstream's `code` and `param` of a rejected request are the client's to read (which
        parameter, why): passed on when they look like identifiers and hold nothing the scrubbing would remove."""
        detail = peeked.get("error")
        param = detail.get("param") if isinstance(detail, dict) else None
        if isinstance(code, str) and _ERROR_CODE.fullmatch(code) and self.sanitize(code) == code:
            error.code, error.passed_code = code, True
        if isinstance(param, str) and _ERROR_PARAM.fullmatch(param) and self.sanitize(param) == param:
            error.param = param

    def _retry_hint(self, response: aiohttp.ClientResponse, body: dict[str, Any]) -> float | None:
        """The seconds an error answer asks to wait before a retry (here: its `retry-after-ms`, else its
        `Retry-After`), or None."""
        return upstream_wait(response.headers)

    def _error_detail(self, body: dict[str, Any]) -> tuple[object, object]:
        """The message and code of an upstream's error body (here: OpenAI's `{"error": {...}}`, or the flat
        `{"object": "error", "message": ..., "type": ..., "code": ...}` of vLLM before 0.10 and other servers)."""
        detail = body.get("error")
        if isinstance(detail, dict):
            return detail.get("message"), detail.get("code")
        if detail is None and body.get("object") == "error":
            return body.get("message"), body.get("code")
        return detail, None

    def _map_status(self, status: int, detail: str, retry_after: float | None, code: str | None, raw: str
                    ) -> GatewayError:
        return status_error(self.name, status, detail, retry_after, code, raw)


def _sent() -> bool:
    """Whether the request that just failed had gone out (its connection made, its head being written), as far as
    the gateway knows: marked where the accounting stage asks (`upstream.request.SENDING`: the request's
    `upstream_sent`, False at each attempt's start), which is where it matters (a request never sent is billed
    nothing). Unmarked, it counts as sent: a timeout waiting for the answer, as before."""
    owner = SENDING.get()
    return owner is None or bool(owner.upstream_sent)


def without_bom(body: bytes) -> bytes | None:
    """`body` after the UTF-8 byte order mark it opens with (some servers and proxies write one before an answer or
    an error: see `_completion`), or None when it has none, or two (one mark is dropped, not any number)."""
    return body[3:] if body[:3] == _BOM and body[3:6] != _BOM else None


def with_max_completion_tokens(body: dict[str, Any]) -> dict[str, Any]:
    """A chat request's `max_tokens` as `max_completion_tokens`, for an upstream that refuses the first (OpenAI's
    reasoning models do): the request's own `max_completion_tokens` wins when it has one, never both are sent. The
    cap is the one accounting read (`max_completion_tokens`, else `max_tokens`: `accounting.outright`). A copy:
    the client's body is what a fallback target gets."""
    body = dict(body)
    cap = body.pop("max_tokens")
    if body.get("max_completion_tokens") is None and cap is not None:
        body["max_completion_tokens"] = cap
    return body


def _answers(body: dict[str, Any]) -> int:
    """How many answers a streamed request asks for, each of which must finish: `n`, times the prompts a
    completions request lists (not token ids: one prompt)."""
    n = body.get("n")
    return (n if type(n) is int and n > 1 else 1) * (len(listed_prompts(body["prompt"])) if "prompt" in body else 1)


def _error_object(decoded: dict[str, Any] | list[Any]) -> dict[str, Any]:
    """An error body's object: Google wraps the error of a streamed request (`streamGenerateContent?alt=sse`) in a
    one-element array, `[{"error": {...}}]` (as google-genai's `APIError` unwraps it): read as the object it holds,
    its message, code, `RetryInfo` and a context window's overflow were lost. Any other array holds none."""
    if isinstance(decoded, dict):
        return decoded
    return decoded[0] if len(decoded) == 1 and type(decoded[0]) is dict else {}


async def _error_body(response: aiohttp.ClientResponse, deadline: float, idle_s: float) -> bytes:
    """An error answer's body, up to `_MAX_ERROR_BODY` (the rest is not read), however many reads it takes."""
    loop = asyncio.get_running_loop()
    content = response.content
    parts: list[bytes] = []
    size = 0
    while size < _MAX_ERROR_BODY:
        async with asyncio.timeout_at(min(deadline, loop.time() + idle_s)):
            data = await content.read(_MAX_ERROR_BODY - size)
        if not data:
            break
        parts.append(data)
        size += len(data)
    return b"".join(parts)
