"""The OpenAI wire format: what ingress checks, and the typed pieces the gateway reads.

The request structs type the fields the gateway interprets or that clients most
often get wrong; they accept unknown fields, because the body is forwarded as the
client sent it (tools, response_format, seed, image parts and fields that do not
exist yet all pass through). Validation runs on the decoded dict; the dict, not
the struct, is what travels on.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

__all__ = [
    "ChatRequest",
    "ChunkPeek",
    "CompletionRequest",
    "CompletionTokensDetails",
    "EmbeddingRequest",
    "PromptTokensDetails",
    "StreamOptions",
    "Usage",
    "UsagePeek",
    "is_count",
    "listed_prompts",
    "unusable_usage",
]

Unit = Annotated[float, Meta(ge=0, le=2)]
Penalty = Annotated[float, Meta(ge=-2, le=2)]
Positive = Annotated[int, Meta(ge=1)]
ModelName = Annotated[str, Meta(min_length=1, max_length=256)]
Stop = str | list[str] | None
# msgspec allows one array type per union, so a list of strings, token ids or token
# lists is typed as one list of that union; the upstream rejects a mixed list.
Prompt = str | Annotated[list[str | int | list[int]], Meta(min_length=1)]


class StreamOptions(Struct):
    include_usage: bool | None = None


class ContentPart(Struct):
    """A message's content part, as far as ingress checks it: a `type` that is a string when given (OpenAI refuses
    any other; the gateway looks it up in sets). Its other fields are not typed, and the dict travels on whole."""

    type: str = ""


class Message(Struct):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class _Sampling(Struct, kw_only=True):
    model: ModelName
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: Unit | None = None
    top_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    n: Annotated[int, Meta(ge=1, le=128)] | None = None
    max_tokens: Positive | None = None
    stop: Stop = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)] | None = None
    user: str | None = None


class ChatRequest(_Sampling, kw_only=True):
    messages: Annotated[list[Message], Meta(min_length=1)]
    max_completion_tokens: Positive | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Sampling, kw_only=True):
    prompt: Prompt | None  # null: the upstream's `<|endoftext|>` (OpenAI's default), counted as no tokens
    max_tokens: Annotated[int, Meta(ge=0)] | None = None  # 0 with `echo` and `logprobs`: a prompt scored, nothing made
    echo: bool | None = None
    logprobs: Annotated[int, Meta(ge=0, le=5)] | None = None
    suffix: str | None = None


class EmbeddingRequest(Struct, kw_only=True):
    model: ModelName
    input: Prompt
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: Annotated[int, Meta(ge=1, le=65_536)] | None = None
    user: str | None = None


class PromptTokensDetails(Struct, omit_defaults=True):
    """Of the prompt tokens: read from the provider's prompt cache, and (some providers) written to it; of those
    written, the ones written to a 1-hour cache (Anthropic's `ttl: "1h"`, billed at a rate of their own)."""

    cached_tokens: int | None = 0  # some OpenAI-compatible servers send null
    cache_write_tokens: int | None = 0
    cache_write_1h_tokens: int | None = 0  # part of `cache_write_tokens` (0: absent from the shape)


class CompletionTokensDetails(Struct, omit_defaults=True):
    """Of the completion tokens: the model's hidden reasoning (o-series, gpt-5, thinking models)."""

    reasoning_tokens: int | None = 0


MAX_USAGE_TOKENS = 100_000_000  # far above any one count of a real answer (`Usage.usable`)


class Usage(Struct, omit_defaults=True):
    """Token usage as the upstream reported it (OpenAI's shape), details included when it gave them."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None

    @property
    def cached_tokens(self) -> int:
        details = self.prompt_tokens_details
        return (details.cached_tokens or 0) if details is not None else 0

    @property
    def cache_write_tokens(self) -> int:
        details = self.prompt_tokens_details
        return (details.cache_write_tokens or 0) if details is not None else 0

    @property
    def cache_write_1h_tokens(self) -> int:
        details = self.prompt_tokens_details
        return (details.cache_write_1h_tokens or 0) if details is not None else 0

    @property
    def reasoning_tokens(self) -> int:
        details = self.completion_tokens_details
        return (details.reasoning_tokens or 0) if details is not None else 0

    def usable(self) -> bool:
        """Whether the counts can be believed: every one in [0, `MAX_USAGE_TOKENS`] (details may be None), and
        together as many as the total the upstream reported, if any. An upstream's negative or absurd figures are
        neither billed nor counted: the answer is estimated instead, as when no usage came (a counter must never go
        down, a cost never below 0). So is a total the counts fall short of, a breakdown missing (Voyage AI's
        embeddings report `{"total_tokens": N}` alone): read as 0 prompt tokens, it billed the answer nothing. (The
        reasoning tokens are counted toward the total too: xAI reports them beside the completion's, not in it.)"""
        prompt, completion = self.prompt_tokens, self.completion_tokens
        if not (0 <= prompt <= MAX_USAGE_TOKENS and 0 <= completion <= MAX_USAGE_TOKENS):
            return False
        given, made = self.prompt_tokens_details, self.completion_tokens_details
        if given is not None and not (0 <= (given.cached_tokens or 0) <= MAX_USAGE_TOKENS
                                      and 0 <= (given.cache_write_tokens or 0) <= MAX_USAGE_TOKENS):
            return False
        reasoning = (made.reasoning_tokens or 0) if made is not None else 0
        return 0 <= reasoning <= MAX_USAGE_TOKENS and self.total_tokens <= prompt + completion + reasoning


def is_count(value: Any) -> bool:
    """Whether an upstream's usage field in a shape the gateway translates is absent (null) or a count: anything else
    (a string, a negative number) is an upstream's error, not a zero (`unusable_usage`)."""
    return value is None or (type(value) is int and value >= 0)


def unusable_usage() -> Usage:
    """The usage of an answer whose upstream reported counts that are no counts (a string, a negative number), in a
    shape the gateway translates (Anthropic's, Gemini's): not `usable`, so billed at the gateway's own count, as an
    OpenAI-shaped answer with negative counts is (a translation that read them as 0 billed the answer nothing)."""
    return Usage(-1, -1, -1)


class UsagePeek(Struct):
    """Just enough of a complete response to read its usage (other fields are skipped, not copied)."""

    usage: Usage | None = None


class ErrorPeek(Struct):
    message: Any = None
    type: Any = None
    code: Any = None


class ChunkPeek(Struct):
    """Just enough of a stream chunk to account for it and to spot an in-band error.

    The choices stay one raw JSON value (b"" when absent): only a chunk with usage needs to
    know whether it has any (`has_choices`), and leaving them whole makes the per-chunk decode
    about a third cheaper than a list of raw choices."""

    usage: Usage | None = None
    choices: msgspec.Raw = msgspec.Raw(b"")
    error: ErrorPeek | None = None


_raw_choices = msgspec.json.Decoder(list[msgspec.Raw] | None).decode


def listed_prompts(prompt: Any) -> list[Any]:
    """The prompts of a completions request's `prompt`, each answered apart (`n` choices each): a list of texts
    (or of token-id lists) as it is; a text, or one prompt given as token ids, as a list of one."""
    return prompt if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else [prompt]


def has_choices(choices: msgspec.Raw | list[Any] | None) -> bool:
    """Whether a chunk's choices (`ChunkPeek`'s raw ones, or `ChunkChoicesPeek`'s) are a non-empty list."""
    if isinstance(choices, msgspec.Raw):
        return bool(choices) and bool(_raw_choices(choices))
    return bool(choices)


class FunctionPeek(Struct):
    name: str | None = None
    arguments: str | None = None


class ToolCallPeek(Struct):
    index: int | None = None
    function: FunctionPeek | None = None


# The peeks below are made for every chunk of a stream whose text is read (quality signals): untracked by the
# garbage collector (decoded JSON holds no cycles), they cost less to make and add no collections.
class MessagePeek(Struct, gc=False):
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCallPeek] | None = None


class ChoicePeek(Struct, gc=False):
    """A choice's text, tool calls and finish reason (answer or chunk; chat or completions), nothing else."""

    index: int = 0
    finish_reason: str | None = None
    text: str | None = None  # completions
    message: MessagePeek | None = None  # a chat answer
    delta: MessagePeek | None = None  # a chat chunk


class ChoicesPeek(Struct):
    choices: list[ChoicePeek] | None = None


class UsageChoicesPeek(Struct, gc=False):
    """`UsagePeek` with the choices read too: decoded instead of it when a stage reads a complete answer's text
    (quality signals), which then costs that stage no second decode of the body (`Completion.choices`)."""

    usage: Usage | None = None
    choices: list[ChoicePeek] | None = None


class ChunkChoicesPeek(Struct, gc=False):
    """`ChunkPeek` with the choices read too: decoded instead of it when a stage reads every chunk's text
    (quality signals), which then costs that stage no second decode. Untracked by the garbage collector, as
    the choice peeks (one per chunk; decoded JSON holds no cycles)."""

    usage: Usage | None = None
    choices: list[ChoicePeek] | None = None
    error: ErrorPeek | None = None


# A chunk that carries nothing but text, for a reader that has all the text it needs (`ChunkTextOnlyPeek`): any
# other value of these fields fails to decode as it, and the chunk is then decoded as `ChunkChoicesPeek`.
class TextOnlyDelta(Struct, gc=False):
    refusal: None = None
    tool_calls: None = None


class TextOnlyChoice(Struct, gc=False):
    finish_reason: None = None
    message: None = None
    delta: TextOnlyDelta | None = None


class ChunkTextOnlyPeek(Struct, gc=False):
    """`ChunkPeek` for a chunk whose choices carry only text: none finished, no tool calls, no refusal (each
    null or absent; the text itself is skipped). A chunk with anything more fails to decode as this (a
    `msgspec.ValidationError`): a stream reader that needs no more text (the quality signals' once a verdict
    cannot change) then has a chunk decoded again, with its choices, only when it carries something to read."""

    usage: Usage | None = None
    choices: list[TextOnlyChoice] | None = None
    error: ErrorPeek | None = None
