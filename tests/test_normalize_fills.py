"""Tool arguments read through `json_view` are ASCII but for the zero-width fills its escapes leave; `fold` and
`canonical` take such a text at C speed (`normalize._ascii_but_fills`), where reading each character cost about a
millisecond per guard and check for a few kilobytes of code with escaped line breaks (found by a review). The fast
path must give the same text and map back as reading each character."""

from __future__ import annotations

import json
import random

import pytest

from gateway.guards.json_view import json_view
from gateway.guards.normalize import canonical, fold

FILL = "\u200b"


def _by_char(text: str) -> tuple[str, list[int]]:
    kept = [(index, char) for index, char in enumerate(text) if char != FILL]
    return "".join(char for _, char in kept), [index for index, _ in kept]


@pytest.mark.parametrize("seed", range(20))
def test_the_fast_path_maps_every_character_back_as_reading_each_one_does(seed: int) -> None:
    rng = random.Random(seed)
    pieces = ["a", " ", "\n", '"', "\\", "/", "\t", "x = 1;"]
    raw = json.dumps({"code": "".join(rng.choice(pieces) for _ in range(300))})
    view, _ = json_view(raw.replace("/", "\\/"))
    if FILL in view:
        view = FILL + view + FILL * 2  # fills at both ends too
    bare, where = _by_char(view)
    folded, folded_where = fold(view)
    shown, shown_where = canonical(view)
    assert (folded, list(folded_where)) == (bare.lower(), where)
    assert (shown, list(shown_where or range(len(view)))) == (bare, where)
    assert [folded_where[i] for i in range(-len(where), 0)] == where  # negative indexes, as a list's
    assert folded_where[2:9] == where[2:9]
    with pytest.raises(IndexError):
        folded_where[len(where)]


def test_a_text_with_other_non_ascii_characters_takes_the_careful_path() -> None:
    text = f"caf\u00e9{FILL}x"
    assert fold(text) == ("cafex", [0, 1, 2, 3, 5])
