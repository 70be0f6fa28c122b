"""How one chunk of an OpenAI SSE stream is read (`openai_stream.OpenAIStream`): the peeks that decode just
enough of it, the check of its UTF-8, and the `"usage": null` the gateway's own usage request makes the
upstream add to every chunk, taken out again.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from ..schemas.openai import ChoicePeek, ChunkChoicesPeek, ChunkPeek, ChunkTextOnlyPeek, has_choices

__all__ = ["COMPACT_CUT", "COMPACT_NULL_USAGE", "EndPeek", "decode_choices", "flat_error", "has_text", "is_utf8",
           "peek_chunk", "peek_chunk_choices", "peek_end", "peek_or_none", "peek_text_only", "strip_null_usage"]

peek_chunk = msgspec.json.Decoder(ChunkPeek).decode
peek_chunk_choices = msgspec.json.Decoder(ChunkChoicesPeek).decode  # when a stage reads every chunk's text
peek_text_only = msgspec.json.Decoder(ChunkTextOnlyPeek).decode  # when its reader needs no more text
decode_choices = msgspec.json.Decoder(list[ChoicePeek] | None).decode  # a chunk's raw choices (`last_choices`)


class _EndChoice(msgspec.Struct):
    index: Any = 0
    finish_reason: Any = None


class EndPeek(msgspec.Struct):
    """A body's last chunk, read only when the body ended without [DONE] (`OpenAIStream._end`)."""

    usage: Any = None
    choices: list[_EndChoice] | None = None


peek_end = msgspec.json.Decoder(EndPeek).decode


class _FlatErrorPeek(msgspec.Struct):
    object: Any = None
    message: Any = None


_peek_flat_error = msgspec.json.Decoder(_FlatErrorPeek).decode


def flat_error(payload: bytes) -> tuple[bool, object]:
    """Whether a chunk with neither choices nor usage is an error written flat, `{"object": "error", "message": ...,
    "type": ..., "code": ...}` (vLLM's before 0.10, and other OpenAI-compatible servers', mid-stream too), with no
    `error` key for the peeks to find; and its message. Asked only of such a chunk: a chunk of an answer has
    `choices`, the usage chunk `usage`."""
    try:
        peek = _peek_flat_error(payload)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return False, None
    return peek.object == "error", peek.message


def peek_or_none(payload: bytes) -> tuple[ChunkPeek | None, bool]:
    """The chunk as `peek_chunk` reads it (its choices left raw) and whether usage rides on a content chunk,
    or (None, False) when even that fails (as it does when no stage reads the choices)."""
    try:
        peek: ChunkPeek = peek_chunk(payload)
        return peek, peek.usage is not None and has_choices(peek.choices)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None, False


def has_text(choices: list[ChoicePeek] | None) -> bool:
    """Whether a chunk's choices carry text (chat's `delta.content`, completions' `text`)."""
    for choice in choices or ():
        delta = choice.delta
        if choice.text or (delta is not None and delta.content):
            return True
    return False


def is_utf8(payload: bytes) -> bool:
    """Whether a payload that is not ASCII is valid UTF-8 (the JSON decode skips what it does not read: the choices
    left raw, fields no peek names)."""
    try:
        payload.decode()
    except UnicodeDecodeError:
        return False
    return True


# The `"usage": null` an upstream adds to every chunk once asked for usage. A JSON key
# cannot occur inside a string unescaped, so this never matches content text.
_NULL_USAGE_AFTER = re.compile(rb',\s*"usage"\s*:\s*null(?=\s*[,}])')
_NULL_USAGE_FIRST = re.compile(rb'"usage"\s*:\s*null\s*,\s*')
COMPACT_NULL_USAGE = b',"usage":null}'
COMPACT_CUT = -len(COMPACT_NULL_USAGE)


def strip_null_usage(payload: bytes) -> bytes:
    """Remove the top-level `"usage": null` that the gateway's own usage request added."""
    if payload.endswith(COMPACT_NULL_USAGE):  # OpenAI's own compact form, last key: the common case
        return payload[:COMPACT_CUT] + b"}"
    stripped, count = _NULL_USAGE_AFTER.subn(b"", payload, count=1)
    return stripped if count else _NULL_USAGE_FIRST.sub(b"", payload, count=1)
