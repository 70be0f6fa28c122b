"""A chat tool call as a Messages `tool_use` block: its name, id and input (`anthropic_answer`'s complete answers and
streams alike).

Every chat tool call is a tool_use block: a function call's, and a custom tool's, its free text as
`{"input": text}` (Messages' input is an object). A call without a name is malformed (`tool_name`).
"""

from __future__ import annotations

import secrets
from typing import Any

from ..errors import InvalidRequest
from .common import malformed, parse_arguments, upstream_object
from .tool_id_signature import signature_of, signed_id

__all__ = ["CALL_PART", "CALL_TEXT", "tool_input", "tool_name", "tool_use", "tool_use_id"]

# Where a chat tool call holds its name and what the model wrote: a function call, or (True) a custom tool's call.
CALL_PART = {False: "a tool call's `function`", True: "a tool call's `custom`"}
CALL_TEXT = {False: "arguments", True: "input"}


def tool_use(call: dict[str, Any]) -> dict[str, Any]:
    """A complete answer's tool call as a `tool_use` block: a function call's or a custom one's (`tool_input`)."""
    custom = call.get("custom") is not None
    part = upstream_object(call["custom"] if custom else call.get("function") or {}, CALL_PART[custom])
    text = part.get(CALL_TEXT[custom])
    if custom and not isinstance(text, str | None):
        raise malformed("a custom tool call's `input`", "a string")
    return {"type": "tool_use", "id": tool_use_id(call.get("id"), signature_of(call)),
            "name": tool_name(part.get("name")), "input": tool_input(text, custom)}


def tool_name(name: Any) -> str:
    """A tool call's name. A call without one cannot be carried (the client has nothing to run, and would send back
    a block the ingress refuses): the answer is the upstream's error rather than a call without content."""
    if isinstance(name, str) and name:
        return name
    raise malformed("a tool call's `name`", "a non-empty string")


def tool_use_id(id_: Any, signature: str | None) -> str:
    """The call's id (`signed_id`), or one made for a call without one (a legacy `function_call` never has one) in
    Messages' form and alphabet: a client sends it back, and the ingress requires it."""
    own = id_ if isinstance(id_, str) and id_ else "toolu_" + secrets.token_hex(12)
    return str(signed_id(own, signature))


def tool_input(text: Any, custom: bool) -> dict[str, Any]:
    """A tool_use `input` (an object, always): a custom call's free text under `input`; a function call's JSON
    arguments, with invalid JSON kept under `_raw_arguments` and a value that is not an object under `value`."""
    if custom:
        return {"input": text or ""}
    try:
        value = parse_arguments(text, "tool_calls")
    except InvalidRequest:
        return {"_raw_arguments": text}  # the model wrote invalid JSON: kept, visibly, rather than lost
    return value if isinstance(value, dict) else {"value": value}
