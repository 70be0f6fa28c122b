"""The prompt's size before the call, for reservations: tiktoken in the alias's encoding, plus estimates.

Chat messages are counted with the chat format's per-message overhead (`TokenCounter.count_messages`); a
Responses API request's `instructions` and `input` the same way, as the chat messages they stand for.
What tiktoken cannot count is estimated on the high side, since a reservation must cover the real cost:
tool definitions as their JSON text, and each image as OpenAI's cost of one 512-pixel tile at high detail
plus the base (255 tokens), whatever its size. The figure is compared with the upstream's afterwards
(`gateway_token_estimate_drift_ratio`).

Clients send the same message texts again and again (a system prompt, a fixed instruction, a benchmark's
prompt): the counts of recent short texts are kept, per model whose encoding is loaded (then a text's count
never changes), so that a repeated text costs a dict look-up instead of a tiktoken run. The texts are held
only in this process's memory, bounded in number and length (`TEXTS_KEPT`, `TEXT_CHARS_KEPT`).
"""

from __future__ import annotations

from typing import Any

import msgspec

from ..pipeline.context import RequestContext
from ..telemetry.tokens import REPLY_PRIMING, TOKENS_PER_MESSAGE, TokenCounter, responses_messages

__all__ = ["IMAGE_TOKENS", "PromptEstimator"]

IMAGE_TOKENS = 255  # 85 base + 170 for one tile (OpenAI's published image token formula)
TEXTS_KEPT = 512  # message texts whose counts are kept, per model (the oldest dropped first)
TEXT_CHARS_KEPT = 2048  # longer texts are counted every time (the kept texts stay under ~1M characters per model)
_MODELS_KEPT = 16  # models with kept texts (a policy's upstream models; others are counted every time)
_encode = msgspec.json.Encoder().encode


_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


class PromptEstimator:
    __slots__ = ("_texts", "tokens")

    def __init__(self, tokens: TokenCounter) -> None:
        self.tokens = tokens
        # model -> ({role: its tokens plus the message overhead}, {recent text: its tokens}), once that is exact
        self._texts: dict[str, tuple[dict[str, int], dict[str, int]]] = {}

    def estimate(self, ctx: RequestContext) -> int:
        route = ctx.route
        return self.estimate_body(ctx.body, route.upstream_model if route is not None else None)

    def estimate_body(self, body: dict[str, Any], model: str | None) -> int:
        """The prompt tokens of a decoded body, in `model`'s encoding (also used offline by `gateway explain`):
        a chat's messages; a Responses request's `instructions` and `input` items, counted as the chat messages
        they stand for; a completion's prompt or an embedding's input, as text and token ids."""
        messages = body.get("messages")
        if isinstance(messages, list):
            return self._chat(messages, body, model)
        prompt = body.get("prompt")
        if not isinstance(prompt, (str, list)):  # no completion prompt (a Responses `prompt` is a template)
            prompt = body.get("input")
            instructions = body.get("instructions")
            if (isinstance(instructions, str) and instructions) or (
                    isinstance(prompt, list) and prompt and type(prompt[0]) is dict):  # the Responses API
                return self._chat(responses_messages(prompt, instructions), body, model)
        if isinstance(prompt, str):
            return self.tokens.count(prompt, model)
        if isinstance(prompt, list):
            return sum(self.tokens.count(p, model) if isinstance(p, str) else _token_list(p) for p in prompt)
        return 0

    def _chat(self, messages: list[Any], body: dict[str, Any], model: str | None) -> int:
        """Chat messages with their format's overhead, their images, and the request's tool definitions."""
        total = self.plain(messages, model)
        if total is None:
            total = self.tokens.count_messages(messages, model) + IMAGE_TOKENS * _images(messages)
        tools = body.get("tools")
        if isinstance(tools, list) and tools:
            total += self.tokens.count(_encode(tools).decode(), model)
        return total


    def plain(self, messages: list[Any], model: str | None) -> int | None:
        """`count_messages` for the usual chat (every message a role and a text content, nothing else), in one
        short loop; None for any other shape (the general count then runs). Equal to it: a test checks."""
        total = REPLY_PRIMING
        found = self._texts.get(model) if model is not None else None
        if found is None:
            if model is not None and len(self._texts) < _MODELS_KEPT and self.tokens.exact_for(model):
                found = self._texts[model] = ({}, {})
            else:
                found = _NOTHING_KEPT
        roles, texts = found
        for message in messages:
            if type(message) is not dict or len(message) != 2:
                return None
            role, content = message.get("role"), message.get("content")
            if type(role) is not str or type(content) is not str:
                return None
            role_tokens = roles.get(role)  # its tokens plus the message's overhead
            if role_tokens is None:
                role_tokens = TOKENS_PER_MESSAGE + self.tokens.count(role, model)
                if role in _ROLES and found is not _NOTHING_KEPT:  # fixed from now on
                    roles[role] = role_tokens
            content_tokens = texts.get(content)
            if content_tokens is None:
                content_tokens = self.tokens.count(content, model)
                if found is not _NOTHING_KEPT and len(content) <= TEXT_CHARS_KEPT:
                    if len(texts) >= TEXTS_KEPT:
                        del texts[next(iter(texts))]
                    texts[content] = content_tokens
            total += role_tokens + content_tokens
        return total


# A model whose counts are not kept (no model, not exact, or past `_MODELS_KEPT`): two maps that stay empty.
_NOTHING_KEPT: tuple[dict[str, int], dict[str, int]] = ({}, {})


_IMAGE_PARTS = frozenset({"image_url", "input_image"})  # chat's image part, and the Responses API's


def _images(messages: list[Any]) -> int:
    count = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            count += sum(1 for part in content if isinstance(part, dict) and part.get("type") in _IMAGE_PARTS)
    return count


def _token_list(item: Any) -> int:
    """A prompt given as token ids: one token per id."""
    if isinstance(item, int):
        return 1
    return len(item) if isinstance(item, list) else 0
