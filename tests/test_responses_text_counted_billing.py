"""A `/v1/responses` stream counted from its text is billed the tokens of the text its client got, never 0.

A provider's streams are counted from their text when it reports no usage: configured `stream_usage: false`, or
switched by the gateway after one of its streams finished without usage (`OpenAIStream`). The collector read only
chat's `choices[].delta`, so a Responses stream that ended without the upstream's usage (a server that reports none,
an upstream cut, a budget's cut) was billed 0 completion tokens, however much its client got. Through a real gateway
(the mock upstream, a scripted Responses server that reports no usage, the openai SDK as the client), each such
stream is billed the tokens of every `*.delta` text its client received (message text, reasoning and its summary,
tool call arguments, a custom tool's input), counted as the gateway counts them (`TokenCounter.count`); a chat
stream on the same provider is billed its content as before.
"""

from __future__ import annotations

import asyncio
import json
import logging
import textwrap
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import openai
import pytest
from aiohttp import web

from gateway.auth.keys import hash_key
from gateway.schemas.events import Chunk
from gateway.telemetry.tokens import TokenCounter
from gateway.telemetry.usage import ResponsesText
from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.billing import access_line, usage_row
from tests.support.mock_upstream import MockUpstream
from tests.support.threaded_app import ThreadedApp

KEY = "gw-responses-text-billing-key-000000000000"
ADMIN = "admin-responses-text-billing"
PRICE = "{input_per_mtok: 0, output_per_mtok: 1000}"  # $0.001 a completion token, the prompt free
TOKEN_USD = 0.001

# The scripted server's answer: (event type, delta pieces), in order; its `response.completed` carries no usage.
DELTAS: list[tuple[str, list[str]]] = [
    ("response.reasoning_summary_text.delta", ["The user ", "greets me; ", "I should greet back."]),
    ("response.reasoning_text.delta", ["Greeting detected. ", "Reply politely, ", "then call the tool."]),
    ("response.output_text.delta", ["Hello there! ", "Here is a longer answer ", "with several words in it."]),
    ("response.function_call_arguments.delta", ['{"city": ', '"Paris", ', '"unit": "celsius"}']),
    ("response.custom_tool_call_input.delta", ["print(", "'hello world'", ")"]),
]
# Its answer to `email-model`: an address an output guard blocks, so that the client gets none of the text.
EMAIL_DELTAS = [("response.output_text.delta", ["Write to me at ", "john.doe@example.com", " please, ", "soon."])]


class QuietResponses(ThreadedApp):
    """A Responses server that reports no usage: every event of a whole answer, `response.completed` with
    `usage: null` (the openai SDK reads it as an answer without usage)."""

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/responses", self._answer)

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        response = {"id": "resp_quiet", "object": "response", "created_at": 1, "status": "in_progress",
                    "model": body.get("model"), "output": [], "usage": None, "error": None,
                    "incomplete_details": None, "instructions": None, "metadata": {}, "parallel_tool_calls": True,
                    "tool_choice": "auto", "tools": [], "text": {"format": {"type": "text"}}}
        events = [("response.created", {"response": response}), ("response.in_progress", {"response": response})]
        for index, (kind, pieces) in enumerate(EMAIL_DELTAS if body.get("model") == "email-model" else DELTAS):
            events.append(("response.output_item.added", {"output_index": index, "item": {"id": f"item_{index}"}}))
            events += [(kind, {"item_id": f"item_{index}", "output_index": index, "content_index": 0,
                               "delta": piece}) for piece in pieces]
        events.append(("response.completed", {"response": {**response, "status": "completed"}}))
        answer = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await answer.prepare(request)
        for number, (kind, fields) in enumerate(events):
            data = json.dumps({"type": kind, "sequence_number": number, **fields})
            await answer.write(f"event: {kind}\ndata: {data}\n\n".encode())
        await answer.write_eof()
        return answer


