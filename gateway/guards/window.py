"""The stream scanner's window: hold back a bounded tail of each lane of text, release the rest.

A lane is one run of answer text as it streams (a choice's content, a tool call's arguments, a Responses output text
part). New text waits in the lane. After each chunk, every guard says from which offset a finding may still start that
the text seen so far does not complete (`Guard.open_from`, `holds.py`: an e-mail address still being written, a number
that may grow into a phone number); the text before the earliest such offset, less the trailing word (which the next
chunk may continue), is scanned (with the last released `window_chars` as left context) and released at once, cut at a
whitespace (or beside a character of a script written without spaces), never inside a finding, an open private key
block, or a placeholder that may still be completing. No more than `window_chars` is held for a possible finding past
where a cut may go, plus how far past a match a guard's context word may still come (`span`: a date of birth waits
whole for its "born" in a small window too); a word without a cut in it waits whole, up to `max_hold_chars`, and is
cut there: a finding that covers the cut (an address that keeps growing) is rewritten up to it as one entity and the
rest of its run dropped as it comes (`_split`); a text ending inside an address's domain waits for the domain, a
label's length at most (`window_runs.domain_open`), and a tool call's arguments are never cut inside a JSON number
(`JsonPieces.number_around`: its replacement is a JSON string in place of all of it). Only an open private key block
is held longer than the window, whole until its END line, but no longer than `max_hold_chars` either: past it, the
block is rewritten there as one entity (or blocks) and its rest dropped as it comes, up to and including its END line
(`_cut_key`). So a lane holds a bounded text and no text is scanned whole again and again. A guard that cannot say
where a finding may start (the `ner` engine) holds the whole window, and then, as before early release, the lane is
scanned once `span + step_chars` are waiting and again after every `step_chars`, releasing all but the last `span`; so
is a lane whose earliest possible start sits at the window's far end (a list of figures), which a scan at every chunk
would rescan for each number. Either way any entity shorter than the window is whole in some scan before its first
character leaves, whatever the chunking. Chunks that arrive in one upstream read are released together, the holds
looked for once, at the last. The released text is rewritten (redact, mask, pseudonymize) and its placeholders
restored; a blocking finding raises `Blocked`, and whoever drives the window ends the stream in its own format. A lane
released whole (`final`) that then goes on (a reasoning resumed after the answer began, an answer's text after its
first tool call) is `sealed`: a finding reaching back into the text already sent blocks.

The window knows nothing of any wire format: the chunk shapes (Chat
Completions, Completions, the Responses API's events) are adapters around it
(`stream.py`, `responses.py`).
"""

from __future__ import annotations

import re
import time
from functools import partial
from typing import TYPE_CHECKING

from msgspec.structs import replace

from ..policy.guard_schema import StreamScanSpec
from .base import Finding, Guard, Where
from .json_view import JsonPieces, json_view
from .pseudonyms import Pseudonyms
from .session import GuardSession
from .verdict import apply
from .window_runs import DOMAIN_REACH, domain_open, key_end, open_escape, run_end

if TYPE_CHECKING:
    from .runtime import GuardRuntime

__all__ = ["ANSWER", "REASONING", "TOOL", "Blocked", "Lane", "LaneKey", "Window", "lane_index"]

ANSWER = Where("output", "answer")
TOOL = Where("output", "tool_arguments")
REASONING = Where("output", "reasoning")  # the model's reasoning (or its summary), as an answer may carry it
# (choice or output index, what the lane is: "text", "tool", or a field of text beside them, such as "reasoning_content"
# or "refusal"; content part, summary part or tool call index)
LaneKey = tuple[int, str, int]


def lane_index(value: object) -> int:
    """An index of a lane's key as the upstream's event gives it (a choice's, an output item's, a part's, a tool
    call's): an int, else 0 (`[0]`, `"1"`, `null`: a list would not even hash)."""
    return value if isinstance(value, int) else 0


class Blocked(Exception):
    """An enforced finding blocks the answer: the stream ends, held text is dropped."""


