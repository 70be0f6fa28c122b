"""Pure logic of the telemetry module: refusal heuristic quality, answer signals, label caps, traceparent."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest

from evals.quality.evaluate import evaluate
from gateway.schemas.endpoints import Endpoint
from gateway.schemas.events import Chunk
from gateway.telemetry.labels import MetricLabels, capped
from gateway.telemetry.quality import Answer, signals_of
from gateway.telemetry.refusals import looks_like_refusal
from gateway.telemetry.tracing import parse_traceparent

EVALS = Path(__file__).resolve().parents[1] / "evals" / "quality"


def test_refusal_heuristic_keeps_its_documented_precision_and_recall() -> None:
    """docs/metrics.md states these figures; a change to the patterns must keep them (or update the docs)."""
    main = evaluate(EVALS / "refusals.jsonl")
    assert main["samples"] == 100 and main["precision"] >= 0.95 and main["recall"] >= 0.9, main
    heldout = evaluate(EVALS / "refusals-heldout.jsonl")
    assert heldout["precision"] >= 0.9 and heldout["recall"] >= 0.9, heldout
    review = evaluate(EVALS / "refusals-review.jsonl")  # false positives a review found, and refusals like them
    assert review["precision"] == 1.0 and review["recall"] == 1.0, review


@pytest.mark.parametrize("text", ["", "Sure.", "I can't stress enough how useful tests are.", "x" * 10_000 + "sorry"])
def test_answers_are_not_refusals(text: str) -> None:
    assert not looks_like_refusal(text)


def _answer(text: str = "", reasons: tuple[str, ...] = ("stop",), tools: dict[int, list[str]] | None = None,
            limit: int = 1000) -> Answer:
    answer = Answer()
    answer.add_text(text, limit)
    answer.finish_reasons = list(reasons)
    answer.tool_calls = tools or {}
    return answer


def test_signals_of_each_problem() -> None:
    schema = {"type": "json_schema", "json_schema": {"schema": {"type": "object", "required": ["a"]}}}
    assert signals_of(_answer("fine", ("length",)), {}) == ["truncated"]
    assert signals_of(_answer("   "), {}) == ["empty"]
    assert signals_of(_answer("{oops", ), {"response_format": {"type": "json_object"}}) == ["invalid_json"]
    assert signals_of(_answer('{"b": 1}'), {"response_format": schema}) == ["schema_violation"]
    assert signals_of(_answer('{"a": 1}'), {"response_format": schema}) == []
    broken_schema = {"type": "json_schema", "json_schema": {"schema": {"type": "no-such-type"}}}
    assert signals_of(_answer('{"a": 1}'), {"response_format": broken_schema}) == []  # the client's fault
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "required": ["x"]}}}]
    assert signals_of(_answer(tools={0: ["f", '{"x"', ": 1}"]}), {"tools": tools}) == []
    for bad in ({0: ["f", "{not json"]}, {0: ["f", "[1]"]}, {0: ["f", "{}"]}, {0: ["g", '{"x": 1}']}):
        assert signals_of(_answer(tools=bad), {"tools": tools}) == ["malformed_tool_call"], bad


def test_an_overlong_answer_skips_the_json_checks() -> None:
    answer = _answer("{" * 2000, limit=1000)
    assert answer.overflow and signals_of(answer, {"response_format": {"type": "json_object"}}) == []


def test_label_caps_bucket_everything_else_as_other() -> None:
    labels = MetricLabels(aliases=capped(["b", "a", "c"], 2), targets=frozenset({"p/m"}), tenants=frozenset({"t"}),
                          keys=frozenset())
    assert labels.aliases == {"a", "b"} and labels.alias("c") == "other" and labels.alias("unknown") == "unknown"
    assert labels.target(None) == "none" and labels.target("p/x") == "other" and labels.target("p/m") == "p/m"
    assert labels.tenant("anonymous") == "anonymous" and labels.tenant("new-tenant") == "other"
    assert labels.key(None) == "none" and labels.key("any") == "other"


def test_traceparent_parsing() -> None:
    trace, span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    assert parse_traceparent(f"00-{trace}-{span}-01".encode()) == (trace.encode(), span.encode(), b"01")
    assert parse_traceparent(f" 00-{trace}-{span}-00\t".encode()) == (trace.encode(), span.encode(), b"00")
    # W3C: lower-case hex only; an invalid header starts a new trace (an upper-case id was read as the same one)
    # A higher version is read by version 00's rules, what follows its flags ignored (W3C "Versioning of
    # traceparent"); it keeps only the flag version 00 defines (sampled), as the gateway forwards version 00
    for future, flags in ((f"01-{trace}-{span}-01", b"01"), (f"cc-{trace}-{span}-01", b"01"),
                          (f"02-{trace}-{span}-03-what-the-future-will-be-like", b"01"),
                          (f"fe-{trace}-{span}-02-", b"00")):
        assert parse_traceparent(future.encode()) == (trace.encode(), span.encode(), flags), future
    for bad in ("", "00-xyz", f"00-{'0' * 32}-{span}-01", f"00-{trace}-{'0' * 16}-01",
                f"00-{trace}-{span}-01-extra", f"00-{trace}-{span}", f"00-{trace.upper()}-{span}-00",
                f"00-{trace}-{span.upper()}-01", f"00-{trace}-{span}-0A",
                f"ff-{trace}-{span}-01", f"CC-{trace}-{span}-01", f"cc-{trace}-{span}-01.extra", f"cc-{trace}-{span}",
                f"cc-{'0' * 32}-{span}-01", f"cc-{trace}-{'0' * 16}-01", f"cc-{trace.upper()}-{span}-01",
                f"cc-{trace}-{span}-0A", f"cc-{trace}x-{span}-01"):
        assert parse_traceparent(bad.encode()) is None, bad


def _chunk(delta: dict[str, Any], finish: str | None = None, index: int = 0, **extra: Any) -> bytes:
    return msgspec.json.encode({"id": "x", "choices": [{"index": index, "delta": delta, "finish_reason": finish}],
                                **extra})


def _stream_reader(asked: dict[str, Any], limit: int = 1 << 20) -> Any:
    from gateway.telemetry.quality import chat_asked
    from gateway.telemetry.quality_reading import StreamQuality

    return StreamQuality(SimpleNamespace(limit=limit), chat_asked(asked), True)  # type: ignore[arg-type]


def _feed(reader: Any, batches: list[list[Any]]) -> None:
    ctx = SimpleNamespace(endpoint=Endpoint.CHAT)

    async def feed() -> None:
        for batch in batches:
            await reader.on_events(ctx, batch)
        reader._read(ctx)

    asyncio.run(feed())


def _typed(payload: bytes) -> Chunk:
    """A chunk as the provider hands it over when a stage reads every chunk (`ctx.read_choices`)."""
    from gateway.schemas.openai import ChunkChoicesPeek

    try:
        return Chunk(payload, None, msgspec.json.decode(payload, type=ChunkChoicesPeek).choices)
    except msgspec.ValidationError:  # unusual types: handed over undecoded
        return Chunk(payload)


def test_stream_quality_reads_typed_choices_batches_and_odd_chunks_in_order() -> None:
    """Chunks the provider read (typed choices), chunks kept for a batch decode, and a chunk of unusual types
    (read as a dict) all reach the same answer, in order; a malformed one is skipped. (JSON asked: all the
    text is kept.)"""
    events: list[Any] = [Chunk(_chunk({"role": "assistant", "content": ""})), _typed(_chunk({"content": "Hello"})),
                         Chunk(_chunk({"content": ", wor"})), Chunk(b"{not json"),
                         Chunk(_chunk({"content": "ld", "tool_calls": "odd"})), Chunk(_chunk({}, "stop"))]
    reader = _stream_reader({"response_format": {"type": "json_object"}})
    _feed(reader, [events[:3], events[3:]])
    assert "".join(reader.answer.text) == "Hello, world"
    assert reader.answer.finish_reasons == ["stop"]


_WORDS = [" lorem", " ipsum", " dolor", " sit", " amet"] * 15  # 450 characters: past the refusal head
_TOOLS_ASKED = {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}
_STREAMS: dict[str, tuple[dict[str, Any], list[bytes]]] = {
    "plain": ({}, [_chunk({"role": "assistant", "content": "", "refusal": None}), _chunk({"content": "Hello"}),
                   _chunk({"content": " there"}), _chunk({}, "stop")]),
    "tool call after the 300th character": (_TOOLS_ASKED, [
        _chunk({"content": "Sure"}), *(_chunk({"content": w}) for w in _WORDS),
        _chunk({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": "{not json"}}]}),
        _chunk({}, "tool_calls")]),
    "finish reason after the 300th character": ({}, [
        *(_chunk({"content": w}) for w in _WORDS), _chunk({}, "length")]),
    "spaced JSON": ({}, [_chunk({"content": "Fine"}), b'{"choices": [{"index": 0, "delta": {}, '
                                                      b'"finish_reason": "stop"}]}']),
    "n>1 choices": ({}, [
        _chunk({"content": "Fine"}),
        b'{"choices":[{"index":0,"delta":{"content":"!"},"finish_reason":null},'
        b'{"index":1,"delta":{"content":"x"},"finish_reason":"length"}]}',
        b'{"choices":[{"index":1,"delta":{},"finish_reason":null},{"index":0,"delta":{},"finish_reason":"stop"}]}']),
    "a refusal field late": ({}, [_chunk({"content": "Well"}), _chunk({"refusal": "I will not"}),
                                  _chunk({}, "stop")]),
    "a refusal over several chunks": ({}, [_chunk({"content": ""}), _chunk({"content": " I"}),
                                           _chunk({"content": "'m sorry, but I"}), _chunk({"content": " can't help"}),
                                           _chunk({"content": " with that."}), _chunk({}, "stop")]),
    "an opening that is not a refusal": ({}, [_chunk({"content": "I"}), _chunk({"content": " think so."}),
                                              _chunk({}, "stop")]),
    "a refusal after 300 blank characters": ({}, [_chunk({"content": " " * 301}), _chunk({"content": "Sorry, I"}),
                                                  _chunk({"content": " can't do that"}), _chunk({}, "stop")]),
    "whitespace, then text": ({}, [_chunk({"content": "  \n"}), _chunk({"content": "..."}),
                                   _chunk({"content": "ok"}), _chunk({}, "stop")]),
    "empty": ({}, [_chunk({"role": "assistant", "content": ""}), _chunk({"content": "  "}), _chunk({}, "stop")]),
    "JSON asked": ({"response_format": {"type": "json_object"}}, [  # valid JSON only when read whole
        _chunk({"content": '{"text": "'}), *(_chunk({"content": w}) for w in _WORDS), _chunk({"content": '"}'}),
        _chunk({}, "stop")]),
    "usage on the last chunk": ({}, [_chunk({"content": "Hi"}), _chunk({}, "stop", usage={"prompt_tokens": 1})]),
    "text that looks like keys": ({}, [_chunk({"content": "Keys"}), _chunk({"content": 'say "finish_reason"'}),
                                       _chunk({"content": '"tool_calls'}), _chunk({"content": '"refusal": "x"'}),
                                       _chunk({}, "length")]),
    "text that looks like a finish reason": ({}, [
        _chunk({"content": "Quoting"}), _chunk({"content": ' {"finish_reason":"stop"} and "finish_reason":null'}),
        _chunk({"content": 'a\\'}), _chunk({"content": '\\"finish_reason'}), _chunk({}, None)]),
    "a key spelled with escapes": ({}, [
        _chunk({"content": "Fine"}), b'{"choices":[{"index":0,"delta":{},"finish\\u005freason":"length"}]}',
        b'{"choices":[{"index":0,"delta":{"tool\\u005Fcalls":[{"index":0,"function":{"name":"f"}}]},'
        b'"finish_reason":null}]}']),
    "escaped text, then the end": ({}, [_chunk({"content": "Caf\u00e9 \u003c\u2019"}), _chunk({"content": "\u00e9"}),
                                        b'{"choices":[{"index":0,"delta":{"content":"\\u003c\\u00e9"},'
                                        b'"finish_reason":null}]}', _chunk({}, "stop")]),
    "tool calls nobody asked for": ({}, [
        _chunk({"content": "Calling"}),
        _chunk({"tool_calls": [{"index": 0, "function": {"name": "g", "arguments": ""}}]}),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a": 1}'}}]}), _chunk({}, "tool_calls")]),
    "n>1 choices, the first one's end first": ({}, [
        b'{"choices":[{"index":0,"delta":{"content":"Yes"},"finish_reason":null},'
        b'{"index":1,"delta":{"content":"I can\'t"},"finish_reason":null}]}',
        b'{"choices":[{"index":0,"delta":{},"finish_reason":"stop"},{"index":1,"delta":{"content":"!"},'
        b'"finish_reason":null}]}',
        b'{"choices":[{"index":1,"delta":{"refusal":"no"},"finish_reason":"content_filter"}]}']),
    "null fields spaced": ({}, [b'{"choices": [{"index": 0, "delta": {"content": "Fine", "refusal": null}, '
                                b'"finish_reason": null}]}',
                                b'{"choices": [{"index": 0, "delta": {"content": "!", "refusal": null}, '
                                b'"finish_reason": null}]}',
                                b'{"choices": [{"index": 0, "delta": {"refusal": ""}, "finish_reason": "length"}]}']),
    "truncated, text split across chunks": ({}, [_chunk({"content": "Sor"}), _chunk({"content": "ry, I can"}),
                                                 _chunk({"content": "'t help with that"}), _chunk({}, "length")]),
    "odd types after the start": ({}, [_chunk({"content": "Fine"}), _chunk({"content": 5}),
                                       b'{"choices":[{"index":"0","delta":{},"finish_reason":"stop"}]}']),
    "no choices, usage only": ({}, [_chunk({"content": "Fine"}), _chunk({}, "stop"),
                                    b'{"id":"x","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}']),
}


@pytest.mark.parametrize("name", list(_STREAMS))
@pytest.mark.parametrize("split", ["one batch", "one chunk per batch"])
@pytest.mark.parametrize("typed", [True, False])
def test_stream_quality_keeps_only_the_text_the_checks_need_and_finds_what_reading_all_finds(
        name: str, split: str, typed: bool) -> None:
    """Once the text is settled, later text is not kept; the signals and finish reasons are those of an
    answer read from every chunk (chunks decoded by the provider or not)."""
    from gateway.telemetry.quality import chat_asked, signals_for
    from gateway.telemetry.quality_reading import read_payload

    asked, payloads = _STREAMS[name]
    whole = Answer()
    for payload in payloads:
        read_payload(whole, payload, True, "delta", 1 << 20)
    events = [_typed(payload) if typed else Chunk(payload) for payload in payloads]
    reader = _stream_reader(asked)
    _feed(reader, [events] if split == "one batch" else [[event] for event in events])
    assert sorted(reader.answer.finish_reasons) == sorted(whole.finish_reasons)
    assert signals_for(reader.answer, chat_asked(asked)) == signals_for(whole, chat_asked(asked))
    assert reader.answer.tool_calls == whole.tool_calls and reader.answer.refusal == whole.refusal


def test_stream_quality_of_completions_reads_what_reading_all_finds() -> None:
    """A completions stream (the text in `text`, no `delta`): the same counts as reading every chunk."""
    from gateway.telemetry.quality import chat_asked, signals_for
    from gateway.telemetry.quality_reading import StreamQuality, read_payload

    nothing = chat_asked({})

    def chunk(text: str, finish: str | None = None) -> bytes:
        return msgspec.json.encode({"choices": [{"index": 0, "text": text, "finish_reason": finish}]})

    for texts, finish in ((["Sure", " thing", "."], "stop"), (["", "I can", "'t do that"], "length"), ([" "], "stop")):
        payloads = [chunk(text) for text in texts] + [chunk("", finish)]
        whole = Answer()
        for payload in payloads:
            read_payload(whole, payload, False, "_", 1 << 20)
        for make in (Chunk, _typed):
            reader = StreamQuality(SimpleNamespace(limit=1 << 20), nothing, False)  # type: ignore[arg-type]
            ctx = SimpleNamespace(endpoint=Endpoint.COMPLETIONS)
            reader.look(ctx, [make(payload) for payload in payloads])  # type: ignore[arg-type]
            reader._read(ctx)  # type: ignore[arg-type]
            assert reader.answer.finish_reasons == whole.finish_reasons
            assert signals_for(reader.answer, nothing) == signals_for(whole, nothing)


def test_stream_quality_stops_keeping_settled_text() -> None:
    """As the benchmark's streams: the text settles at its first word; the rest is not kept."""
    reader = _stream_reader({})
    payloads = _STREAMS["finish reason after the 300th character"][1]
    _feed(reader, [[_typed(payload) for payload in payloads]])
    assert "".join(reader.answer.text) == _WORDS[0] and reader.answer.finish_reasons == ["length"]


