"""An upstream event stream's lines may end in CRLF, LF or a lone CR (WHATWG HTML, "Interpreting an event stream"):
every event a read completes goes on to the client with that read, whichever ending it uses.

A CR that ends a read ends its line there; an LF that starts the next read is then the second half of a CRLF and
is skipped. The decoder used to keep such a CR until the next read (to see whether an LF followed), so on an
upstream that ends lines with lone CRs the last event of every read waited for the upstream's next write.

End to end: an upstream that writes each event on its own and then holds the stream until the client received it
(or `HOLD_S` passed): a gateway that holds an event back makes the upstream wait its hold out, and the test fails.
"""

from __future__ import annotations

import json
import textwrap
import threading
from collections.abc import Iterator

import openai
import pytest
from aiohttp import web

from gateway.auth.keys import hash_key
from gateway.upstream.sse import SSEDecoder
from tests.conftest import FULL_KEY, RunningGateway
from tests.support.threaded_app import ThreadedApp

HOLD_S = 2.0  # how long the upstream waits for the client to see an event before it writes on anyway
HOLD = None  # in a script: wait until the client saw one more content chunk


class _ScriptedUpstream(ThreadedApp):
    """An OpenAI-compatible upstream in a thread of its own that answers every chat request with `script`: byte
    strings, each written (a write of its own), and `HOLD`s, where it waits until the client saw one more content
    chunk (`saw`). `late` counts the holds it had to wait out: events the gateway did not forward in time."""

    def __init__(self) -> None:
        super().__init__()
        self.script: list[bytes | None] = []
        self.late = 0
        self._seen = 0
        self._cond = threading.Condition()

    def start(self, script: list[bytes | None]) -> None:
        with self._cond:
            self.script, self.late, self._seen = script, 0, 0

    def saw(self) -> None:
        with self._cond:
            self._seen += 1
            self._cond.notify_all()

    def _wait_seen(self, count: int) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._seen >= count, HOLD_S)

    def routes(self, app: web.Application) -> None:
        async def handle(request: web.Request) -> web.StreamResponse:
            await request.read()
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            holds = 0
            for part in self.script:
                if part is None:
                    holds += 1
                    if not await self.loop.run_in_executor(None, self._wait_seen, holds):
                        self.late += 1
                else:
                    await response.write(part)
            await response.write_eof()
            return response

        app.router.add_post("/v1/chat/completions", handle)


@pytest.fixture(scope="module")
def scripted() -> Iterator[_ScriptedUpstream]:
    with _ScriptedUpstream() as upstream:
        yield upstream


@pytest.fixture(scope="module")
def served(scripted: _ScriptedUpstream) -> Iterator[RunningGateway]:
    text = textwrap.dedent(f"""\
        version: 1
        server: {{host: 127.0.0.1}}
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
        providers:
          scripted:
            kind: openai
            base_url: http://127.0.0.1:{scripted.port}/v1
            api_key_env: MOCK_UPSTREAM_KEY
            timeouts: {{connect_s: 2, first_byte_s: 5, idle_s: 10, total_s: 30}}
        models:
          plain: {{provider: scripted, model: m}}
        """)
    running = RunningGateway(text, {"MOCK_UPSTREAM_KEY": "sk"}).start()
    yield running
    running.stop()


def _data(content: str | None, finish: str | None = None) -> bytes:
    delta = {} if content is None else {"content": content}
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode()


_END = _data(None, "stop")
_DONE = b"data: [DONE]"

# Each script: content chunks A, B, C..., each followed by a hold (the client must have it before the upstream
# writes on), then the finish chunk and [DONE].
LF: list[bytes | None] = [_data("A") + b"\n\n", HOLD, _data("B") + b"\n\n", HOLD, _END + b"\n\n" + _DONE + b"\n\n"]
SCRIPTS: dict[str, list[bytes | None]] = {
    "lone cr": [_data("A") + b"\r\r", HOLD, _data("B") + b"\r\r", HOLD, _data("C") + b"\r\r", HOLD,
                _END + b"\r\r" + _DONE + b"\r\r"],
    # the CR ending each event's blank line closes a write; the LF of its CRLF starts the next one
    "crlf split across writes": [_data("A") + b"\r\n\r", HOLD, b"\n" + _data("B") + b"\r\n\r", HOLD,
                                 b"\n" + _data("C") + b"\r\n\r", HOLD, b"\n" + _END + b"\r\n\r\n" + _DONE + b"\r\n\r"],
    "mixed": [_data("A") + b"\r\n\r", HOLD,  # CRLF, then a CR whose LF comes with the next write
              b"\n" + _data("B") + b"\n\r", HOLD,  # LF, then a lone CR
              _data("C") + b"\r\r\n", HOLD,  # a lone CR, then a CRLF
              _data("D") + b"\r", b"\n\r", HOLD,  # a CRLF split across two writes that hold no whole event
              b"\n" + _data("E") + b"\r\n\n", HOLD,  # the split CRLF's LF, then a CRLF and an LF
              b"event: x\r" + _data("F") + b"\r\r", HOLD,  # a line before the data line
              _END + b"\n\n" + _DONE + b"\r"],  # and the stream ends before the last blank line
}


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_every_event_a_read_completes_reaches_the_client_with_that_read(
        scripted: _ScriptedUpstream, served: RunningGateway, name: str) -> None:
    """Each case after the same stream with LF endings, which must pass whatever the decoder does with CRs: the
    control that the gateway holds no event back for any other reason."""
    for script in (LF, SCRIPTS[name]):
        _stream_through(scripted, served, script)


