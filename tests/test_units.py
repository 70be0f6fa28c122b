"""Unit tests of pure logic: SSE decoding, message sanitizing, key hashing, status mapping."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.auth.keys import KeyRing, VirtualKey, digest_of, generate_key, hash_key
from gateway.errors import RateLimited, UpstreamError, UpstreamTimeout
from gateway.pipeline.context import Reply
from gateway.pipeline.runner import Pipeline
from gateway.providers.openai_compat import status_error
from gateway.sanitize import sanitize_upstream_message
from gateway.upstream.sse import SSEDecoder

EVENTS = b'data: {"a":1}\n\ndata: {"b":2}\n\n: keep-alive comment\n\ndata: [DONE]\n\n'


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 11, 64, len(EVENTS)])
def test_sse_decoder_survives_any_split(size: int) -> None:
    decoder = SSEDecoder()
    payloads = []
    for start in range(0, len(EVENTS), size):
        payloads += decoder.feed(EVENTS[start:start + size])
    assert payloads == [b'{"a":1}', b'{"b":2}', b"[DONE]"]


@pytest.mark.parametrize("size", [1, 2, 3, 4, 100])
def test_sse_decoder_handles_crlf_split_anywhere(size: int) -> None:
    data = EVENTS.replace(b"\n", b"\r\n")
    decoder = SSEDecoder()
    payloads = []
    for start in range(0, len(data), size):
        payloads += decoder.feed(data[start:start + size])
    assert payloads == [b'{"a":1}', b'{"b":2}', b"[DONE]"]


def test_sse_decoder_multiline_data_and_flush() -> None:
    """Several `data:` lines make one payload, joined by a space: the edge forwards a payload as one `data:` line,
    which a line break inside would end (the client got half an event and a stray line)."""
    decoder = SSEDecoder()
    assert decoder.feed(b"event: x\ndata: one\ndata: two\n\ndata:nospace") == [b"one two"]
    assert decoder.flush() == [b"nospace"]
    assert decoder.flush() == []


def test_sse_decoder_joins_a_large_event_once_however_many_reads_it_takes() -> None:
    """A large event in small reads: the reads that cannot end it are kept as they are and joined once, when one
    may (re-joining and re-searching the whole event on every read was quadratic in its size)."""
    event = b'data: {"choices": [{"delta": {"content": "' + b"x" * 100_000 + b'"}}]}\n\n'
    decoder = SSEDecoder()
    payloads = []
    for start in range(0, len(event), 1000):
        payloads += decoder.feed(event[start:start + 1000])
        if start + 1000 < len(event) - 2:
            assert len(decoder._more) == start // 1000  # (kept, not joined: the first read is `_pending`)
    assert payloads == [event[6:-2]] and not decoder._more and decoder._pending == b""
    decoder.feed(b"data: " + b"y" * 1000)
    with pytest.raises(ValueError, match="too large"):
        for _ in range(9 * 1024):
            decoder.feed(b"y" * 1024)
    tail = SSEDecoder()
    tail.feed(b"data: a")
    tail.feed(b"bc")
    assert tail.flush() == [b"abc"]


@pytest.mark.parametrize(("read", "payloads"), [
    (b"data: x\n\n", [b"x"]),  # the fast path: one whole single-line event per read
    (b"data:x\n\n", [b"x"]),
    (b"data:\n\n", [b""]),
    (b"data:  two spaces\n\n", [b" two spaces"]),
    (b"data: a\ndata: b\n\n", [b"a b"]),  # the rest: the general path (lines joined by a space: see `_data_of`)
    (b"data: x\r\n\r\n", [b"x"]),
    (b"data: x\n\ndata: y\n\n", [b"x", b"y"]),
    (b"event: e\ndata: x\n\n", [b"x"]),
    (b": comment\n\n", []),
    (b"data: x\n", []),
    (b"\n\n", []),
    (b"x", []),
])
def test_sse_decoder_reads_one_whole_event_per_read_like_any_other(read: bytes, payloads: list[bytes]) -> None:
    assert SSEDecoder().feed(read) == payloads
    decoder = SSEDecoder()  # after a partial event, the same bytes complete it
    assert decoder.feed(b"data: before") == []
    assert decoder.feed(b"\n\n" + read) == [b"before", *payloads]


def test_sse_decoder_reads_events_of_one_read_as_it_reads_each_alone() -> None:
    """Several events in one read (the loop's in-line single-line case) give what each gives alone."""
    events = [b"data: x", b"data:x", b"data:", b"data:  two", b"data: a\ndata: b", b"event: e\ndata: y", b": c",
              b"data", b"dat", b"data: [DONE]"]
    alone = [payload for event in events for payload in SSEDecoder().feed(event + b"\n\n")]
    assert SSEDecoder().feed(b"\n\n".join(events) + b"\n\n") == alone
    assert alone == [b"x", b"x", b"", b" two", b"a b", b"y", b"[DONE]"]


def test_sse_decoder_refuses_an_endless_event() -> None:
    decoder = SSEDecoder()
    with pytest.raises(ValueError):
        for _ in range(200):
            decoder.feed(b"x" * 65536)


@pytest.mark.parametrize(
    ("message", "hidden"),
    [
        ("Incorrect API key provided: sk-proj-abcdefghijklmnop1234", "sk-proj-abcdefghijklmnop1234"),
        ("failed to reach http://10.1.2.3:8000/v1/chat", "10.1.2.3"),
        ("host 192.168.0.7:443 refused", "192.168.0.7"),
        ("upstream inference.svc.cluster.local:9000 busy", "cluster.local"),
        ("Authorization: Bearer abc.def.ghi was rejected", "abc.def.ghi"),
        ("token " + "a1" * 20 + " expired", "a1" * 20),
        ("[fe80::1]:8080 down", "fe80::1"),
    ],
)
def test_sanitizer_removes_secrets_and_addresses(message: str, hidden: str) -> None:
    cleaned = sanitize_upstream_message(message)
    assert hidden not in cleaned
    assert cleaned  # something useful is left


def test_sanitizer_keeps_plain_messages_and_bounds_length() -> None:
    assert sanitize_upstream_message("max_tokens is too large: 99999") == "max_tokens is too large: 99999"
    assert len(sanitize_upstream_message("word " * 1000)) <= 500
    assert sanitize_upstream_message({"not": "a string"}) == ""
    assert sanitize_upstream_message("line\nbreaks\tand\x00nul") == "line breaks and nul"


def test_status_mapping() -> None:
    limited = status_error("p", 429, "slow down", "12")
    assert isinstance(limited, RateLimited) and limited.headers == {"Retry-After": "12", "retry-after-ms": "12000"}
    assert status_error("p", 429, None, "12; DROP TABLE").headers == {}
    assert isinstance(status_error("p", 503, None, None), UpstreamError)
    assert status_error("p", 401, "bad key sk-xxxxxxxxxxxx", None).status == 502
    assert "sk-xxxx" not in status_error("p", 401, "bad key sk-xxxxxxxxxxxx", None).message
    assert isinstance(status_error("p", 504, None, None), UpstreamTimeout)
    assert status_error("p", 422, "bad", None).status == 400


def test_keys_are_hashed_and_found() -> None:
    key = generate_key()
    record = VirtualKey("k", "t", digest_of(key), frozenset({"a"}))
    ring = KeyRing({record.digest: record})
    assert ring.find(key) is record
    assert ring.find(key + "x") is None
    assert ring.find("") is None
    assert hash_key(key) == "sha256:" + record.digest.hex()
    assert record.allows("a") and not record.allows("b")
    assert key not in repr(record) and record.digest.hex() not in repr(record)


def test_a_gateway_sets_up_nothing_process_wide_and_keeps_its_own_ids() -> None:
    import asyncio
    import gc
    import signal

    from gateway.app import Gateway
    from gateway.policy import compile_text

    policy = compile_text(
        "version: 1\nauth: none\nproviders: {d: {kind: demo}}\nmodels: {m: {provider: d, model: x}}\n")
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    frozen, thresholds = gc.get_freeze_count(), gc.get_threshold()
    first, second = Gateway(policy), Gateway(policy)

    async def cycle(gateway: Gateway) -> None:
        await gateway.start()
        await gateway.stop()

    asyncio.run(cycle(first))
    asyncio.run(cycle(second))
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
    assert gc.get_freeze_count() == frozen and gc.get_threshold() == thresholds
    assert first.request_ids.new()[:16] != second.request_ids.new()[:16]  # per-gateway prefixes
    assert first.runtime.providers["d"]._ids is not second.runtime.providers["d"]._ids  # type: ignore[attr-defined]


def test_the_served_process_freezes_its_start_up_heap_and_sets_the_collectors_thresholds() -> None:
    import asyncio
    import gc
    import threading

    from gateway import server
    from gateway.app import Gateway
    from gateway.policy import compile_text

    gateway = Gateway(compile_text(
        "version: 1\nauth: none\nproviders: {d: {kind: demo}}\nmodels: {m: {provider: d, model: x}}\n"))
    before = gc.get_threshold()
    seen: list[tuple[int, ...]] = []

    async def start() -> None:  # off the main thread: no signal handlers are installed
        server._ServedProcess(gateway).started()
        seen.append(gc.get_threshold())
        seen.append((gc.get_freeze_count(),))

    try:
        thread = threading.Thread(target=asyncio.run, args=(start(),))
        thread.start()
        thread.join()
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()
    assert seen[0] == server._GC_THRESHOLDS != before
    assert seen[1][0] > 0


def test_the_typed_request_is_kept_beside_the_forwarded_body() -> None:
    from gateway.pipeline.stages import decode_body
    from gateway.schemas.endpoints import Endpoint
    from gateway.schemas.openai import ChatRequest

    body, typed = decode_body(b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], '
                              b'"temperature": 0, "brand_new_field": {"x": 1}}', Endpoint.CHAT)
    assert isinstance(typed, ChatRequest) and typed.temperature == 0 and typed.messages[0].content == "hi"
    assert body["brand_new_field"] == {"x": 1}  # unknown fields are forwarded unchanged


