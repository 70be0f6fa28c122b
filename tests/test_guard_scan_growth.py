"""What the stream scanner costs as an answer grows (`gateway/guards/window.py`), counted in the characters handed
to the guards (a counting guard beside the real ones), never timed: an entity that keeps growing past
`max_hold_chars` is rewritten there as one entity and the rest of its run dropped, not held and rescanned whole
at every step; a stream of figures, held from its first digit at the window's far end, is rescanned every
`step_chars`, not at every chunk; and however an answer is chunked, what leaves is what a check of the whole
text gives."""

from __future__ import annotations

import asyncio
import json
import random
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec
import pytest
from aiohttp import web

from gateway.auth.keys import hash_key
from gateway.guards.base import Finding, Where
from gateway.guards.runtime import GuardRuntime
from gateway.guards.session import GuardSession
from gateway.guards.stream import StreamGuard
from gateway.guards.window import ANSWER
from gateway.policy.guard_schema import GuardsSpec, StreamScanSpec
from gateway.schemas.endpoints import Endpoint
from gateway.schemas.events import DONE, Chunk
from gateway.telemetry.metrics import Metrics
from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway
from tests.support.probe import healthz_probe
from tests.support.threaded_app import ThreadedApp

SPEC = StreamScanSpec()  # window 48, step 24, max_hold 4,096
BASE = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m"}
KEY = "AKIAIOSFODNN7EXAMPLQ"
OUTPUT = {"places": ["output"]}


class Counting:
    """A guard that finds nothing and holds nothing, and counts what the scanner asks of it: the characters of
    every scan (each guard of a request reads the same text) and every look for holds."""

    name = kind = "counting"
    mode = "enforce"
    fail = "closed"
    timeout_s = 2.0
    places = frozenset({"output"})

    def __init__(self) -> None:
        self.scanned = 0
        self.looks = 0

    def detect_now(self, text: str, where: Where) -> list[Finding]:
        self.scanned += len(text)
        return []

    async def detect(self, text: str, where: Where) -> list[Finding]:
        return self.detect_now(text, where)

    def open_from(self, text: str, start: int) -> int:
        self.looks += 1
        return len(text)

    def hold_from(self, text: str) -> None:
        return None

    def context_reach(self) -> int:
        return 0


def runtime_of(guards: dict[str, Any]) -> GuardRuntime:
    built = GuardRuntime(msgspec.convert({"global": guards}, GuardsSpec), Metrics(), len)
    asyncio.run(built.start())
    return built


@pytest.fixture(scope="module")
def runtime() -> Iterator[GuardRuntime]:
    built = runtime_of({"pii": {"kind": "pii", **OUTPUT},
                        "secrets": {"kind": "secrets", "action": "redact", **OUTPUT}})
    yield built
    asyncio.run(built.aclose())


@dataclass
class Streamed:
    sent: list[str]  # per choice
    blocked: bool
    counter: Counting
    pieces: list[str] = field(default_factory=list)  # what each upstream read released (choice 0)
    most_held: int = 0  # the most characters a lane held after a read

    @property
    def text(self) -> str:
        return self.sent[0]


def delta(piece: str, tool: bool, first: bool) -> dict[str, Any]:
    if not tool:
        return {"content": piece}
    call: dict[str, Any] = {"index": 0, "function": {"arguments": piece}}
    if first:
        call.update(id="call_1", type="function", function={"name": "f", "arguments": piece})
    return {"tool_calls": [call]}


def released(events: list[Any], choices: int) -> list[str]:
    out = [""] * choices
    for event in events:
        for choice in event.data()["choices"] if isinstance(event, Chunk) else []:
            d = choice["delta"]
            out[choice["index"]] += (d.get("content") or "") + "".join(
                (call.get("function") or {}).get("arguments") or "" for call in d.get("tool_calls") or [])
    return out


