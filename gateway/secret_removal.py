"""The removal of a provider's configured credentials, by value, from what an upstream says: every spelling an
encoder may leave them in, by a pattern built once per set of credentials, off the event loop.

The first step of `sanitize.sanitize_upstream_message`, and the whole of what the text beside an upstream's error
goes through (`remove_secrets`). Its own module because it has a life of its own: a pattern per set of secrets,
costly to build for a long token and so built ahead of need, in a worker thread (`prepare_secrets`), and large
(1.4 MB for two 2,000-character tokens), so kept only while in use (`use_secrets`) or within a budget of bytes.
"""

from __future__ import annotations

import asyncio
import re
import sys
import threading
from bisect import bisect_right
from collections.abc import Iterable

import regex  # type: ignore[import-untyped]  # no stubs

__all__ = ["prepare_secrets", "remove_secrets", "spaced", "use_secrets"]

# Configured secrets shorter than this are not removed by value: a short string
# ("abc", "test") hits ordinary words far more often than it hits an echo of the
# credential, and a credential that short is not protected by hiding it anyway.
_MIN_SECRET_LENGTH = 6
_REDACTED = "[redacted]"
# "Bearer " / "Basic " in front of a configured header value.
_AUTH_SCHEME = re.compile(r"(?:bearer|basic)\s+", re.IGNORECASE)


def remove_secrets(text: str, secrets: Iterable[str]) -> str:
    """`text` with every spelling of the configured `secrets` replaced (the first step of
    `sanitize.sanitize_upstream_message` alone: no cut, no shape rules), for the text an upstream put beside its error
    (an answer's ids, code, instructions), which the shape rules would mangle."""
    return _without_secrets(text, _key(secrets))


def spaced(text: str) -> str:
    """`text` with each run of the characters the removal reads across (`_GAP_RUN`: white space and every
    character a reader does not see as one) as one space: how `sanitize` shows an upstream's message. By the same
    class, so that no character the removal did not read across becomes a space (Python's own idea of what is
    printable follows an older Unicode than the `regex` module's: a character assigned since would have)."""
    shown: str = _GAP_RUN.sub(" ", text, concurrent=False)
    return shown


def prepare_secrets(secrets: Iterable[str]) -> None:
    """Build the removal pattern of `secrets` (a provider's `secrets()`, as its errors will pass them) ahead of
    need. It blocks for up to a few tenths of a second (a 2,000-character Entra token): run it in a worker thread
    (`asyncio.to_thread`) when a provider starts and before a new credential is used, so that no upstream error
    waits for it and the event loop never builds one (see `_without_secrets` for when it has to)."""
    key = _key(secrets)
    if key not in _PATTERNS:
        _store(key, _secrets_pattern(_secret_values(key)))


def use_secrets(owner: object, secrets: Iterable[str] | None) -> None:
    """Say that `owner` (a provider, by identity) now passes `secrets` to its errors, None once it is closed. The
    pattern of the set it passed before goes as soon as no owner passes that set: a token file's rotation makes a
    new set each time (the new token and the one it replaced), and the replaced ones would otherwise stay. A set
    in use is never dropped; one nobody uses (prepared by a provider that does not say, or replaced) is kept within
    `_MAX_SPARE_BYTES`. Cheap (no build): call it on the event loop, after `prepare_secrets` of the new set."""
    key = None if secrets is None else _key(secrets)
    with _LOCK:
        before = _USERS.pop(id(owner), None)
        if key is not None:
            _USERS[id(owner)] = key
        if before is not None and before != key and before not in _USERS.values():
            _PATTERNS.pop(before, None)


def _key(secrets: Iterable[str]) -> tuple[str, ...]:
    return tuple(secrets) if not isinstance(secrets, str) else (secrets,)


# What an upstream may put between a secret's characters when it echoes one: white space (a line wrapped) and
# every character a client does not see as one: Unicode's "other" characters (control, format such as a zero-width
# space, a bidi isolate or a tag, private-use, unassigned, surrogate) and separators, which `sanitize` shows as a
# space (`spaced`), and the default-ignorable ones (a Hangul filler, a variation selector), which show as nothing.
# The removal reads across them: it matches the text with them taken out (`_sub_across_gaps`), so that the pattern
# need not allow them between every two characters (that class, compiled once per character, was most of the cost
# of building a pattern). By the `regex` module, for its Unicode properties (the class spelled out for `re` is 700
# ranges, slower to match): it runs only on what an upstream's error carries.
_GAP_RUN = regex.compile(r"[\s\p{C}\p{Z}\p{Default_Ignorable_Code_Point}]++")
# Its every use passes `concurrent=False`: by default the `regex` module lets go of the GIL while it matches a
# `str`, and taking it back waits for any other thread's turn (a pattern being built in a worker thread: tenths of
# a second at a time); the gaps of one message, read on the event loop, stalled it for 0.7 s.


def _squeezed(text: str) -> str:
    """`text` with its `_GAP_RUN`s taken out."""
    out: str = _GAP_RUN.sub("", text, concurrent=False)
    return out
