"""The patterns engine's scan stays linear in the text, whatever its script or repetitions.

Gates read a text with other characters as DEL, which is a digit, a letter and a space at once: the
address gate's `[0 DEL]`, then spaces, started at every character of Chinese or Cyrillic prose and read to
its end (7.5 s for 15,000 characters with one digit, on the event loop: `/healthz` waited behind it).
presidio's URL patterns tried 253 lengths at every start of `a.a.a...` (30 s at 16K). The bounds below are
twenty to a hundred times what a linear scan takes: a guard against quadratic behaviour, not a speed target.
"""

from __future__ import annotations

import random
import re
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream

PROSE = ("今天我们讨论了项目的进展情况\uff0c大家都认为目前的工作方向是正确的。"
         "接下来需要进一步完善细节\uff0c并且加强团队之间的沟通与协作。")
# (Japanese punctuation stays as it is in the canonical text the engine reads; a Chinese full-width comma turns ASCII)
JAPANESE = ("私たちはプロジェクトの進捗について話し合い、現在の方向性が正しいことを確認しました。"
            "次に細部を詰め、チーム間の連携を強化する必要があります。")


def _repeat(piece: str, size: int) -> str:
    return (piece * (size // len(piece) + 1))[:size]


def _cyrillic(size: int) -> str:
    rng = random.Random(1)
    words = " ".join("".join(chr(rng.randint(0x430, 0x44F)) for _ in range(rng.randint(2, 9)))
                     for _ in range(size // 4))
    return ("Заказ 1 " + words)[:size]


# Texts the engine read in seconds at 16K characters, and in minutes at 64K (quadratic).
SLOW_TEXTS: dict[str, Callable[[int], str]] = {
    "japanese minutes, one year": lambda n: ("議事録\uff082024年\uff09\uff1a" + _repeat(JAPANESE, n))[:n],
    "chinese notes, one year": lambda n: ("会议纪要\uff082024年\uff09\uff1a" + _repeat(PROSE, n))[:n],
    "chinese ideographs, one digit": lambda n: ("订单号 1\uff1a" + "".join(chr(0x4E00 + i * 7919 % 20000)
                                                                         for i in range(n)))[:n],
    "cyrillic, one digit": _cyrillic,
    "combining accents after a digit": lambda n: "4" + "\u0301" * n,
    "no-break spaces after a digit": lambda n: "1" + "\u00a0" * n,
    "accented letters, then a number": lambda n: "é" * n + " 12",
    "accented letters and spaces, then a year": lambda n: _repeat("é ", n) + " 1984",
    "ideographs and spaces": lambda n: "1 " + _repeat("订 ", n),
    "a street word before other letters": lambda n: "Via " + _cyrillic(n),
}


def _guard(entities: list[str] | None = None) -> Any:
    import msgspec

    from gateway.guards.pii import PiiGuard
    from gateway.guards.pool import GuardPool
    from gateway.policy.guard_schema import GuardPoolSpec, PiiGuardSpec

    spec = msgspec.convert({"entities": {e: {} for e in entities}} if entities else {}, PiiGuardSpec)
    return PiiGuard("pii", spec, GuardPool(GuardPoolSpec()))


def _timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


@pytest.mark.parametrize("name", sorted(SLOW_TEXTS))
def test_the_patterns_engine_reads_long_texts_of_other_scripts_in_linear_time(name: str) -> None:
    from gateway.guards.pii import analyze

    guard = _guard()
    analyze(guard.engine, "warm up a@b.org 1", guard.floor)
    text = SLOW_TEXTS[name](64_000)
    took = _timed(lambda: analyze(guard.engine, text, guard.floor))
    assert took < 0.5, f"{name}: {took:.2f}s for 64K characters"


def _shape_gates() -> list[Any]:
    from gateway.guards.gates import ShapeGate
    from gateway.guards.pii import analyzer

    found = []
    pending = [gate for _, gate in analyzer(_guard().engine).gated if gate is not None]
    while pending:
        gate = pending.pop()
        if isinstance(gate, ShapeGate):
            found.append(gate)
        pending.extend(getattr(gate, "gates", ()))
    return found


@pytest.mark.parametrize("piece", ["\x7f", "0\x7f", "\x7f ", "0 ", "\x7f0", "\x7f.", "0/", "A\x7f", "\x7f, ",
                                   "Via \x7f ", "\x7f rue ", "0 \x7f A", "\x7f\n", "ab "])
def test_every_gate_pattern_reads_a_long_shape_in_linear_time(piece: str) -> None:
    """Each shape gate's patterns, both forms, on 64K characters of shapes made of digits, DEL (any other
    character) and spaces: where a `+` run of a class that DEL widens could start at every character."""
    shape = _repeat(piece, 64_000)
    for gate in _shape_gates():
        for pattern, back in (*gate.ascii, *gate.other):
            scanned = shape[::-1] if back else shape
            took = _timed(lambda: pattern.search(scanned))  # noqa: B023  (called at once)
            assert took < 0.2, f"{pattern.pattern[:80]!r}: {took:.2f}s"


def test_address_gates_for_other_scripts_open_where_their_previous_forms_do() -> None:
    """The address gate's forms for texts with other characters enter each run of spaces and DEL at its start;
    on made-up texts they open wherever their previous forms (each `0` widened to DEL, every start tried) open:
    exactly there, but for the form before `Calle`/`Via`, which now asks less."""
    from gateway.guards.gates import OTHER, ShapeGate, TextShape
    from gateway.guards.recognizers import _ADDRESS_SHAPE, _S, _streets_before

    gates = [g for g in _gates_of(_ADDRESS_SHAPE) if isinstance(g, ShapeGate)]
    assert len(gates) == 3
    previous = [ShapeGate(*(p.pattern for p, back in g.ascii if not back),
                          backwards=[p.pattern for p, back in g.ascii if back]) for g in gates[:2]]
    previous.append(ShapeGate(backwards=[("", rf"0{_S}+(?:[\w'\-{OTHER}]+{_S}+){{0,4}}(?:{_streets_before})")]))
    rng = random.Random(5)
    pieces = ["1", "12", "0", "é", "éé", "中文", " ", "  ", "\t", "\u3000", ",", ".", "A", "Baker", "a", "x", "rue",
              "bd", "Rue", "stra\u00dfe", "str.", "weg", "Via", "Calle", "Mayor", "'", "-", "Street"]
    opened = [[0, 0] for _ in gates]
    for _ in range(20_000):
        text = "é" + "".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
        shape = TextShape(text)
        for index, (mine, before) in enumerate(zip(gates, previous, strict=True)):
            was, now = before(shape), mine(shape)
            assert now or not was, (index, text)
            opened[index][0] += was
            opened[index][1] += now
    assert opened[0][0] == opened[0][1] > 1000 and opened[1][0] == opened[1][1] > 1000
    assert opened[2][1] >= opened[2][0] > 100


def _gates_of(gate: Any) -> list[Any]:
    return [gate, *(g for inner in getattr(gate, "gates", ()) for g in _gates_of(inner))]


# Addresses and phone numbers as Chinese, Japanese and Russian texts hold them.
REAL_TEXTS = [
    ("请把包裹寄到 221B Baker Street, London NW1 6XE\uff0c谢谢。", "STREET_ADDRESS",
     "221B Baker Street, London NW1 6XE"),
    ("Мой адрес: Hauptstraße 12, 10115 Berlin. Жду письма.", "STREET_ADDRESS", "Hauptstraße 12, 10115 Berlin"),
    ("Адрес доставки — 12 rue de la Paix, 75002 Paris.", "STREET_ADDRESS", "12 rue de la Paix, 75002 Paris"),
    ("我的地址是 Calle Mayor 5, 28013 Madrid。", "STREET_ADDRESS", "Calle Mayor 5, 28013 Madrid"),
    ("住所は 742 Evergreen Terrace, Springfield, IL 62704 です。", "STREET_ADDRESS",
     "742 Evergreen Terrace, Springfield, IL 62704"),
    ("请打电话给我\uff1a+44 20 7946 0958\uff0c或者发邮件。", "PHONE_NUMBER", "+44 20 7946 0958"),
    ("Позвоните мне: +49 30 1234567, пожалуйста.", "PHONE_NUMBER", "+49 30 1234567"),
    ("電話番号は (415) 555-2671 です。", "PHONE_NUMBER", "(415) 555-2671"),
    ("Телефон офиса 030 1234567, звоните днём.", "PHONE_NUMBER", "030 1234567"),
]


def _found(guard: Any, text: str, *, gated: bool) -> list[tuple[str, int, int, float]]:
    from presidio_analyzer import EntityRecognizer

    from gateway.guards.pii import analyzer

    built = analyzer(guard.engine)
    if gated:
        results = built.analyze(text, "en", list(guard.engine.entities), guard.floor, 0)
    else:  # every recognizer, gates or not
        results = EntityRecognizer.remove_duplicates(
            [r for recognizer in built.recognizers for r in recognizer.analyze(text, list(guard.engine.entities), None)
             if r.score >= guard.floor])
    return sorted((r.entity_type, r.start, r.end, r.score) for r in results)


@pytest.mark.parametrize(("text", "entity", "value"), REAL_TEXTS)
def test_addresses_and_phones_in_other_scripts_are_found_as_without_gates(text: str, entity: str, value: str) -> None:
    """Alone, and in 16K characters of Chinese prose: found where they start, and the gated engine finds what
    every recognizer run on the text finds."""
    guard = _guard()
    for before in ("", _repeat(PROSE, 8_000) + "\n"):
        whole = before + text + "\n" + _repeat(PROSE, 8_000 if before else 0)
        found = _found(guard, whole, gated=True)
        assert found == _found(guard, whole, gated=False)
        at = whole.index(value)
        assert (entity, at) in [(e, s) for e, s, _, _ in found], (found, text)  # (where the recognizer starts it)


URL_TEXTS: dict[str, Callable[[int], str]] = {
    "dots and digits": lambda n: _repeat("0.", n),
    "dots and letters": lambda n: _repeat("a.", n),
    "a domain, then dots and letters": lambda n: ("a.com " + _repeat("a.", n))[:n],
    "a domain every 600 characters": lambda n: _repeat("a." * 300 + "x.com", n),
    "a long path": lambda n: ("see https://a.com/" + _repeat("a.", n))[:n],
}


@pytest.mark.parametrize("name", sorted(URL_TEXTS))
def test_the_url_recognizer_reads_long_runs_of_dots_in_linear_time(name: str) -> None:
    from gateway.guards.windowed import UrlWindows

    recognizer = UrlWindows(name="UrlRecognizer")
    recognizer.analyze("see example.com", ["URL"])  # its first call builds what it needs (about 0.35 s): not timed
    text = URL_TEXTS[name](64_000)
    took = _timed(lambda: recognizer.analyze(text, ["URL"]))
    assert took < 0.5, f"{name}: {took:.2f}s for 64K characters"


def test_the_url_windows_find_what_presidio_finds() -> None:
    """On made-up texts of domains, schemes, quotes, paths and long runs, and on prose: presidio's results."""
    from presidio_analyzer.predefined_recognizers import UrlRecognizer

    from gateway.guards.windowed import UrlWindows

    presidio, windowed = UrlRecognizer(), UrlWindows(name="UrlRecognizer")
    rng = random.Random(4)
    pieces = ["a", "b", ".", ".", "com", "co", "Com", "io", "org", "/", "/x", "http://", "https://", "www.", "www1.",
              "-", "0", " ", " ", "\n", '"', "'", "(", ")", "<", "é", "\u017f", "\u212a", "e.g.", "example", "x" * 40,
              "?q=1", "#f", "\x1c", ",", "\u00a0", "a.a."]
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 40))) for _ in range(3000)]
    # (longer than a domain can be: presidio's own scan of these is slow, hence few)
    texts += ["".join(rng.choice([*pieces, "lorem ipsum " * 20, "b" * 260 + ".com", "a." * 140])
                      for _ in range(rng.randint(5, 20))) for _ in range(12)]
    texts += ["See https://example.com/a/b?c=1 and www.test.org, or 'foo.io'; e.g. this. 访问 github.com/x 吧。"]
    matches = 0
    for text in texts:
        want = sorted((r.start, r.end, r.score) for r in presidio.analyze(text, ["URL"]))
        assert sorted((r.start, r.end, r.score) for r in windowed.analyze(text, ["URL"])) == want, text
        matches += len(want)
    assert matches > 1000


