"""Anthropic's Messages API (`kind: anthropic`): Chat Completions in, Chat Completions out.

The transport (pool, gate, per-phase timeouts, body cap, sanitized errors) is the
OpenAI-compatible provider's; this module changes what travels: the request is
translated (`translate.chat_to_anthropic`), sent to `{base_url}/messages` with
`x-api-key` and `anthropic-version`, and the answer or each stream event is
translated back. Anthropic's error types map to the gateway's statuses:
`overloaded_error` (HTTP 529) is a 503 that routing retries and falls back on,
`rate_limit_error` a 429 with its wait (`retry-after-ms`, else `retry-after`), a prompt too long for the window a
context-length error, a 400 that refuses the account (its credit balance too low, its
usage limit reached, its organization disabled: `account_state`) the gateway's
credential failing, which routing falls back from. A 200 answer that is no Message (`type` other than
`message`, no `content` list) is never an empty success: Anthropic's error
envelope in it is the error its type gives with its own status, anything else a
502 `UpstreamError`; routing retries or falls back on both.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import msgspec

from ..errors import GatewayError, UpstreamError, UpstreamOverloaded, with_detail
from ..policy.compiled import ProviderConfig
from ..policy.provider_schema import AnthropicSpec
from ..schemas.endpoints import Endpoint
from ..schemas.events import EventSource
from ..translate.chat_to_anthropic import AnthropicEvents, anthropic_request, chat_completion
from ..translate.common import BETA
from ..upstream.client import ConnectionGate
from ..upstream.retry_after import wait_headers
from .account_state import anthropic_account_refusal
from .base import Call, Completion
from .openai_compat import OpenAICompatProvider, status_error, without_bom
from .streaming import TranslatedStream

__all__ = ["AnthropicProvider"]

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(dict[str, Any]).decode
_OVERLOADED = 529
# Anthropic's error types, by the HTTP status it sends them with (for an in-stream `error` event).
_STATUS_OF_TYPE = {
    "invalid_request_error": 400, "authentication_error": 401, "permission_error": 403, "not_found_error": 404,
    "request_too_large": 413, "rate_limit_error": 429, "api_error": 500, "overloaded_error": _OVERLOADED,
    "timeout_error": 504,
}


class AnthropicProvider(OpenAICompatProvider):
    endpoints = frozenset({Endpoint.CHAT})
    passes_error_fields = False  # (its envelope's `type` or `status` is no OpenAI code)
    keeps_cache_control = True  # `cache_control` goes on the Messages blocks (`translate.chat_to_anthropic`)

    def __init__(self, config: ProviderConfig, gate: ConnectionGate) -> None:
        super().__init__(config, gate)
        options = config.options if isinstance(config.options, AnthropicSpec) else AnthropicSpec()
        self.options = options
        self.target = f"Anthropic's Messages API (provider `{config.name}`)"
        self._messages_url = f"{config.base_url}/messages"
        self._static = {"anthropic-version": options.version}
        if options.beta:
            self._static["anthropic-beta"] = ",".join(options.beta)

    def _url(self, call: Call) -> str:
        return self._messages_url

    def _headers(self, call: Call) -> dict[str, str]:
        headers = {**self._static, **super()._headers(call)}
        betas = call.body.get(BETA)
        if betas and self.options.forward_beta:  # a `/v1/messages` client's, after the policy's own
            headers["anthropic-beta"] = ",".join(dict.fromkeys([*self.options.beta, *betas]))
        return headers

    def _payload(self, call: Call) -> bytes:
        return _encode(anthropic_request(call.body, self.options.default_max_tokens, self.target))

    def _completion(self, call: Call, body: bytes) -> Completion:
        try:
            answer = _decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:  # (Recursion: nested too deep)
            bare = without_bom(body)
            if bare is not None:
                return self._completion(call, bare)
            raise UpstreamError(f"upstream `{self.name}` answered with invalid JSON") from exc
        if answer.get("type") != "message" or not isinstance(answer.get("content"), list):
            raise self._not_a_message(answer)
        try:
            chat, usage = chat_completion(answer)
        except (AttributeError, TypeError, RecursionError) as exc:
            raise UpstreamError(f"upstream `{self.name}` answered with an invalid message") from exc
        return Completion(_encode(chat), usage, chat)

    def _not_a_message(self, answer: dict[str, Any]) -> GatewayError:
        """A 200 answer that is no Message: Anthropic's error envelope is the error its type's status gives
        (`overloaded_error`: a 503 that routing retries), anything else an `UpstreamError` (never an empty
        success)."""
        detail = answer.get("error")
        if answer.get("type") == "error" and isinstance(detail, dict):
            return self._event_error(detail)
        return UpstreamError(f"upstream `{self.name}` answered with HTTP 200 but no message")

    def _stream(self, call: Call, response: aiohttp.ClientResponse, deadline: float, idle_s: float) -> EventSource:
        return TranslatedStream(self, response, deadline, idle_s, AnthropicEvents(self._event_error))

    def _error_detail(self, body: dict[str, Any]) -> tuple[object, object]:
        """Anthropic's envelope: `{"type": "error", "error": {"type": ..., "message": ...}}`."""
        detail = body.get("error")
        if isinstance(detail, dict):
            return detail.get("message"), detail.get("type")
        return None, None

    def _map_status(self, status: int, detail: str, retry_after: float | None, code: str | None, raw: str
                    ) -> GatewayError:
        if status == _OVERLOADED or code == "overloaded_error":
            hint = wait_headers(retry_after) if retry_after is not None else {}
            return with_detail(UpstreamOverloaded, f"upstream `{self.name}` is overloaded", detail, headers=hint)
        refused = anthropic_account_refusal(self.name, status, raw)
        if refused is not None:  # a 400 for the account (out of credit, disabled): the gateway's, not the client's
            return refused
        return status_error(self.name, status, detail, retry_after, code, raw)

    def _event_error(self, detail: dict[str, Any]) -> GatewayError:
        """An `error` event mid-stream (e.g. overloaded after the 200): the error the client is told."""
        kind = detail.get("type")
        status = _STATUS_OF_TYPE.get(kind if isinstance(kind, str) else "", 500)
        message = detail.get("message")
        error = self._map_status(status, self.sanitize(message), None, kind if isinstance(kind, str) else None,
                                 message if isinstance(message, str) else "")
        error.upstream_status = status
        return error