@pytest.mark.parametrize(("payload", "expected"), [
    (b'{"id":"c","choices":[],"usage":null}', b'{"id":"c","choices":[]}'),  # OpenAI's compact form
    (b'{"id": "c", "choices": [], "usage": null}', b'{"id": "c", "choices": []}'),  # spaced
    (b'{"usage": null, "id": "c"}', b'{"id": "c"}'),  # first key
    (b'{"id":"c","usage":null,"x":1}', b'{"id":"c","x":1}'),  # middle
    (b'{"id":"c","text":"\\"usage\\":null"}', b'{"id":"c","text":"\\"usage\\":null"}'),  # inside a string: kept
])
def test_the_gateways_own_null_usage_is_stripped_and_nothing_else(payload: bytes, expected: bytes) -> None:
    import json

    from gateway.providers.openai_chunks import strip_null_usage

    stripped = strip_null_usage(payload)
    assert stripped == expected
    json.loads(stripped)


def _openai_events(payloads: list[bytes], asked_for_usage: bool = True, read_choices: bool = False) -> Any:
    from types import SimpleNamespace

    from gateway.providers.openai_stream import OpenAIStream

    provider = SimpleNamespace(name="p", sanitize=str, release=lambda: None)
    stream = OpenAIStream(provider, None, 0.0, asked_for_usage, 1.0, read_choices)  # type: ignore[arg-type]
    events, finished = stream._events(payloads)
    return events, finished, stream._saw_usage


