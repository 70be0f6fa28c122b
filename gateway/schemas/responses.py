"""The OpenAI Responses API (`POST /v1/responses`): what ingress checks, and where its usage is.

The gateway forwards a Responses request to upstreams that serve the same API;
it reads only what routing, guards and accounting need: the model, `stream`,
the input texts, and the usage (`input_tokens`/`output_tokens`, in the answer
or in the stream's `response.completed` event), reported in the OpenAI usage
shape the rest of the gateway reads.
"""

from __future__ import annotations

from typing import Annotated, Any

from msgspec import Meta, Struct

from ..errors import Unsupported
from .openai import CompletionTokensDetails, PromptTokensDetails, Usage

__all__ = ["ResponsesEventPeek", "ResponsesPeek", "ResponsesRequest", "ResponsesUsage", "responses_usage"]


class InputItem(Struct):
    """An input item, as far as ingress checks it: a `type` that is a string when given (a message item may leave
    it out, and an item reference may leave it out or send null, its default being `item_reference`: OpenAI
    refuses any other value). Its other fields are not typed, and the dict travels on whole."""

    type: str | None = ""


class ResponsesRequest(Struct, kw_only=True):
    model: Annotated[str, Meta(min_length=1, max_length=256)]
    input: str | Annotated[list[InputItem], Meta(min_length=1)] | None = None
    instructions: str | None = None
    stream: bool | None = False
    max_output_tokens: Annotated[int, Meta(ge=1)] | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    tools: list[dict[str, Any]] | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    background: bool | None = None

    def __post_init__(self) -> None:
        if self.background:  # its answer is read later (`GET /v1/responses/{id}`, not served) and billed unseen
            raise Unsupported("`background` responses are not supported by this gateway: the answer could not be "
                              "retrieved through it, nor billed; send the request without it", param="background")


class _InputDetails(Struct):
    cached_tokens: int | None = 0  # (null from some servers, as in a chat answer's details)


class _OutputDetails(Struct):
    reasoning_tokens: int | None = 0


class ResponsesUsage(Struct):
    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    input_tokens_details: _InputDetails | None = None
    output_tokens_details: _OutputDetails | None = None


class ResponsesPeek(Struct):
    """Just enough of a Responses answer (or of the `response` in a stream event) to read its usage."""

    usage: ResponsesUsage | None = None


class ResponsesEventPeek(Struct):
    """Just enough of a Responses stream event: its type, the usage it may carry, an error's message."""

    type: str = ""
    response: ResponsesPeek | None = None
    message: Any = None
    code: Any = None


def responses_usage(usage: ResponsesUsage | None) -> Usage | None:
    if usage is None:
        return None
    total = usage.total_tokens or usage.input_tokens + usage.output_tokens
    # The cached input and the reasoning, which prices may price apart (as a chat answer's details).
    cached = (usage.input_tokens_details.cached_tokens or 0) if usage.input_tokens_details is not None else 0
    reasoning = (usage.output_tokens_details.reasoning_tokens or 0) if usage.output_tokens_details is not None \
        else 0
    return Usage(usage.input_tokens, usage.output_tokens, total,
                 PromptTokensDetails(cached_tokens=cached) if cached else None,
                 CompletionTokensDetails(reasoning_tokens=reasoning) if reasoning else None)
