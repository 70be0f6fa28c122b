"""Phone numbers among many digits: what the pii guard hands libphonenumber, and where it runs.

libphonenumber's matcher tries every cluster of digits once per region. A letter-free run with seven digits was
handed to it whole, so a 16K table of figures (`12.5,13.75,...`) took 1.7 s on the event loop under the default
`patterns` engine, and found "phone numbers" among the figures (`168.14`, in Germany's format); a run like
`1/1/1/...` took 3 s. Now only clusters that can hold a number of seven digits are read (`phone_windows`), and a
text of more than `INLINE_DIGITS` digits is checked on the guard pool, not on the loop.
"""

from __future__ import annotations

import asyncio
import random
import re
import textwrap
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream
from tests.support.probe import healthz_probe


def _full_width(text: str) -> str:
    """`text` with its ASCII digits written full width (as a Japanese keyboard writes them)."""
    return re.sub("[0-9]", lambda digit: chr(ord(digit[0]) + 0xFEE0), text)


def _table(rows: int, seed: int = 7) -> str:
    """Figures as a model or a user writes them in a CSV: no cell has seven digits."""
    rng = random.Random(seed)
    return "\n".join(",".join(f"{rng.uniform(0, 1000):.2f}" for _ in range(8)) for _ in range(rows))


def test_phone_punctuation_is_what_the_matcher_joins_digits_with() -> None:
    """`PHONE_PUNCTUATION` is libphonenumber's punctuation and lead characters, read case-blind as its matcher
    reads them: a library that changes them fails here, not silently in the windows."""
    from phonenumbers import phonenumbermatcher, phonenumberutil

    from gateway.guards.windowed import PHONE_PUNCTUATION

    library = re.compile(f"[{phonenumberutil._VALID_PUNCTUATION}{phonenumbermatcher._LEAD_CLASS_CHARS}]",
                         re.IGNORECASE | re.UNICODE)
    ours = re.compile(f"[{PHONE_PUNCTUATION}]")
    differ = [hex(c) for c in range(0x30000) if bool(library.fullmatch(chr(c))) != bool(ours.fullmatch(chr(c)))]
    assert differ == []


def test_a_table_of_figures_holds_no_phone_window() -> None:
    from gateway.guards.pii import _PHONE_REGIONS, quiet_network
    from gateway.guards.windowed import PhoneWindows, phone_windows

    quiet_network()
    table = _table(300)[:16_000]
    assert phone_windows(table) == []
    assert PhoneWindows(supported_regions=_PHONE_REGIONS).analyze(table, ["PHONE_NUMBER"]) == []
    # A run of seven digits or more is read, with its neighbours: one character before, what an extension or a
    # time may add after.
    assert phone_windows("a 1234567") == [(0, 9)]
    assert phone_windows("12.5,13.75\ncall 555-123-4567,\t#12 ok") == [(14, 35)]


@pytest.mark.parametrize("text", [
    "12.5,13.75,call +44 20 7946 0958\n14.0,15.5",
    "12.5,13.75,555-123-4567,\t#12,14.0",
    "12.5;(415) 555-0100 x 12;14.0",
    "2024-01-05 12:30,2024-01-06 13:45,0301234567",
    "1,2,3,4,5,6,7,8,9,10,11,12,13,030 1234567,14",
    _full_width("12.5,030 1234567,13"),
    "+1 (415) 555-0100/+1 (415) 555-0101 12.5,13.75",
    "12.5,13.75,\n" * 40 + "tel. +49 30 1234567 " + "14.0,15.5\n" * 40,
])
def test_numbers_among_figures_are_found_as_presidio_finds_them(text: str) -> None:
    """Every number of seven digits or more presidio's recognizer finds on the whole text is found on the
    windows, with the same span and score; the windows find nothing it does not."""
    from presidio_analyzer.predefined_recognizers import PhoneRecognizer

    from gateway.guards.pii import _PHONE_REGIONS, quiet_network
    from gateway.guards.windowed import PHONE_MIN_DIGITS, PhoneWindows

    quiet_network()
    spans = [(r.start, r.end, round(r.score, 6))
             for r in PhoneRecognizer(supported_regions=_PHONE_REGIONS).analyze(text, ["PHONE_NUMBER"], None)]
    long = [s for s in spans if sum(c.isdigit() for c in text[s[0]:s[1]]) >= PHONE_MIN_DIGITS]
    found = [(r.start, r.end, round(r.score, 6))
             for r in PhoneWindows(supported_regions=_PHONE_REGIONS).analyze(text, ["PHONE_NUMBER"])]
    assert long, text  # each text holds a number presidio finds
    assert sorted(found) == sorted(long)