def test_stream_quality_keeps_no_empty_text() -> None:
    """The first chunk's empty text is not kept (nor checked): the text settles at the first word as before."""
    reader = _stream_reader({})
    _feed(reader, [[_typed(_chunk({"role": "assistant", "content": ""}))], [_typed(_chunk({"content": "Hello"}))],
                   [_typed(_chunk({"content": " there"}))]])
    assert reader.answer.text == ["Hello"] and reader.settled


def test_cannot_become_refusal_first_letter_shortcut_agrees_with_the_regexes() -> None:
    """An ASCII letter that opens no refusal settles the text without the regexes: the same verdict."""
    import string

    from gateway.telemetry.refusals import _FIRST_WORD_CHAR, _MAY_OPEN_A_REFUSAL, cannot_become_refusal

    for letter in string.ascii_letters:
        text = letter + "ello"
        slow = _MAY_OPEN_A_REFUSAL.match(text, _FIRST_WORD_CHAR.search(text).start()) is None  # type: ignore[union-attr]
        assert cannot_become_refusal(text) is slow, letter
    assert cannot_become_refusal("Hello") and not cannot_become_refusal("Sorry")


def test_every_refusal_opens_with_one_of_the_initials() -> None:
    """`cannot_become_refusal` and the first-letter shortcut trust `_INITIALS`: the letters the pattern can
    start with after its opening non-word characters, computed here from its parse tree (a new opener cannot
    slip past them)."""
    import re
    import re._constants as c
    import re._parser as parser
    import string

    from gateway.telemetry.refusals import _INITIALS, _NOT_INITIALS, _REFUSAL, cannot_become_refusal

    def first(items: Any) -> tuple[set[Any], bool]:
        """The first atoms of a sequence, and whether it can match nothing."""
        found: set[Any] = set()
        for op, av in items:
            if op is c.AT:
                continue
            if op is c.SUBPATTERN:
                atoms, empty = first(av[-1])
            elif op is c.BRANCH:
                atoms, empty = set(), False
                for branch in av[1]:
                    more, branch_empty = first(branch)
                    atoms |= more
                    empty = empty or branch_empty
            elif op in (c.MAX_REPEAT, c.MIN_REPEAT):
                atoms, _ = first(av[2])
                empty = av[0] == 0
            else:
                atoms, empty = {(op, repr(av))}, False
            found |= atoms
            if not empty:
                return found, False
        return found, True

    atoms, empty = first(parser.parse(_REFUSAL.pattern, _REFUSAL.flags))
    non_words, _ = first(parser.parse('[^\\w"\u201c]', _REFUSAL.flags))  # the opening class, as the pattern has it
    letters = {(op, av) for op, av in atoms - non_words if op is c.LITERAL}
    assert not empty and atoms - non_words == letters  # after the opening's non-word characters, letters only
    assert {chr(int(av)) for _, av in letters} == set(_INITIALS)
    assert _NOT_INITIALS == set(string.ascii_letters) - set(_INITIALS + _INITIALS.upper())
    assert cannot_become_refusal("  Hello") and cannot_become_refusal("\u00bfQu\u00e9?")
    assert not cannot_become_refusal("I") and not cannot_become_refusal("...") and not cannot_become_refusal("")
    assert not cannot_become_refusal("\u0130 can't")  # folds to `i` under IGNORECASE, as in the pattern
    assert re.match("i", "\u0130", re.IGNORECASE) and not cannot_become_refusal("\u0130")