def _stream_through(scripted: _ScriptedUpstream, served: RunningGateway, script: list[bytes | None]) -> None:
    scripted.start(script)
    client = openai.OpenAI(base_url=served.base_url, api_key=FULL_KEY, max_retries=0, timeout=20)
    contents: list[str] = []
    finishes: list[str] = []
    stream = client.chat.completions.create(model="plain", stream=True, messages=[{"role": "user", "content": "hi"}])
    for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                contents.append(choice.delta.content)
                scripted.saw()
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
    holds = script.count(HOLD)
    assert contents == [chr(ord("A") + n) for n in range(holds)]
    assert finishes == ["stop"]
    assert scripted.late == 0, f"{scripted.late} of {holds} events reached the client only after the next write"


# --- the decoder itself: what every prefix of a stream gives, whatever the line endings ------------------------


def _reference(stream: bytes) -> list[bytes]:
    """The payloads a stream's bytes dispatch, read as the spec reads them (a CR ends its line even when it ends
    the bytes), with the decoder's own conventions: only `data:` lines count, several joined by a space."""
    payloads: list[bytes] = []
    data: list[bytes] = []
    lines = stream.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")[:-1]  # the last: no ending yet
    for line in lines:
        if not line:
            if data:
                payloads.append(b" ".join(data))
            data = []
        elif line[:5] == b"data:":
            data.append(line[6:] if line[5:6] == b" " else line[5:])
    return payloads


STREAMS = {  # (the stream, its payloads); LF alone: `test_units.py`
    "crlf": (b"data: a\r\n\r\ndata: b\r\n\r\n: c\r\n\r\nevent: e\r\ndata: d\r\ndata: e\r\n\r\n", [b"a", b"b", b"d e"]),
    "cr": (b"data: a\r\rdata: b\r\r: c\r\revent: e\rdata: d\rdata: e\r\r", [b"a", b"b", b"d e"]),
    "mixed": (b"data: a\r\n\rdata: b\n\r\ndata: c\r\r\n\ndata: d\n\r\r\ndata: e\r\n\r\n\r\r\n",
              [b"a", b"b", b"c", b"d", b"e"]),
}


@pytest.mark.parametrize("name", list(STREAMS))
def test_the_decoder_gives_each_read_the_events_it_completed(name: str) -> None:
    """Every stream cut into two or three reads at every pair of places: after each read, the payloads so far are
    those of the bytes so far, neither fewer (held back) nor other ones (an LF counted twice)."""
    stream, whole = STREAMS[name]
    assert _reference(stream) == whole
    for first in range(len(stream) + 1):
        for second in range(first, len(stream) + 1):
            decoder = SSEDecoder()
            got: list[bytes] = []
            for start, end in ((0, first), (first, second), (second, len(stream))):
                if end > start:
                    got += decoder.feed(stream[start:end])
                    assert got == _reference(stream[:end]), (first, second, end)
            assert got + decoder.flush() == whole


def test_a_stream_that_ends_after_a_cr_flushes_its_last_event_whole() -> None:
    """The CR that ended a read stays the last byte kept (so that an LF next is skipped): the reads after it that
    end no line, and the end of the stream, leave the last event as it was sent."""
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"data: b") == []  # no line break: kept as it is, joined later
    assert decoder.feed(b"c") == []
    assert decoder.flush() == [b"a bc"]
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r\r") == [b"a"]
    assert decoder.feed(b"data: b") == []
    assert decoder.flush() == [b"b"]
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.flush() == [b"a"]


@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b"\r"])
def test_a_stream_that_opens_with_a_byte_order_mark_keeps_its_first_event(ending: bytes) -> None:
    """The spec drops one byte order mark at the start of a stream: its first event is not lost with it."""
    decoder = SSEDecoder()
    first = b"\xef\xbb\xbfdata: {\"a\":1}" + ending * 2
    assert decoder.feed(first) == [b'{"a":1}']
    assert decoder.feed(b"data: [DONE]" + ending * 2) == [b"[DONE]"]
