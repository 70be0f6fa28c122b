"""An answer counted from its text counts its reasoning and its refusal, never 0 for what its upstream generated.

A provider's answers are counted from their text when it reports no usage (`stream_usage: false`, as a vLLM server
is configured; a complete answer without `usage`). That count read only a chat message's `content` and tool call
arguments: a reasoning model's `reasoning_content` (`reasoning`, as OpenRouter, Groq and Ollama name it) and a
`refusal` were left out, so a reasoning answer was under-billed, and a refusal, or a stream cut while the model
reasoned, was billed 0 completion tokens; a chat stream whose text an output guard held back was billed 0 too. A
complete Responses answer's refusal parts, reasoning summaries and custom tool inputs were left out the same way.

Through a real gateway (a scripted OpenAI-compatible server that reports no usage, the openai SDK as the client, a
budget on the key so that the bill is read back from `/admin/usage` and the access log), each such answer is billed
the tokens of the text the gateway counts (`TokenCounter.count`), the reasoning written once though vLLM sends it
under both names; and a stream whose upstream reports its usage is billed exactly that usage, as before.
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
from gateway.guards.responses_answer import ITEM_TEXTS
from gateway.guards.texts import BESIDE_CONTENT
from gateway.guards.window import REASONING as REASONING_LANE
from gateway.schemas.events import Chunk
from gateway.telemetry.tokens import TokenCounter
from gateway.telemetry.usage import OWN_TEXT_FIELDS, REASONING_FIELDS, StreamText, answer_text
from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.billing import access_line, usage_row
from tests.support.mock_upstream import MockUpstream
from tests.support.threaded_app import ThreadedApp

KEY = "gw-text-counted-reasoning-key-0000000000000"
ADMIN = "admin-text-counted-reasoning"
PRICE = "{input_per_mtok: 0, output_per_mtok: 1000}"  # $0.001 a completion token, the prompt free
TOKEN_USD = 0.001

REASONING = ["The user ", "asks for ", "a greeting; ", "I should ", "answer ", "warmly ", "and briefly."]
CONTENT = ["Hello there, ", "it is good ", "to hear from you!"]
REFUSAL = ["I'm sorry, ", "but I cannot ", "help with ", "that request."]
CUT_AFTER = 4  # the cut stream's reasoning pieces before its body ends
EMAIL = ["john.doe@example.com", " is where ", "to write ", "to me."]  # (nothing a guard could pass first)
SUMMARY = "The user greets me; a short greeting back is enough."
TOOL_INPUT = "print('hello world')"
LONG_REASONING = [f"step {number} of the plan, " for number in range(40)]


def _chat_pieces(model: str) -> list[dict[str, Any]]:
    """The deltas of the scripted server's answer to `model` (a complete answer joins them)."""
    if model in ("reasoning-model", "reasoning-cut"):  # vLLM: the reasoning under both names
        return ([{"reasoning_content": piece, "reasoning": piece, "content": None} for piece in REASONING]
                + [{"content": piece} for piece in CONTENT])
    if model == "named-reasoning":  # OpenRouter, Groq, Ollama: `reasoning` alone
        return [{"reasoning": piece} for piece in REASONING] + [{"content": piece} for piece in CONTENT]
    if model == "long-reasoning":
        return [{"reasoning_content": piece} for piece in LONG_REASONING] + [{"content": piece} for piece in CONTENT]
    if model == "refusal-model":
        return [{"content": None, "refusal": piece} for piece in REFUSAL]
    if model == "email-model":
        return [{"content": piece} for piece in EMAIL]
    raise AssertionError(model)