def test_the_first_letter_shortcut_agrees_with_the_pattern() -> None:
    from gateway.telemetry.refusals import _APOSTROPHES, _HEAD_CHARS, _REFUSAL

    texts = [json.loads(line)["text"] for name in ("refusals.jsonl", "refusals-heldout.jsonl", "refusals-review.jsonl")
             for line in (EVALS / name).read_text().splitlines() if line.strip()]
    for text in texts + [t[1:] for t in texts] + [t.upper() for t in texts] + [t.lower() for t in texts]:
        expected = _REFUSAL.match(text[:_HEAD_CHARS].translate(_APOSTROPHES)) is not None
        assert looks_like_refusal(text) == expected, text


def test_the_fast_observe_and_inc_add_what_prometheus_client_adds() -> None:
    """`_Observe` and `_Increment` (the per-request path), and their lock-free forms for the telemetry stage
    (`loop_child`), write exactly what the library's own calls write."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    from gateway.telemetry.series import (
        _Increment,
        _LoopIncrement,
        _LoopObserve,
        _Observe,
        _Set,
        fast_child,
        loop_child,
    )

    def exposition(fast: bool, loop: bool = False) -> bytes:
        registry = CollectorRegistry()
        histogram = Histogram("h_seconds", "h", ("a",), buckets=(0.001, 0.01, 0.1, 1.0, 10.0), registry=registry)
        counter = Counter("c", "c", ("a",), registry=registry)
        gauge = Gauge("g", "g", ("a",), registry=registry)
        h, c, g = histogram.labels("x"), counter.labels("x"), gauge.labels("x")
        if fast:
            h, c, g = fast_child(h), fast_child(c), fast_child(g)
            assert isinstance(h, _Observe) and isinstance(c, _Increment) and isinstance(g, _Set)  # internals found
        if loop:  # the telemetry stage's writers (the event loop's thread only); a gauge's `set` stays the library's
            h, c = loop_child(histogram.labels("x")), loop_child(counter.labels("x"))
            assert type(h) is _LoopObserve and type(c) is _LoopIncrement
            up_down = loop_child(gauge.labels("y"))
            up_down.inc(3)
            up_down.inc(-1)
        for value in (0.0, 0.0005, 0.001, 0.0011, 0.05, 0.1, 0.99, 1.0, 5.0, 10.0, 11.0, 1e9):
            h.observe(value)
            c.inc(value)
            g.set(value)
        c.inc()
        return b"\n".join(line for line in generate_latest(registry).splitlines() if b"_created" not in line)

    assert exposition(True) == exposition(False)
    looped = exposition(False, loop=True).splitlines()
    assert b'g{a="y"} 2.0' in looped  # inc(3), inc(-1)
    assert b"\n".join(line for line in looped if line != b'g{a="y"} 2.0') == exposition(False)


def test_a_loop_value_adds_what_inc_adds_lock_free_or_through_the_child() -> None:
    """`loop_value(child)._value += amount`: the lock-free child's value object itself; any other child (another
    kind of registry) gets a stand-in whose additions go through the child's own `inc` (gauges: negative too)."""
    from prometheus_client import CollectorRegistry, Counter, Gauge
    from prometheus_client.values import MutexValue

    from gateway.telemetry.series import _AddThrough, fast_child, loop_child, loop_value

    registry = CollectorRegistry()
    counter = Counter("c", "c", ("a",), registry=registry)
    gauge = Gauge("g", "g", ("a",), registry=registry)
    direct = loop_value(loop_child(counter.labels("x")))
    assert type(direct) is MutexValue
    through = loop_value(fast_child(counter.labels("y")))  # not lock-free: through `inc`
    assert type(through) is _AddThrough
    up_down = loop_value(gauge.labels("z"))  # a library child
    for value in (direct, through):
        value._value += 2
        value._value += 0.5
    up_down._value += 3
    up_down._value -= 1
    assert counter.labels("x")._value.get() == counter.labels("y")._value.get() == 2.5
    assert gauge.labels("z")._value.get() == 2


