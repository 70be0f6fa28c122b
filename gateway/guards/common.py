"""What every guard kind shares: its name, mode, failure policy, timeout and places."""

from __future__ import annotations

from typing import Literal

from ..policy.guard_schema import GuardSpec
from .base import Finding, Place, Where

__all__ = ["GuardBase"]


class GuardBase:
    kind = "guard"

    def __init__(self, name: str, spec: GuardSpec) -> None:
        self.name = name
        self.mode: Literal["enforce", "shadow", "off"] = spec.mode
        self.fail: Literal["closed", "open"] = spec.fail
        self.timeout_s = spec.timeout_s
        self.places: frozenset[Place] = frozenset(spec.places)

    def detect_now(self, text: str, where: Where) -> list[Finding] | None:
        return None  # `detect` decides, under the guard's timeout

    def open_from(self, text: str, start: int) -> int:
        return 0  # cannot tell: the scanner holds its whole window

    def hold_from(self, text: str) -> int | None:
        return None

    def context_reach(self) -> int:
        return 0