class Lane:
    __slots__ = ("block", "carry", "context", "json", "keyed", "open", "pending", "pieces", "released", "scanned",
                 "sealed", "waiting")

    def __init__(self, json: bool) -> None:
        self.pending = ""
        self.context = ""  # the last released upstream text: left context for the next scan
        self.json = json  # tool arguments: restored originals are JSON-escaped, a number's replacement is a string
        self.pieces = JsonPieces() if json else None
        self.scanned = 0  # len(pending) at the last scan
        self.released = 0  # upstream characters released so far
        # Upstream offset before which no guard's finding may still start (`Guard.open_from`: the next look's start).
        self.open = 0
        # Released whole (`final`): the lane was taken as over, its tail sent unheld. Only a lane that goes on after
        # that (a reasoning resumed after the answer began, a text after a tool call) can have a finding reach back
        # into sent text.
        self.sealed = False
        # The last look for holds found the earliest at the window's far end: the next waits for `step_chars`.
        self.waiting = False
        # The rest of an entity rewritten at `max_hold_chars` is still coming: dropped up to its run's end (`_split`).
        self.carry = False
        # The rest carried is a private key block's: dropped up to and including its END line (`_cut_key`).
        self.keyed = False
        # The upstream offset of the private key block the last look found open (-1: none): if it ends in the next
        # chunk past `max_hold_chars`, it is taken whole there too (`_hold`).
        self.block = -1


