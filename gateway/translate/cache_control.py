"""Anthropic's prompt caching (`cache_control`) in the internal chat request, and its removal for other upstreams.

The `/v1/messages` ingress keeps a block's `cache_control` on the chat form it
builds, where LiteLLM's clients put it: on a text or image part, on a message
(a `tool` message for a `tool_result` block), on a tool call (a `tool_use`
block) and on a tool; and marks the body with `CACHE_MARK`. An Anthropic upstream
gets it back on the matching blocks (`chat_to_anthropic`); every other provider
removes it, and the mark, before sending (`without_cache_control`), reading only
the mark when there is none: the mark is the one key it looks up. The mark is set
too when an assistant turn carries Anthropic's thinking (`reasoning_blocks`, see
`thinking.py`): the other providers lose those blocks and the `reasoning_content`
beside them (the history of `/v1/messages` never sent them its thinking); and when
the client sent Messages-only fields, `top_k` and `thinking`, named in
`ANTHROPIC_ONLY`: the other providers lose them (OpenAI and Azure refuse `top_k`;
`thinking` is not mapped to `reasoning_effort`: a budget of tokens is no effort
level, and a model without reasoning would refuse it).

Gemini's counterpart, a tool call's `extra_content` (its `thought_signature`,
`gemini_to_chat._signed`), comes back in a Chat Completions client's own history,
unmarked: an upstream that gets the body as it is (`kind: openai`, `azure`; but
Google's own OpenAI-compatible API, which reads it) gets it without
(`without_extra_content`), which looks into no message but those with `tool_calls`.
"""

from __future__ import annotations

from typing import Any

from .common import ANTHROPIC_ONLY, BETA, CACHE_MARK
from .thinking import BLOCKS, REASONING

__all__ = ["CACHE", "CACHE_MARK", "without_cache_control", "without_extra_content"]

CACHE = "cache_control"
EXTRA = "extra_content"


def without_cache_control(body: dict[str, Any]) -> dict[str, Any]:
    """A copy of `body` without the mark, any `cache_control`, Anthropic's thinking (`reasoning_blocks` and the
    `reasoning_content` beside them) and the Messages-only fields a `/v1/messages` client sent (`ANTHROPIC_ONLY`:
    `top_k`, `thinking`); the original is left as it is: a later fallback to an Anthropic target still reads them."""
    out = {key: value for key, value in body.items() if key != CACHE_MARK and key != BETA and key != ANTHROPIC_ONLY}
    native = body.get(ANTHROPIC_ONLY)
    for name in native if isinstance(native, list) else ():  # `top_k`, `thinking`: the client's, Anthropic's only
        out.pop(name, None)
    messages = body.get("messages")
    if isinstance(messages, list):
        out["messages"] = [_message(message) for message in messages]
    tools = body.get("tools")
    if isinstance(tools, list):
        out["tools"] = [_tool(tool) for tool in tools]
    return out


def _bare(item: Any) -> Any:
    if isinstance(item, dict) and CACHE in item:
        return {key: value for key, value in item.items() if key != CACHE}
    return item


def _message(message: Any) -> Any:
    if not isinstance(message, dict):
        return message
    out = _bare(message)
    if BLOCKS in out:  # Anthropic's thinking: its signatures, and its text, are for Anthropic only
        out = {key: value for key, value in out.items() if key not in (BLOCKS, REASONING)}
    content = out.get("content")
    if isinstance(content, list):
        out = {**out, "content": [_bare(part) for part in content]}
    calls = out.get("tool_calls")
    if isinstance(calls, list):
        out = {**out, "tool_calls": [_bare(call) for call in calls]}
    return out


def _tool(tool: Any) -> Any:
    out = _bare(tool)
    function = out.get("function") if isinstance(out, dict) else None
    if isinstance(function, dict) and CACHE in function:
        out = {**out, "function": _bare(function)}
    return out


def without_extra_content(body: dict[str, Any]) -> dict[str, Any]:
    """`body` without Gemini's `extra_content` on its tool calls, for an upstream that takes the body as it is: an
    unknown field in a message may be refused (OpenAI's own API has refused them, as have vLLM, Mistral, Groq). The
    same `body` when no tool call has one (nothing copied); a copy otherwise, the original left to a later
    fallback to a Gemini target, which needs the signature."""
    messages = body.get("messages")
    if type(messages) is not list:
        return body
    try:
        for message in messages:  # (the usual request: one key looked up per message)
            if "tool_calls" in message:
                break
        else:
            return body
    except TypeError:  # a message that is not an object: the upstream refuses it
        return body
    out: list[Any] | None = None
    index = -1
    for message in messages:  # (plain loops: a generator per message cost more than the rest of this)
        index += 1
        calls = message.get("tool_calls") if type(message) is dict else None
        if type(calls) is not list:
            continue
        for call in calls:
            if type(call) is dict and EXTRA in call:
                if out is None:
                    out = list(messages)
                out[index] = {**message, "tool_calls": [_without_extra(one) for one in calls]}
                break
    return body if out is None else {**body, "messages": out}


def _without_extra(call: Any) -> Any:
    if type(call) is dict and EXTRA in call:
        return {key: value for key, value in call.items() if key != EXTRA}
    return call
