"""The stream scanner releases text as soon as no finding can still start inside it (`holds.py`)."""

from __future__ import annotations

import asyncio
import copy
import json
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest

from gateway.guards.denylist import DenyListGuard
from gateway.guards.holds import RegexHolds, phone_from
from gateway.guards.runtime import GuardRuntime
from gateway.guards.session import GuardSession
from gateway.guards.stream import StreamGuard
from gateway.policy.guard_schema import DenyListGuardSpec, GuardsSpec, StreamScanSpec
from gateway.schemas.endpoints import Endpoint
from gateway.schemas.events import DONE, Chunk
from gateway.telemetry.metrics import Metrics

SPEC = StreamScanSpec()  # the defaults: window 48, step 24
EMAIL = "jane.doe@mailbox.org"
CARD = "4111 1111 1111 1111"
PHONE = "+44 20 7946 0958"
KEY = "AKIAIOSFODNN7EXAMPLQ"


@pytest.fixture(scope="module")
def runtime() -> Iterator[GuardRuntime]:
    spec = msgspec.convert({"global": {
        "pii": {"kind": "pii", "places": ["output"], "action": "redact"},
        "secrets": {"kind": "secrets", "places": ["output"], "action": "redact"},
        "deny": {"kind": "denylist", "terms": ["project falcon"], "action": "redact", "places": ["output"]},
    }}, GuardsSpec)
    built = GuardRuntime(spec, Metrics(), len)
    asyncio.run(built.start())
    yield built
    asyncio.run(built.aclose())