class Window:
    def __init__(self, runtime: GuardRuntime, guards: tuple[Guard, ...], session: GuardSession,
                 spec: StreamScanSpec, model: str) -> None:
        self.runtime = runtime
        self.guards = guards
        self.session = session
        self.spec = spec
        self.model = model
        self.lanes: dict[LaneKey, Lane] = {}
        self.first_in: float | None = None
        self.first_out = False
        # More chunks of the same upstream read follow (set by the stream stage): they leave together with
        # the last, so the holds are looked for once, at the last (a fast upstream's many chunks at once).
        self.more = False
        # How far back holds are looked for and kept: the window, plus how far past a match a guard's context
        # word still counts (`holds.py`): a match shorter than the window waits for its context word whole.
        self.span = spec.window_chars + max((guard.context_reach() for guard in guards), default=0)

    def lane(self, key: LaneKey, json: bool) -> Lane:
        lane = self.lanes.get(key)
        if lane is None:
            lane = self.lanes[key] = Lane(json)
        return lane

    def feed(self, lane: Lane, text: str) -> None:
        lane.pending += text
        if lane.carry:
            self._swallow(lane)
        if self.first_in is None:
            self.first_in = time.perf_counter()

    async def release(self, lane: Lane, final: bool, where: Where) -> str:
        """What of the lane may leave now, rewritten; all of it when `final`. Raises `Blocked`."""
        if lane.carry:  # (what waits may be a key block's END line still coming: it leaves with none of it)
            if not final:
                return ""
            self._swallow(lane, final)
        text = lane.pending
        if not text:
            return ""
        pseudonyms = self.session.pseudonyms
        if not self.guards:  # nothing to scan: only placeholders to restore
            cut = len(text) if final else len(text) - Pseudonyms.open_tail(text)
            return self._emit(lane, text, cut, [], [], where)
        full = lane.context + text
        offset = len(lane.context)
        cut, key = len(text), -1
        if not final:  # (a tool call's arguments: the guards' holds read them as `runtime.detect` does)
            tool = where.part == "tool_arguments"
            cut, key = self._hold(lane, text, json_view(full)[0] if tool else full, offset, tool)
            if cut <= 0:  # nothing can leave yet: no scan
                return ""
        lane.scanned = len(text)
        enforced, shadow = await self.runtime.detect(self.guards, full, where)
        if lane.sealed:
            self._reached_back(enforced, offset, where)
        lane.sealed = lane.sealed or final
        enforced = _shift(enforced, offset)
        shadow = _shift(shadow, offset)
        if any(f.action == "block" for f in enforced):
            self.session.note_findings([f for f in enforced if f.action == "block"], "enforce", where.place)
            raise Blocked
        split = key >= 0
        if split:
            enforced, shadow = self._cut_key(lane, key, cut, enforced), _clipped(shadow, cut)
        elif not final:
            settled = self._settle(text, cut, enforced + shadow)
            # Nothing could leave, the lane past `max_hold_chars`: a finding covers the held text up to the cut.
            split = settled <= 0 < cut and len(text) > self.spec.max_hold_chars
            if split:
                cut = self._split(lane, full, offset, cut, enforced, where)
                enforced, shadow = _clipped(enforced, cut), _clipped(shadow, cut)
            else:
                # A finding that started before the window covers the cut: the next scan waits for `step_chars`.
                lane.waiting = lane.waiting or settled <= 0
                cut = settled if lane.pieces is None else lane.pieces.number_around(text, settled, self.span)
        if pseudonyms and cut < len(text) and not split:
            cut -= Pseudonyms.open_tail(text[:cut])
        out = self._emit(lane, text, cut, enforced, shadow, where)
        if lane.carry:
            self._swallow(lane)
        return out

    def _reached_back(self, findings: list[Finding], offset: int, where: Where) -> None:
        """A lane released whole went on: an enforced finding that starts in the text already sent (the left
        context) and goes on past it was split by that release; redacting only its rest would send a finding in
        part (its start is out), so the answer is blocked instead, counted as the guard's block."""
        reached = [f for f in findings if f.start < offset < f.end and f.type != "GUARD_FAILURE"]
        if reached:
            self.session.note_findings([replace(f, action="block") for f in reached], "enforce", where.place)
            raise Blocked

    def _hold(self, lane: Lane, text: str, full: str, offset: int, tool: bool) -> tuple[int, int]:
        """Where the held text may be cut before scanning it: before the earliest offset where a guard
        says a finding may still start, and before the trailing word (it may go on in the next chunk);
        never holding more than `span`, except for an open private key block (up to `max_hold_chars`). When the
        earliest such offset is at the window's far end (within `step_chars` of it: a guard that cannot tell holds
        the whole window; a stretch of figures is held from its first digit in reach), scans wait for `step_chars`
        of new text, as they did before early release. 0: nothing may leave yet. With it, where a key block held past
        `max_hold_chars` starts (cut at its END line, or before what may be its start: `_cut_key`); -1: none.
        A tool call's arguments (`tool`: `full` is their JSON view) are read for holds only up to an escape at their
        end that may still be completing (`\\`, `\\u00`): read as it is, its backslash ended any finding before it
        that its character may yet go on (`Jaur\\` then `u00e8s`), and the window released the finding's start."""
        spec = self.spec
        span = self.span
        bound = len(text) - span
        hold = bound
        if bound < 0 and self._words(text, len(text) - (not text[-1].isspace())) <= 0:
            return 0, -1  # nothing but the trailing word waits (a token that continues it): no holds to look for
        if spec.max_hold_chars < len(text) <= spec.max_hold_chars + DOMAIN_REACH and domain_open(text):
            return 0, -1  # cut inside the domain, an address would be no finding yet: its start would leave in clear
        fresh = len(text) - lane.scanned >= spec.step_chars  # new text enough for a scan of the whole window
        if not self.more:
            if lane.waiting and not fresh:
                return 0, -1  # (the holds only move on as text comes: none can let text leave before the next step)
            base = lane.released - offset  # the upstream offset of full[0]
            # A finding starting before the window is cut at the window anyway; before `lane.open`, none can.
            start = max(0, len(full) - span, lane.open - base)
            seen = full[:offset + open_escape(text)] if tool else full  # (never past an escape still completing)
            found = min(guard.open_from(seen, min(start, len(seen))) for guard in self.guards)
            lane.open = base + found
            hold = found - offset
            # What may leave would grow a chunk at a time while a whole window stays held: a scan per chunk
            # rescanned that window every time (a list of numbers cost 30 to 80 times a check of the whole text).
            lane.waiting = hold - bound < spec.step_chars
        if hold - bound < spec.step_chars and not fresh:
            return 0, -1
        if hold <= bound:
            if len(text) < span + spec.step_chars:
                return 0, -1
            cut = bound
        else:
            cut = min(hold, len(text))
            if cut == len(text) and not text[-1].isspace():
                cut -= 1  # inside the trailing word: `_words` moves it to the word's start
        opened = min((at for at in (guard.hold_from(full) for guard in self.guards) if at is not None), default=None)
        held = opened if opened is not None or lane.block < lane.released else lane.block - lane.released + offset
        lane.block = -1 if opened is None else lane.released - offset + opened
        if held is not None and len(full) - held > spec.max_hold_chars:  # taken whole now, up to its END line if
            key = max(0, held - offset)  # it came, else all but what may be its start (`_cut_key`)
            end, over = key_end(text[key:], lane.json)
            lane.block = -1 if over else lane.block
            return key + end, key
        if opened is not None:
            cut = min(cut, opened - offset)
        return self._words(text, cut), -1

    def _cut_key(self, lane: Lane, key: int, cut: int, enforced: list[Finding]) -> list[Finding]:
        """A key block held past `max_hold_chars` (`key` to `cut`): the enforced findings over it from its header (a
        block action has blocked) are rewritten up to the cut; if it is still open, keeping none of it, its rest is
        dropped up to and including its END line (`carry`, `keyed`). One no enforced finding covers (no key material
        after the header, as at the stream's end; a shadow guard's) leaves as it is."""
        hidden = [f for f in enforced if f.start <= key < f.end and f.end >= cut and f.action in _REWRITING]
        lane.carry = lane.keyed = bool(hidden) and lane.block >= 0
        return _clipped([replace(f, end=cut, keep=0) if lane.carry and f in hidden else f for f in enforced], cut)

    def _split(self, lane: Lane, full: str, offset: int, cut: int, enforced: list[Finding], where: Where) -> int:
        """Where a finding that covers the held text past `max_hold_chars` (an address or a key that keeps growing)
        ends, as one entity: at `cut` (moved out of a JSON escape). It is rewritten up to there, and the rest of its
        run (up to the next white space) is dropped as it comes (`carry`): held, it was rescanned whole at every step
        (quadratic), and its tail, scanned alone, is no finding (`.com.com`, the letters of a key without its
        `sk-`). One that holds white space may go on past the run's end: it blocks, counted as its guard's block."""
        tool = where.part == "tool_arguments"
        view, escapes = json_view(full) if tool else (full, [])
        for start, end in escapes:
            if start - offset < cut < end - offset:
                cut = start - offset
        hidden = [f for f in enforced if f.start < cut < f.end and f.action in _REWRITING]
        spaced = [f for f in hidden if _SPACE.search(view, offset + f.start, offset + cut)]
        if spaced:
            self.session.note_findings([replace(f, action="block") for f in spaced], "enforce", where.place)
            raise Blocked
        lane.carry = bool(hidden) and cut > 0
        return cut

    def _swallow(self, lane: Lane, final: bool = False) -> None:
        """Drops the held text that goes on an entity split at `max_hold_chars` (`_split`), up to the end of its
        run: the first white space (in tool arguments, also the string's closing quote or an escaped white space; a
        trailing escape that may still be completing waits, unless the lane is over); a key block's, up to and
        including its END line (`window_runs.key_end`). What is dropped is still the next scan's context."""
        text = lane.pending
        end, over = key_end(text, lane.json) if lane.keyed else run_end(text, lane.json)
        if final and not over:
            end = len(text)
        lane.context = (lane.context + text[:end])[-self.spec.window_chars:]
        lane.released += end
        lane.pending = text[end:]
        lane.scanned = max(0, lane.scanned - end)
        lane.carry = not over
        lane.keyed = lane.keyed and not over

    def _settle(self, text: str, cut: int, findings: list[Finding]) -> int:
        """The cut, moved back out of any finding it would split (and to a word's start)."""
        for _ in range(3):  # moving the cut back may land inside another finding: settle
            for f in findings:
                if f.start < cut < f.end:
                    cut = f.start
            cut = self._words(text, cut)
        return cut

    def _words(self, text: str, cut: int) -> int:
        """`cut`, moved back to a word's start (unless the text has no space and is longer than
        `max_hold_chars`); 0 or more. Beside a character of a script written without spaces (Chinese,
        Japanese, Thai...) every offset is a word's start: else an answer in it would wait, whole, for its end."""
        if 0 < cut < len(text) and not (text[cut].isspace() or text[cut - 1].isspace()):
            space = max(text.rfind(" ", 0, cut), text.rfind("\n", 0, cut))
            unspaced = -1 if text.isascii() else _unspaced_before(text, space + 1, cut)
            if unspaced > 0:
                cut = unspaced
            elif space >= 0:
                cut = space + 1
            elif len(text) <= self.spec.max_hold_chars:
                cut = 0
        return max(0, cut)

    def _emit(self, lane: Lane, text: str, cut: int, enforced: list[Finding], shadow: list[Finding],
              where: Where) -> str:
        if cut <= 0:
            return ""
        released = text[:cut]
        applied = [f for f in enforced if f.start < cut]
        self.session.note_findings(applied, "enforce", where.place)
        self.session.note_findings([f for f in shadow if f.start < cut], "shadow", where.place)
        pseudonyms = self.session.pseudonyms
        numbers = lane.pieces.numbers(released) if lane.pieces is not None else None
        out = apply(released, applied, pseudonyms, partial(pseudonyms.restore, json_string=lane.json), numbers)
        lane.context = (lane.context + released)[-self.spec.window_chars:]
        lane.released += cut
        lane.pending = text[cut:]
        lane.scanned = max(0, lane.scanned - cut)
        if out and not self.first_out and self.first_in is not None:
            self.first_out = True
            self.runtime.metrics.guard_stream_delay.labels(self.model).observe(time.perf_counter() - self.first_in)
        return out