def test_a_responses_answer_is_read_from_its_output_items() -> None:
    from gateway.telemetry.quality import signals_for
    from gateway.telemetry.quality_responses import answer_of, decode_response, responses_asked

    def read(**response: object) -> Answer | None:
        return answer_of(decode_response(json.dumps(response).encode()), 1000)

    message = {"type": "message", "content": [{"type": "output_text", "text": "Hello"}]}
    assert (answer := read(status="completed", output=[message])) is not None
    assert answer.text == ["Hello"] and answer.finish_reasons == ["stop"]
    cut = read(status="incomplete", output=[message], incomplete_details={"reason": "max_output_tokens"})
    assert cut is not None and cut.finish_reasons == ["length"]
    assert signals_for(cut, responses_asked({})) == ["truncated"]
    refused = read(status="completed", output=[{"type": "message", "content": [{"type": "refusal", "refusal": "No"}]}])
    assert refused is not None and signals_for(refused, responses_asked({})) == ["refusal"]
    assert read(status="failed", output=[]) is None  # not an answer: not counted
    call = {"type": "function_call", "name": "f", "arguments": '{"x": 1}'}
    tools = {"tools": [{"type": "function", "name": "f", "parameters": {"type": "object", "required": ["y"]}}]}
    called = read(status="completed", output=[{"type": "reasoning"}, call])
    assert called is not None and called.finish_reasons == ["tool_calls"]
    assert signals_for(called, responses_asked(tools)) == ["malformed_tool_call"]
    schema = {"text": {"format": {"type": "json_schema", "name": "s", "schema": {"type": "object", "required": ["a"]}}}}
    json_text = {**message, "content": [{"type": "output_text", "text": '{"b": 1}'}]}
    json_answer = read(status="completed", output=[json_text])
    assert json_answer is not None and signals_for(json_answer, responses_asked(schema)) == ["schema_violation"]


