"""A client that asks for usage (`stream_options.include_usage`) is never served a streamed hit without it (H49).

`stream_options` is not in the key, so an include_usage request finds the entry another client's plain stream
stored. With a provider's `stream_usage: false` that stream's upstream was not asked for usage and sent none (the
entry holds the gateway's estimate): the hit had no usage chunk, where the live answer (the client's own
`stream_options` forwarded) carries the upstream's. Such a hit is a miss now (the entry is `usage_unasked`:
`replay.ReplaySource`), whose answer, usage chunk included, replaces the entry; an entry with the upstream's usage is
served with it.
"""

from __future__ import annotations

import textwrap
import uuid
from collections.abc import Iterator

import msgspec
import openai
import pytest

from gateway.auth.keys import hash_key
from gateway.cache.entry import Entry
from gateway.cache.replay import ReplaySource, Unconvertible
from gateway.schemas.endpoints import Endpoint
from gateway.schemas.events import Chunk, UsageReport
from gateway.schemas.openai import Usage
from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream

USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


@pytest.fixture
def gw(upstream: MockUpstream) -> Iterator[RunningGateway]:
    running = RunningGateway(textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
        providers:
          quiet: {{kind: openai, base_url: {upstream.base_url}, api_key_env: MK, stream_usage: false}}
        models:
          su: {{provider: quiet, model: mock-model, cache: {{}}}}
        """), {"MK": UPSTREAM_KEY}).start()
    yield running
    running.stop()


def test_a_client_that_asks_for_usage_gets_it_from_the_cache_or_upstream(gw: RunningGateway,
                                                                          upstream: MockUpstream) -> None:
    api = openai.OpenAI(base_url=gw.base_url, api_key=FULL_KEY, max_retries=0)
    messages = [{"role": "user", "content": "hello " + uuid.uuid4().hex}]
    plain = list(api.chat.completions.create(model="su", messages=messages, temperature=0, stream=True))
    assert all(c.usage is None for c in plain)  # stored, without usage (the upstream was not asked for it)
    calls = len(upstream.requests)
    asked = api.chat.completions.with_raw_response.create(model="su", messages=messages, temperature=0, stream=True,
                                                          stream_options={"include_usage": True})
    # was: a hit without any usage chunk
    assert asked.headers["x-gateway-cache"] == "miss" and len(upstream.requests) == calls + 1
    usage = list(asked.parse())[-1].usage
    assert usage is not None and usage.prompt_tokens > 0
    for include in (True, False):  # its answer replaced the entry: a hit for both, usage for the one that asks
        options = {"stream_options": {"include_usage": True}} if include else {}
        again = api.chat.completions.with_raw_response.create(model="su", messages=messages, temperature=0,
                                                              stream=True, **options)  # type: ignore[call-overload]
        assert again.headers["x-gateway-cache"] == "hit"
        assert list(again.parse())[-1].usage == (usage if include else None)
    assert len(upstream.requests) == calls + 1


def chunk(delta: dict[str, object], finish: str | None = None, **extra: object) -> bytes:
    return msgspec.json.encode({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra})


def reports(source: ReplaySource) -> list[bytes | None]:
    return [event.payload for event in source.events() if isinstance(event, UsageReport)]


def test_an_entry_with_the_upstreams_usage_is_served_with_it_and_one_stored_unasked_is_not() -> None:
    """The upstream's usage reaches a client that asks for it: its usage chunk, the usage riding on the last content
    chunk (already among the chunks), a complete answer's usage object. A stream stored without usage for a client
    that asked for it is what its upstream sends: served so. One stored for a client that had not asked is a miss for
    one that asks; an estimate is never sent as the upstream's usage."""
    text = [chunk({"role": "assistant", "content": "hi"}), chunk({}, "stop")]
    usage_chunk = msgspec.json.encode({"id": "c", "choices": [], "usage": USAGE})
    own = Entry("stream", 0, chunks=text, usage=Usage(3, 2, 5), usage_chunk=usage_chunk)
    assert reports(ReplaySource(own, Endpoint.CHAT, wants_usage=True)) == [usage_chunk]
    riding = Entry("stream", 0, chunks=[text[0], chunk({}, "stop", usage=USAGE)], usage=Usage(3, 2, 5))
    events = ReplaySource(riding, Endpoint.CHAT, wants_usage=True).events()
    assert isinstance(events[1], Chunk) and msgspec.json.decode(events[1].payload)["usage"] == USAGE
    body = msgspec.json.encode({"id": "c", "choices": [{"index": 0, "message": {"content": "hi"},
                                                        "finish_reason": "stop"}], "usage": USAGE})
    built = reports(ReplaySource(Entry("body", 0, body=body, usage=Usage(3, 2, 5)), Endpoint.CHAT, wants_usage=True))
    assert [msgspec.json.decode(p or b"")["usage"] for p in built] == [USAGE]
    asked = Entry("stream", 0, chunks=text, usage=Usage(9, 9, 18), usage_estimated=True)
    assert not any(reports(ReplaySource(asked, Endpoint.CHAT, wants_usage=True)))
    for usage in (Usage(9, 9, 18), None):
        unasked = Entry("stream", 0, chunks=text, usage=usage, usage_estimated=usage is not None, usage_unasked=True)
        assert not any(reports(ReplaySource(unasked, Endpoint.CHAT)))  # one that does not ask: served, as before
        with pytest.raises(Unconvertible):
            ReplaySource(unasked, Endpoint.CHAT, wants_usage=True)
