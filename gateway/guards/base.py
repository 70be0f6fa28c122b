"""The guard interface: text with its place in, findings and a verdict out.

A guard only detects: it returns `Finding`s, each carrying the action the policy
gives its type. One shared function (`verdict.decide`) turns findings into a
verdict (allow, redact with the replacements, block), so that every guard kind
redacts, masks and pseudonymizes the same way, and shadow mode is one switch in
one place. A finding never carries its matched text outside the request: spans
point into the text the guard was given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import msgspec

from ..policy.guard_schema import Action

__all__ = ["WITHHELD", "Action", "Finding", "Guard", "GuardFailure", "Part", "Place", "Where", "enforcing"]

Place = Literal["input", "output"]
# Which part of a request or answer a text is: what a guard may treat differently.
Part = Literal["message", "tool_arguments", "tool_result", "prompt", "embedding_input", "answer", "reasoning"]


@dataclass(frozen=True, slots=True)
class Where:
    place: Place
    part: Part


class Finding(msgspec.Struct, frozen=True):
    """One thing found: its type, where it is in the text, how sure, by which recognizer, and what to do.

    A msgspec struct, not a frozen dataclass: the same immutability at about a tenth of the cost to build
    (a frozen dataclass sets each field through `object.__setattr__`: ~13k instructions a finding)."""

    guard: str
    type: str
    start: int
    end: int
    score: float
    recognizer: str
    action: Action
    keep: int = 4  # mask: characters kept at the end


class GuardFailure(Exception):
    """A guard could not decide (it raised, timed out, or its queue was full): `fail:` decides."""

    def __init__(self, guard: str, reason: Literal["error", "timeout", "queue_full"]) -> None:
        super().__init__(f"guard {guard} failed: {reason}")
        self.guard = guard
        self.reason = reason


class Guard(Protocol):
    """A configured guard. `detect` may run on a worker (the ner engine, the injection model, any text
    longer than `pool.INLINE_CHARS`) and must be safe to call concurrently; it is given the text and its
    place, and returns findings with spans into it."""

    name: str
    kind: str
    mode: Literal["enforce", "shadow", "off"]
    fail: Literal["closed", "open"]
    timeout_s: float
    places: frozenset[Place]

    async def detect(self, text: str, where: Where) -> list[Finding]: ...

    def detect_now(self, text: str, where: Where) -> list[Finding] | None:
        """The findings, when the guard computes them on the loop without waiting for anything (a text of at
        most `pool.INLINE_CHARS` characters, no model); None when `detect` has to hand the text to the pool."""
        ...

    def open_from(self, text: str, start: int) -> int:
        """Streams: the earliest offset at or after `start` where a finding may start that `text` does
        not complete (an e-mail address still being written, a number that may grow into a phone
        number): more text cannot change what the guard finds before it. `len(text)` when there is
        none; 0 when the guard cannot tell (the scanner then holds its whole window). `holds.py`."""
        ...

    def hold_from(self, text: str) -> int | None:
        """Streams: where a finding that is still being written may start and must be held even past
        the window (an open private key block); None when nothing is open."""
        ...

    def context_reach(self) -> int:
        """Streams: how many characters past a match a context word may still arrive and make it a finding (the
        `patterns` engine's context words, `holds.RegexHolds.reach`); 0 for a guard without any."""
        ...


WITHHELD = "its message withheld: output guards are on"


def enforcing(guards: tuple[Guard, ...]) -> bool:
    """Whether any of `guards` (output guards) changes or stops what leaves: in enforce mode, with another action than
    `record` (its own, or a pii guard's for one of its entities)."""
    for guard in guards:
        if guard.mode != "enforce":
            continue
        actions = getattr(guard, "actions", None)
        if getattr(guard, "action", "block") != "record" or (
                isinstance(actions, dict) and any(action != "record" for action in actions.values())):
            return True
    return False
