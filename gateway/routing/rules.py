"""Conditional rules, evaluated before the strategy: the first rule whose conditions all hold wins.

Rules arrive compiled (`policy.compiled.Match`): sets to test membership in, header
names already lower-case bytes, thresholds as ints. Nothing is parsed here. The
facts a rule reads come from the request that is already decoded; the only costly
one, the prompt's token count, is computed at most once per request and only when a
rule that needs it is reached.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..auth.keys import VirtualKey
from ..policy.compiled import Match, Rule
from ..telemetry.tokens import TokenCounter

__all__ = ["Facts", "first_match", "matches"]

_JSON_FORMATS = frozenset({"json_object", "json_schema"})


class Facts:
    """What rules and sticky assignment may read about one request."""

    __slots__ = ("_prompt_tokens", "body", "headers", "key", "model", "tokens")

    def __init__(
        self, body: dict[str, Any], key: VirtualKey | None, headers: Sequence[tuple[bytes, bytes]],
        tokens: TokenCounter | None, model: str | None = None,
    ) -> None:
        self.body = body
        self.key = key
        self.headers = headers
        self.tokens = tokens
        self.model = model  # for the tokenizer: the upstream model of the alias asked for
        self._prompt_tokens: int | None = None

    @property
    def tenant(self) -> str:
        return self.key.tenant if self.key is not None else "anonymous"

    @property
    def key_name(self) -> str | None:
        return self.key.name if self.key is not None else None

    def header(self, name: bytes) -> str | None:
        """A request header's value (`name` lower-case); the first one when repeated. Read as UTF-8, as clients send
        text (a rule's `x-user: ["\u2603"]` matched no request when read as latin-1), else as latin-1 (any bytes)."""
        for raw_name, value in self.headers:
            if raw_name == name:
                try:
                    return value.decode()
                except UnicodeDecodeError:
                    return value.decode("latin-1")
        return None

    @property
    def user(self) -> str | None:
        value = self.body.get("user")
        return value if isinstance(value, str) else None

    def metadata(self, field: str) -> str | None:
        metadata = self.body.get("metadata")
        value = metadata.get(field) if isinstance(metadata, dict) else None
        return value if isinstance(value, str) else None

    @property
    def prompt_tokens(self) -> int:
        """The prompt's token count (tiktoken; an estimate without the encoding), counted once."""
        if self._prompt_tokens is None:
            self._prompt_tokens = _count_prompt(self.body, self.tokens, self.model)
        return self._prompt_tokens

    @property
    def has_tools(self) -> bool:
        tools = self.body.get("tools") or self.body.get("functions")
        return isinstance(tools, list) and bool(tools)

    @property
    def has_images(self) -> bool:
        messages = self.body.get("messages")
        for message in messages if isinstance(messages, list) else ():
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list) and any(
                isinstance(part, dict) and part.get("type") in ("image_url", "input_image") for part in content
            ):
                return True
        return False

    @property
    def json_response(self) -> bool:
        response_format = self.body.get("response_format")
        return isinstance(response_format, dict) and response_format.get("type") in _JSON_FORMATS

    def sticky_value(self, sticky: str) -> str | None:
        """The caller's identity for sticky assignment; None (then drawn at random) when absent."""
        if sticky == "tenant":
            return self.tenant
        if sticky == "key":
            return self.key_name
        if sticky == "user":
            return self.user
        return self.header(sticky.removeprefix("header:").lower().encode("latin-1"))


def _count_prompt(body: dict[str, Any], tokens: TokenCounter | None, model: str | None) -> int:
    messages = body.get("messages")
    if tokens is None:
        text = str(messages if messages is not None else body.get("prompt", body.get("input", "")))
        return (len(text) + 3) // 4
    if isinstance(messages, list):
        return tokens.count_messages(messages, model)
    prompt = body.get("prompt", body.get("input"))
    if isinstance(prompt, str):
        return tokens.count(prompt, model)
    if isinstance(prompt, list):
        return sum(tokens.count(p, model) if isinstance(p, str) else 1 for p in prompt)
    return 0


def matches(match: Match, alias: str, facts: Facts) -> bool:
    """Whether every condition of `match` holds; cheap tests first, the token count last."""
    if match.alias is not None and alias not in match.alias:
        return False
    if match.tenant is not None and facts.tenant not in match.tenant:
        return False
    if match.key is not None and facts.key_name not in match.key:
        return False
    if match.user is not None and facts.user not in match.user:
        return False
    for name, values in match.headers:
        value = facts.header(name)
        if value is None or (values is not None and value not in values):
            return False
    for field, allowed in match.metadata:
        if facts.metadata(field) not in allowed:
            return False
    if match.has_tools is not None and facts.has_tools is not match.has_tools:
        return False
    if match.json_response is not None and facts.json_response is not match.json_response:
        return False
    if match.has_images is not None and facts.has_images is not match.has_images:
        return False
    if match.needs_tokens:
        count = facts.prompt_tokens
        if match.prompt_tokens_over is not None and count <= match.prompt_tokens_over:
            return False
        if match.prompt_tokens_under is not None and count >= match.prompt_tokens_under:
            return False
    return True


def first_match(rules: Sequence[Rule], alias: str, facts: Facts) -> Rule | None:
    for rule in rules:
        if matches(rule.match, alias, facts):
            return rule
    return None