def _policy(upstream_url: str) -> str:
    return textwrap.dedent(f"""\
        version: 1
        server: {{watch_policy: false}}
        auth: none
        providers:
          mock: {{kind: openai, base_url: {upstream_url}, api_key_env: MOCK_UPSTREAM_KEY}}
        models:
          guarded: {{provider: mock, model: fault-echo}}
        guards:
          models:
            guarded:
              pii: {{kind: pii, places: [input]}}
        """)


@pytest.fixture(scope="module")
def gw(upstream: MockUpstream) -> Iterator[RunningGateway]:
    running = RunningGateway(_policy(upstream.base_url), {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()
    yield running
    running.stop()


def test_a_long_japanese_prompt_leaves_the_gateway_answering(gw: RunningGateway) -> None:
    """A 16K-character Japanese prompt with one year and an e-mail address at its end, through a pii input
    guard: `/healthz`, asked while the guard reads it, answers at once (it waited 5 s behind the address
    gate), and the address reaches the upstream redacted."""
    prompt = "議事録\uff082024年\uff09\uff1a" + _repeat(JAPANESE, 16_000) + "連絡先は taro.yamada@example.jp です。"
    answer: dict[str, str] = {}

    def send() -> None:
        with openai.OpenAI(base_url=gw.base_url, api_key="unused", max_retries=0, timeout=60) as sdk:
            reply = sdk.chat.completions.create(model="guarded", messages=[{"role": "user", "content": prompt}])
        answer["text"] = reply.choices[0].message.content or ""

    with openai.OpenAI(base_url=gw.base_url, api_key="unused", max_retries=0, timeout=60) as sdk:
        sdk.chat.completions.create(model="guarded", messages=[{"role": "user", "content": "warm up 1"}])
    sender = threading.Thread(target=send)
    sender.start()
    time.sleep(0.05)
    took = _timed(lambda: httpx.get(gw.url + "/healthz", timeout=30).raise_for_status())
    sender.join(60)
    assert took < 1.0, f"/healthz waited {took:.2f}s behind one guarded prompt"
    assert "taro.yamada@example.jp" not in answer["text"]
    assert re.search("議事録", answer["text"]) and len(answer["text"]) > 16_000