# The patterns built, by the secrets as a provider passes them. A dict rather than `lru_cache`: the event loop
# asks whether one is ready without building it. Written from worker threads (`prepare_secrets`), under `_LOCK`.
# Those of a set some owner uses (`_USERS`) stay; the others ("spare") are bounded by count and by size in bytes
# (`_pattern_bytes`: 1.4 MB for two 2,000-character tokens), the oldest out first, the newest always kept.
_PATTERNS: dict[tuple[str, ...], re.Pattern[str] | None] = {}
_USERS: dict[int, tuple[str, ...]] = {}  # the set each owner uses, by the owner's id (`use_secrets`)
_BUILDING: set[tuple[str, ...]] = set()  # those a worker thread is building for the loop
_STAND_INS: dict[tuple[str, ...], re.Pattern[str]] = {}  # `_before_ready`'s, while their pattern is built
_LOCK = threading.Lock()
_MAX_PATTERNS = 256
_MAX_SPARE_BYTES = 32 << 20
_MAX_STAND_INS = 8
# The size (characters of secret) of a missing pattern the event loop builds itself, a few milliseconds' work;
# a larger one is built in a worker thread while `_before_ready` stands in.
_INLINE_CHARS = 256
_MISSING = object()


def _without_secrets(text: str, key: tuple[str, ...]) -> str:
    pattern = _PATTERNS.get(key, _MISSING) if key else None
    if pattern is _MISSING:  # not built yet (a provider prepares its own: this is the rare caller that did not)
        values = _secret_values(key)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop to stall: build it here
            loop = None
        if loop is None or sum(len(value) + sum(map(len, prefixes)) for value, prefixes in values.items()
                               ) <= _INLINE_CHARS:
            prepare_secrets(key)
            pattern = _PATTERNS.get(key)
        else:
            with _LOCK:
                new = key not in _BUILDING
                _BUILDING.add(key)
            if new:
                loop.run_in_executor(None, _build_for_loop, key)
            return _before_ready(text, key, values)
    return _sub_across_gaps(pattern, text) if isinstance(pattern, re.Pattern) else text


def _build_for_loop(key: tuple[str, ...]) -> None:
    try:
        prepare_secrets(key)
    finally:
        with _LOCK:
            _BUILDING.discard(key)


def _store(key: tuple[str, ...], pattern: re.Pattern[str] | None) -> None:
    with _LOCK:
        _PATTERNS[key] = pattern
        _STAND_INS.pop(key, None)
        in_use = set(_USERS.values())
        spare = [(old, _pattern_bytes(_PATTERNS[old])) for old in _PATTERNS if old not in in_use]
        count, size = len(spare), sum(size for _, size in spare)
        for old, old_size in spare[:-1]:  # the oldest first; the newest stays, however large
            if count <= _MAX_PATTERNS and size <= _MAX_SPARE_BYTES:
                break
            del _PATTERNS[old]
            count, size = count - 1, size - old_size


def _pattern_bytes(pattern: re.Pattern[str] | None) -> int:
    """What a pattern holds: its compiled code (`sys.getsizeof` counts it) and its source."""
    return 0 if pattern is None else sys.getsizeof(pattern) + sys.getsizeof(pattern.pattern)


def _compile_uncached(source: str) -> re.Pattern[str]:
    """`re.compile(source)`, left out of the `re` module's own cache: it keeps the last 512 patterns compiled
    (3.12 adds a second cache of 256), so every replaced set's pattern would stay there, whatever this module
    drops. Those caches are private: a Python that keeps them elsewhere leaves the pattern there (the test
    `tests/test_secret_pattern_memory.py` checks where they are)."""
    pattern = re.compile(source)
    for name in ("_cache", "_cache2"):
        cache = getattr(re, name, None)
        if isinstance(cache, dict):
            cache.pop((str, source, 0), None)
    return pattern


def _before_ready(text: str, key: tuple[str, ...], values: dict[str, set[str]]) -> str:
    """What stands in for the pattern while a worker thread builds it: the secrets as given are removed exactly
    (across gaps, by a pattern of plain text, built in milliseconds and kept until the pattern is ready); a text
    that may hold one escaped (it has a `%`, `&` or `\\`) is replaced as a whole, rather than let a spelling
    through."""
    if not values:
        return text
    if "%" in text or "&" in text or "\\" in text:
        return _REDACTED
    stand_in = _STAND_INS.get(key)
    if stand_in is None:
        forms = sorted({prefix + value for value, prefixes in values.items() for prefix in (*prefixes, "")},
                       key=len, reverse=True)
        stand_in = _compile_uncached("|".join(map(re.escape, forms)))
        with _LOCK:
            if key not in _PATTERNS:  # else its pattern is ready: no need to keep this one
                if len(_STAND_INS) >= _MAX_STAND_INS:
                    del _STAND_INS[next(iter(_STAND_INS))]
                _STAND_INS[key] = stand_in
    return _sub_across_gaps(stand_in, text)


