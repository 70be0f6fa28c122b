"""The pii and secrets guards find a value in the Unicode forms a reader takes for its ASCII form.

A card number copied from a web page or a PDF has no-break spaces in it (French typography: narrow ones), a CJK
input method types full-width digits and at signs, other scripts have their own digits, and a zero-width space, a soft
hyphen or a combining mark hides inside a value without showing. The guards read each text's canonical form
(`normalize.canonical`) and redact the original characters of the value, invisible ones included: here for each
form, on the guards themselves, through a stream cut anywhere, and through a served gateway with a mock upstream
(the openai SDK as client).
"""

from __future__ import annotations

import asyncio
import random
import re
import textwrap
import unicodedata
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import openai
import pytest

from gateway.auth.keys import hash_key
from gateway.guards.base import Where
from gateway.guards.normalize import _ASTRAL, _INVISIBLE, canonical, fold
from gateway.guards.pii import PiiGuard
from gateway.guards.pool import GuardPool
from gateway.guards.runtime import GuardRuntime
from gateway.guards.secrets import SecretsGuard
from gateway.guards.session import GuardSession
from gateway.guards.stream import StreamGuard
from gateway.policy.guard_schema import GuardPoolSpec, GuardsSpec, PiiGuardSpec, SecretsGuardSpec, StreamScanSpec
from gateway.schemas.endpoints import Endpoint
from gateway.schemas.events import DONE, Chunk
from gateway.telemetry.metrics import Metrics
from tests.conftest import FULL_KEY, SHARED, UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream

IN = Where("input", "message")
CARD, IBAN, PHONE = "4111 1111 1111 1111", "DE89 3704 0044 0532 0130 00", "+33 1 42 68 53 00"
EMAIL, SSN, IP, AWS = "jane.doe@mailbox.org", "536-22-1234", "8.8.4.4", "AKIAIOSFODNN7EXAMPLQ"


def _digits(first: int) -> Callable[[str], str]:
    """Each ASCII digit written in the script whose zero is `first`."""
    return lambda s: "".join(chr(first + int(c)) if c.isdigit() else c for c in s)


def full_width(s: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in s)


def spaced(space: str) -> Callable[[str], str]:
    return lambda s: s.replace(" ", space)