def stream(runtime: GuardRuntime, text: str, size: int, *, session: GuardSession | None = None,
           spec: StreamScanSpec = SPEC, guards: tuple[Any, ...] | None = None) -> list[tuple[int, str]]:
    """(characters sent so far, text released by that chunk) for `text` sent `size` characters at a time;
    the upstream's end is (len(text) + 1, what it released)."""
    session = session or GuardSession(runtime.metrics)
    chosen = runtime.resolve("t", "a").output if guards is None else guards
    stage = StreamGuard(runtime, chosen, session, spec, Endpoint.CHAT, "m")
    base = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m"}

    def released(events: list[Any]) -> str:
        return "".join(choice["delta"].get("content") or "" for e in events if isinstance(e, Chunk)
                       for choice in e.data()["choices"])

    async def run() -> list[tuple[int, str]]:
        out = []
        for i in range(0, len(text), size):
            chunk = Chunk.of({**base, "choices": [{"index": 0, "delta": {"content": text[i:i + size]},
                                                   "finish_reason": None}]})
            out.append((min(len(text), i + size), released(await stage.on_events(None, [chunk]))))  # type: ignore[arg-type]
        end = Chunk.of({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        out.append((len(text) + 1, released(await stage.on_events(None, [end, DONE]))))  # type: ignore[arg-type]
        return out

    return asyncio.run(run())


def joined(pieces: list[tuple[int, str]]) -> str:
    return "".join(piece for _, piece in pieces)


# -- holds on their own ---------------------------------------------------------------------------


def test_an_earlier_partial_match_wins_over_a_later_complete_one() -> None:
    # `regex`'s search prefers the complete `o` at 3 to the partial `foo` at 1: each start is tried alone.
    assert RegexHolds([(r"foo\d|o", 0, 0)]).open_from("zfoo") == 1
    assert RegexHolds([(r"\d{3}(?:-\d{4})?", 0, 0)]).open_from("call 555-") == 5  # may still grow
    assert RegexHolds([(r"\d{3}(?:-\d{4})?", 0, 0)]).open_from("call 555- or") == len("call 555- or")
    assert RegexHolds([(r"\d{3}", 0, 0)]).open_from("a 123 b", start=4) == len("a 123 b")


def test_a_match_is_held_while_a_context_word_may_still_follow() -> None:
    holds = RegexHolds([(r"\d{4}", 0, 10)])
    assert holds.open_from("year 1990 and") == 5
    assert holds.open_from("year 1990 and then more") == len("year 1990 and then more")


def test_a_phone_number_may_grow_until_a_letter() -> None:
    assert phone_from("call +1 415 555") == 5
    assert phone_from("call 415 555 ok") == len("call 415 555 ok")
    assert phone_from("call me ") == len("call me ")
    assert phone_from("box 12 x 34") == 4  # x and X belong to numbers (extensions)
    assert phone_from("ab 1\u0301 2") == 3  # a combining mark is no letter to the phone windows (stdlib `\w`)


def test_a_regex_the_holds_cannot_read_holds_everything() -> None:
    assert RegexHolds([("(unclosed", 0, 0)]).open_from("anything at all") == 0


def test_a_policy_regex_that_backtracks_for_long_is_cut_off_and_holds_everything() -> None:
    """A deny list's or custom recognizer's regex is the policy's: its searches are bounded in time (the
    scan that follows has its own bound), so one chunk cannot stall the event loop on it."""
    text = "a" * 40 + "!"  # (a|aa)+c tries every split of the a's: seconds unbounded
    holds = RegexHolds([("(a|aa)+c", 0, 0)], timeout=0.05)
    started = time.perf_counter()
    assert holds.open_from(text) == 0
    assert time.perf_counter() - started < 1.0
    assert RegexHolds([("(a|aa)+c", 0, 0)], timeout=0.05).open_from("no a's here") == len("no a's here")
    guard = DenyListGuard("deny", msgspec.convert({"kind": "denylist", "patterns": ["(a|aa)+c"]},
                                                  DenyListGuardSpec))
    assert guard.holds.timeout is not None


# -- the scanner ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 3, 7])
def test_text_without_a_possible_finding_leaves_at_once(runtime: GuardRuntime, size: int) -> None:
    text = "Sure, here is a short answer that has nothing special in it at all, only plain words."
    pieces = stream(runtime, text, size)
    assert joined(pieces) == text
    for sent, _ in pieces[:-1]:  # everything but the trailing word, as soon as it arrived
        released = joined([p for p in pieces if p[0] <= sent])
        seen = text[:sent]
        assert released == seen[:seen.rfind(" ") + 1], (sent, released)


@pytest.mark.parametrize("size", [1, 3, 7])
def test_an_answer_in_a_script_without_spaces_leaves_as_it_comes(runtime: GuardRuntime, size: int) -> None:
    """Chinese, Japanese, Thai: every offset beside such a character is a word's start, so the answer streams
    (it used to wait, whole, for its end: no space to cut at); a finding in it is still held whole."""
    comma, stop, colon = "\uff0c", "\u3002", "\uff1a"  # full-width: the marks of such a text
    text = (f"当然{comma}这是一个简短的回答{comma}里面没有任何特别的内容{comma}只有普通的文字{stop}"
            f"日本語の文章もここにあります{stop}ภาษาไทยก็เช่นกัน")
    pieces = stream(runtime, text, size)
    assert joined(pieces) == text
    for sent, _ in pieces[:-1]:
        released = joined([p for p in pieces if p[0] <= sent])
        # A run of letters may open an e-mail address (`\w+@`): it waits for a mark, as a word waits for a space.
        clause = max(text.rfind(mark, 0, sent) for mark in (comma, stop)) + 1
        assert len(released) >= min(clause, sent - 1), (sent, released)
    # (presidio's e-mail pattern takes letters glued to the address into it, `\w` being Unicode's: a mark ends them)
    mixed = f"请把邮件发到{colon}{EMAIL}{comma}谢谢你的帮助{comma}我们明天见{stop}"
    pieces = stream(runtime, mixed, size)
    assert joined(pieces) == mixed.replace(EMAIL, "<EMAIL_ADDRESS>")
    start = mixed.index(EMAIL)
    for sent, _ in pieces:
        released = joined([p for p in pieces if p[0] <= sent])
        if sent < start + len(EMAIL):
            assert len(released) <= start, (sent, released)
    assert len(joined([p for p in pieces if p[0] <= len(mixed)])) > start  # and the rest streams after it


@pytest.mark.parametrize(("value", "shown"), [
    (EMAIL, "<EMAIL_ADDRESS>"), (CARD, "<CREDIT_CARD>"), (PHONE, "<PHONE_NUMBER>"), (KEY, "<AWS_ACCESS_KEY>"),
    ("Project Falcon", "<DENIED_TERM>"),
])
@pytest.mark.parametrize("size", [1, 2, 5, 7])
def test_a_partial_finding_at_the_tail_is_held_until_complete(runtime: GuardRuntime, value: str, shown: str,
                                                               size: int) -> None:
    for pad in range(size):
        text = "x" * pad + f" The value is {value} and the rest of this answer is plain text."
        pieces = stream(runtime, text, size)
        assert joined(pieces) == text.replace(value, shown)
        start = text.index(value)
        for sent, _ in pieces:
            released = joined([p for p in pieces if p[0] <= sent])
            if sent < start + len(value):  # the value is not all there: nothing of it has left
                assert len(released) <= start and released == text[:len(released)], (pad, sent, released)
            if sent == start + len(value) - 1:  # but the text before it has, up to a word or two
                assert len(released) >= text.index(" is "), (pad, released)


def test_a_finding_a_late_context_word_makes_is_not_released_early(runtime: GuardRuntime) -> None:
    # A date is a date of birth only next to "born", which may follow it (`ContextRecognizer`'s `window // 2`).
    text = "The date 12 March 1984 (born) is what I mean, and nothing more comes after it here."
    for size in (1, 4, 7):
        assert "1984" not in joined(stream(runtime, text, size))


@pytest.mark.parametrize("size", [1, 3, 7])
def test_placeholders_split_across_chunks_still_restore(runtime: GuardRuntime, size: int) -> None:
    for pad in range(12):
        session = GuardSession(runtime.metrics)
        placeholder = session.pseudonyms.placeholder("PERSON", "John Smith")
        text = "x" * pad + f" Say hi to {placeholder} today, and to {placeholder} tomorrow."
        assert joined(stream(runtime, text, size, session=session)) == text.replace(placeholder, "John Smith")


def test_a_guard_that_cannot_tell_holds_the_whole_window(runtime: GuardRuntime) -> None:
    spec = msgspec.convert({"global": {"inj": {"kind": "injection", "places": ["output"]}}}, GuardsSpec)
    blind = GuardRuntime(spec, Metrics(), len)
    text = "word " * 40
    pieces = stream(blind, text, 5, spec=SPEC)
    first = next(sent for sent, piece in pieces if piece)
    assert first >= SPEC.window_chars + SPEC.step_chars  # as before early release
    assert joined(pieces) == text


def test_chunks_read_together_are_looked_at_once(runtime: GuardRuntime, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fast upstream's chunks arrive in one read: the holds are looked for at its last chunk only."""
    from gateway.guards.pii import PiiGuard

    calls = []
    looked = PiiGuard.open_from
    monkeypatch.setattr(PiiGuard, "open_from", lambda self, text, start: calls.append(1) or looked(self, text, start))
    text = f"Write to {EMAIL} today, please, and then wait for the answer to come back."
    stage = StreamGuard(runtime, runtime.resolve("t", "a").output, GuardSession(runtime.metrics), SPEC,
                        Endpoint.CHAT, "m")
    base = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m"}
    chunks = [Chunk.of({**base, "choices": [{"index": 0, "delta": {"content": text[i:i + 4]},
                                             "finish_reason": None}]}) for i in range(0, len(text), 4)]
    out = asyncio.run(stage.on_events(None, chunks))  # type: ignore[arg-type]
    released = "".join(c.data()["choices"][0]["delta"].get("content") or "" for c in out if isinstance(c, Chunk))
    assert len(calls) == 1
    assert released == text.replace(EMAIL, "<EMAIL_ADDRESS>")[:len(released)] and "back." not in released
    assert released.endswith("come ")


@pytest.mark.parametrize("size", [1, 3, 7])
def test_a_private_key_block_longer_than_the_window_leaves_nothing_of_itself(runtime: GuardRuntime,
                                                                            size: int) -> None:
    body = "MIIEowIBAAKCAQEAq8Zr1Lx0Vb7Tn4Wk2Pm9Qx7Lr3Ta5Yb0Nc8Vd6We4Xf2Zg1Hh"
    block = f"-----BEGIN RSA PRIVATE KEY-----\n{body}\n{body[::-1]}\n-----END RSA PRIVATE KEY-----"
    text = f"Here is the key:\n{block}\nKeep it safe, and rotate it soon."
    pieces = stream(runtime, text, size)
    assert joined(pieces) == text.replace(block, "<PRIVATE_KEY>")
    assert not any(body[:8] in piece or "-----BEGIN" in piece for _, piece in pieces)


@pytest.mark.parametrize("size", [1, 3, 7])
def test_a_private_key_block_cut_before_its_end_line_leaves_nothing_of_itself(runtime: GuardRuntime,
                                                                             size: int) -> None:
    """An answer cut at `max_tokens` inside a key: the open block is held to the stream's end, then redacted (it
    was released whole: no detector matched a block without its END line)."""
    body = "MIIEowIBAAKCAQEAq8Zr1Lx0Vb7Tn4Wk2Pm9Qx7Lr3Ta5Yb0Nc8Vd6We4Xf2Zg1Hh"
    text = f"Here is the key:\n-----BEGIN RSA PRIVATE KEY-----\n{body}\n{body[::-1]}"
    pieces = stream(runtime, text, size)
    assert joined(pieces) == "Here is the key:\n<PRIVATE_KEY>"
    assert not any(body[:8] in piece or "-----BEGIN" in piece for _, piece in pieces)


def test_text_after_a_whole_private_key_block_leaves_before_the_stream_ends(runtime: GuardRuntime) -> None:
    """The detector's branch for a block without its END line reaches the text's end: what follows a whole block
    still leaves as it comes (a stream's holds look back one window only), not at the stream's end."""
    block = "-----BEGIN PRIVATE KEY-----\nMIIEowIBAAKCAQEAq8Zr1Lx0Vb7Tn4Wk2Pm9\n-----END PRIVATE KEY-----"
    text = f"{block}\nThat was the key, and this sentence goes on for a good while after it, word by word."
    pieces = stream(runtime, text, 5)
    assert joined(pieces) == text.replace(block, "<PRIVATE_KEY>")
    assert "word by" in "".join(piece for sent, piece in pieces if sent <= len(text))


# -- what leaves beside the text ------------------------------------------------------------------


def _chunks(choices: list[dict[str, Any]]) -> list[Chunk]:
    base = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m"}
    return [Chunk.of({**base, "choices": [choice]}) for choice in choices]


def _run(runtime: GuardRuntime, chunks: list[Chunk], guards: tuple[Any, ...] | None = None) -> list[dict[str, Any]]:
    stage = StreamGuard(runtime, runtime.resolve("t", "a").output if guards is None else guards,
                        GuardSession(runtime.metrics), SPEC, Endpoint.CHAT, "m")

    async def run() -> list[dict[str, Any]]:
        out: list[Any] = []
        for chunk in chunks:
            out += await stage.on_events(None, [chunk])  # type: ignore[arg-type]
        out += await stage.on_events(None, [DONE])  # type: ignore[arg-type]
        return [event.data() for event in out if isinstance(event, Chunk)]

    return asyncio.run(run())


def test_a_guarded_streams_logprobs_are_emptied(runtime: GuardRuntime) -> None:
    """Logprobs carry the upstream's tokens: with an enforcing guard they would carry a redacted value out beside
    the redacted text (and could never line up with text the window holds back), so every chunk's are emptied."""
    words = ["Write", " to", f" {EMAIL}", " today", " please", "."]
    choices = [{"index": 0, "delta": {"content": w}, "finish_reason": None,
                "logprobs": {"content": [{"token": w, "logprob": -0.1, "bytes": list(w.encode()), "top_logprobs": []}]}}
               for w in words] + [{"index": 0, "delta": {}, "finish_reason": "stop", "logprobs": None}]
    sent = _run(runtime, _chunks(copy.deepcopy(choices)))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in sent if c.get("choices"))
    assert text == "".join(words).replace(EMAIL, "<EMAIL_ADDRESS>")
    assert all(c["choices"][0].get("logprobs") is None for c in sent if c.get("choices"))
    assert EMAIL not in json.dumps(sent)
    untouched = _run(runtime, _chunks(copy.deepcopy(choices)), guards=())  # no enforcing guard: as they came
    assert [c["choices"][0].get("logprobs") for c in untouched if c.get("choices")] == [
        choice["logprobs"] for choice in choices]


def test_a_tool_calls_held_arguments_leave_before_the_next_call_starts(runtime: GuardRuntime) -> None:
    """The SDK's stream helper takes a call's arguments as done once the next call starts: a guard holding them
    until the finish chunk made them `""`. Each call's arguments are whole before the next call's first delta."""
    args = [json.dumps({"city": "Paris", "note": f"call {n} for {EMAIL} ok"}) for n in range(3)]
    choices: list[dict[str, Any]] = []
    for n, arguments in enumerate(args):
        choices.append({"index": 0, "finish_reason": None, "delta": {"tool_calls": [
            {"index": n, "id": f"call_{n}", "type": "function", "function": {"name": "f", "arguments": ""}}]}})
        choices += [{"index": 0, "finish_reason": None, "delta": {"tool_calls": [
            {"index": n, "function": {"arguments": arguments[i:i + 7]}}]}} for i in range(0, len(arguments), 7)]
    choices.append({"index": 0, "delta": {}, "finish_reason": "tool_calls"})
    sent = _run(runtime, _chunks(choices))
    seen: dict[int, str] = {}
    for chunk in sent:
        for call in chunk["choices"][0]["delta"].get("tool_calls") or ():
            index = call["index"]
            if index not in seen and index > 0:  # a new call starts: every earlier one is whole already
                for earlier in range(index):
                    assert json.loads(seen[earlier])["note"] == f"call {earlier} for <EMAIL_ADDRESS> ok", seen
            seen[index] = seen.get(index, "") + (call.get("function", {}).get("arguments") or "")
    assert [json.loads(seen[n])["note"] for n in range(3)] == [f"call {n} for <EMAIL_ADDRESS> ok" for n in range(3)]


@pytest.mark.parametrize("endpoint", [Endpoint.CHAT, Endpoint.COMPLETIONS])
def test_a_guarded_answers_logprobs_are_emptied(runtime: GuardRuntime, endpoint: Endpoint) -> None:
    """A complete answer: a redacted value (and a blocked one) left in `logprobs` would reach the client."""
    from types import SimpleNamespace

    from gateway.guards.stage import GuardStage

    logprobs = {"content": [{"token": EMAIL, "logprob": -0.1, "bytes": list(EMAIL.encode()), "top_logprobs": []}]}
    text = f"Write to {EMAIL} today."
    choice: dict[str, Any] = {"index": 0, "logprobs": logprobs, "finish_reason": "stop"}
    choice.update({"message": {"role": "assistant", "content": text}} if endpoint is Endpoint.CHAT else {"text": text})
    body = json.dumps({"id": "x", "choices": [choice, {**choice, "index": 1}]}).encode()
    stage = GuardStage(runtime, SPEC)
    ctx = SimpleNamespace(endpoint=endpoint)
    out = json.loads(asyncio.run(stage._output(ctx, runtime.resolve("t", "a"), GuardSession(runtime.metrics), body)))  # type: ignore[arg-type]
    assert EMAIL not in json.dumps(out) and all(c["logprobs"] is None for c in out["choices"])
    assert "<EMAIL_ADDRESS>" in json.dumps(out["choices"][0])


def _tool_delta(call: int, arguments: str, start: bool = False) -> dict[str, Any]:
    entry: dict[str, Any] = {"index": call, "function": {"arguments": arguments}}
    if start:
        entry.update(id=f"call_{call}", type="function")
        entry["function"]["name"] = "f"
    return entry


def _arguments(sent: list[dict[str, Any]]) -> dict[int, str]:
    joined: dict[int, str] = {}
    for chunk in sent:
        for call in chunk["choices"][0].get("delta", {}).get("tool_calls") or ():
            joined[call["index"]] = joined.get(call["index"], "") + (call.get("function", {}).get("arguments") or "")
    return joined


def test_interleaved_tool_calls_let_no_part_of_a_finding_out(runtime: GuardRuntime) -> None:
    """A stream may come back to a call after another began (0, 1, 0): what is held of a call whose arguments
    are not yet whole JSON stays held when the next call starts, so a value still being written never leaves in
    part; a call's pieces and another's in one chunk keep their order."""
    for pieces in (
        [[_tool_delta(0, '{"to": "jane.do', True)], [_tool_delta(1, '{"q": 1}', True)],
         [_tool_delta(0, 'e@mailbox.org", "x": 1}')]],
        [[_tool_delta(0, '{"to": "jane.doe@mai', True)],
         [_tool_delta(1, '{"q": 1}', True), _tool_delta(0, 'lbox.org"}')]],
    ):
        choices = [{"index": 0, "delta": {"tool_calls": calls}, "finish_reason": None} for calls in pieces]
        sent = _run(runtime, _chunks([*choices, {"index": 0, "delta": {}, "finish_reason": "tool_calls"}]))
        joined = _arguments(sent)
        assert "jane" not in json.dumps(sent) and json.loads(joined[1]) == {"q": 1}, sent
        assert json.loads(joined[0])["to"] == "<EMAIL_ADDRESS>", joined
    key = [[_tool_delta(0, '{"k": "AKIAIOSFOD', True)], [_tool_delta(1, '{"q": 1}', True)],
           [_tool_delta(0, 'NN7EXAMPLQ"}')]]
    sent = _run(runtime, _chunks([{"index": 0, "delta": {"tool_calls": c}, "finish_reason": None} for c in key]))
    assert "AKIA" not in json.dumps(sent)  # blocked, and not half of it sent before


def test_held_tool_arguments_leave_when_the_stream_ends_without_a_finish_reason(runtime: GuardRuntime) -> None:
    pieces = [_tool_delta(0, '{"to": "', True), _tool_delta(0, f'{EMAIL}", "x": '), _tool_delta(0, "1}")]
    sent = _run(runtime, _chunks([{"index": 0, "delta": {"tool_calls": [p]}, "finish_reason": None} for p in pieces]))
    assert json.loads(_arguments(sent)[0]) == {"to": "<EMAIL_ADDRESS>", "x": 1}


def test_a_custom_tools_held_input_leaves_whole_before_the_next_call_starts(runtime: GuardRuntime) -> None:
    """A custom tool's input is plain text, never resumed once another call starts: what the window held of it
    (the word after an address) leaves before the next call, not in the finish chunk."""
    choices = [
        {"index": 0, "finish_reason": None, "delta": {"tool_calls": [
            {"index": 0, "id": "c0", "type": "custom", "custom": {"name": "note", "input": f"to {EMAIL[:10]}"}}]}},
        {"index": 0, "finish_reason": None, "delta": {"tool_calls": [
            {"index": 0, "custom": {"input": EMAIL[10:] + " bye"}}]}},
        {"index": 0, "finish_reason": None, "delta": {"tool_calls": [_tool_delta(1, '{"q": 1}', True)]}},
        {"index": 0, "delta": {}, "finish_reason": "tool_calls"},
    ]
    sent = _run(runtime, _chunks(choices))
    seen: dict[int, str] = {}
    for chunk in sent:
        for call in chunk["choices"][0]["delta"].get("tool_calls") or ():
            if call["index"] == 1 and call.get("id"):
                assert seen[0] == "to <EMAIL_ADDRESS> bye", seen  # call 0 whole before call 1 begins
            seen[call["index"]] = seen.get(call["index"], "") + (call.get("custom", {}).get("input") or "")
    assert seen[0] == "to <EMAIL_ADDRESS> bye"


def test_content_parts_become_openais_fields_where_the_guards_read_them(runtime: GuardRuntime) -> None:
    """Mistral's `thinking` parts and a `refusal` part in a list content were dropped with the list made text."""
    choices = [
        {"index": 0, "finish_reason": None, "delta": {"content": [
            {"type": "thinking", "thinking": [{"type": "text", "text": f"mail {EMAIL} later. "}]}]}},
        {"index": 0, "finish_reason": None, "delta": {"content": [{"type": "text", "text": "Done."}]}},
        {"index": 0, "finish_reason": None, "delta": {"content": [{"type": "refusal", "refusal": f"not {EMAIL}"}]}},
        {"index": 0, "delta": {}, "finish_reason": "stop"},
    ]
    sent = _run(runtime, _chunks(choices))
    joined = {field: "".join(c["choices"][0]["delta"].get(field) or "" for c in sent if c.get("choices"))
              for field in ("reasoning_content", "content", "refusal")}
    assert joined == {"reasoning_content": "mail <EMAIL_ADDRESS> later. ", "content": "Done.",
                      "refusal": "not <EMAIL_ADDRESS>"}
    assert EMAIL not in json.dumps(sent)


@pytest.mark.parametrize("gap", ["\n", "\r\n", "\t", "  ", "\n\n  ", "\u2028", "\u00a0"])
def test_a_deny_term_of_several_words_is_found_whatever_white_space_parts_them(runtime: GuardRuntime,
                                                                                gap: str) -> None:
    """A model that wraps lines writes `project\\nfalcon`: the term `project falcon` was found only with one space
    (its words were escaped as one string); whole or streamed in pieces of any size, it is redacted whole."""
    deny = DenyListGuard("deny", msgspec.convert({"kind": "denylist", "terms": ["Project Falcon", "x"]},
                                                DenyListGuardSpec))
    text = f"The codename is project{gap}falcon, as agreed."
    (found,) = [f for f in deny.rules.find(text) if f.type == "DENIED_TERM"]
    assert text[found.start:found.end] == f"project{gap}falcon"
    assert deny.rules.find(f"projects{gap}falcon and project{gap}falconry") == []  # whole words only
    for size in (1, 3, 8, len(text)):
        out = joined(stream(runtime, text, size))
        assert out == "The codename is <DENIED_TERM>, as agreed.", (size, out)
