"""Google Gemini, the Generative Language API (`kind: gemini`): Chat Completions in and out.

Requests go to `{base_url}/models/{model}:generateContent`, or to
`:streamGenerateContent?alt=sse` for a stream, with the key in `x-goog-api-key`;
translation is in `translate.chat_to_gemini` (the request) and
`translate.gemini_to_chat` (the answer). Errors come as Google's
`{"error": {"code", "message", "status", "details"}}` (a stream's wrapped in a
one-element array: `openai_compat._error_object`): the HTTP status decides the
gateway's error as for any upstream (429 rate limited, 5xx retried), a prompt over
the model's window is a context-length error that routing can fall back on, and a
bad key (its `ErrorInfo.reason`) or an account Google will not serve
(`account_state.gemini_account_refusal`) is the gateway's credential rejected.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

import aiohttp
import msgspec

from ..errors import ContentPolicyViolation, ContextLengthExceeded, CredentialsRejected, GatewayError, UpstreamError
from ..policy.compiled import ProviderConfig
from ..schemas.endpoints import Endpoint
from ..schemas.events import EventSource
from ..translate.chat_to_gemini import gemini_request
from ..translate.gemini_to_chat import GeminiEvents, chat_completion
from ..upstream.client import ConnectionGate
from .account_state import gemini_account_refusal
from .base import Call, Completion
from .openai_compat import OpenAICompatProvider, status_error, without_bom
from .streaming import TranslatedStream

__all__ = ["GeminiProvider"]

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(dict[str, Any]).decode
_TOO_LONG = re.compile(r"exceeds the maximum number of tokens", re.IGNORECASE)
# Google's reasons for a 400 that is the gateway's credential, not the client's request.
_BAD_KEY = re.compile(r'"(?:API_KEY_INVALID|API_KEY_EXPIRED)"|API key not valid|API key expired', re.IGNORECASE)
# google.rpc.ErrorInfo's `reason` for a bad key: "API Key not found" says neither of `_BAD_KEY`'s words, only this.
_KEY_REASONS = frozenset({"API_KEY_INVALID", "API_KEY_EXPIRED"})
_MAX_DETAILS = 16  # details read for a reason (the body is capped at 64 KiB: `openai_compat._MAX_ERROR_BODY`)
_RETRY_DELAY = re.compile(r"^(\d{1,6}(?:\.\d+)?)s(?!\n)$")  # google.rpc.RetryInfo's `retryDelay`: "37s", "1.5s"


class GeminiProvider(OpenAICompatProvider):
    endpoints = frozenset({Endpoint.CHAT})
    passes_error_fields = False  # (its envelope's `type` or `status` is no OpenAI code)

    def __init__(self, config: ProviderConfig, gate: ConnectionGate) -> None:
        super().__init__(config, gate)
        self.target = f"the Gemini API (provider `{config.name}`)"
        self._stream_query = {**config.query, "alt": "sse"}
        self._model_urls: dict[tuple[str, bool], str] = {}

    def _url(self, call: Call) -> str:
        model = str(call.body.get("model", ""))
        key = (model, call.stream)
        url = self._model_urls.get(key)
        if url is None:
            method = "streamGenerateContent" if call.stream else "generateContent"
            name = model.removeprefix("models/")  # (Google lists models as `models/gemini-...`: either spelling)
            url = f"{self.config.base_url}/models/{quote(name, safe='.-_')}:{method}"
            if len(self._model_urls) < 1024:  # bounded: models come from the policy's targets
                self._model_urls[key] = url
        return url

    def _params(self, call: Call) -> dict[str, str] | None:
        return self._stream_query if call.stream else self._query

    def _payload(self, call: Call) -> bytes:
        return _encode(gemini_request(call.body, self.target))

    def _completion(self, call: Call, body: bytes) -> Completion:
        try:
            answer = _decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
            bare = without_bom(body)
            if bare is not None:
                return self._completion(call, bare)
            raise UpstreamError(f"upstream `{self.name}` answered with invalid JSON") from exc
        try:
            chat, usage = chat_completion(answer, self.name)
        except ContentPolicyViolation:
            raise
        except (AttributeError, TypeError, RecursionError) as exc:
            raise UpstreamError(f"upstream `{self.name}` answered with invalid JSON") from exc
        return Completion(_encode(chat), usage, chat)

    def _stream(self, call: Call, response: aiohttp.ClientResponse, deadline: float, idle_s: float) -> EventSource:
        return TranslatedStream(self, response, deadline, idle_s, GeminiEvents(self._event_error, self.name))

    def _error_detail(self, body: dict[str, Any]) -> tuple[object, object]:
        """Google's message, and its `status` (e.g. INVALID_ARGUMENT) as the code, or a bad key's reason (`_kind`)."""
        detail = body.get("error")
        if isinstance(detail, dict):
            return detail.get("message"), _kind(detail)
        return None, None

    def _event_error(self, detail: dict[str, Any]) -> GatewayError:
        """An `{"error": {...}}` event mid-stream (Google's error object: `code` an HTTP status, `status` e.g.
        RESOURCE_EXHAUSTED): the error the client is told, mapped and scrubbed as an error answer would be."""
        code, message, kind = detail.get("code"), detail.get("message"), _kind(detail)
        status = code if isinstance(code, int) and 400 <= code <= 599 else 500
        error = self._map_status(status, self.sanitize(message), None, kind if isinstance(kind, str) else None,
                                 message if isinstance(message, str) else "")
        error.upstream_status = status
        return error

    def _retry_hint(self, response: aiohttp.ClientResponse, body: dict[str, Any]) -> float | None:
        """`Retry-After`, else the body's `RetryInfo.retryDelay` (Google's 429 RESOURCE_EXHAUSTED has only that)."""
        hint = super()._retry_hint(response, body)
        return hint if hint is not None else _retry_delay(body)

    def _map_status(self, status: int, detail: str, retry_after: float | None, code: str | None, raw: str
                    ) -> GatewayError:
        if status == 400 and _TOO_LONG.search(raw[:2000]):
            return ContextLengthExceeded(f"upstream `{self.name}` rejected the request: the prompt exceeds its "
                                         f"context window: {detail}")
        if status == 400 and (code in _KEY_REASONS or _BAD_KEY.search(raw[:4000])):  # Google's 400 for a bad key:
            # the gateway's, not the client's (its message says the status Google sent)
            return CredentialsRejected(f"upstream `{self.name}` rejected the gateway's credentials (HTTP 400: its API "
                                       "key is not valid, expired or not found)")
        if status in (400, 402):  # an account Google will not serve (out of credit, its location): not the client's
            refused = gemini_account_refusal(self.name, status, raw)
            if refused is not None:
                return refused
        return status_error(self.name, status, detail, retry_after, code, raw)


def _kind(error: dict[str, Any]) -> object:
    """An error object's `status`, or, for a bad key, its `ErrorInfo.reason` (API_KEY_INVALID, API_KEY_EXPIRED:
    "API Key not found. Please pass a valid API key." names neither in its message); read from the first
    `_MAX_DETAILS` details only."""
    details = error.get("details")
    if type(details) is list:
        for detail in details[:_MAX_DETAILS]:
            reason = detail.get("reason") if type(detail) is dict else None  # (google.rpc.ErrorInfo's)
            if type(reason) is str and reason in _KEY_REASONS:
                return reason
    return error.get("status")


def _retry_delay(body: dict[str, Any]) -> float | None:
    """The seconds a Google error asks to wait, from its `RetryInfo.retryDelay` ("37s"): it sends no Retry-After."""
    error = body.get("error")
    details = error.get("details") if isinstance(error, dict) else None
    for detail in details if isinstance(details, list) else ():
        delay = detail.get("retryDelay") if isinstance(detail, dict) else None
        found = _RETRY_DELAY.match(delay) if isinstance(delay, str) else None
        if found is not None:  # (a fraction is passed on as it is: `retry-after-ms`)
            return float(found[1])
    return None