# Scripts written without spaces between words: Thai, Lao, Myanmar, Khmer, CJK punctuation, kana, bopomofo, the
# CJK ideographs (and their extensions and compatibility forms), Yi, and the full-width forms.
_UNSPACED = re.compile("[\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3000-\u30ff\u3100-\u312f\u31a0-\u31ff"
                       "\u3400-\u4dbf\u4e00-\u9fff\ua000-\ua4cf\uf900-\ufaff\uff00-\uffef\U00020000-\U0003134f]")


def _unspaced_before(text: str, start: int, cut: int) -> int:
    """The last offset in (`start`, `cut`] beside a character of a script written without spaces; -1 if none."""
    if _UNSPACED.match(text, cut) or _UNSPACED.match(text, cut - 1):
        return cut  # (the usual case in such a text: the cut itself)
    last = -1
    for found in _UNSPACED.finditer(text, start, cut):
        last = found.end()  # after it (and the offset before it, found.start(), is earlier)
    return last if last > start else -1


_REWRITING = frozenset({"redact", "mask", "pseudonymize"})
_SPACE = re.compile(r"\s")


def _shift(findings: list[Finding], offset: int) -> list[Finding]:
    """Findings in the scanned text, as spans of the held text (those wholly in the context dropped)."""
    out = []
    for f in findings:
        if f.type == "GUARD_FAILURE":
            out.append(f)
        elif f.end > offset:
            out.append(type(f)(f.guard, f.type, max(0, f.start - offset), f.end - offset, f.score, f.recognizer,
                               f.action, f.keep))  # (an `EscapedFinding` stays one: its value is its text read)
    return out


def _clipped(findings: list[Finding], cut: int) -> list[Finding]:
    """Findings split by `cut` (`Window._split`), ending there: a mask keeps nothing (the characters before the cut
    are the entity's middle, not its end)."""
    return [replace(f, end=cut, keep=0) if f.start < cut < f.end and f.type != "GUARD_FAILURE" else f
            for f in findings]