class QuietServer(ThreadedApp):
    """An OpenAI-compatible server that reports no usage: chat answers (whole or streamed, `reasoning-cut`'s body
    ending during its reasoning, without a finish reason or `[DONE]`) and complete Responses answers."""

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/responses", self._responses)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        model = body["model"]
        pieces = _chat_pieces(model)
        base = {"id": "chatcmpl-quiet", "created": 1, "model": model}
        if not body.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None}
            for piece in pieces:
                for field, text in piece.items():
                    if text is not None:
                        message[field] = (message.get(field) or "") + text
            return web.json_response({**base, "object": "chat.completion", "choices": [
                {"index": 0, "message": message, "finish_reason": "stop"}]})
        answer = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await answer.prepare(request)

        async def send(delta: dict[str, Any], finish: str | None = None) -> None:
            chunk = {**base, "object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            await answer.write(f"data: {json.dumps(chunk)}\n\n".encode())

        await send({"role": "assistant", "content": ""})
        for piece in pieces[:CUT_AFTER] if model == "reasoning-cut" else pieces:
            await send(piece)
        if model != "reasoning-cut":
            await send({}, "stop")
            await answer.write(b"data: [DONE]\n\n")
        await answer.write_eof()
        return answer

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        items = {
            "refusal-model": [{"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
                               "content": [{"type": "refusal", "refusal": "".join(REFUSAL)}]}],
            "summary-model": [{"id": "rs_1", "type": "reasoning", "summary": [{"type": "summary_text",
                                                                             "text": SUMMARY}]},
                              {"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
                               "content": [{"type": "output_text", "text": "".join(CONTENT), "annotations": []}]}],
            "custom-tool-model": [{"id": "ctc_1", "type": "custom_tool_call", "call_id": "call_1", "name": "run",
                                   "input": TOOL_INPUT, "status": "completed"}],
        }[body["model"]]
        return web.json_response({"id": "resp_quiet", "object": "response", "created_at": 1, "status": "completed",
                                  "model": body["model"], "output": items, "usage": None, "error": None,
                                  "incomplete_details": None, "instructions": None, "metadata": {},
                                  "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
                                  "text": {"format": {"type": "text"}}})


@pytest.fixture(scope="module")
def tokens() -> TokenCounter:
    """The gateway's counter, as it counts an answer's text (its default encoding)."""
    counter = TokenCounter()
    assert counter.load(), "the tiktoken encoding must be in TIKTOKEN_CACHE_DIR for exact counts"
    return counter


def _policy(mock: MockUpstream, quiet: QuietServer) -> str:
    aliases = {alias: f"{{provider: quiet, model: {model}, price: {PRICE}}}" for alias, model in (
        ("reasoning", "reasoning-model"), ("reasoning-whole", "reasoning-model"), ("reasoning-cut", "reasoning-cut"),
        ("named-reasoning", "named-reasoning"), ("refusal", "refusal-model"), ("refusal-whole", "refusal-model"),
        ("blocked", "email-model"), ("long-reasoning", "long-reasoning"),
        ("responses-refusal", "refusal-model"), ("responses-summary", "summary-model"),
        ("responses-custom-tool", "custom-tool-model"))}
    models = "\n".join(f"  {alias}: {{targets: [{target}]}}" for alias, target in aliases.items())
    return textwrap.dedent(f"""\
        version: 1
        server: {{host: 127.0.0.1, admin_token_env: ADMIN_TOK, access_log: true}}
        auth: keys
        keys:
          - {{name: main, tenant: acme, hash: "{hash_key(KEY)}", budget: {{usd: 1000}}}}
        accounting: {{default_max_tokens: 2}}
        routing: {{breaker: {{enabled: false}}}}
        providers:
          quiet: {{kind: openai, base_url: http://127.0.0.1:{quiet.port}/v1, api_key_env: MOCK_UPSTREAM_KEY,
                   stream_usage: false}}
          reporting: {{kind: openai, base_url: {mock.base_url}, api_key_env: MOCK_UPSTREAM_KEY}}
        models:
          reported: {{targets: [{{provider: reporting, model: fault-echo-reasoning, price: {PRICE}}}]}}
          budget-cut: {{targets: [{{provider: quiet, model: long-reasoning, price: {PRICE}}}], budget: {{usd: 0.006}}}}
          {{models}}
        guards:
          models:
            blocked: {{pii: {{kind: pii, places: [output], action: block, entities: {{EMAIL_ADDRESS: {{}}}}}}}}
        """).replace("{models}", models.lstrip())


@pytest.fixture(scope="module")
def gw() -> Iterator[RunningGateway]:
    with MockUpstream(UPSTREAM_KEY) as mock, QuietServer() as quiet:
        running = RunningGateway(_policy(mock, quiet),
                                 {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "ADMIN_TOK": ADMIN}).start()
        yield running
        running.stop()


def _client(gw: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=KEY, max_retries=0, timeout=30)


def _streamed(gw: RunningGateway, alias: str) -> tuple[dict[str, str], str | None]:
    """The texts a client got of a chat stream, by field, and the error that ended it (None: it finished)."""
    texts: dict[str, str] = {}
    stream = _client(gw).chat.completions.create(model=alias, messages=[{"role": "user", "content": "hi"}],
                                                 stream=True)
    try:
        for chunk in stream:
            for choice in chunk.choices:
                fields = {**(choice.delta.model_extra or {}), **choice.delta.model_dump(exclude_none=True)}
                for field in ("content", "refusal", "reasoning_content", "reasoning"):
                    if isinstance(fields.get(field), str):
                        texts[field] = texts.get(field, "") + fields[field]
    except openai.APIError as exc:
        return texts, exc.message
    finally:
        stream.close()
    return texts, None


def _row(gw: RunningGateway, alias: str) -> dict[str, Any]:
    return usage_row(gw.url, ADMIN, alias)


def _billed(gw: RunningGateway, caplog: pytest.LogCaptureFixture, alias: str) -> int:
    """The completion tokens the alias's one request was billed, the access log's figure the same (estimated)."""
    row = _row(gw, alias)
    completion = int(row["completion_tokens"])
    assert row["cost_usd"] == pytest.approx(completion * TOKEN_USD, abs=2e-6), row
    line = access_line(caplog, alias)
    assert (line["completion_tokens"], line["tokens_estimated"]) == (completion, True), line
    return completion


@pytest.fixture(autouse=True)
def _access_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")


@pytest.mark.parametrize("alias", ["reasoning", "named-reasoning"])
def test_a_stream_of_reasoning_then_content_is_billed_both_once(
    gw: RunningGateway, caplog: pytest.LogCaptureFixture, tokens: TokenCounter, alias: str,
) -> None:
    """vLLM sends each reasoning piece as `reasoning_content` and as `reasoning`: it is counted once."""
    texts, error = _streamed(gw, alias)
    assert error is None
    assert (texts.get("reasoning_content", texts.get("reasoning")), texts["content"]) == (
        "".join(REASONING), "".join(CONTENT))  # the client got both
    expected = tokens.count("".join(REASONING + CONTENT))
    assert expected > tokens.count("".join(CONTENT)) > 0
    assert _billed(gw, caplog, alias) == expected  # was the content's alone


def test_a_stream_cut_while_its_model_reasoned_is_billed_the_reasoning_it_sent(
    gw: RunningGateway, caplog: pytest.LogCaptureFixture, tokens: TokenCounter,
) -> None:
    texts, error = _streamed(gw, "reasoning-cut")
    assert error is not None
    assert texts["reasoning_content"] == "".join(REASONING[:CUT_AFTER]) and not texts.get("content")
    expected = tokens.count("".join(REASONING[:CUT_AFTER]))
    assert expected > 0
    assert _billed(gw, caplog, "reasoning-cut") == expected  # was 0


def test_a_stream_a_budget_cut_while_its_model_reasoned_is_billed_the_reasoning_it_sent(
    gw: RunningGateway, caplog: pytest.LogCaptureFixture, tokens: TokenCounter,
) -> None:
    texts, error = _streamed(gw, "budget-cut")  # 43 chunks of reasoning and content; the budget holds 6 tokens
    assert error is not None and "budget" in error, error
    reasoning = texts["reasoning_content"]
    assert 0 < len(reasoning) < len("".join(LONG_REASONING)) and not texts.get("content")
    expected = tokens.count(reasoning)
    assert expected > 0
    assert _billed(gw, caplog, "budget-cut") == expected  # was 0


def test_a_streamed_refusal_is_billed_its_text(
    gw: RunningGateway, caplog: pytest.LogCaptureFixture, tokens: TokenCounter,
) -> None:
    texts, error = _streamed(gw, "refusal")
    assert error is None and texts.get("refusal") == "".join(REFUSAL) and not texts.get("content")
    expected = tokens.count("".join(REFUSAL))
    assert expected > 0
    assert _billed(gw, caplog, "refusal") == expected  # was 0


def test_a_complete_refusal_is_billed_its_text(
    gw: RunningGateway, caplog: pytest.LogCaptureFixture, tokens: TokenCounter,
) -> None:
    answer = _client(gw).chat.completions.create(model="refusal-whole", messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.refusal == "".join(REFUSAL) and answer.choices[0].message.content is None
    expected = tokens.count("".join(REFUSAL))
    assert expected > 0
    assert _billed(gw, caplog, "refusal-whole") == expected  # was 0


def test_a_complete_reasoning_answer_is_billed_its_reasoning_once_and_its_content(
    gw: RunningGateway, caplog: pytest.LogCaptureFixture, tokens: TokenCounter,
) -> None:
    answer = _client(gw).chat.completions.create(model="reasoning-whole",
                                                 messages=[{"role": "user", "content": "hi"}])
    message = answer.choices[0].message
    assert ((message.model_extra or {}).get("reasoning_content"), message.content) == (
        "".join(REASONING), "".join(CONTENT))
    expected = tokens.count("".join(REASONING + CONTENT))
    assert expected > tokens.count("".join(CONTENT)) > 0
    assert _billed(gw, caplog, "reasoning-whole") == expected  # was the content's alone


def test_a_chat_stream_whose_text_a_guard_held_back_is_billed_what_its_upstream_sent(
    gw: RunningGateway, caplog: pytest.LogCaptureFixture,
) -> None:
    """The client got no text (the guard ended the answer at the address): billed by the stream's length (its
    upstream's chunks), as a Responses stream is, not 0."""
    texts, _ = _streamed(gw, "blocked")
    assert texts.get("content") == ""  # its role chunk alone, which carries no text
    completion = _billed(gw, caplog, "blocked")
    assert 0 < completion <= len(EMAIL) + 1, completion  # (the upstream's finish chunk is a chunk too)


@pytest.mark.parametrize(("alias", "text"), [
    ("responses-refusal", "".join(REFUSAL)),
    ("responses-summary", SUMMARY + "".join(CONTENT)),
    ("responses-custom-tool", TOOL_INPUT),
])
def test_a_complete_responses_answer_is_billed_its_refusal_summary_and_tool_input(
    gw: RunningGateway, caplog: pytest.LogCaptureFixture, tokens: TokenCounter, alias: str, text: str,
) -> None:
    answer = _client(gw).responses.create(model=alias, input="hi")
    assert answer.output and answer.usage is None
    expected = tokens.count(text)
    assert expected > 0
    assert _billed(gw, caplog, alias) == expected  # the refusal's and the tool input's were 0


def test_a_reasoning_stream_whose_upstream_reports_usage_is_billed_that_usage(
    gw: RunningGateway, caplog: pytest.LogCaptureFixture,
) -> None:
    """The mock's usage: 5 prompt tokens, a completion token per echoed word and one for the answer."""
    words = "please think about this carefully"
    chunks = _client(gw).chat.completions.create(model="reported", messages=[{"role": "user", "content": words}],
                                                 stream=True, stream_options={"include_usage": True})
    usage = [chunk.usage for chunk in chunks if chunk.usage is not None]
    assert [(u.prompt_tokens, u.completion_tokens) for u in usage] == [(5, len(words.split()) + 1)]
    row = _row(gw, "reported")
    assert (row["prompt_tokens"], row["completion_tokens"]) == (5, len(words.split()) + 1), row
    assert row["cost_usd"] == pytest.approx((len(words.split()) + 1) * TOKEN_USD, abs=2e-6), row
    line = access_line(caplog, "reported")
    assert (line["completion_tokens"], line["tokens_estimated"]) == (len(words.split()) + 1, False), line


def test_the_count_reads_a_chat_message_where_the_guards_read_it() -> None:
    """The texts beside the content the guards check (`BESIDE_CONTENT`) are those counted: the reasoning's names
    as one text, the others each."""
    reasoning = {field for field, where in BESIDE_CONTENT.items() if where == REASONING_LANE}
    assert (set(REASONING_FIELDS), set(OWN_TEXT_FIELDS)) == (reasoning, set(BESIDE_CONTENT) - reasoning)


@pytest.mark.parametrize(("kind", "field", "what"), [
    (kind, field, what) for kind, texts in ITEM_TEXTS.items() for field, what in texts])
def test_the_count_reads_each_text_of_a_responses_answer_the_guards_read(
    kind: str, field: str | None, what: str,
) -> None:
    """Every text of a complete Responses answer the guards read (`ITEM_TEXTS`) is counted."""
    item: dict[str, Any] = {"id": "item_1", "type": kind}
    if field is None:
        item[what] = "the text"
    else:
        item[field] = [{"type": what, "refusal" if what == "refusal" else "text": "the text"}]
    assert answer_text(json.dumps({"object": "response", "output": [item]}).encode()) == "the text"


@pytest.mark.parametrize(("deltas", "chunks", "expected"), [
    # an empty answer (its role and finish chunks, no text): 0, as before
    ([{"role": "assistant", "content": ""}, {}], 2, 0),
    # an output guard held all the text back: the upstream's chunks, less those without text the client got
    ([{"role": "assistant", "content": ""}], 6, 5),
])
def test_a_chat_text_of_no_token_is_billed_the_chunks_that_carried_text(
    deltas: list[dict[str, Any]], chunks: int, expected: int,
) -> None:
    collected = StreamText()
    ctx = SimpleNamespace(chunks=chunks)
    events = [Chunk.of({"choices": [{"index": 0, "delta": delta}]}) for delta in deltas]
    asyncio.run(collected.on_events(ctx, events))  # type: ignore[arg-type]
    assert (collected.text(), collected.tokens(ctx, 0)) == ("", expected)  # type: ignore[arg-type]