def _guard(entities: list[str] | None = None) -> object:
    import msgspec

    from gateway.guards import pii
    from gateway.guards.pool import GuardPool
    from gateway.policy.guard_schema import GuardPoolSpec, PiiGuardSpec

    spec = msgspec.convert({"entities": {e: {} for e in entities}} if entities else {}, PiiGuardSpec)
    return pii.PiiGuard("pii", spec, GuardPool(GuardPoolSpec()))


def test_a_text_of_many_digits_is_checked_on_the_pool() -> None:
    from gateway.guards.base import Where
    from gateway.guards.pool import INLINE_DIGITS, digit_count

    where = Where("input", "prompt")
    guard = _guard()
    few = "call me at 555-123-4567 tomorrow"
    many = "1/" * INLINE_DIGITS + "1 call me at 555-123-4567"
    assert digit_count(many) == INLINE_DIGITS + 11 and digit_count(_full_width("\u0663\u0664\u0665 and 12 and 7")) == 6
    assert [f.type for f in guard.detect_now(few, where)] == ["PHONE_NUMBER"]  # type: ignore[attr-defined]
    assert guard.detect_now(many, where) is None  # type: ignore[attr-defined]  # for the pool
    found = asyncio.run(guard.detect(many, where))  # type: ignore[attr-defined]
    assert [(f.type, many[f.start:f.end]) for f in found] == [("PHONE_NUMBER", "555-123-4567")]
    # A guard that does not look for phone numbers checks such a text where it did.
    assert guard_without_phones_checks_inline(many + " a@b.co", where)


def guard_without_phones_checks_inline(text: str, where: object) -> bool:
    found = _guard(["EMAIL_ADDRESS"]).detect_now(text, where)  # type: ignore[attr-defined]
    return found is not None and [f.type for f in found] == ["EMAIL_ADDRESS"]


def _policy(upstream_url: str) -> str:
    return textwrap.dedent(f"""\
        version: 1
        server: {{watch_policy: false}}
        auth: none
        providers:
          mock: {{kind: openai, base_url: {upstream_url}, api_key_env: MOCK_UPSTREAM_KEY}}
        models:
          gpt: {{provider: mock, model: mock-model}}
        guards:
          global:
            pii: {{kind: pii, places: [input], fail: open, timeout_s: 60}}
        """)


@pytest.fixture(scope="module")
def gw(upstream: MockUpstream) -> Iterator[RunningGateway]:
    running = RunningGateway(_policy(upstream.base_url), {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()
    yield running
    running.stop()


def _ask(gw: RunningGateway, content: str) -> httpx.Response:
    body = {"model": "gpt", "messages": [{"role": "user", "content": content}]}
    return httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=120)


def test_a_table_with_a_phone_number_reaches_the_upstream_with_only_the_number_redacted(
        gw: RunningGateway, upstream: MockUpstream) -> None:
    table = _table(200)
    rows = table.split("\n")
    rows[100] += ",+1 (415) 555-0100"
    response = _ask(gw, "\n".join(rows))
    assert response.status_code == 200, response.text
    sent = upstream.requests[-1].json["messages"][-1]["content"]  # type: ignore[index]
    rows[100] = rows[100].replace("+1 (415) 555-0100", "<PHONE_NUMBER>")
    assert sent == "\n".join(rows)  # every figure as it was: none taken for a phone number


def test_a_text_that_is_slow_to_read_for_numbers_does_not_hold_up_other_requests(gw: RunningGateway) -> None:
    """16,000 characters of `1/1/1...`: about 3 s of libphonenumber, which held the loop (and every other
    request) when it ran there."""
    with healthz_probe(gw.url) as slowest:
        started = time.monotonic()
        response = _ask(gw, "1/" * 8_000)
        took = time.monotonic() - started
    assert response.status_code == 200, response.text
    assert took > 0.3, took  # long enough for the probe to have seen a blocked loop
    assert slowest[0] < max(0.25, took / 3), (slowest[0], took)
