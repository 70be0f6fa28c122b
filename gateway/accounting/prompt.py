"""The prompt's size in tokens: one estimate for a reservation, for usage an upstream did not report, and for
`/v1/messages/count_tokens`.

`PromptEstimator.estimate_body` is the gateway's figure for a request's prompt, in the encoding of the alias's
upstream model. The accounting stage reserves with it before the call, `telemetry.usage.CountTokens` bills with it
when the upstream reports no usage, and `count_tokens` answers with it: a Messages client's `count_tokens` figure
is the `input_tokens` it is billed for by an upstream that reports none. It reads the fields of the endpoint the
request came in by, never others the body carries (an upstream ignores them). What it counts:

- chat messages with the chat format's overhead (`TokenCounter.count_messages`: role, text, name, tool calls'
  names and arguments), the ids that tie tool calls and results together, and the thinking of the current
  assistant turn only (`reasoning_content`, and a redacted block as about a quarter of the bytes its base64 holds),
  as Anthropic counts it;
- a Responses API request's `instructions` and `input` the same way, as the chat messages they stand for (its
  `prompt` is a template stored upstream, unknown here); a completion's prompt (null: none) and its `suffix` (the
  text after the insertion point, which the upstream reads and bills), or an embedding's input, as text and
  token ids;
- tool definitions as their JSON text (without Anthropic's `cache_control`), which is longer than the forms
  upstreams render them in;
- each image by one rule whatever the upstream, Anthropic's published one (`translate.image_tokens`: about
  width x height / 750 tokens, at most 1,600), read from a base64 image's header; an image whose size the gateway
  cannot know (a URL) counts as that most, 1,600. OpenAI's tile rule differs: a small image costs more there (at
  high detail, 255 tokens for 100 x 100 px, 14 by this rule), a large square one less (765 for 1024 x 1024 px).

A reservation must cover the real cost, and this figure is high where the gateway cannot know: an image of
unknown size, tool definitions. It is compared with the upstream's afterwards (`gateway_token_estimate_drift_ratio`).

Clients send the same message texts again and again (a system prompt, a fixed instruction, a benchmark's
prompt): the reservation's estimator keeps the counts of recent short texts, per model whose encoding is loaded
(then a text's count never changes), so that a repeated text costs a dict look-up instead of a tiktoken run. The
texts are held only in this process's memory, bounded in number and length (`TEXTS_KEPT`, `TEXT_CHARS_KEPT`). An
estimator made with `keep=False` keeps nothing, and so changes nothing as it counts: it may count in a thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from ..pipeline.context import RequestContext
from ..schemas.endpoints import Endpoint
from ..schemas.openai import listed_prompts
from ..telemetry.tokens import REPLY_PRIMING, TOKENS_PER_MESSAGE, TokenCounter, responses_messages
from ..translate.cache_control import CACHE
from ..translate.image_tokens import MAX_IMAGE_TOKENS, image_tokens
from ..translate.thinking import BLOCKS, REASONING
from .outright import endpoint_named

__all__ = ["PromptEstimator", "estimate_prompt"]

TEXTS_KEPT = 512  # message texts whose counts are kept, per model (the oldest dropped first)
TEXT_CHARS_KEPT = 2048  # longer texts are counted every time (the kept texts stay under ~1M characters per model)
_MODELS_KEPT = 16  # models with kept texts (a policy's upstream models; others are counted every time)
_encode = msgspec.json.Encoder().encode
_CHAT, _COMPLETIONS, _RESPONSES = Endpoint.CHAT, Endpoint.COMPLETIONS, Endpoint.RESPONSES


_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


class PromptEstimator:
    __slots__ = ("_keep", "_texts", "tokens")

    def __init__(self, tokens: TokenCounter, *, keep: bool = True) -> None:
        self.tokens = tokens
        self._keep = keep
        # model -> ({role: its tokens plus the message overhead}, {recent text: its tokens}), once that is exact
        self._texts: dict[str, tuple[dict[str, int], dict[str, int]]] = {}

    def estimate(self, ctx: RequestContext) -> int:
        route = ctx.route
        return self.estimate_body(ctx.body, route.upstream_model if route is not None else None, ctx.endpoint)

    def estimate_body(self, body: dict[str, Any], model: str | None, endpoint: Endpoint | None = None) -> int:
        """The prompt tokens of a decoded body, in `model`'s encoding (also used offline by `gateway explain`), read
        from the fields of the API it came in by (`endpoint`), whatever others it carries (an upstream ignores
        them: a completion with an extra `messages: []` was estimated at 3 tokens): a chat's messages; a Responses
        request's `instructions` and `input` items, counted as the chat messages they stand for; a completion's
        prompt and `suffix`; an embedding's input. `endpoint` None: the API the body's fields name
        (`outright.endpoint_named`), for a caller that does not know it."""
        if endpoint is None:
            endpoint = endpoint_named(body)
        if endpoint is _CHAT:
            messages = body.get("messages")
            return self._chat(messages, body, model) if isinstance(messages, list) else 0
        if endpoint is _COMPLETIONS:  # its prompt (null: `<|endoftext|>`, none), and the text after the insertion
            prompt, suffix = body.get("prompt"), body.get("suffix")  # point, read with each prompt listed
            return self._text(prompt, model) + (self.tokens.count(suffix, model) * len(listed_prompts(prompt))
                                                if isinstance(suffix, str) and suffix else 0)
        if endpoint is _RESPONSES:  # (its `prompt` is a template, stored upstream: not counted)
            return self._chat(responses_messages(body.get("input"), body.get("instructions")), body, model)
        return self._text(body.get("input"), model)

    def _text(self, prompt: Any, model: str | None) -> int:
        """A completion's prompt or an embedding's input: a text, token ids, or a list of either."""
        if isinstance(prompt, str):
            return self.tokens.count(prompt, model)
        if isinstance(prompt, list):
            return sum(self.tokens.count(p, model) if isinstance(p, str) else _token_list(p) for p in prompt)
        return 0

    def _chat(self, messages: list[Any], body: dict[str, Any], model: str | None) -> int:
        """Chat messages with their format's overhead and what it leaves out, and the request's tool definitions."""
        total = self.plain(messages, model)
        if total is None:
            total = self.tokens.count_messages(messages, model) + self._beyond_text(messages, model)
        tools = body.get("tools")
        if isinstance(tools, list) and tools:
            total += self.tokens.count(_encode([_bare(tool) for tool in tools]).decode(), model)
        return total

    def _beyond_text(self, messages: list[Any], model: str | None) -> int:
        """What `count_messages` leaves out: the ids of tool calls and results, images, the current turn's
        thinking."""
        count, current = self.tokens.count, _current_turn(messages)
        total = 0
        for index, message in enumerate(messages):
            if type(message) is not dict:
                continue
            if isinstance(message.get("tool_call_id"), str):
                total += count(message["tool_call_id"], model)
            calls = message.get("tool_calls")
            for call in calls if isinstance(calls, list) else ():
                if isinstance(call, dict) and isinstance(call.get("id"), str):
                    total += count(call["id"], model)
            content = message.get("content")
            if isinstance(content, list):
                total += sum(_image(part) for part in content if isinstance(part, dict))
            if index >= current:
                total += _thinking(count, message, model)
        return total

    def plain(self, messages: list[Any], model: str | None) -> int | None:
        """`estimate_body`'s figure for the usual chat without tools (every message a role and a text content,
        nothing else), in one short loop; None for any other shape (the general count then runs). Equal to it: a
        test checks."""
        total = REPLY_PRIMING
        found = self._texts.get(model) if model is not None else None
        if found is None:
            if (self._keep and model is not None and len(self._texts) < _MODELS_KEPT
                    and self.tokens.exact_for(model)):
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


def estimate_prompt(tokens: TokenCounter, body: dict[str, Any], model: str | None,
                    endpoint: Endpoint | None = None) -> int:
    """`estimate_body` by an estimator that keeps nothing: for a count in a thread, or one made now and then."""
    return PromptEstimator(tokens, keep=False).estimate_body(body, model, endpoint)


def _current_turn(messages: list[Any]) -> int:
    """Where the current assistant turn begins: after the last user message that does not follow a tool's result
    (a Messages user message with `tool_result` blocks and text beside them is tool messages, then a user message:
    it goes on the turn whose tool calls they answer, as `count_tokens` takes it). 0 when there is none."""
    for index in range(len(messages) - 1, -1, -1):
        message = messages[index]
        if type(message) is dict and message.get("role") == "user":
            before = messages[index - 1] if index else None
            if type(before) is not dict or before.get("role") != "tool":
                return index + 1
    return 0


def _thinking(count: Callable[[str, str | None], int], message: dict[str, Any], model: str | None) -> int:
    """A message's thinking: its text, and each redacted block (encrypted) as about the text its base64 holds."""
    total = count(message[REASONING], model) if isinstance(message.get(REASONING), str) else 0
    blocks = message.get(BLOCKS)
    for block in blocks if isinstance(blocks, list) else ():
        if isinstance(block, dict) and block.get("type") == "redacted_thinking" and isinstance(block.get("data"), str):
            total += _estimate(len(block["data"]) * 3 // 4)
    return total


_IMAGE_PARTS = frozenset({"image_url", "input_image"})  # chat's image part, and the Responses API's


def _image(part: dict[str, Any]) -> int:
    """An image part's tokens (`translate.image_tokens`); 0 for any other part (one whose `type` is no string too:
    a client's object there is no image, and must not fail the set's look-up)."""
    kind = part.get("type")
    if type(kind) is not str or kind not in _IMAGE_PARTS:
        return 0
    url = part.get("image_url")  # chat: {"url": ...}; the Responses API: the URL itself (or a `file_id`)
    url = url.get("url") if isinstance(url, dict) else url
    return image_tokens(url) if isinstance(url, str) else MAX_IMAGE_TOKENS


def _bare(tool: Any) -> Any:
    """A tool definition without Anthropic's `cache_control` (a mark for its cache, not read by the model)."""
    if isinstance(tool, dict) and CACHE in tool:
        return {key: value for key, value in tool.items() if key != CACHE}
    return tool


def _estimate(characters: int) -> int:
    """Tokens of a text of `characters` the gateway cannot read: about 4 characters a token (`TokenCounter`'s own
    estimate for a text it cannot encode)."""
    return (characters + 3) // 4 if characters > 0 else 0


def _token_list(item: Any) -> int:
    """A prompt given as token ids: one token per id."""
    if isinstance(item, int):
        return 1
    return len(item) if isinstance(item, list) else 0
