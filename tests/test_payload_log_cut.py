"""The payload log redacts a text before it cuts it: a finding that a cut splits is no longer recognisable (a card
number cut to 14 digits fails its Luhn check), and when redactions before it shortened the text (a long key ->
`<OPENAI_API_KEY>`), what is left of it lands inside the part that is written. A long text is read only so far
(`2 x max_text_chars` plus a tail of 4,096 characters), and the tail is not written: a finding the read's end
splits lies there."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import FULL_KEY, RunningGateway, policy_text

CARD = "4111 1111 1111 1111"
OTHER_CARD = "5500 0000 0000 0004"
MAX_TEXT = 64
TAIL = 4_096  # payload_log._UNSURE_TAIL
READ = 2 * MAX_TEXT + TAIL


def _logged_prompt(make_gateway: Any, upstream: Any, tmp_path: Path, prompt: str) -> str:
    path = tmp_path / "payloads.jsonl"
    running: RunningGateway = make_gateway(policy_text(upstream.base_url) + (
        f"telemetry:\n  payload_log: {{enabled: true, path: '{path}', max_text_chars: {MAX_TEXT}}}\n"))
    response = httpx.post(f"{running.base_url}/chat/completions", timeout=20,
                          headers={"Authorization": f"Bearer {FULL_KEY}"},
                          json={"model": "chat", "messages": [{"role": "user", "content": prompt}]})
    assert response.status_code == 200
    deadline = time.monotonic() + 20
    while not (path.exists() and path.read_text().strip()):
        assert time.monotonic() < deadline, "nothing was logged"
        time.sleep(0.05)
    logged: str = json.loads(path.read_text().splitlines()[0])["input"][0]
    return logged


def _digits(text: str) -> str:
    return "".join(c for c in text if c.isdigit())


def test_a_card_number_across_twice_the_limit_is_redacted_whole(make_gateway: Any, upstream: Any,
                                                                 tmp_path: Path) -> None:
    prompt = "token sk-proj-" + "Ab1Cd2Ef3G" * 9 + " card " + CARD + " thanks"
    assert prompt.index(CARD) < 2 * MAX_TEXT < prompt.index(CARD) + len(CARD)  # the old cut split the card
    logged = _logged_prompt(make_gateway, upstream, tmp_path, prompt)
    assert logged.startswith("token <OPENAI_API_KEY> card <CREDIT_CARD>"), logged
    assert "1111" not in _digits(logged), logged


def test_a_long_text_shows_nothing_of_a_finding_its_read_splits(make_gateway: Any, upstream: Any,
                                                                tmp_path: Path) -> None:
    """Past the read: a card split by the read's end, after a key long enough that, redacted, it would shorten
    the text by more than the read's length: only the tail left unwritten keeps the rest of that card out."""
    head = "token sk-proj-" + "Ab1Cd2Ef3G" * 9 + " card " + CARD + " and "
    key_length = READ - 8 - len(head) - len(" card ")  # the second card starts 8 characters before the read's end
    long_key = ("sk-proj-" + "Zy9Xw8Vu7T" * (key_length // 10 + 1))[:key_length]
    prompt = head + long_key + " card " + OTHER_CARD + " more" + " padding" * 2_000
    card_at = prompt.index(OTHER_CARD)
    assert card_at < READ < card_at + len(OTHER_CARD)  # the read's end splits the second card
    assert prompt.index(CARD) < 2 * MAX_TEXT < prompt.index(CARD) + len(CARD)
    logged = _logged_prompt(make_gateway, upstream, tmp_path, prompt)
    assert "<OPENAI_API_KEY>" in logged and "Ab1Cd2" not in logged and "Zy9Xw8" not in logged, logged
    digits = _digits(logged)
    assert "1111" not in digits and "0000" not in digits, logged
    assert len(logged) <= MAX_TEXT
