"""The OpenAI endpoints the gateway serves, with the request struct that checks each."""

from __future__ import annotations

import enum
from functools import cached_property

import msgspec

from .openai import ChatRequest, CompletionRequest, EmbeddingRequest
from .responses import ResponsesRequest

__all__ = ["Endpoint"]


class Endpoint(enum.Enum):
    CHAT = "chat/completions"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"
    RESPONSES = "responses"  # forwarded to providers that serve the Responses API (`Provider.endpoints`)

    # Members are compared by identity (an Enum's `__eq__` is object's), so object's hash fits them too; Enum's
    # own, `hash(self._name_)`, is a Python call on CPython 3.11, made a few times per request (dict and set keys).
    __hash__ = object.__hash__

    @property
    def path(self) -> str:
        return self.value

    # cached: read on every request, and a property of an enum member costs more than the attribute
    @cached_property
    def label(self) -> str:
        """The metric label: short, fixed set (made once: `Enum.name` is slow, and this is read per request)."""
        return _LABELS[self]

    @property
    def request_type(self) -> type[msgspec.Struct]:
        return _REQUEST_TYPES[self]

    @cached_property
    def streams(self) -> bool:
        return self is not Endpoint.EMBEDDINGS


_LABELS: dict[Endpoint, str] = {endpoint: endpoint.name.lower() for endpoint in Endpoint}


_REQUEST_TYPES: dict[Endpoint, type[msgspec.Struct]] = {
    Endpoint.CHAT: ChatRequest,
    Endpoint.COMPLETIONS: CompletionRequest,
    Endpoint.EMBEDDINGS: EmbeddingRequest,
    Endpoint.RESPONSES: ResponsesRequest,
}
