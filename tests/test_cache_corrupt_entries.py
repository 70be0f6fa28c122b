"""A stored entry that decodes (a valid msgpack `Entry`) but whose answer is not one is never served, in either form:
not as the stored bytes to a request of the form it was stored in, not converted to the other. It is a miss counted
as `corrupt`: the upstream answers, its answer is served and stored anew, the next request is a hit. In the memory
store and in Redis (written there as another program would), with the `openai` SDK as the client.

Then the check itself: what passes as an answer (every shape the gateway stores), and that a hit on a value the cache
keeps decoded is not checked again.
"""

from __future__ import annotations

import re
import textwrap
import time
import uuid
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import redis

from gateway.cache import entry as entry_module
from gateway.cache.entry import Entry, encode_entry, holds_answer
from gateway.cache.service import ENTRY, ResponseCache
from gateway.cache.stage import CacheStage
from gateway.policy import compile_text
from gateway.schemas.endpoints import Endpoint
from gateway.store.memory import MemoryStore
from gateway.telemetry.metrics import Metrics
from gateway.telemetry.tokens import TokenCounter
from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream
from tests.support.redis_server import suite_redis_url
from tests.test_cache import cache_policy, upstream_calls
from tests.test_reload import on_loop

CHAT, EMBEDDINGS = Endpoint.CHAT, Endpoint.EMBEDDINGS
PIECE = b'{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"cached"}}]}'
USAGE_PIECE = b'{"id":"c","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":1}}'

# Decodable entries whose answer is not a chat answer: each must be a miss, whichever form is asked for.
NOT_CHAT_ANSWERS = {
    "body-not-json": Entry("body", 0, body=b"not json"),
    "body-list": Entry("body", 0, body=b"[1,2]"),
    "body-null": Entry("body", 0, body=b"null"),
    "body-null-choice": Entry("body", 0, body=b'{"choices":[null]}'),
    "body-without-choices": Entry("body", 0, body=b'{"id":"x"}'),
    "body-choices-string": Entry("body", 0, body=b'{"choices":"x"}'),
    "body-embeddings": Entry("body", 0, body=b'{"object":"list","data":[]}'),
    "stream-not-json": Entry("stream", 0, chunks=[b"not json"]),
    "stream-null-choice": Entry("stream", 0, chunks=[b'{"choices": [null]}']),
    "stream-list": Entry("stream", 0, chunks=[b"[1]"]),
    "stream-choices-string": Entry("stream", 0, chunks=[PIECE, b'{"choices":"x"}']),
    "stream-of-nothing": Entry("stream", 0, chunks=[]),
    "stream-usage-only": Entry("stream", 0, chunks=[USAGE_PIECE]),
    "stream-bad-usage-chunk": Entry("stream", 0, chunks=[PIECE], usage_chunk=b"not json"),
}


class Served:
    """A caching gateway, the keys its cache wrote (in order), and a way to overwrite an entry as another program
    sharing the store would."""

    def __init__(self, gw: RunningGateway, redis_client: redis.Redis | None = None, prefix: str = "") -> None:
        self.gw, self.redis, self.prefix = gw, redis_client, prefix
        self.client = openai.OpenAI(api_key=FULL_KEY, base_url=gw.base_url, max_retries=0)
        self.written: list[str] = []
        (stage,) = [s for s in gw.gateway.runtime.pipeline.stages if isinstance(s, CacheStage)]
        cache, write = stage.cache, stage.cache.write

        async def recorded(alias: str, key: str, *rest: Any) -> None:
            await write(alias, key, *rest)
            self.written.append(key)

        cache.write = recorded  # type: ignore[method-assign]

    def plant(self, key: str, entry: Entry) -> None:
        value = encode_entry(entry, 1 << 20)
        assert value is not None
        if self.redis is not None:
            self.redis.set(self.prefix + ENTRY + key, value)
        else:
            on_loop(self.gw, self.gw.gateway.runtime.store.set(ENTRY + key, value, 3600))

    def stored(self, writes: int) -> str:
        """The key of the `writes`-th write, once it is done."""
        deadline = time.monotonic() + 5
        while len(self.written) < writes:
            assert time.monotonic() < deadline, "the answer was never stored"
            time.sleep(0.01)
        return self.written[writes - 1]

    def corrupt(self) -> float:
        found = re.search(r'^gateway_cache_errors_total\{reason="corrupt"\} (\S+)$', self.gw.metrics(), re.M)
        return float(found.group(1)) if found else 0.0