def stream(runtime: GuardRuntime, pieces: list[str], *, tool: bool = False, batches: list[int] | None = None,
           choices: int = 1) -> Streamed:
    """`pieces` streamed through the runtime's output guards and a counting guard, `batches` chunks per upstream
    read (one each by default), in `choices` choices; the upstream's end in one more read."""
    counter = Counting()
    stage = StreamGuard(runtime, (*runtime.resolve("t", "a").output, counter), GuardSession(runtime.metrics), SPEC,
                        Endpoint.CHAT, "m")
    chunks = [Chunk.of({**BASE, "choices": [{"index": i, "delta": delta(p, tool, n == 0), "finish_reason": None}]})
              for n, p in enumerate(pieces) for i in range(choices)]
    ends = [Chunk.of({**BASE, "choices": [{"index": i, "delta": {}, "finish_reason": "stop"}]}) for i in range(choices)]
    result = Streamed([""] * choices, False, counter)

    async def run() -> None:
        at = 0
        for size in batches or [1] * len(chunks):
            out = released(await stage.on_events(None, chunks[at:at + size]), choices)  # type: ignore[arg-type]
            at += size
            result.sent = [a + b for a, b in zip(result.sent, out, strict=True)]
            result.pieces.append(out[0])
            result.most_held = max([result.most_held, *(len(lane.pending) for lane in stage.window.lanes.values())])
            if stage.blocked:
                result.blocked = True
                return
        out = released(await stage.on_events(None, [*chunks[at:], *ends, DONE]), choices)  # type: ignore[arg-type]
        result.sent = [a + b for a, b in zip(result.sent, out, strict=True)]
        result.pieces.append(out[0])
        result.blocked = stage.blocked

    asyncio.run(run())
    return result


