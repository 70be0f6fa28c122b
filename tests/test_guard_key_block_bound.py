"""An open private key block in a streamed answer (`gateway/guards/window.py`): held whole until its END line while
it is shorter than `max_hold_chars`, and past that dealt with at the bound, as the secrets guard's action says (its
header on replaced and the rest of the block dropped as it comes, or the answer blocked), so that a lane holds a
bounded text and what the guards read per character stays bounded. Costs are counted in the characters the secrets
guard is handed (its scans and its looks for an open block), never timed."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.guards.base import Finding, Where
from gateway.guards.runtime import GuardRuntime
from gateway.guards.secrets import SecretsGuard
from gateway.guards.session import GuardSession
from gateway.guards.window import ANSWER
from tests.test_guard_scan_growth import OUTPUT, SPEC, runtime_of, split, stream

HEADER, FOOTER = "-----BEGIN RSA PRIVATE KEY-----", "-----END RSA PRIVATE KEY-----"


def body(chars: int, seed: int = 0, newline: str = "\n") -> str:
    """Key material: lines of 64 base64 characters, `chars` characters in all."""
    rng = random.Random(seed)
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    lines = ["".join(rng.choice(letters) for _ in range(64)) for _ in range(chars // 65 + 1)]
    return newline.join(lines)[:chars]


def leaked(sent: str, material: str) -> list[str]:
    """The pieces of `material` (16 characters at every offset) found in `sent`."""
    return [material[i:i + 16] for i in range(0, len(material) - 16) if material[i:i + 16] in sent]


class Counted:
    """Counts the characters handed to a runtime's secrets guard: its scans and its looks for holds."""

    def __init__(self, runtime: GuardRuntime) -> None:
        self.read = 0
        for guard in runtime.resolve("t", "a").output:
            if isinstance(guard, SecretsGuard):
                self._wrap(guard)

    def _wrap(self, guard: SecretsGuard) -> None:
        scan, hold_from, open_from = guard.detect_now, guard.hold_from, guard.open_from

        def counted_scan(text: str, where: Where) -> list[Finding] | None:
            self.read += len(text)
            return scan(text, where)

        def counted_hold_from(text: str) -> int | None:
            self.read += len(text)
            return hold_from(text)

        def counted_open_from(text: str, start: int) -> int:
            self.read += len(text) - start
            return open_from(text, start)

        guard.detect_now = counted_scan  # type: ignore[method-assign]
        guard.hold_from = counted_hold_from  # type: ignore[method-assign]
        guard.open_from = counted_open_from  # type: ignore[method-assign]


def with_runtime(guards: dict[str, Any]) -> Iterator[GuardRuntime]:
    built = runtime_of(guards)
    yield built
    asyncio.run(built.aclose())


@pytest.fixture
def redacting() -> Iterator[GuardRuntime]:
    yield from with_runtime({"pii": {"kind": "pii", **OUTPUT},
                             "secrets": {"kind": "secrets", "action": "redact", **OUTPUT}})


@pytest.mark.parametrize("chars", [50_000, 100_000])
def test_an_open_key_block_is_read_a_bounded_number_of_times_per_character(redacting: GuardRuntime,
                                                                           chars: int) -> None:
    counted = Counted(redacting)
    material = body(chars)
    text = f"Here it is:\n{HEADER}\n{material}"  # no END line: the model never writes it
    out = stream(redacting, split(text, 16))
    assert out.text == "Here it is:\n<PRIVATE_KEY>" and not out.blocked
    # Held whole and looked through again at every chunk: 1,569 characters per character at 50K, 3,131 at 100K.
    assert counted.read < 16 * len(text), counted.read / len(text)
    assert out.most_held <= SPEC.max_hold_chars + 2 * SPEC.window_chars + SPEC.step_chars + 16, out.most_held


@pytest.mark.parametrize("size", [1, 7, 64])
def test_a_long_key_block_is_redacted_whole_at_the_bound(redacting: GuardRuntime, size: int) -> None:
    material = body(4 * SPEC.max_hold_chars, seed=size)
    text = f"Here it is:\n{HEADER}\n{material}\n{FOOTER}\nKeep it safe, and call me on 555."
    whole = asyncio.run(redacting.check(redacting.resolve("t", "a").output, text, ANSWER,
                                        GuardSession(redacting.metrics))).text
    out = stream(redacting, split(text, size))
    assert out.text == whole == "Here it is:\n<PRIVATE_KEY>\nKeep it safe, and call me on 555.", out.text[:300]
    assert out.most_held <= SPEC.max_hold_chars + 2 * SPEC.window_chars + SPEC.step_chars + size, out.most_held
    # The block leaves at the bound, while the upstream still writes it.
    at = next(i for i, piece in enumerate(out.pieces) if "<PRIVATE_KEY>" in piece)
    assert at * size < 2 * SPEC.max_hold_chars, at * size


