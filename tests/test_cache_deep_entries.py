"""A stored entry nested past Python's recursion limit (a corrupted or shared Redis) is a corrupt entry: counted
`corrupt`, served as a miss (the upstream answers, its answer replaces the entry), never a 500. Written in a real
Redis under the very key the gateway reads, with the `openai` SDK as the client, in both forms; small enough to be
decoded on the event loop and large enough for a worker thread. Then the conversions themselves: a deep value met
while converting a stored answer to the other form is `Unconvertible` (a miss), not a `RecursionError`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import msgspec
import numpy as np
import pytest
import redis

from gateway.cache.assemble import Unconvertible
from gateway.cache.entry import DECODE_INLINE_BYTES, Entry, decode_entry, holds_answer
from gateway.cache.replay import ReplaySource, assemble_body
from gateway.cache.semantic import CHANNEL, SemanticIndex, SemanticShare
from gateway.schemas.endpoints import Endpoint
from gateway.store.base import StoreConfig
from gateway.store.redis import RedisStore
from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream
from tests.support.redis_server import suite_redis_url
from tests.test_cache import cache_policy, upstream_calls
from tests.test_cache_corrupt_entries import PIECE, Served, ask

SHALLOW, DEEP = 5_000, 100_000  # nesting levels: a value decoded on the event loop, one decoded in a thread


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def deep_usage_entry(depth: int) -> bytes:
    """An `Entry` as msgpack (raw, tag 0) whose `usage` map holds an unknown field nested `depth` deep."""
    head = msgspec.msgpack.encode(["body", 0.0, b'{"choices":[]}', [], {"prompt_tokens": 1, "x": 0}])
    assert head.endswith(b"\x00")
    return b"\x00" + head[:-1] + b"\x91" * depth + b"\x90"


def deep_entries(depth: int) -> dict[str, Entry | bytes]:
    return {
        "body-choice": Entry("body", 0, body=b'{"choices":[{"index":0,"x":' + nested(depth) + b"}]}"),
        "body-field": Entry("body", 0, body=b'{"choices":[],"x":' + nested(depth) + b"}"),
        "stream-chunk": Entry("stream", 0, chunks=[PIECE, b'{"choices":[],"x":' + nested(depth) + b"}"]),
        "stream-usage-chunk": Entry("stream", 0, chunks=[PIECE], usage_chunk=b'{"usage":' + nested(depth) + b"}"),
        "msgpack-usage": deep_usage_entry(depth),
    }


@pytest.fixture(scope="module")
def served(upstream: MockUpstream) -> Iterator[Served]:
    with suite_redis_url() as url:
        prefix = f"gwtest:{uuid.uuid4().hex}:"
        state = f'state: {{backend: redis, url_env: GW_TEST_REDIS, key_prefix: "{prefix}", op_timeout_s: 0.5}}\n'
        gw = RunningGateway(cache_policy(upstream.base_url, state=state),
                            {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "GW_TEST_REDIS": url}).start()
        client = redis.Redis.from_url(url)
        try:
            yield Served(gw, client, prefix)
        finally:
            gw.stop()
            keys = list(client.scan_iter(match=prefix + "*", count=1000))
            if keys:
                client.delete(*keys)
            client.close()


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize("depth", [SHALLOW, DEEP], ids=["on-loop", "in-thread"])
@pytest.mark.parametrize("name", list(deep_entries(1)))
def test_an_entry_nested_past_the_recursion_limit_is_a_counted_miss(
    served: Served, upstream: MockUpstream, name: str, depth: int, stream: bool,
) -> None:
    """Before: the decode's `RecursionError` escaped the cache read, and the client got a 500."""
    question = f"deep {name} {depth} {stream} {uuid.uuid4().hex}"
    writes = len(served.written) + 1
    status, first_id, text = ask(served, question, stream)
    assert status == "miss" and text
    key = served.stored(writes)
    planted = deep_entries(depth)[name]
    assert served.redis is not None
    value = planted if isinstance(planted, bytes) else msgspec.msgpack.encode(planted)
    if not isinstance(planted, bytes):
        value = b"\x00" + value
    assert (len(value) > DECODE_INLINE_BYTES) is (depth == DEEP)
    served.redis.set(served.prefix + "cache:entry:" + key, value)
    corrupt, calls = served.corrupt(), upstream_calls(upstream)

    status, answer_id, answer_text = ask(served, question, stream)
    assert (status, answer_text) == ("miss", text) and answer_id != first_id
    assert upstream_calls(upstream) == calls + 1
    assert served.corrupt() == corrupt + 1
    assert served.stored(writes + 1) == key  # replaced by the upstream's new answer
    assert ask(served, question, stream) == ("hit", answer_id, text)


@pytest.mark.parametrize("name", list(deep_entries(1)))
def test_a_deep_entry_is_not_an_answer(name: str) -> None:
    planted = deep_entries(DEEP)[name]
    if isinstance(planted, bytes):
        assert decode_entry(planted) is None
    else:
        assert not holds_answer(planted, Endpoint.CHAT)


# Deep values a check made on a shallower stack let through may still be met converting the answer: a miss.
CONVERSIONS = {
    "assemble-chunk": (Entry("stream", 0, chunks=[PIECE, b'{"usage":' + nested(DEEP) + b"}"]), False),
    "assemble-chunk-dict": (Entry("stream", 0, chunks=[b'{"x":' + nested(DEEP) + b"}"]), False),
    "assemble-usage-chunk": (Entry("stream", 0, chunks=[PIECE], usage_chunk=b'{"usage":' + nested(DEEP) + b"}"),
                             False),
    "split-body": (Entry("body", 0, body=b'{"choices":[],"usage":' + nested(DEEP) + b"}"), True),
}


@pytest.mark.parametrize("name", list(CONVERSIONS))
def test_a_deep_value_met_converting_is_unconvertible(name: str) -> None:
    entry, streamed = CONVERSIONS[name]
    with pytest.raises(Unconvertible):
        if streamed:
            ReplaySource(entry, Endpoint.CHAT)
        else:
            assemble_body(entry, Endpoint.CHAT)


async def test_a_deep_message_on_the_semantic_channel_does_not_stop_the_sharing() -> None:
    """Another replica's vectors come over a Redis channel any client of that Redis can publish on. Before: one
    message nested past the limit raised `RecursionError` in the listener, whose task died: this replica took no
    other replica's vector again (silently) until it restarted."""
    with suite_redis_url() as url:
        prefix = f"gwtest:{uuid.uuid4().hex}:"
        store = RedisStore(StoreConfig(backend="redis", url=url, key_prefix=prefix, op_timeout_s=5.0))
        await store.start()
        index = SemanticIndex(10)
        share, other = SemanticShare(store, {"chat": index}), SemanticShare(store, {})
        try:
            await share.start()
            head = msgspec.msgpack.encode(["o", "chat\x00s", "k", b"", 0])
            deep = b"\x95" + head[1:-1] + b"\x91" * DEEP + b"\x90"  # a fifth element, nested `DEEP` deep
            await store.publish(CHANNEL, deep)
            vector = np.full(4, 0.5, dtype=np.float32)  # a unit vector
            await other.publish("chat", "s", "shared-key", vector)
            deadline = time.monotonic() + 5
            while index.nearest("s", vector) is None:
                assert time.monotonic() < deadline, "the vector published after the deep message never came"
                await asyncio.sleep(0.02)
            key, similarity = index.nearest("s", vector) or ("", 0.0)
            assert key == "shared-key" and similarity == pytest.approx(1.0)
        finally:
            await share.aclose()
            await store.aclose()
