"""A Gemini thought signature carried in a Messages `tool_use` id: Gemini 3 refuses its own function call sent back
without its signature, which rides on a chat tool call's `extra_content.google.thought_signature`; a Messages client
has no such field, and sends back only the block's `id` (with the call, and as its `tool_result`'s `tool_use_id`).
The id is then `<call id>__gts_<the signature's UTF-8 bytes, base64url, unpadded>` (Anthropic's own id alphabet,
`[a-zA-Z0-9_-]`); only a call with a signature gets one."""

from __future__ import annotations

import base64
from typing import Any

__all__ = ["SIGNED", "signature_of", "signature_tail", "signed_id", "unsigned"]

# In a tool_use id, the mark after which its call's Gemini thought signature follows.
SIGNED = "__gts_"


def signature_of(call: dict[str, Any]) -> str | None:
    """A tool call's Gemini thought signature (`gemini_to_chat._signed`), if it has one."""
    extra = call.get("extra_content")
    google = extra.get("google") if isinstance(extra, dict) else None
    signature = google.get("thought_signature") if isinstance(google, dict) else None
    return signature if isinstance(signature, str) and signature else None


def signed_id(id_: Any, signature: str | None) -> Any:
    """The tool_use id: the call's, with its thought signature after `SIGNED` when it has one (Gemini 3 refuses its
    own call sent back without it, and Messages has no other place the client sends back)."""
    return id_ + SIGNED + signature_tail(signature) if signature is not None and isinstance(id_, str) else id_


def signature_tail(signature: str) -> str:
    """What follows `SIGNED` in a tool_use id: the signature's UTF-8 bytes in base64url without padding, so that the
    id keeps to Anthropic's own alphabet (`[a-zA-Z0-9_-]`) whatever the signature holds."""
    return base64.urlsafe_b64encode(signature.encode()).rstrip(b"=").decode()


def unsigned(id_: str) -> tuple[str, str | None]:
    """A tool_use id (or a tool_result's `tool_use_id`) without the thought signature the answer put in it, and the
    signature; an id without the mark, or with a tail that is not one's exact encoding, is the client's own, as is."""
    head, mark, tail = id_.partition(SIGNED)
    if not mark or not tail:
        return id_, None
    try:
        signature = base64.urlsafe_b64decode(tail + "=" * (-len(tail) % 4)).decode()
    except (ValueError, UnicodeDecodeError):  # (binascii.Error is a ValueError)
        return id_, None
    return (head, signature) if signature_tail(signature) == tail else (id_, None)