@pytest.fixture(scope="module", params=["memory", "redis"])
def served(request: pytest.FixtureRequest, upstream: MockUpstream) -> Iterator[Served]:
    if request.param == "memory":
        gw = RunningGateway(cache_policy(upstream.base_url), {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()
        try:
            yield Served(gw)
        finally:
            gw.stop()
        return
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


def ask(served: Served, question: str, stream: bool) -> tuple[str, str, str]:
    """The cache's status, the answer's id and its text, as the SDK reads them."""
    raw = served.client.chat.completions.with_raw_response.create(
        model="chat", messages=[{"role": "user", "content": question}], temperature=0, stream=stream)
    status = raw.headers["x-gateway-cache"]
    if not stream:
        answer = raw.parse()
        return status, answer.id, answer.choices[0].message.content or ""
    chunks = list(raw.parse())
    return status, chunks[0].id, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize("name", list(NOT_CHAT_ANSWERS))
def test_a_stored_entry_that_is_not_an_answer_is_a_counted_miss_in_either_form(
    served: Served, upstream: MockUpstream, name: str, stream: bool,
) -> None:
    """Asked for in the form it was stored in, it went out as stored (`not json` as a 200 JSON body, a `data:`
    line the SDK cannot parse); asked for in the other, `{"id":"x"}` streamed as a bare `[DONE]`."""
    question = f"corrupt {name} {stream} {uuid.uuid4().hex}"
    writes = len(served.written) + 1
    status, first_id, text = ask(served, question, stream)
    assert status == "miss" and text
    key = served.stored(writes)
    served.plant(key, NOT_CHAT_ANSWERS[name])
    corrupt, calls = served.corrupt(), upstream_calls(upstream)

    status, answer_id, answer_text = ask(served, question, stream)  # the SDK read it: not the planted bytes
    assert (status, answer_text) == ("miss", text) and answer_id != first_id  # the upstream's new answer
    assert upstream_calls(upstream) == calls + 1
    assert served.corrupt() == corrupt + 1  # once: a coalesced miss does not take the entry for a stored one
    assert served.stored(writes + 1) == key  # stored anew, in its place
    assert ask(served, question, stream) == ("hit", answer_id, text)
    assert upstream_calls(upstream) == calls + 1


@pytest.mark.parametrize("stored", [Entry("body", 0, body=b'{"object":"list"}'),
                                    Entry("body", 0, body=b'{"choices":[{"index":0}]}'),
                                    Entry("stream", 0, chunks=[PIECE])], ids=["no-data", "chat-body", "stream"])
def test_an_embeddings_entry_must_hold_embeddings(served: Served, upstream: MockUpstream, stored: Entry) -> None:
    """The check is the endpoint's: a chat answer stored under an embeddings key is not an embeddings answer."""
    text = f"embed {uuid.uuid4().hex}"
    writes = len(served.written) + 1

    def embed() -> tuple[str, int]:
        raw = served.client.embeddings.with_raw_response.create(model="embed", input=text)
        return raw.headers["x-gateway-cache"], len(raw.parse().data[0].embedding)

    status, size = embed()
    assert status == "miss" and size > 0
    served.plant(served.stored(writes), stored)
    corrupt, calls = served.corrupt(), upstream_calls(upstream)
    assert embed() == ("miss", size)
    assert served.corrupt() == corrupt + 1 and upstream_calls(upstream) == calls + 1
    served.stored(writes + 1)
    assert embed() == ("hit", size)


# -- the check ---------------------------------------------------------------------------------------------------

CHAT_BODY = (b'{"id":"c","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant",'
             b'"content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1}}')


@pytest.mark.parametrize("entry,endpoint", [
    (Entry("body", 0, body=CHAT_BODY), CHAT),
    (Entry("body", 0, body=b'{"object":"text_completion","choices":[{"index":0,"text":"hi"}]}'), Endpoint.COMPLETIONS),
    (Entry("body", 0, body=b'{"object":"list","data":[{"embedding":[0.1]}],"model":"m"}'), EMBEDDINGS),
    (Entry("stream", 0, chunks=[PIECE, USAGE_PIECE]), CHAT),  # a usage-only piece has no choice
    (Entry("stream", 0, chunks=[PIECE], usage_chunk=USAGE_PIECE), CHAT),
    (Entry("stream", 0, chunks=[b'{"id":"c"}', PIECE]), CHAT),  # a piece without choices: as the upstream sent it
    (Entry("stream", 0, chunks=[b'{"choices":[{"index":0,"text":"hi"}]}']), Endpoint.COMPLETIONS),
])
def test_every_answer_the_gateway_stores_holds_one(entry: Entry, endpoint: Endpoint) -> None:
    assert holds_answer(entry, endpoint)


@pytest.mark.parametrize("name", list(NOT_CHAT_ANSWERS))
def test_what_is_not_a_chat_answer_holds_none(name: str) -> None:
    assert not holds_answer(NOT_CHAT_ANSWERS[name], CHAT)


async def test_a_stored_value_is_checked_once_however_often_it_is_hit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hit on a value the cache keeps decoded costs no check; nor does one that is no answer, which a read-only
    cache never replaces: each such read is still a miss, and counted."""
    checks: list[Entry] = []

    def counted(entry: Entry, endpoint: Endpoint) -> bool:
        checks.append(entry)
        return holds_answer(entry, endpoint)

    monkeypatch.setattr(entry_module, "holds_answer", counted)
    policy = compile_text(textwrap.dedent("""\
        version: 1
        auth: none
        providers: {mock: {kind: openai, base_url: "http://127.0.0.1:9/v1", api_key_env: NONE}}
        models: {chat: {provider: mock, model: m, cache: {}}}
        """), "p.yaml", {"NONE": "x"})
    metrics = Metrics()
    cache = ResponseCache(policy, MemoryStore(), {}, metrics, TokenCounter())
    good = Entry("body", 1.0, body=CHAT_BODY)
    await cache.write("chat", "good", good, 60, None, 1 << 20)
    assert [await cache.read("good", None, "chat", CHAT) for _ in range(3)] == [good] * 3
    assert checks == [good]
    bad = Entry("body", 1.0, body=b'{"id":"x"}')
    await cache.write("chat", "bad", bad, 60, None, 1 << 20)
    assert [await cache.read("bad", None, "chat", CHAT) for _ in range(3)] == [None] * 3
    assert checks == [good, bad]
    assert metrics.cache_errors.labels("corrupt")._value.get() == 3
    assert await cache.present("good", CHAT) and not await cache.present("bad", CHAT)
