"""The cache key: everything that changes the answer, and nothing that does not.

The key is the SHA-256 of one msgpack array: a format tag, the tenant, the policy
version, the endpoint, the alias with the targets it may reach, and the request
body minus the fields below. msgpack arrays and strings carry their lengths, so
the encoding is prefix-free (no two different inputs give the same bytes), and
maps are encoded with sorted keys, so the order in which a client wrote its
fields does not matter.

What is left out, on purpose (`EXCLUDED`), and why:

* `model`: replaced by the resolved alias and its target set (an alias that now
  points elsewhere gets new keys; the policy version changes too);
* `stream`, `stream_options`: how the answer is delivered, not what it is (a
  streamed answer serves a non-streamed request and the other way round);
* `user`, `metadata`, `store`, `prompt_cache_key`, `safety_identifier`: tags for
  the provider's abuse monitoring, logs and its own prompt cache, not inputs of
  the generation.

Everything else is in, unknown fields included: a field the gateway does not
know might change the answer, so it must split the key (a miss is safe, a wrong
hit is not). Text is keyed as sent, after the input guards rewrote it.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

from ..schemas.endpoints import Endpoint

__all__ = ["EXCLUDED", "KEY_FORMAT", "SEMANTIC_TEXT_FIELDS", "cache_key", "semantic_scope"]

KEY_FORMAT = "gw-cache-1"
EXCLUDED = frozenset({
    "model", "stream", "stream_options", "user", "metadata", "store", "prompt_cache_key", "safety_identifier",
})
# The prompt's text, which the semantic cache compares by meaning; every other field must match exactly.
SEMANTIC_TEXT_FIELDS = frozenset({"messages", "prompt"})

_encode = msgspec.msgpack.Encoder(order="sorted").encode


def _digest(parts: list[Any]) -> str:
    return hashlib.sha256(_encode(parts)).hexdigest()


def cache_key(tenant: str, version: str, endpoint: Endpoint, alias: str, targets: tuple[str, ...],
              body: dict[str, Any]) -> str:
    """The exact key of one request (hex SHA-256)."""
    fields = {name: value for name, value in body.items() if name not in EXCLUDED}
    return _digest([KEY_FORMAT, tenant, version, endpoint.label, alias, targets, fields])


def semantic_scope(tenant: str, version: str, endpoint: Endpoint, alias: str, targets: tuple[str, ...],
                   body: dict[str, Any]) -> tuple[str, str] | None:
    """The namespace a semantic match is looked for in, and the text compared by meaning; None: not comparable.

    Only the last message (or the prompt) is compared by meaning; everything else must
    be equal: tenant, alias, sampling parameters, tools, response format, and every
    earlier message word for word (a system prompt or a conversation so far). So a
    paraphrase never borrows an answer made under other parameters or in another
    conversation. A last message that is not plain text (an image) is not comparable.
    """
    fields = {name: value for name, value in body.items() if name not in EXCLUDED and name not in SEMANTIC_TEXT_FIELDS}
    if endpoint is Endpoint.CHAT:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
            return None
        last = messages[-1]
        text = last.get("content")
        if not isinstance(text, str) or set(last) - {"role", "content"}:
            return None
        context: Any = [messages[:-1], last.get("role")]
    elif endpoint is Endpoint.COMPLETIONS:
        text = body.get("prompt")
        if not isinstance(text, str):
            return None
        context = None
    else:
        return None
    scope = _digest([KEY_FORMAT + "/semantic", tenant, version, endpoint.label, alias, targets, fields, context])
    return scope, text