def _sub_across_gaps(pattern: re.Pattern[str], text: str) -> str:
    """`text` with every match of `pattern` in it, read with its `_GAP_RUN`s taken out, replaced: each match's
    span in `text` runs from its first character to its last, the gaps between them included."""
    squeezed = _squeezed(text)
    if len(squeezed) == len(text):
        return pattern.sub(_REDACTED, text)
    spans = [match.span() for match in pattern.finditer(squeezed)]
    if not spans:
        return text
    starts: list[int] = []  # where each gap was, in `squeezed`
    removed: list[int] = []  # the characters taken out up to the end of each gap
    total = 0
    for gap in _GAP_RUN.finditer(text, concurrent=False):
        starts.append(gap.start() - total)
        total += gap.end() - gap.start()
        removed.append(total)

    def in_text(index: int) -> int:
        before = bisect_right(starts, index)
        return index + (removed[before - 1] if before else 0)

    pieces: list[str] = []
    done = 0
    for start, end in spans:
        pieces += (text[done:in_text(start)], _REDACTED)
        done = in_text(end - 1) + 1
    pieces.append(text[done:])
    return "".join(pieces)


def _secret_values(secrets: Iterable[str]) -> dict[str, set[str]]:
    """The configured secrets to remove, without a `Bearer `/`Basic ` scheme, each with the schemes seen before
    it (it goes with or without one), those of at least `_MIN_SECRET_LENGTH` characters (a scheme and a shorter
    value: the two as one value), `_GAP_RUN`s taken out."""
    if isinstance(secrets, str):  # one secret passed bare: do not split it into characters
        secrets = (secrets,)
    values: dict[str, set[str]] = {}
    for secret in secrets:
        if not isinstance(secret, str):
            continue
        value = secret.strip()
        scheme = _AUTH_SCHEME.match(value)
        rest = value[scheme.end():] if scheme else value
        if len(rest) >= _MIN_SECRET_LENGTH:
            values.setdefault(_squeezed(rest), set()).update((_squeezed(scheme[0]),) if scheme else ())
        elif len(value) >= _MIN_SECRET_LENGTH:
            values.setdefault(_squeezed(value), set())
    return values


# The JSON short escapes and HTML named entities of the characters that have one.
_JSON_SHORT = {'"': '\\"', "\\": "\\\\", "/": "\\/"}
_HTML_NAMED = {"&": "amp", "<": "lt", ">": "gt", '"': "quot", "'": "apos"}


def _spellings(char: str) -> str:
    """A pattern for one character of a secret as an upstream may echo it: as itself, or escaped: percent-encoded
    (its UTF-8 bytes, `%2B`/`%2b`), JSON (`\\u002B`, `\\/`), an HTML character reference (`&#43;`, `&#x2B;`,
    `&amp;`). An encoder escapes some characters and keeps others (Python's `quote` keeps `/`, Go's `PathEscape`
    keeps `+` and `=`), so each character is matched on its own, whatever its neighbours became. Escape hex digits
    and `x`/`u` in either case, by a class (`[Bb]`: cheaper to build than a `(?i:...)` group); the character
    itself exactly."""
    code = ord(char)
    utf8 = char.encode("utf-8", "surrogatepass")
    spellings = [re.escape(char), "%" + "%".join(_either_case(f"{byte:02x}") for byte in utf8),
                 f"&\\#(?:0*{code}|[xX]0*{_either_case(f'{code:x}')});"]
    if code < 0x10000:
        spellings.append(f"\\\\[uU]{_either_case(f'{code:04x}')}")
    else:  # a JSON escape of a character beyond the BMP: its surrogate pair
        high, low = 0xD800 + ((code - 0x10000) >> 10), 0xDC00 + ((code - 0x10000) & 0x3FF)
        spellings.append(f"\\\\[uU]{_either_case(f'{high:04x}')}\\\\[uU]{_either_case(f'{low:04x}')}")
    if char in _HTML_NAMED:
        spellings.append(f"&(?i:{_HTML_NAMED[char]});")
    if char in _JSON_SHORT:
        spellings.append(re.escape(_JSON_SHORT[char]))
    return "(?:" + "|".join(spellings) + ")"


def _either_case(hex_digits: str) -> str:
    return "".join(f"[{digit.upper()}{digit}]" if digit.isalpha() else digit for digit in hex_digits)


def _secrets_pattern(values: dict[str, set[str]]) -> re.Pattern[str] | None:
    """One pattern for every configured secret (`_secret_values`), each character spelled any way `_spellings`
    knows, the longest value first and its scheme, if any, taken with it (greedy); None for none. Made once per
    set of secrets (a provider's: they change only with the policy or a token file's rotation), never per
    message, and in a worker thread (`prepare_secrets`): its cost grows with the secrets' length."""
    if not values:
        return None
    branches = []
    for value in sorted(values, key=len, reverse=True):
        schemes = "|".join(map(_spelled, sorted(values[value], key=len, reverse=True)))
        branches.append((f"(?:{schemes})?" if schemes else "") + _spelled(value))
    return _compile_uncached("|".join(branches))


def _spelled(text: str) -> str:
    return "".join(_spellings(char) for char in text)
