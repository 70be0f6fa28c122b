"""What a chat answer (a stream's chunk, or a complete answer) may carry past an enforcing output guard, and the
shapes of its texts the guards read: the fields the gateway knows (an allowlist: an upstream may write the answer's
text, or an error quoting it, in any field it invents), a choice's `error` without the upstream's words, texts sent
as lists of parts read as one, a usage chunk's figures. The stream adapter (`stream.ChatChunks`) and the guard
stage's complete answers (`stage.py`) both apply them.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from .base import WITHHELD
from .texts import BESIDE_CONTENT, spread_parts

__all__ = ["ANSWER_CHOICE_FIELDS", "CHOICE_FIELDS", "CHUNK_FIELDS", "DELTA_FIELDS", "drop_unknown",
           "known_usage_chunk", "parts_text", "shape_beside", "shape_content", "withheld_error"]

# With an enforcing output guard a chat (or completion) chunk passes only the fields the gateway knows: any other may
# hold text no guard reads (an upstream's note quoting the answer), so it is dropped. The chunk's own (OpenAI's, and
# the metadata of the servers in use: OpenRouter's `provider`, Azure's `prompt_filter_results`, Perplexity's
# `citations` and `search_results`, which are the citations' URLs and titles, as `annotations` are; none is read).
CHUNK_FIELDS = frozenset({"id", "object", "created", "model", "system_fingerprint", "service_tier", "obfuscation",
                          "choices", "usage", "provider", "prompt_filter_results", "citations", "search_results"})
# A choice's (by whether the stream is a chat one): a choice's `error` (OpenRouter's) is kept, its message withheld
# (`withheld_error`); its finish reasons and filter results are no text.
_CHOICE_COMMON = ("index", "finish_reason", "logprobs", "error", "native_finish_reason", "stop_reason", "matched_stop",
                  "content_filter_results")
CHOICE_FIELDS = {True: frozenset({*_CHOICE_COMMON, "delta"}), False: frozenset({*_CHOICE_COMMON, "text"})}
ANSWER_CHOICE_FIELDS = {True: frozenset({*_CHOICE_COMMON, "message"}), False: CHOICE_FIELDS[False]}  # (`stage.py`)
# A delta's: the texts the guards read, the tool calls (each call's other fields pass: Gemini's `extra_content`
# carries its thought signature), Anthropic's signed thinking (`reasoning_blocks`, the gateway's own: its text is the
# reasoning's, read there; `translate/thinking.py`), and what is no text a guard could read (`audio` beside its
# transcript, OpenRouter's `images`) or is passed unread by design (`annotations`: citations' URLs and titles).
DELTA_FIELDS = frozenset({"role", "content", *BESIDE_CONTENT, "tool_calls", "function_call", "audio", "annotations",
                          "images", "reasoning_blocks"})
_CODE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")  # an error's code kept beside a withheld message: a name, never words


def drop_unknown(holder: dict[str, Any], known: frozenset[str]) -> None:
    """`holder` without the fields not in `known`, in place."""
    for field in [field for field in holder if field not in known]:
        del holder[field]


def parts_text(parts: list[Any]) -> str:
    """A text beside the content sent as a list: its strings' and its parts' text (a part's `text`, `refusal` or
    `thinking`, when a string), joined; anything else in it no guard reads."""
    texts: list[str] = []
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict):
            texts.append(next((text for field in ("text", "refusal", "thinking")
                               if isinstance(text := part.get(field), str)), ""))
    return "".join(texts)


def shape_content(holder: dict[str, Any], key: str, chat: bool, scrub: bool) -> None:
    """A chat content (`key`) sent as a list of parts: read (and sent) as OpenAI's fields (`spread_parts`). Of any
    other type than a string (an object; a completion's text as a list) it holds text no guard reads: dropped under
    an enforcing guard (`scrub`)."""
    value = holder.get(key)
    if type(value) is str or value is None:
        return
    if chat and isinstance(value, list):
        spread_parts(holder, key)
    elif scrub:
        del holder[key]


def shape_beside(holder: dict[str, Any], scrub: bool) -> None:
    """The texts beside a chat content (reasoning, refusal): one sent as a list is read as its parts' text
    (`parts_text`); of another type (an object) it holds text no guard reads: dropped under an enforcing guard."""
    for field in BESIDE_CONTENT:
        value = holder.get(field)
        if type(value) is str or value is None:
            continue
        if isinstance(value, list):
            holder[field] = parts_text(value)
        elif scrub:
            del holder[field]


def withheld_error(error: object) -> dict[str, Any]:
    """A choice's `error` without the upstream's words: the gateway's, and its `code` when that is a number or a
    name (`_CODE`)."""
    withheld: dict[str, Any] = {"message": f"the upstream failed ({WITHHELD})"}
    code = error.get("code") if isinstance(error, dict) else None
    if type(code) is int or (isinstance(code, str) and _CODE.fullmatch(code)):
        withheld["code"] = code
    return withheld


def known_usage_chunk(payload: bytes) -> bytes:
    """A usage-only chunk under an enforcing guard: its known fields (`CHUNK_FIELDS`), and of its usage the figures
    (any string in it dropped: a usage holds numbers, OpenRouter's `is_byok` a boolean). Once a stream."""
    data = msgspec.json.decode(payload)
    if not isinstance(data, dict):
        return payload
    drop_unknown(data, CHUNK_FIELDS)
    if "usage" in data:
        data["usage"] = _figures(data["usage"])
    return msgspec.json.encode(data)


def _figures(value: Any) -> Any:
    """`value` without its strings (a dict's or a list's, at any depth)."""
    if isinstance(value, dict):
        return {k: _figures(v) for k, v in value.items() if not isinstance(v, str)}
    if isinstance(value, list):
        return [_figures(v) for v in value if not isinstance(v, str)]
    return value
