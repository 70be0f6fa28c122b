"""Whether a streamed tool call's arguments so far are a whole JSON value (`JsonEnd`), followed piece by piece.

The stream stage (`stream.py`) asks it of every call it holds when another call begins: held arguments leave whole
when their call is over.
"""

from __future__ import annotations

import json
import re

__all__ = ["JsonEnd"]

# A JSON text's tokens that `JsonEnd` follows: a bracket, a quote, or an escape (a lone backslash: the piece's last).
_JSON_TOKEN = re.compile(r'\\.?|[][{}"]', re.DOTALL)
_NOT_BLANK = re.compile(r"[^ \t\n\r]")  # (JSON's white space)
_SCALAR_CHARS = 64  # a top-level number or literal longer than this is taken as never complete


class JsonEnd:
    """Whether a tool call's arguments so far are a whole JSON value (the call is over), fed each piece once, in
    order, keeping only the bracket depth and whether it is inside a string: the arguments themselves are not kept
    (a call may stream megabytes, and another call's start asks this of every call held). A value in brackets or
    quotes is whole once its brackets close (or its string does), with nothing but white space after it; what lies
    between is not checked (`[}` closes), since this only decides whether held arguments leave whole when another
    call begins, and a call that goes on after that is scanned with what left as its context all the same. A
    top-level number or literal (`true`, `12`) is kept, up to `_SCALAR_CHARS`, and parsed."""

    __slots__ = ("bad", "depth", "done", "escaped", "inside", "scalar")

    def __init__(self) -> None:
        self.depth = 0  # brackets open
        self.inside = False  # inside a string
        self.escaped = False  # ... and the last piece ended in a backslash: the next's first character is escaped
        self.done = False  # the value is whole (only white space may follow)
        self.bad = False  # not a JSON value, or more after a whole one: never complete
        self.scalar: str | None = None  # a top-level number or literal's text so far

    def feed(self, piece: str) -> None:
        if self.bad or not piece:
            return
        if self.scalar is not None:
            self._scalar(piece)
            return
        at = 0
        if self.done:
            self.bad = _NOT_BLANK.search(piece) is not None
            return
        if self.escaped:
            self.escaped = False
            at = 1
        elif not self.depth and not self.inside:  # before the value
            first = _NOT_BLANK.search(piece)
            if first is None:
                return
            at = first.start()
            if piece[at] not in '{["':
                self.scalar = ""
                self._scalar(piece[at:])
                return
        inside, depth = self.inside, self.depth
        for token in _JSON_TOKEN.finditer(piece, at):
            char = token.group()
            if inside:
                if char == "\\":
                    self.escaped = True  # (a backslash and its character match as one: this one ends the piece)
                if char != '"':
                    continue
                inside = False
                if depth:
                    continue
            elif char == '"':
                inside = True
                continue
            elif char in "{[":
                depth += 1
                continue
            elif char in "}]" and depth:
                depth -= 1
                if depth:
                    continue
            else:  # an escape outside a string, a bracket closing none
                self.bad = True
                return
            self.done = True  # the value is whole: white space may follow, nothing else
            self.bad = _NOT_BLANK.search(piece, token.end()) is not None
            break
        self.inside, self.depth = inside, depth

    def _scalar(self, piece: str) -> None:
        text = self.scalar = (self.scalar or "") + piece
        if len(text) > _SCALAR_CHARS:
            self.scalar, self.bad = None, True

    def complete(self) -> bool:
        if self.bad:
            return False
        if self.scalar is not None:
            try:
                json.loads(self.scalar)
            except ValueError:
                return False
            return True
        return self.done