async def test_a_responses_stream_is_read_at_its_last_event_only() -> None:
    from types import SimpleNamespace

    from gateway.pipeline.streams import StreamEnd
    from gateway.schemas.events import Chunk
    from gateway.telemetry.quality_responses import ResponsesStreamQuality

    counted: list[tuple[Answer, object]] = []
    stage = SimpleNamespace(limit=1000, count=lambda ctx, answer, asked: counted.append((answer, asked)))
    reader = ResponsesStreamQuality(stage)  # type: ignore[arg-type]
    # a delta whose text names the last event's type is not the last event (its quotes are escaped)
    delta = {"type": "response.output_text.delta", "delta": 'the "response.completed" event'}
    last = {"type": "response.completed", "response": {"status": "completed", "output": [
        {"type": "message", "content": [{"type": "output_text", "text": "the whole text"}]}]}}
    ctx = SimpleNamespace(body={})
    for event in (delta, last):
        await reader.on_events(ctx, [Chunk(json.dumps(event).encode())])  # type: ignore[arg-type]
    await reader.on_end(ctx, StreamEnd("done"))  # type: ignore[arg-type]
    assert len(counted) == 1 and counted[0][0].text == ["the whole text"]


@pytest.mark.parametrize("binary", [True, False])
def test_json_lines_handler_writes_access_lines_and_records_in_order(binary: bool) -> None:
    """Over a text stream with a byte layer (stderr) or without one (StringIO): lines written and flushed whole,
    a record's text before the lines that follow it."""
    import io
    import logging

    from gateway.telemetry.logs import JsonLinesHandler

    raw = io.BytesIO()
    stream: Any = io.TextIOWrapper(raw, encoding="utf-8", write_through=False) if binary else io.StringIO()
    handler = JsonLinesHandler(stream)
    handler.write_line(b'{"n":1}\n')  # no running loop: written at once
    handler.emit(logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None))
    handler.write_line(b'{"n":2}\n')
    text = raw.getvalue().decode() if binary else stream.getvalue()
    lines = text.splitlines()
    assert lines[0] == '{"n":1}' and '"msg":"hello"' in lines[1] and lines[2] == '{"n":2}' and len(lines) == 3


