"""The text parts of one message, read by the input guards as the one text the model reads.

A message's content sent as a list of parts is read by the model as its text parts' text joined as it is (no
separator: what `texts.spread_parts` makes of an answer's parts, and what the gateway's own translators send a
provider that takes one string). Checked one part at a time, a value cut in two (`key AKIAZ3MQ` then
`7XJ4K2PLW9QA`, `project` then ` falcon`) was found in neither part, and reached the upstream whole. So a run of
two or more text parts is checked as one text (`Joined`, the container of a `texts.Ref`), and what the
guards rewrite in it is written back onto the parts (`Joined.rewrite`): a finding's replacement in the part where
the finding starts, the rest of the finding removed from the parts after it, so that the parts joined are the
rewritten text. A part without text between two (an image, an audio clip, a file) is passed over, and left as it is:
the model reads the texts on either side of it one after the other (`my key is sk-proj-abc`, an image, `def123...`
reached the upstream whole). Where one sat is a seam (`Joined.seams`), and there the text is read both ways: whole,
for a value across the seam, and cut at it, for a value that ends there (`mail jane.doe@gmail.com`, an image, `or
...`: joined, `gmail.comor` is no address, and the model, which reads the image between, reads the address). A run
ends at a part with a text of its own (a refusal), checked on its own: only text parts are joined. A single text part
is read as before, on its own.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable
from typing import Any

from .base import Finding
from .pseudonyms import Pseudonyms
from .verdict import edits

__all__ = ["TEXT", "Joined"]

TEXT = "text"  # the key of a `Joined` in its `Ref` (and the field of each of its parts)


class Joined:
    """Two or more text parts of one message (dicts with a string `text`), read as their texts joined:
    `joined[TEXT]` is that text; `rewrite` writes a rewritten one back onto the parts."""

    __slots__ = ("ends", "parts", "seams", "text")

    def __init__(self, parts: list[dict[str, Any]], gaps: Iterable[int] = ()) -> None:
        self.parts = parts
        texts = [part[TEXT] for part in parts]
        self.text = "".join(texts)
        ends: list[int] = []
        at = 0
        for text in texts:
            at += len(text)
            ends.append(at)
        self.ends = ends  # where each part's text ends in the joined text
        # Where a part without text sat, in the joined text (`gaps`: the indexes of the parts after one): the
        # guards read the text both ways, whole and cut there (`runtime.GuardRuntime.detect`).
        self.seams = sorted({ends[gap - 1] for gap in gaps})

    def __getitem__(self, key: str) -> str:
        return self.text

    def rewrite(self, new: str, findings: Iterable[Finding], pseudonyms: Pseudonyms | None) -> None:
        """Write `new` (`verdict.apply` of `findings` on the joined text) back onto the parts: the text between
        findings stays in the part it was in, a finding's replacement goes where the finding starts, and the rest
        of a finding that runs into later parts leaves them. The edits are those `apply` makes (the same findings
        resolved, placeholders already in the text left alone, a JSON number replaced whole); should they ever
        differ from `new`, the first part takes all of `new` and the others are emptied: never a piece of a
        finding sent on."""
        text = self.text
        pieces: list[list[str]] = [[] for _ in self.parts]
        at = 0
        for start, end, replaced in edits(text, findings, pseudonyms):
            self._keep(pieces, at, start)
            pieces[self._part_of(start)].append(replaced)
            at = end
        self._keep(pieces, at, len(text))
        written = ["".join(piece) for piece in pieces]
        if "".join(written) != new:  # (a backstop: `edits` is `apply`'s own walk)
            written = [new] + [""] * (len(self.parts) - 1)
        for part, piece in zip(self.parts, written, strict=True):
            part[TEXT] = piece

    def _part_of(self, offset: int) -> int:
        """The part holding the character at `offset` (an empty part holds none; the end of the text: the last)."""
        return min(bisect_right(self.ends, offset), len(self.ends) - 1)

    def _keep(self, pieces: list[list[str]], start: int, end: int) -> None:
        """The joined text's `[start, end)` as it was, each character in the part it came from."""
        text, ends = self.text, self.ends
        while start < end:
            index = self._part_of(start)
            stop = min(end, ends[index])
            pieces[index].append(text[start:stop])
            start = stop