_USAGE = b'{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}'


@pytest.mark.parametrize("read_choices", [False, True])
def test_openai_stream_events_by_kind_of_chunk(read_choices: bool) -> None:
    from gateway.schemas.events import Chunk, StreamDone, StreamError, UsageReport

    content = b'{"choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null}'
    riding = b'{"choices":[{"index":0,"delta":{"content":"!"}}],"usage":' + _USAGE + b"}"
    alone = b'{"choices":[],"usage":' + _USAGE + b"}"
    events, finished, saw = _openai_events([content, riding, alone, b"[DONE]"], read_choices=read_choices)
    kinds = [type(e) for e in events]
    assert kinds == [Chunk, Chunk, UsageReport, UsageReport, StreamDone] and finished and saw
    assert events[0].payload == b'{"choices":[{"index":0,"delta":{"content":"hi"}}]}'  # the gateway's usage ask, undone
    assert events[1].payload == riding and events[2].payload is None  # the content chunk is forwarded as it is
    assert events[3].payload == alone and events[3].usage.total_tokens == 3
    assert (events[0].choices is not None) == read_choices
    events, finished, saw = _openai_events([content], read_choices=read_choices)
    assert [type(e) for e in events] == [Chunk] and not finished and not saw
    spaced = b'{"choices": [{"index": 0, "delta": {"content": "hi"}}], "usage": null}'  # not the compact form
    events, _, _ = _openai_events([spaced], read_choices=read_choices)
    assert events[0].payload == b'{"choices": [{"index": 0, "delta": {"content": "hi"}}]}'
    bad = b'{"choices":5,"usage":' + _USAGE + b"}"  # a usage chunk whose choices are not a list
    events, finished, _ = _openai_events([bad], read_choices=read_choices)
    assert [type(e) for e in events] == [StreamError] and finished


def test_sse_frames_of_one_chunk_and_of_a_batch_agree() -> None:
    from gateway.api.sse import frame
    from gateway.schemas.events import DONE, Chunk, UsageReport
    from gateway.schemas.openai import Usage

    one = frame([Chunk(b'{"a":1}')], False)  # the one-chunk fast path
    assert one == b'data: {"a":1}\n\n'
    usage = UsageReport(Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2), b'{"u":1}')
    assert frame([Chunk(b'{"a":1}'), usage, DONE], True) == one + b'data: {"u":1}\n\ndata: [DONE]\n\n'
    assert frame([usage], False) == b""  # a usage report only for a client that asked


# -- the pipeline's chain ---------------------------------------------------------------------------