def inside(char: str) -> Callable[[str], str]:
    """`char` in the middle of the value."""
    return lambda s: s[:len(s) // 2] + char + s[len(s) // 2:]


def combining(s: str) -> str:
    """A combining acute accent on every letter and digit."""
    return "".join(c + "\u0301" if c.isalnum() else c for c in s)


arabic, devanagari, math_bold = _digits(0x0660), _digits(0x0966), _digits(0x1D7CE)
NBSP, NARROW_NBSP, ZWSP, SOFT_HYPHEN = spaced("\u00a0"), spaced("\u202f"), inside("\u200b"), inside("\u00ad")
# name: (guard kind, type found, ASCII value, its form a reader takes for it)
FORMS: dict[str, tuple[str, str, str, str]] = {
    "card_nbsp": ("pii", "CREDIT_CARD", CARD, NBSP(CARD)),
    "card_narrow_nbsp": ("pii", "CREDIT_CARD", CARD, NARROW_NBSP(CARD)),
    "card_full_width": ("pii", "CREDIT_CARD", CARD, full_width(CARD)),
    "card_zwsp": ("pii", "CREDIT_CARD", CARD, ZWSP(CARD)),
    "card_soft_hyphen": ("pii", "CREDIT_CARD", CARD, SOFT_HYPHEN(CARD)),
    "card_arabic": ("pii", "CREDIT_CARD", CARD, arabic(CARD)),
    "card_devanagari": ("pii", "CREDIT_CARD", CARD, devanagari(CARD)),
    "card_math_bold": ("pii", "CREDIT_CARD", CARD, math_bold(CARD)),
    "card_combining": ("pii", "CREDIT_CARD", CARD, combining(CARD)),
    "iban_nbsp": ("pii", "IBAN_CODE", IBAN, NBSP(IBAN)),
    "iban_arabic": ("pii", "IBAN_CODE", IBAN, arabic(IBAN)),
    "iban_devanagari": ("pii", "IBAN_CODE", IBAN, devanagari(IBAN)),
    "iban_math_bold": ("pii", "IBAN_CODE", IBAN, math_bold(IBAN)),
    "iban_combining": ("pii", "IBAN_CODE", IBAN, combining(IBAN)),
    "phone_narrow_nbsp": ("pii", "PHONE_NUMBER", PHONE, NARROW_NBSP(PHONE)),
    "phone_combining": ("pii", "PHONE_NUMBER", PHONE, combining(PHONE)),
    "email_full_width_at": ("pii", "EMAIL_ADDRESS", EMAIL, EMAIL.replace("@", "\uff20")),
    "email_zwsp": ("pii", "EMAIL_ADDRESS", EMAIL, ZWSP(EMAIL)),
    "email_full_width": ("pii", "EMAIL_ADDRESS", EMAIL, full_width(EMAIL)),
    "email_combining": ("pii", "EMAIL_ADDRESS", EMAIL, combining(EMAIL)),
    "ssn_zwsp": ("pii", "US_SSN", SSN, ZWSP(SSN)),
    "ssn_combining": ("pii", "US_SSN", SSN, combining(SSN)),
    "ip_full_width": ("pii", "IP_ADDRESS", IP, full_width(IP)),
    "ip_combining": ("pii", "IP_ADDRESS", IP, combining(IP)),
    "aws_zwsp": ("secrets", "AWS_ACCESS_KEY", AWS, ZWSP(AWS)),
    "aws_full_width": ("secrets", "AWS_ACCESS_KEY", AWS, full_width(AWS)),
    "aws_combining": ("secrets", "AWS_ACCESS_KEY", AWS, combining(AWS)),
}


def sentence(value: str) -> str:
    return f"Please note the value {value} for the record, thanks."


@pytest.fixture(scope="module")
def guards() -> dict[str, Any]:
    pii = PiiGuard("pii", PiiGuardSpec(), GuardPool(GuardPoolSpec()))
    pii.build()
    return {"pii": pii, "secrets": SecretsGuard("secrets", SecretsGuardSpec())}


# -- the guards on their own ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FORMS))
def test_each_form_is_found_and_its_span_is_the_original_value(guards: dict[str, Any], name: str) -> None:
    kind, entity, ascii_value, form = FORMS[name]
    guard = guards[kind]
    for value in (ascii_value, form):  # the ASCII one: the control
        text = sentence(value)
        found = [f for f in asyncio.run(guard.detect(text, IN)) if f.type == entity]
        assert [text[f.start:f.end] for f in found] == [value], (name, value, found)


def test_a_mark_on_the_last_character_and_invisible_characters_inside_are_redacted_with_the_value(
        guards: dict[str, Any]) -> None:
    text = f"card \u200b{CARD[:-1]}\u200d{CARD[-1]}\u0301\u0301\u200b ok"
    [found] = asyncio.run(guards["pii"].detect(text, IN))
    # from the first digit (a zero-width space before it is no part of it) to the marks and the zero-width space
    # that follow its last digit
    assert (found.start, found.end) == (text.index("4"), text.index(" ok"))


def test_the_ner_engine_reads_the_canonical_text() -> None:
    from gateway.guards.pii import Engine, analyze

    engine = Engine("ner", str(SHARED / "models" / "en_ner_sm_port-1.0.0"), ("en",), ("CREDIT_CARD", "PERSON"), ())
    text = f"Mr\u00a0John\u00a0Smith paid with {NBSP(CARD)} yesterday"
    spans = {entity: text[start:end] for entity, start, end, _, _ in analyze(engine, text, 0.3)}
    assert spans["CREDIT_CARD"] == NBSP(CARD)
    assert spans["PERSON"].endswith("John\u00a0Smith")


def test_canonical_costs_an_ascii_text_nothing_and_leaves_other_prose_alone() -> None:
    ascii_text = "plain ASCII with 4111 1111 1111 1111"
    assert canonical(ascii_text)[0] is ascii_text and canonical(ascii_text)[1] is None
    for prose in ("Le café est très bon, n'est-ce pas", "Привет, как дела", "中文测试。再见", "क्षत्रिय नमस्ते"):
        assert canonical(prose) == (prose, None)


def test_canonical_keeps_case_and_other_scripts_digits_for_the_secrets_scanner() -> None:
    assert canonical(full_width("AKIAabc"), digits=False)[0] == "AKIAabc"
    assert canonical(arabic("key 12"), digits=False)[0] == arabic("key 12")
    assert canonical(arabic("card 12"))[0] == "card 12"
    # the secrets scanner is case-sensitive: a lower-case AWS key id in full-width letters is none
    assert not SecretsGuard("s", SecretsGuardSpec()).scan(full_width(AWS.lower()))


def _one_by_one(text: str, digits: bool) -> tuple[str, list[int]]:
    """What `canonical` must give, read from `unicodedata` a character at a time."""
    out: list[str] = []
    where: list[int] = []
    on_ascii = False
    for index, char in enumerate(text):
        category = unicodedata.category(char)
        if category == "Cf" or _INVISIBLE.match(char):
            continue
        turned = " " if category == "Zs" else str(unicodedata.decimal(char)) if digits and category == "Nd" \
            else unicodedata.normalize("NFKC", char)
        for piece in turned:
            if not (on_ascii and unicodedata.category(piece)[0] == "M"):
                out.append(piece)
                where.append(index)
                on_ascii = piece.isascii()
    return "".join(out), where


def test_canonical_fast_paths_give_what_reading_each_character_gives() -> None:
    """The translation of the characters that stay one, and the searches that skip texts with nothing to change,
    agree with the character-by-character reading, on texts mixing every kind of character it treats."""
    choices = [*map(chr, range(0x20, 0x7f)), *"\u00a0\u202f\u3000\u1680\u2009\u200b\u200d\u00ad\ufeff\u0301\u0308",
               *"\u093c\uff14\uff20\uff0c\u0664\u0966\u00bd\u00b2\u00a8\u0340\ufb01\u338b\u00e9\u4e2d\u3002\u0915",
               "\U0001d7d2", "\U0001d400", "\U000e0041", "\U0001f201", "\U00011066", "\U0001fbf3", "\U0001f389"]
    rng = random.Random(7)
    for _ in range(5000):
        text = "".join(rng.choice(choices) for _ in range(rng.randint(1, 10)))
        for digits in (True, False):
            shown, where = canonical(text, digits)
            assert (shown, list(range(len(text)) if where is None else where)) == _one_by_one(text, digits), text


def test_every_character_canonical_changes_is_one_its_searches_look_for() -> None:
    """Its classes come from the `regex` module's tables: they hold every character Python's own (`unicodedata`)
    says it changes; in the astral planes, all but the CJK compatibility ideographs (no pattern reads them)."""
    from gateway.guards.normalize import _CANONICAL

    astral = re.compile(f"[{_ASTRAL}]")
    for code in [*range(0x80, 0xD800), *range(0xE000, 0x2F800), *range(0x2FA20, 0x30000), *range(0xE0000, 0xE1000)]:
        char = chr(code)
        category = unicodedata.category(char)
        if category[0] == "M":
            shown, where = canonical("a" + char)
            assert (shown, list(where or ())) == ("a", [0]), hex(code)  # a mark on an ASCII character, dropped
        elif category in ("Cf", "Nd", "Zs") or _INVISIBLE.match(char) or unicodedata.normalize("NFKC", char) != char:
            assert _CANONICAL.changing.match(char) and (code < 0x10000 or astral.match(char)), hex(code)


def test_fold_is_unchanged_for_injection_and_the_deny_list() -> None:
    assert fold(full_width("Project") + "\u00a0Fal\u200bcon")[0] == "project falcon"


# -- streams ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runtime() -> Iterator[GuardRuntime]:
    spec = msgspec.convert({"global": {
        "pii": {"kind": "pii", "places": ["output"], "action": "redact"},
        "secrets": {"kind": "secrets", "places": ["output"], "action": "redact"},
    }}, GuardsSpec)
    built = GuardRuntime(spec, Metrics(), len)
    asyncio.run(built.start())
    yield built
    asyncio.run(built.aclose())


def streamed(runtime: GuardRuntime, pieces: list[str]) -> str:
    """What the output stream guard releases of an answer streamed in `pieces` (Chat Completions chunks)."""
    stage = StreamGuard(runtime, runtime.resolve("t", "a").output, GuardSession(runtime.metrics), StreamScanSpec(),
                        Endpoint.CHAT, "m")
    base = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m"}

    def released(events: list[Any]) -> str:
        return "".join(choice["delta"].get("content") or "" for e in events if isinstance(e, Chunk)
                       for choice in e.data()["choices"])

    async def run() -> str:
        out = []
        for piece in pieces:
            chunk = Chunk.of({**base, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
            out.append(released(await stage.on_events(None, [chunk])))  # type: ignore[arg-type]
        end = Chunk.of({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        out.append(released(await stage.on_events(None, [end, DONE])))  # type: ignore[arg-type]
        return "".join(out)

    return asyncio.run(run())


def chunked(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


@pytest.mark.parametrize("name", list(FORMS))
def test_a_stream_in_chunks_of_any_size_releases_what_the_whole_text_gives(runtime: GuardRuntime,
                                                                            name: str) -> None:
    _, _, ascii_value, form = FORMS[name]
    text = sentence(form)
    whole = streamed(runtime, [text])
    assert whole == streamed(runtime, [sentence(ascii_value)]) != text  # redacted as the ASCII value is
    for size in (1, 2, 3, 7):
        assert streamed(runtime, chunked(text, size)) == whole, size


@pytest.mark.parametrize("name", ["card_zwsp", "card_soft_hyphen", "card_nbsp", "card_combining", "email_zwsp",
                                  "iban_nbsp", "aws_zwsp", "aws_combining"])
def test_a_chunk_edge_beside_an_invisible_character_releases_no_part_of_the_value(runtime: GuardRuntime,
                                                                                  name: str) -> None:
    _, _, ascii_value, form = FORMS[name]
    text = sentence(form)
    redacted = streamed(runtime, [sentence(ascii_value)])
    start = text.index(form)
    for cut in range(start, start + len(form) + 1):  # every edge inside the value, and on both its sides
        assert streamed(runtime, [text[:cut], text[cut:]]) == redacted, cut


# -- a served gateway, the openai SDK as client -----------------------------------------------------------------


def _policy(upstream_url: str) -> str:
    return textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
        providers:
          mock: {{kind: openai, base_url: {upstream_url}, api_key_env: MOCK_UPSTREAM_KEY}}
        models:
          in-redact: {{provider: mock, model: fault-echo}}
          in-block: {{provider: mock, model: fault-echo}}
          out: {{provider: mock, model: fault-echo}}
        guards:
          models:
            in-redact:
              pii: {{kind: pii, places: [input], action: redact}}
              secrets: {{kind: secrets, places: [input], action: redact}}
            in-block:
              pii: {{kind: pii, places: [input], action: block}}
              secrets: {{kind: secrets, places: [input], action: block}}
            out:
              pii: {{kind: pii, places: [output], action: redact}}
              secrets: {{kind: secrets, places: [output], action: redact}}
        """)


@pytest.fixture(scope="module")
def client(upstream: MockUpstream) -> Iterator[openai.OpenAI]:
    running = RunningGateway(_policy(upstream.base_url), {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()
    try:
        with openai.OpenAI(base_url=running.base_url, api_key=FULL_KEY, max_retries=0) as sdk:
            yield sdk
    finally:
        running.stop()


def _ask(client: openai.OpenAI, model: str, text: str, **extra: Any) -> Any:
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], **extra)


@pytest.mark.parametrize("name", list(FORMS))
def test_served_input_is_redacted_or_blocked(client: openai.OpenAI, upstream: MockUpstream, name: str) -> None:
    _, _, ascii_value, form = FORMS[name]
    _ask(client, "in-redact", sentence(ascii_value))
    redacted = upstream.requests[-1].json["messages"][-1]["content"]  # the control: as the ASCII value is
    assert ascii_value not in redacted
    answer = _ask(client, "in-redact", sentence(form))
    assert upstream.requests[-1].json["messages"][-1]["content"] == redacted
    assert answer.choices[0].message.content == redacted
    before = len(upstream.requests)
    with pytest.raises(openai.BadRequestError) as caught:
        _ask(client, "in-block", sentence(form))
    assert caught.value.code == "content_policy_violation"
    assert len(upstream.requests) == before  # never sent


@pytest.mark.parametrize("name", list(FORMS))
def test_served_output_is_redacted_streamed_or_not(client: openai.OpenAI, name: str) -> None:
    _, _, ascii_value, form = FORMS[name]
    redacted = _ask(client, "out", sentence(ascii_value)).choices[0].message.content
    assert ascii_value not in redacted  # the control: as the ASCII value is
    assert _ask(client, "out", sentence(form)).choices[0].message.content == redacted
    for size in (1, 3):
        pieces = [c.choices[0].delta.content or "" for c in _ask(client, "out", sentence(form), stream=True,
                                                                 extra_body={"echo_chunk": size}) if c.choices]
        assert "".join(pieces) == redacted, size