@pytest.mark.parametrize("size", [1, 7, 64])
def test_a_key_block_that_never_ends_leaks_none_of_it(redacting: GuardRuntime, size: int) -> None:
    material = body(2 * SPEC.max_hold_chars, seed=size)
    out = stream(redacting, split(f"Sure:\n{HEADER}\nProc-Type: 4,ENCRYPTED\n\n{material}\n-----END RSA", size))
    assert out.text == "Sure:\n<PRIVATE_KEY>" and leaked(out.text, material) == []
    # Past the bound the lane holds no more than a possible END line's start, not the block to the stream's end.
    assert out.most_held <= SPEC.max_hold_chars + 2 * SPEC.window_chars + SPEC.step_chars + size, out.most_held
    assert out.pieces[-1] == "", out.pieces[-1]  # (the redaction left at the bound, not with the stream's end)


@pytest.mark.parametrize("size", [1, 7, 64])
def test_a_long_key_block_in_tool_arguments_keeps_them_json(redacting: GuardRuntime, size: int) -> None:
    material = body(2 * SPEC.max_hold_chars, seed=size, newline="\\n")
    for end in (f"\\n{FOOTER}\\n", ""):  # (without its END line, the block ends with the string)
        arguments = f'{{"note": "mine", "key": "{HEADER}\\n{material}{end}", "n": 1}}'
        out = stream(redacting, split(arguments, size), tool=True)
        value = json.loads(out.text)
        assert value == {"note": "mine", "key": "<PRIVATE_KEY>" + ("\n" if end else ""), "n": 1}, (size, end)
        assert leaked(out.text, material) == []


@pytest.mark.parametrize(("action", "sent", "blocked"), [
    ("block", "Here it is:\n", True),  # the default: blocked at the bound, not when the block ends
    ("mask", "Here it is:\n****\nBye.", False),  # none of its characters kept
])
def test_a_long_key_block_is_handled_by_its_action(action: str, sent: str, blocked: bool) -> None:
    for runtime in with_runtime({"secrets": {"kind": "secrets", "action": action, **OUTPUT}}):
        material = body(3 * SPEC.max_hold_chars)
        pieces = split(f"Here it is:\n{HEADER}\n{material}\n{FOOTER}\nBye.", 7)
        out = stream(runtime, pieces)
        assert (out.text, out.blocked) == (sent, blocked)
        assert leaked(out.text, material) == []
        if blocked:
            assert len(out.pieces) * 7 < 2 * SPEC.max_hold_chars, len(out.pieces)


@pytest.mark.parametrize("size", [1, 7, 64])
def test_a_key_block_that_ends_before_the_bound_is_held_whole(redacting: GuardRuntime, size: int) -> None:
    material = body(SPEC.max_hold_chars - 200, seed=size)
    text = f"One:\n{HEADER}\n{material}\n{FOOTER}\nTwo:\n{HEADER}\n{body(300)}\n{FOOTER} done"
    out = stream(redacting, split(text, size))
    assert out.text == "One:\n<PRIVATE_KEY>\nTwo:\n<PRIVATE_KEY> done"
    # Held whole up to its END line: nothing of it left before.
    at = next(i for i, piece in enumerate(out.pieces) if "<PRIVATE_KEY>" in piece)
    assert (at + 1) * size >= len(f"One:\n{HEADER}\n{material}\n{FOOTER}"), at


@pytest.mark.parametrize(("size", "every"), [(1, 23), (7, 5), (64, 1)])
def test_a_key_block_that_ends_just_past_the_bound_is_replaced_whole(redacting: GuardRuntime, size: int,
                                                                     every: int) -> None:
    # Its END line may come in the very chunk that takes the held block past the bound: it is one entity still.
    for chars in range(SPEC.max_hold_chars - 80, SPEC.max_hold_chars + 2 * size, every):
        material = body(chars, seed=chars)
        out = stream(redacting, split(f"Hi:\n{HEADER}\n{material}\n{FOOTER}\nok bye", size))
        assert (out.text, out.blocked) == ("Hi:\n<PRIVATE_KEY>\nok bye", False), (chars, out.text[:80])