_ANSWERS = [  # complete answers: common, truncated, a tool call, a refusal field, odd choice types, no choices
    b'{"choices":[{"index":0,"message":{"content":"Hello there"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1}}',
    b'{"choices":[{"index":0,"message":{"content":"Sorry, I can\'t help"},"finish_reason":"length"}]}',
    b'{"choices":[{"index":0,"message":{"tool_calls":[{"function":{"name":"f","arguments":"{"}}]},'
    b'"finish_reason":"tool_calls"}]}',
    b'{"choices":[{"index":0,"message":{"content":null,"refusal":"no"},"finish_reason":"stop"}]}',
    b'{"choices":[{"index":"0","message":{"content":"x"},"finish_reason":7}]}',
    b'{"id":"x","usage":{"prompt_tokens":2,"completion_tokens":3,"total_tokens":5}}',
    # the common answer's shortcut (`QualitySignals.read`) and the answers it leaves to the full read
    b'{"choices":[{"index":0,"message":{"content":"Hello there, and so on"},"finish_reason":"length"}]}',
    b'{"choices":[{"index":0,"message":{"content":"Hello","refusal":null,"tool_calls":[]},"finish_reason":"odd"}]}',
    b'{"choices":[{"index":0,"message":{"content":"I am sorry, I cannot help"},"finish_reason":"stop"}]}',
    b'{"choices":[{"index":0,"message":{"content":" \\n "},"finish_reason":"stop"}]}',
    b'{"choices":[{"index":0,"message":{"content":""},"finish_reason":"stop"}]}',
    b'{"choices":[{"index":0,"message":{"content":"Hello"},"finish_reason":null}]}',
    b'{"choices":[{"index":1,"message":{"content":"Hello"},"finish_reason":"stop"}]}',
]


