"""Limits on the input's size: characters, messages and tokens, over the whole request.

Not a text scanner: it reads the request as a whole, before any other guard, so
that an oversized prompt is refused before it costs an analysis.
"""

from __future__ import annotations

from collections.abc import Callable

from ..policy.guard_schema import LimitsGuardSpec
from .base import Finding, Where
from .common import GuardBase

__all__ = ["LimitsGuard"]


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
        found = []
        chars = sum(map(len, texts))
        if self.max_chars is not None and chars > self.max_chars:
            found.append(self._finding("MAX_CHARS", chars))
        if self.max_messages is not None and messages > self.max_messages:
            found.append(self._finding("MAX_MESSAGES", messages))
        if self.max_tokens is not None and (chars > self.max_tokens and
                                            sum(self.count_tokens(t) for t in texts) > self.max_tokens):
            found.append(self._finding("MAX_TOKENS", 0))
        return found

    def _finding(self, label: str, size: int) -> Finding:
        return Finding(self.name, label, 0, 0, 1.0, f"limits.{label.lower()}", self.action)