@pytest.fixture(scope="module")
def tokens() -> TokenCounter:
    """The gateway's counter, as it counts an answer's text (its default encoding)."""
    counter = TokenCounter()
    assert counter.load(), "the tiktoken encoding must be in TIKTOKEN_CACHE_DIR for exact counts"
    return counter


def _policy(mock: MockUpstream, quiet: QuietResponses, budget: bool) -> str:
    """The policy; `budget`: a budget on the key, and an alias whose own budget cuts its stream (accounting on)."""
    key_budget = ", budget: {usd: 1000}" if budget else ""
    accounting = "accounting: {default_max_tokens: 2}" if budget else ""
    budget_cut = (f"budget-cut: {{targets: [{{provider: mute, model: fault-slow-stream-20, price: {PRICE}}}], "
                  "budget: {usd: 0.006}}") if budget else ""
    return textwrap.dedent(f"""\
        version: 1
        server: {{host: 127.0.0.1, admin_token_env: ADMIN_TOK, access_log: true}}
        auth: keys
        keys:
          - {{name: main, tenant: acme, hash: "{hash_key(KEY)}"{key_budget}}}
        {accounting}
        routing: {{breaker: {{enabled: false}}}}
        providers:
          mute: {{kind: openai, base_url: {mock.base_url}, api_key_env: MOCK_UPSTREAM_KEY, stream_usage: false}}
          scripted: {{kind: openai, base_url: http://127.0.0.1:{quiet.port}/v1, api_key_env: MOCK_UPSTREAM_KEY,
                      stream_usage: false}}
          flipped: {{kind: openai, base_url: {mock.base_url}, api_key_env: MOCK_UPSTREAM_KEY}}
        models:
          finished: {{targets: [{{provider: scripted, model: quiet-model, price: {PRICE}}}]}}
          upstream-cut: {{targets: [{{provider: mute, model: fault-end-after-5, price: {PRICE}}}]}}
          chat-quiet: {{targets: [{{provider: mute, model: plain-model, price: {PRICE}}}]}}
          flip-chat: {{targets: [{{provider: flipped, model: fault-no-usage, price: {PRICE}}}]}}
          flipped-cut: {{targets: [{{provider: flipped, model: fault-end-after-4, price: {PRICE}}}]}}
          blocked: {{targets: [{{provider: scripted, model: email-model, price: {PRICE}}}]}}
          {budget_cut}
        guards:
          models:
            blocked: {{pii: {{kind: pii, places: [output], action: block, entities: {{EMAIL_ADDRESS: {{}}}}}}}}
        """)


@pytest.fixture(scope="module")
def gw() -> Iterator[RunningGateway]:
    """Accounting on (a budget on the key): the bill (`StreamBill`) counts the text."""
    with MockUpstream(UPSTREAM_KEY) as mock, QuietResponses() as quiet:
        running = RunningGateway(_policy(mock, quiet, budget=True),
                                 {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "ADMIN_TOK": ADMIN}).start()
        yield running
        running.stop()


@pytest.fixture(scope="module")
def plain_gw() -> Iterator[RunningGateway]:
    """No accounting at all: telemetry's `CountTokens` counts the text, for the access log and the metrics."""
    with MockUpstream(UPSTREAM_KEY) as mock, QuietResponses() as quiet:
        running = RunningGateway(_policy(mock, quiet, budget=False),
                                 {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "ADMIN_TOK": ADMIN}).start()
        yield running
        running.stop()


def _client(gw: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=KEY, max_retries=0, timeout=30)


def _received(gw: RunningGateway, alias: str) -> tuple[str, str | None]:
    """The text of every `*.delta` event the client got, and the error that ended the stream (None: it finished)."""
    parts: list[str] = []
    stream = _client(gw).responses.create(model=alias, input="hi", stream=True)
    try:
        for event in stream:
            delta = getattr(event, "delta", None)
            if event.type.endswith(".delta") and isinstance(delta, str):
                parts.append(delta)
    except openai.APIError as exc:  # the Responses API's `error` event: the stream ended early
        return "".join(parts), exc.message
    finally:
        stream.close()
    return "".join(parts), None