@pytest.mark.parametrize("body", _ANSWERS)
def test_a_complete_answers_choices_read_by_the_provider_give_the_verdicts_of_reading_the_body(body: bytes) -> None:
    """`Call.read_choices` on a complete answer: the provider decodes the choices with the usage (odd types:
    the usage alone, as without it), and the quality stage reads them only while the reply's body is still
    that body; its counts are those of reading the body itself."""
    from gateway.pipeline.context import Reply
    from gateway.providers.openai_compat import OpenAICompatProvider, _peek_usage
    from gateway.telemetry.metrics import Metrics
    from gateway.telemetry.quality import QualitySignals

    call = SimpleNamespace(endpoint=Endpoint.CHAT, read_choices=True)
    completion = OpenAICompatProvider._completion(SimpleNamespace(name="p"), call, body)  # type: ignore[arg-type]
    assert completion.usage == _peek_usage(body).usage
    odd = b'"index":"0"' in body
    assert (completion.choices is None) == odd
    labels = MetricLabels(frozenset({"a"}), frozenset({"t"}))

    def counts(reply: Reply, limit: int = 1 << 20) -> dict[str, float]:
        metrics = Metrics()
        stage = QualitySignals(metrics, limit)
        ctx = SimpleNamespace(endpoint=Endpoint.CHAT, body={}, route=SimpleNamespace(alias="a"),
                              target=SimpleNamespace(name="t"), read_choices=False,
                              runtime=SimpleNamespace(policy=SimpleNamespace(labels=labels)))

        stage.prepare(ctx)  # type: ignore[arg-type]
        stage.read(ctx, reply)  # type: ignore[arg-type]
        return {f"{s.name}{sorted(s.labels.items())}": s.value for m in metrics.registry.collect()
                if m.name.startswith("gateway_quality") for s in m.samples if not s.name.endswith("_created")}

    plain = counts(Reply(body=body))
    read = Reply(body=body, choices_of=(body, completion.choices) if completion.choices is not None else None)
    assert counts(read) == plain and plain
    assert counts(read, limit=4) == counts(Reply(body=body), limit=4)  # the text past the limit: not kept
    rewritten = b'{"choices":[{"index":0,"message":{"content":"Fine."},"finish_reason":"stop"}]}'
    stale = Reply(body=rewritten, choices_of=read.choices_of)  # a stage changed the body: its own text is read
    assert counts(stale) == counts(Reply(body=rewritten))


async def test_a_batched_series_writes_what_its_childrens_calls_write() -> None:
    """`BatchedSeries.record` (requests written in batches: on a running loop, when `render` comes) against
    `RequestSeries.record` (the children's own `observe` and `inc`, request by request) on two registries: the
    same samples, sums included, for streams, complete answers and errors (`tests/test_metric_batches.py`:
    more cases, and the multiprocess kind)."""
    from gateway.telemetry.batches import _LoopBatchedSeries
    from gateway.telemetry.metrics import Metrics
    from gateway.telemetry.series import RequestSeries

    def samples(metrics: Metrics) -> list[Any]:
        metrics.render()  # (writes the waiting batches)
        return [(s.name, s.labels, s.value) for m in metrics.registry.collect() for s in m.samples
                if not s.name.endswith("_created")]

    batched, called = Metrics(), Metrics()
    for status, provider, error in ((200, "p", None), (429, None, "rate_limited"), (502, "p", "upstream_error")):
        fast = batched.series("chat", "a", status, provider, "t", "ten", "k", error)
        assert type(fast) is _LoopBatchedSeries  # (lock-free children: one process)
        slow = RequestSeries(*(getattr(called.series("chat", "a", status, provider, "t", "ten", "k", error), field)
                               for field in RequestSeries.__dataclass_fields__))
        for values in ((0.5, 0.4, 0.1, 10, 20), (0.3, 0.35, None, 0, 1), (2.0, 0.0, 0.2, 5, 0), (0.01, 0.5, 0.6, 3, 2)):
            fast.record(*values)
            slow.record(*values)
    assert fast.batch  # waiting for the timer
    assert samples(batched) == samples(called)
    assert not fast.batch