class _Looks:
    """A stage that only looks, then passes the request on unawaited (as the core stages do)."""

    def __init__(self, name: str, seen: list[str], refuse: bool = False) -> None:
        self.name, self.seen, self.refuse = name, seen, refuse

    def __call__(self, ctx: Any, call_next: Any) -> Any:
        self.seen.append(self.name)
        if self.refuse:
            raise UpstreamError("refused")
        return call_next(ctx)


class _Wraps:
    """A stage that awaits the rest and changes the reply, and sees errors raised by the stages after it."""

    name = "wraps"

    def __init__(self, seen: list[str]) -> None:
        self.seen = seen

    async def __call__(self, ctx: Any, call_next: Any) -> Any:
        try:
            reply = await call_next(ctx)
        except UpstreamError:
            self.seen.append("caught")
            raise
        reply.body += b"+wrapped"
        return reply


def _terminal(seen: list[str]) -> Any:
    class Terminal:
        name = "terminal"

        def __call__(self, ctx: Any, call_next: Any) -> Any:
            seen.append("terminal")
            return _reply(ctx)

    async def _reply(ctx: Any) -> Reply:
        return Reply(body=ctx)

    return Terminal()


def test_the_pipeline_runs_stages_in_order_awaited_or_passed_on() -> None:
    seen: list[str] = []
    pipeline = Pipeline([_Wraps(seen), _Looks("a", seen), _Looks("b", seen), _terminal(seen)])
    reply = asyncio.run(_run(pipeline, b"body"))
    assert seen == ["a", "b", "terminal"]
    assert reply.body == b"body+wrapped"


def test_an_error_raised_by_a_stage_that_passes_on_reaches_the_stage_before_it() -> None:
    seen: list[str] = []
    pipeline = Pipeline([_Wraps(seen), _Looks("a", seen), _Looks("b", seen, refuse=True), _terminal(seen)])
    with pytest.raises(UpstreamError):
        asyncio.run(_run(pipeline, b"body"))
    assert seen == ["a", "b", "caught"]


async def _run(pipeline: Pipeline, ctx: Any) -> Reply:
    return await pipeline.run(ctx)


# -- the response head's deadline (`providers.deadline`), beside asyncio's own timeout ---------------


async def _wait_under(kind: str, delay: float, work: float) -> str:
    """What a wait of `work` seconds under a `delay` timeout ends with, by `asyncio.timeout` or by `Deadline`."""
    from gateway.providers.deadline import deadline_in

    manager = asyncio.timeout(delay) if kind == "asyncio" else deadline_in(delay)
    try:
        async with manager:
            await asyncio.sleep(work)
    except TimeoutError:
        return "timeout"
    return "done"


@pytest.mark.parametrize("kind", ["asyncio", "deadline"])
def test_a_deadline_ends_a_wait_as_asyncio_timeout_does(kind: str) -> None:
    async def scenarios() -> list[object]:
        results: list[object] = [await _wait_under(kind, 0.05, 0), await _wait_under(kind, 0.01, 1),
                                 await _wait_under(kind, -1, 0.01)]  # already past: the next loop turn
        task = asyncio.current_task()
        assert task is not None
        results.append(task.cancelling())  # the timeout's own cancellation was taken back
        other = asyncio.ensure_future(_wait_under(kind, 1, 1))  # cancelled by someone else: not a timeout
        await asyncio.sleep(0.01)
        other.cancel()
        try:
            await other
        except asyncio.CancelledError:
            results.append("cancelled")
        both = asyncio.ensure_future(_wait_under(kind, -1, 1))  # its timeout's cancellation is queued ...
        await asyncio.sleep(0)
        both.cancel()  # ... and someone else cancels it before that runs: not a timeout either
        await asyncio.sleep(0.01)
        results.append("cancelled" if both.cancelled() else both.result())
        return results

    assert asyncio.run(scenarios()) == ["done", "timeout", "timeout", 0, "cancelled", "cancelled"]


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_deadline_finds_the_task_it_cancels_as_current_task_does(loop_kind: str) -> None:
    from gateway.providers import deadline

    async def found() -> bool:
        manager = deadline.deadline_in(1)
        async with manager:
            return manager._task is asyncio.current_task() and manager._task is not None

    if loop_kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        assert uvloop.run(found())
    else:
        assert asyncio.run(found())

    async def outside_a_task() -> str:  # entered from a loop callback: the error `asyncio.timeout` raises
        loop = asyncio.get_running_loop()
        said = loop.create_future()

        def enter() -> None:
            entering = deadline.Deadline(loop.time() + 1).__aenter__()
            try:
                entering.send(None)
            except RuntimeError as exc:
                said.set_result(str(exc))

        loop.call_soon(enter)
        return await said

    assert asyncio.run(outside_a_task()) == "Timeout should be used inside a task"