def _row(gw: RunningGateway, alias: str) -> dict[str, Any]:
    return usage_row(gw.url, ADMIN, alias)


def _billed(gw: RunningGateway, caplog: pytest.LogCaptureFixture, alias: str, completion: int) -> None:
    """The ledger and the access log: `completion` tokens (estimated), at their price."""
    assert completion > 0
    row = _row(gw, alias)
    assert row["completion_tokens"] == completion, row
    assert row["cost_usd"] == pytest.approx(completion * TOKEN_USD, abs=2e-6), row
    line = access_line(caplog, alias)
    assert (line["completion_tokens"], line["tokens_estimated"]) == (completion, True), line


def test_a_finished_responses_stream_without_usage_is_billed_the_tokens_of_its_text(
    gw: RunningGateway, caplog: pytest.LogCaptureFixture, tokens: TokenCounter,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    text, error = _received(gw, "finished")
    assert error is None
    assert text == "".join(piece for _, pieces in DELTAS for piece in pieces)  # every kind of delta reached it
    _billed(gw, caplog, "finished", tokens.count(text))  # was 0


def test_a_responses_stream_its_upstream_cut_is_billed_the_tokens_it_sent(
    gw: RunningGateway, caplog: pytest.LogCaptureFixture, tokens: TokenCounter,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    text, error = _received(gw, "upstream-cut")  # the body ends after 5 deltas, before `response.completed`
    assert error is not None and "ended the stream before the response completed" in error, error
    assert text == " ".join(MockUpstream.REPLY_WORDS[:5])
    _billed(gw, caplog, "upstream-cut", tokens.count(text))  # was 0


def test_a_responses_stream_a_budget_cut_is_billed_the_tokens_of_what_it_sent(
    gw: RunningGateway, caplog: pytest.LogCaptureFixture, tokens: TokenCounter,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    text, error = _received(gw, "budget-cut")  # 20 deltas; the alias's budget holds 6 tokens
    assert error is not None and "budget" in error, error
    assert 0 < len(text) < len(" ".join(MockUpstream.REPLY_WORDS))
    _billed(gw, caplog, "budget-cut", tokens.count(text))  # was 0


def test_a_provider_switched_to_counting_text_bills_a_responses_stream_its_text(
    gw: RunningGateway, caplog: pytest.LogCaptureFixture, tokens: TokenCounter,
) -> None:
    """A provider that should report usage and did not (a chat stream without it) has its later streams counted
    from their text (`OpenAIStream`): a Responses stream among them, too."""
    caplog.set_level(logging.INFO, logger="gateway.access")
    chat = _client(gw).chat.completions.create(model="flip-chat", messages=[{"role": "user", "content": "hi"}],
                                               stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chat if chunk.choices)
    text, error = _received(gw, "flipped-cut")
    assert error is not None and text == " ".join(MockUpstream.REPLY_WORDS[:4]), (text, error)
    _billed(gw, caplog, "flipped-cut", tokens.count(text))  # was 0


def test_a_responses_stream_whose_text_a_guard_held_back_is_billed_what_its_upstream_sent(
    gw: RunningGateway, caplog: pytest.LogCaptureFixture,
) -> None:
    """The client got no text (the guard ended the answer at the address): the answer is billed by its length, the
    upstream's deltas the gateway read (`ResponsesText.tokens`), not 0."""
    caplog.set_level(logging.INFO, logger="gateway.access")
    text, _ = _received(gw, "blocked")
    assert text == ""
    row = _row(gw, "blocked")
    assert 0 < row["completion_tokens"] <= len(EMAIL_DELTAS[0][1]), row  # was 0
    line = access_line(caplog, "blocked")
    assert (line["completion_tokens"], line["tokens_estimated"]) == (row["completion_tokens"], True), line


def test_a_chat_stream_counted_from_its_text_is_billed_its_content_as_before(
    gw: RunningGateway, caplog: pytest.LogCaptureFixture, tokens: TokenCounter,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    chunks = _client(gw).chat.completions.create(model="chat-quiet", messages=[{"role": "user", "content": "hi"}],
                                                 stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == " ".join(MockUpstream.REPLY_WORDS)
    _billed(gw, caplog, "chat-quiet", tokens.count(text))


def test_without_accounting_a_responses_stream_is_logged_and_counted_with_the_tokens_of_its_text(
    plain_gw: RunningGateway, caplog: pytest.LogCaptureFixture, tokens: TokenCounter,
) -> None:
    """No bill: telemetry's own count (`CountTokens`) is what the access log and the metrics read."""
    caplog.set_level(logging.INFO, logger="gateway.access")
    for alias in ("finished", "upstream-cut"):
        text, _ = _received(plain_gw, alias)
        completion = tokens.count(text)
        assert completion > 0
        line = access_line(caplog, alias)
        assert (line["completion_tokens"], line["tokens_estimated"]) == (completion, True), line
        metric = f'gateway_tokens_total{{kind="completion",model="{alias}"}}'
        assert [float(row.rsplit(" ", 1)[1]) for row in plain_gw.metrics().splitlines()
                if row.startswith(metric)] == [completion]


def _event(kind: str, **fields: Any) -> Chunk:
    """An upstream's event as `ResponsesEvents` makes it (`Chunk.content`: whether it is a `*.delta`)."""
    return Chunk(json.dumps({"type": kind, **fields}).encode(), None, None, kind.endswith(".delta"))


@pytest.mark.parametrize(("events", "chunks", "text", "untexted"), [
    # the text of every content event; lifecycle events, the upstream's or a stage's own (`Chunk.of`: content by
    # default), add nothing
    ([_event("response.created", response={"output": [{"content": [{"text": "not this"}]}]}),
      _event("response.output_text.delta", delta="Hello"), _event("response.refusal.delta", delta=" no"),
      Chunk.of({"type": "response.output_text.done", "text": "Hello"})], 2, "Hello no", 0),
    # audio's base64 bytes are no text: a token an event, as the stream's length counts them
    ([_event("response.output_audio.delta", delta="UklGRiQAAABXQVZFZm10IBAAAAABAAEA"),
      _event("response.output_audio_transcript.delta", delta="Hi")], 2, "Hi", 1),
    # a delta that is no text counts a token
    ([_event("response.output_text.delta", delta={"text": "odd"})], 1, "", 1),
])
def test_a_responses_text_is_its_content_events_texts_and_a_token_for_each_without_text(
    events: list[Chunk], chunks: int, text: str, untexted: int, tokens: TokenCounter,
) -> None:
    collected, ctx = _collected(events, chunks)
    assert collected.text() == text
    assert collected.tokens(ctx, tokens.count(text)) == tokens.count(text) + untexted


def test_a_responses_text_of_no_token_from_content_events_is_billed_their_count() -> None:
    """Every delta empty (or held back from the client): the stream's length (`ctx.chunks`), not 0; a stream with no
    content event at all, 0."""
    collected, ctx = _collected([_event("response.output_text.delta", delta="")] * 2, 2)
    assert (collected.text(), collected.tokens(ctx, 0)) == ("", 2)
    collected, ctx = _collected([_event("response.created"), _event("response.completed")], 0)
    assert collected.tokens(ctx, 0) == 0


def _collected(events: list[Chunk], chunks: int) -> tuple[ResponsesText, Any]:
    """`events` through a `ResponsesText`, and a request whose length is `chunks` (all `tokens` reads of it)."""
    collected = ResponsesText()
    ctx = SimpleNamespace(chunks=chunks)
    asyncio.run(collected.on_events(ctx, list(events)))  # type: ignore[arg-type]
    return collected, ctx
