"""Limits on the input's size: characters, messages and tokens, over the whole request.

Not a text scanner: it reads the request as a whole, before any other guard, so
that an oversized prompt is refused before it costs an analysis.

Tokens are counted only when the characters do not decide (a text has no more tokens than characters), and only
until the count passes the limit. tiktoken takes about a second for a megabyte written without spaces (a pasted
blob), so a request with more than `OFF_LOOP_CHARS` characters to count is counted in a thread
(`check_request_off_loop`), as accounting counts a large body: the event loop goes on serving the other requests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ..policy.guard_schema import LimitsGuardSpec
from .base import Finding, Where
from .common import GuardBase

__all__ = ["OFF_LOOP_CHARS", "LimitsGuard"]

OFF_LOOP_CHARS = 64 * 1024  # more characters to count: counted in a thread (as `telemetry.usage` does)


class LimitsGuard(GuardBase):
    kind = "limits"

    def __init__(self, name: str, spec: LimitsGuardSpec, count_tokens: Callable[[str], int]) -> None:
        super().__init__(name, spec)
        self.action = spec.action
        self.max_chars = spec.max_chars
        self.max_messages = spec.max_messages
        self.max_tokens = spec.max_tokens
        self.count_tokens = count_tokens

    async def detect(self, text: str, where: Where) -> list[Finding]:
        return []  # whole-request checks only (`check_request`)

    def check_request(self, texts: list[str], messages: int) -> list[Finding]:
        """The request's findings, its tokens counted here (on the loop: for a request known to be small, and for
        the dry run, which has no loop to keep free)."""
        found, chars = self._sizes(texts, messages)
        if self._counts(chars) and self._over_tokens(texts, chars):
            found.append(self._finding("MAX_TOKENS", 0))
        return found

    async def check_request_off_loop(self, texts: list[str], messages: int) -> list[Finding]:
        """As `check_request`, the tokens of more than `OFF_LOOP_CHARS` characters counted in a thread."""
        found, chars = self._sizes(texts, messages)
        if self._counts(chars):
            over = (await asyncio.to_thread(self._over_tokens, texts, chars) if chars > OFF_LOOP_CHARS
                    else self._over_tokens(texts, chars))
            if over:
                found.append(self._finding("MAX_TOKENS", 0))
        return found

    def _sizes(self, texts: list[str], messages: int) -> tuple[list[Finding], int]:
        """The findings on characters and messages, and how many characters the texts hold."""
        found = []
        chars = sum(map(len, texts))
        if self.max_chars is not None and chars > self.max_chars:
            found.append(self._finding("MAX_CHARS", chars))
        if self.max_messages is not None and messages > self.max_messages:
            found.append(self._finding("MAX_MESSAGES", messages))
        return found, chars

    def _counts(self, chars: int) -> bool:
        """Whether the tokens must be counted: fewer characters than the limit are fewer tokens too."""
        return self.max_tokens is not None and chars > self.max_tokens

    def _over_tokens(self, texts: list[str], chars: int) -> bool:
        """Whether `texts` (`chars` characters) hold more than `max_tokens` tokens: counted text by text, until the
        count passes the limit, or until what is left to count cannot take it past (a token per character)."""
        limit = self.max_tokens
        assert limit is not None
        tokens = 0
        for text in texts:
            if tokens + chars <= limit:
                return False
            chars -= len(text)
            tokens += self.count_tokens(text)
            if tokens > limit:
                return True
        return False

    def _finding(self, label: str, size: int) -> Finding:
        return Finding(self.name, label, 0, 0, 1.0, f"limits.{label.lower()}", self.action)