async def test_json_lines_handler_on_a_loop_writes_lines_together_and_in_order() -> None:
    """On the event loop, lines wait for one write: until `_FLUSH_LINES` wait or `_FLUSH_AFTER_S` passed, or
    a record of the loop's thread comes (written after them); another thread's record does not touch them,
    and `flush` from another thread writes them only once the loop's thread has ended (at exit)."""
    import io
    import logging
    import threading

    from gateway.telemetry import logs

    stream = io.StringIO()
    handler = logs.JsonLinesHandler(stream)
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None)
    handler.write_line(b'{"n":1}\n')
    handler.write_line(b'{"n":2}\n')
    assert stream.getvalue() == ""  # waiting for the timer
    await asyncio.sleep(logs._FLUSH_AFTER_S * 2)
    assert stream.getvalue() == '{"n":1}\n{"n":2}\n'
    handler.write_line(b'{"n":3}\n')
    worker = threading.Thread(target=handler.emit, args=(record,))
    worker.start()
    worker.join()
    assert stream.getvalue().endswith('"msg":"hello"}\n')  # another thread's record: the line still waits
    handler.flush()  # (from another thread, as `logging.shutdown` may: the loop's thread lives, so nothing)
    handler.emit(record)  # the loop's thread: the waiting line first
    lines = stream.getvalue().splitlines()
    assert lines[-2] == '{"n":3}' and '"msg":"hello"' in lines[-1]
    for n in range(logs._FLUSH_LINES):  # a full buffer: written at once
        handler.write_line(b'{"m":%d}\n' % n)
    assert stream.getvalue().count('"m":') == logs._FLUSH_LINES
    handler.write_line(b'{"n":4}\n')
    done = threading.Event()

    def at_exit() -> None:  # a thread other than the loop's, as `logging.shutdown` at exit may be
        handler.flush()
        done.set()

    threading.Thread(target=at_exit).start()
    done.wait(5)
    assert not stream.getvalue().endswith('{"n":4}\n')  # the loop's thread (this one) is alive: it writes
    handler._owner = -2  # as if the loop's thread had ended
    handler.flush()
    assert stream.getvalue().endswith('{"n":4}\n')
    await asyncio.sleep(logs._FLUSH_AFTER_S * 2)  # the timer left finds nothing to write
    assert stream.getvalue().count('{"n":4}') == 1


def test_an_access_line_written_by_the_handler_is_the_line_logging_would_make() -> None:
    """The handler's own encoding gives the object `JsonFormatter` makes from the line's fields for a record of
    the same time, odd characters included."""
    import io
    import logging

    from gateway.schemas.openai import Usage
    from gateway.telemetry import logs
    from gateway.telemetry.access import AccessLines

    ctx = SimpleNamespace(
        request_id="req_\u2028x", runtime=SimpleNamespace(policy=SimpleNamespace(version="sha256:abc")),
        usage=Usage(3, 4), upstream_seconds=0.001, first_chunk_seconds=0.00025, cost_usd=0.000125, attempts=None,
        rule=None, fallback_reason=None, stream=True, error_code=None, usage_estimated=False, cache_result="miss",
        guard_session=SimpleNamespace(header=lambda: b"pii:redact"), headers=[(b"x-gateway-guards", b"pii:redact")],
        traceparent=None)
    names = ("chat", "model-\u00e9", 200, "openai", 't"1', "acme", None, None)
    line = AccessLines().line(ctx, 0.0015, names)  # type: ignore[arg-type]
    stream = io.StringIO()
    handler = logs.JsonLinesHandler(stream)
    handler.write_access(line)  # no loop: written at once
    written = json.loads(stream.getvalue())
    record = logging.LogRecord("gateway.access", logging.INFO, __file__, 1, "request", None, None)
    record.fields = line.fields()
    made = json.loads(logs.JsonFormatter().format(record))
    assert written.pop("ts")[:10] == made.pop("ts")[:10]
    assert written == made and len(made) == 3 + 27  # level, logger, msg; the line
    assert made["attempts"] == [{"target": 't"1', "outcome": "ok"}] and made["policy_version"] == "sha256:abc"
    assert made["model"] == "model-\u00e9" and made["guards"] == "pii:redact" and made["first_chunk_ms"] == 0.25


def test_json_lines_handler_on_a_new_loop_times_its_writes_again() -> None:
    """A timed write due on a loop that ended never runs: on the next loop, the first full buffer schedules
    one there, so lines wait at most `_FLUSH_LINES` lines, then `_FLUSH_AFTER_S`, not until exit."""
    import io

    from gateway.telemetry import logs

    stream = io.StringIO()
    handler = logs.JsonLinesHandler(stream)

    async def one_line() -> None:
        handler.write_line(b'{"first":1}\n')

    asyncio.run(one_line())  # the loop ends before its timed write
    assert stream.getvalue() == ""

    async def more_lines() -> None:
        for n in range(logs._FLUSH_LINES):
            handler.write_line(b'{"n":%d}\n' % n)
        handler.write_line(b'{"last":1}\n')
        await asyncio.sleep(logs._FLUSH_AFTER_S * 2)

    asyncio.run(more_lines())
    text = stream.getvalue()
    assert text.startswith('{"first":1}\n') and text.endswith('{"last":1}\n')


def test_policy_info_keeps_the_sixteen_versions_served_last_before_this_one() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from gateway.telemetry.metrics import Metrics

    metrics = Metrics()
    for version in [f"v{n}" for n in range(40)] + ["v30"]:  # v30 served again: the newest now
        metrics.serving(version)
    families = text_string_to_metric_families(metrics.render().decode())
    family = next(f for f in families if f.name == "gateway_policy_info")
    kept = {sample.labels["version"]: sample.value for sample in family.samples}
    assert kept == {**{f"v{n}": 0.0 for n in range(23, 40) if n != 30}, "v30": 1.0}