def split(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


# -- an entity that keeps growing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1_000, 2_000, 4_000, 8_000])
def test_an_address_that_keeps_growing_is_scanned_about_once(runtime: GuardRuntime, count: int) -> None:
    text = "Mail jane@x" + ".com" * count  # 4 to 32K characters, every prefix ending in `.com` an address
    out = stream(runtime, split(text, 4))
    assert out.text == "Mail <EMAIL_ADDRESS>"
    # Held and rescanned whole at every step past max_hold_chars, it cost 740 characters per character at 8K.
    assert out.counter.scanned < 2 * len(text), out.counter.scanned / len(text)
    assert out.most_held <= SPEC.max_hold_chars + 2 * SPEC.window_chars + SPEC.step_chars
    if len(text) > 2 * SPEC.max_hold_chars:  # the address leaves at the bound, not when the answer ends
        at = next(i for i, piece in enumerate(out.pieces) if "<EMAIL_ADDRESS>" in piece)
        assert at * 4 < SPEC.max_hold_chars + 256, at


def test_what_follows_a_split_entity_is_scanned_as_usual(runtime: GuardRuntime) -> None:
    run = "sk-" + "Zq8rT2vL" * 1_500  # a key of 12K characters: found at any length
    text = f"Here: {run} and {KEY} then\n{run},{KEY}\tsaid {KEY}."
    for size in (1, 4, 7):
        out = stream(runtime, split(text, size))
        # The rest of a run split at the bound is dropped up to its white space, whatever is glued to it.
        assert out.text == ("Here: <OPENAI_API_KEY> and <AWS_ACCESS_KEY> then\n<OPENAI_API_KEY>\tsaid "
                            "<AWS_ACCESS_KEY>."), (size, out.text[:200])
        assert out.counter.scanned < 3 * len(text), (size, out.counter.scanned / len(text))


def test_a_split_entity_keeps_tool_arguments_json(runtime: GuardRuntime) -> None:
    run = "sk-" + "Zq8rT2vL" * 700
    for after in ('\\nnext', '\\" more', '\\\\ more', '\\u00e9x y', '", "more": "x'):
        arguments = f'{{"key": "{run}{after}", "n": 1}}'
        for size in (3, 4, 7):
            out = stream(runtime, split(arguments, size), tool=True)
            value = json.loads(out.text)  # still JSON: the run ends at an escape's start, never inside it
            assert value["key"].startswith("<OPENAI_API_KEY>") and "Zq8" not in out.text, (after, size, out.text)
            assert value["n"] == 1
            assert out.counter.scanned < 3 * len(arguments), (after, size, out.counter.scanned / len(arguments))


@pytest.mark.parametrize(("guards", "sent", "blocked"), [
    ({"secrets": {"kind": "secrets", **OUTPUT}}, "Here: ", True),  # the default action blocks, at the bound
    ({"secrets": {"kind": "secrets", "action": "mask", **OUTPUT}}, "Here: **** ok", False),  # no middle characters
    ({"secrets": {"kind": "secrets", "mode": "shadow", **OUTPUT}}, None, False),  # recorded: the text leaves as is
])
def test_a_split_entity_is_handled_by_its_action(guards: dict[str, Any], sent: str | None, blocked: bool) -> None:
    runtime = runtime_of(guards)
    text = "Here: sk-" + "Zq8rT2vL" * 1_000 + " ok"
    try:
        out = stream(runtime, split(text, 4))
    finally:
        asyncio.run(runtime.aclose())
    assert (out.text, out.blocked) == (sent or text, blocked)
    assert out.counter.scanned < 3 * len(text)


def test_a_finding_with_white_space_in_it_past_the_bound_blocks() -> None:
    # Split at the bound, its rest could go on past the next white space: it cannot be dropped up to there.
    runtime = runtime_of({"deny": {"kind": "denylist", "patterns": [r"secret(?: \w+)+"], "action": "redact",
                                   **OUTPUT}})
    try:
        out = stream(runtime, split("the secret" + " word" * 2_000 + ".", 5))
    finally:
        asyncio.run(runtime.aclose())
    assert out.blocked and out.text == "the "
    # Rescanned every `step_chars` up to the bound (it may end at any word), not at every chunk; then no more.
    assert out.counter.scanned < SPEC.max_hold_chars ** 2 / SPEC.step_chars, out.counter.scanned


# -- figures ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("figure", ["1.5 ", "1 ", "12,5; "])
def test_a_stream_of_figures_is_scanned_no_more_than_prose(runtime: GuardRuntime, figure: str) -> None:
    prose = stream(runtime, ["word "] * 1_000)
    figures = stream(runtime, [figure] * 1_000)
    assert (prose.text, figures.text) == ("word " * 1_000, figure * 1_000)
    # A scan at every chunk of the window held from its first digit: 37 characters per character for "1.5 ".
    per_figure = figures.counter.scanned / len(figures.text)
    assert per_figure <= prose.counter.scanned / len(prose.text) and per_figure < 8, per_figure
    # The holds are looked for once per `step_chars` of figures (prose: at every chunk, and leaves at once).
    assert figures.counter.looks < 2 * len(figures.text) / SPEC.step_chars, figures.counter.looks
    assert prose.pieces[1:4] == ["word "] * 3


# -- whatever the chunking, the whole text's result ------------------------------------------------------------------

VALUES = ["jane.doe@mailbox.org", "4111 1111 1111 1111", "+44 20 7946 0958", KEY, "(415) 555-2671",
          "GB82 WEST 1234 5698 7654 32", "078-05-1120", "sk-proj-abcdefghijklmnopqrstuvwxyz012345",
          "ghp_abcdefghijklmnopqrstuvwxyz0123456789", "4111-1111-1111-1111",
          "\uff2aane\uff20mailbox.org"]  # (full-width letters)
FIGURES = ["1.5 2.25 3 ", "12, 13, 14, 15, 16, 17, 18", "3.14159 ", "2024-01-05 ", "$1,299.00 ", "0.5 0.25 0.125",
           "100 200 300 400 500 600 700 800 ", "(1) 2 3. "]
FILLERS = ["Sure, here it is: ", "联系我", " and then ", "\n", "Contact ", ", ", "\"", " ", "x", "1 "]


def _answer(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(1, 4)):
        parts += [rng.choice(FILLERS), rng.choice(VALUES + FIGURES), rng.choice(FIGURES + FILLERS)]
    return "".join(parts) + " thanks, bye now."


def _chunks(rng: random.Random, text: str) -> list[str]:
    if rng.random() < 0.4:
        return split(text, rng.randint(1, 9))
    cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, len(text) // 2)))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def test_any_chunking_sends_what_a_whole_text_check_sends() -> None:
    runtime = runtime_of({"pii": {"kind": "pii", **OUTPUT}, "secrets": {"kind": "secrets", "action": "redact",
                                                                       **OUTPUT}})
    guards = runtime.resolve("t", "a").output
    try:
        for seed in range(400):
            rng = random.Random(seed)
            text = _answer(rng)
            whole = asyncio.run(runtime.check(guards, text, ANSWER, GuardSession(runtime.metrics))).text
            pieces = _chunks(rng, text)
            choices = 2 if rng.random() < 0.2 else 1
            batches = None
            if rng.random() < 0.5:  # several chunks in one upstream read
                left, batches = len(pieces) * choices, []
                while left > 0:
                    batches.append(min(left, rng.randint(1, 6)))
                    left -= batches[-1]
            out = stream(runtime, pieces, batches=batches, choices=choices)
            assert out.sent == [whole] * choices, (seed, text, pieces)
    finally:
        asyncio.run(runtime.aclose())


# -- a real gateway --------------------------------------------------------------------------------------------------


class Held(ThreadedApp):
    """Streams the last user message back 4 characters per write, then waits (up to 15 s) for the test to see the
    redacted address before it writes the last words: an address that keeps growing, held to the stream's end,
    would never reach the client while the upstream waits."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = threading.Event()
        self.waited_out = False

    def routes(self, app: web.Application) -> None:
        async def handle(request: web.Request) -> web.StreamResponse:
            text = (await request.json())["messages"][-1]["content"]
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)

            async def event(delta: dict[str, Any], finish: str | None = None) -> None:
                chunk = {**BASE, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
                await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")

            await event({"role": "assistant", "content": ""})
            for piece in split(text, 4):
                await event({"content": piece})
            waited = await asyncio.get_running_loop().run_in_executor(None, self.seen.wait, 15)
            self.waited_out = not waited
            await event({"content": " bye"})
            await event({}, "stop")
            await resp.write(b"data: [DONE]\n\n")
            return resp

        app.router.add_post("/v1/chat/completions", handle)


def test_a_growing_address_reaches_the_client_at_the_bound() -> None:
    with Held() as held:
        running = RunningGateway(textwrap.dedent(f"""\
            version: 1
            auth: keys
            keys:
              - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
            providers:
              held: {{kind: openai, base_url: "http://127.0.0.1:{held.port}/v1", api_key_env: MOCK_UPSTREAM_KEY}}
            models:
              held: {{provider: held, model: m}}
            guards:
              global:
                pii: {{kind: pii, places: [output]}}
            """), {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()
        content = ""
        try:
            with healthz_probe(running.url) as slowest:
                body = {"model": "held", "stream": True,
                        "messages": [{"role": "user", "content": "Mail jane@x" + ".com" * 8_000}]}
                with httpx.stream("POST", running.base_url + "/chat/completions", json=body, timeout=60,
                                  headers={"Authorization": f"Bearer {FULL_KEY}"}) as response:
                    assert response.status_code == 200
                    for line in response.iter_lines():
                        data = line.removeprefix("data: ")
                        if line.startswith("data: {"):
                            content += "".join(c["delta"].get("content") or "" for c in json.loads(data)["choices"])
                        if "<EMAIL_ADDRESS>" in content:
                            held.seen.set()
        finally:
            held.seen.set()
            running.stop()
    assert content == "Mail <EMAIL_ADDRESS> bye"
    assert not held.waited_out  # the address left while the upstream still waited for it
    assert slowest[0] < 2.0, slowest[0]
