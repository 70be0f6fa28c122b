"""Pieces every translator shares: refusing a field clearly, image data URLs, tool arguments, chunks."""

from __future__ import annotations

import re
import time
from typing import Any

import msgspec

from ..errors import InvalidRequest, Unsupported, UpstreamError
from ..schemas.events import Chunk

__all__ = ["ANTHROPIC_ONLY", "BETA", "CACHE_MARK", "MARKS", "ChunkWriter", "StreamProtocolError", "data_url",
           "json_instruction", "json_schema_of", "malformed", "parse_arguments", "tool_calls_of", "unsupported",
           "upstream_array", "upstream_object"]

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode
# A body whose messages, parts or tools carry Anthropic's `cache_control`, or whose history carries its thinking
# (`reasoning_blocks`), set by the `/v1/messages` ingress: the one key a provider other than Anthropic's reads, to
# strip them (`translate.cache_control`) before sending.
CACHE_MARK = "_gateway_cache_control"
# A `/v1/messages` client's `anthropic-beta` values (checked, in order), for an Anthropic upstream's header; the
# body then carries `CACHE_MARK` too, so that every other provider removes it.
BETA = "_gateway_anthropic_beta"
# The Messages fields a `/v1/messages` client sent that only Anthropic's API takes (`top_k`, `thinking`), by name;
# set by the ingress with `CACHE_MARK`, so that every other provider removes them with the mark (OpenAI's and Azure's
# APIs refuse `top_k`: "Unrecognized request argument"). A target's own `extra_body` fields are not listed.
ANTHROPIC_ONLY = "_gateway_anthropic_only"
# Every mark: the gateway's own, never a client's (`pipeline.stages.decode_body` refuses a body that holds one: a
# client's would strip its own `max_tokens` past a budget's reservation, or its `stream`, and fail the upstream).
MARKS = frozenset((CACHE_MARK, BETA, ANTHROPIC_ONLY))
_DATA_URL = re.compile(r"data:([a-z]+/[a-z0-9.+-]+);base64,(.*)", re.IGNORECASE | re.DOTALL)


class StreamProtocolError(ValueError):
    """The upstream sent an event the translator cannot place (the message names it, never content)."""


def unsupported(field: str, target: str, what: str | None = None) -> Unsupported:
    """The 400 for a request field the routed target's API has no equivalent for (the next target is tried)."""
    shown = what or f"`{field}`"
    return Unsupported(f"{shown} is not supported by {target}; remove it or route to a model that supports it",
                       param=field)


def malformed(what: str, kind: str) -> UpstreamError:
    """The upstream's answer has a wrong-typed value where a translation reads it: a 502, as invalid JSON is (the
    message names the field, never the value: it is upstream text)."""
    return UpstreamError(f"the upstream sent a malformed answer ({what} is not {kind})")


def upstream_object(value: Any, what: str) -> dict[str, Any]:
    """`value` of an upstream's answer when it is an object; of any other type the answer is `malformed`."""
    if isinstance(value, dict):
        return value
    raise malformed(what, "an object")


def upstream_array(value: Any, what: str) -> list[Any]:
    """`value` of an upstream's answer when it is an array; else the answer is `malformed`."""
    if isinstance(value, list):
        return value
    raise malformed(what, "an array")


def data_url(url: str) -> tuple[str, str] | None:
    """(media type, base64 data) of a `data:` URL; None for any other URL."""
    if not url.startswith("data:"):
        return None
    match = _DATA_URL.fullmatch(url)
    if match is None:
        raise InvalidRequest("an image `data:` URL must be `data:<media type>;base64,<data>`", param="messages")
    media = match.group(1).lower()
    return ("image/jpeg" if media == "image/jpg" else media), match.group(2)  # (`jpg`: no registered type)


def parse_arguments(arguments: Any, where: str) -> Any:
    """A tool call's JSON `arguments` string as the object APIs other than OpenAI's want."""
    if arguments is None or arguments == "":
        return {}
    if not isinstance(arguments, str):
        return arguments
    try:
        return _decode(arguments)
    except (msgspec.DecodeError, RecursionError) as exc:  # (msgspec: RecursionError past ~1,000 levels of nesting)
        raise InvalidRequest(f"`{where}.function.arguments` is not valid JSON", param=where) from exc


def json_schema_of(response_format: dict[str, Any]) -> Any:
    """The schema of a `json_schema` response format (None when it has none); a `json_schema` that is not an
    object is the client's error (400), not a translator's crash."""
    spec = response_format.get("json_schema")
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise InvalidRequest("`response_format.json_schema` must be an object", param="response_format.json_schema")
    return spec.get("schema")


def tool_calls_of(message: dict[str, Any], where: str) -> list[Any]:
    """An assistant message's `tool_calls` (none: empty); anything but a list is the client's error (400)."""
    calls = message.get("tool_calls")
    if calls is None:
        return []
    if not isinstance(calls, list):
        raise InvalidRequest(f"`{where}.tool_calls` must be an array", param=f"{where}.tool_calls")
    return calls


def json_instruction(response_format: Any) -> str | None:
    """JSON mode as an instruction, for APIs without it (Anthropic): json_object, or json_schema with its schema."""
    if not isinstance(response_format, dict):
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return "Respond only with one valid JSON object, with no other text."
    if kind == "json_schema":
        schema = json_schema_of(response_format)
        return ("Respond only with one valid JSON object, with no other text, that matches this JSON Schema: "
                + _encode(schema).decode())
    return None


class ChunkWriter:
    """Builds one stream's `chat.completion.chunk`s (id, model and time fixed once per stream)."""

    __slots__ = ("created", "id", "model")

    def __init__(self, id_: str, model: Any) -> None:
        self.id = id_
        self.model = model if isinstance(model, str) else ""
        self.created = int(time.time())

    def chunk(self, delta: dict[str, Any], finish: str | None = None, index: int = 0,
              stop_reason: str | None = None) -> Chunk:
        """One chunk; `stop_reason`: the stop sequence that ended the answer (vLLM's field), when known."""
        choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        if stop_reason is not None:
            choice["stop_reason"] = stop_reason
        return Chunk.of({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                         "model": self.model, "choices": [choice]})

    def usage_chunk(self, usage: dict[str, Any]) -> bytes:
        """OpenAI's usage-only last chunk (forwarded only to a client that asked for usage)."""
        return _encode({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                        "model": self.model, "choices": [], "usage": usage})
