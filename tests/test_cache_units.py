"""Pure logic of the cache: the key, entries and their compression, replay and reassembly, Cache-Control."""

from __future__ import annotations

import asyncio
import textwrap
import zlib
from collections.abc import Sequence
from typing import Any

import msgspec
import pytest

from gateway.cache import coalesce
from gateway.cache.batch import MAX_BATCH, BatchedGets
from gateway.cache.coalesce import LOCK, Flights
from gateway.cache.control import CachePlan, Directives, cacheable, directives, plan
from gateway.cache.entry import Entry, decode_entry, encode_entry
from gateway.cache.key import EXCLUDED, cache_key, semantic_scope
from gateway.cache.replay import ReplaySource, assemble_body, split_body
from gateway.cache.service import ResponseCache
from gateway.policy import compile_text
from gateway.policy.cache_schema import CacheSpec, CacheWhenSpec
from gateway.schemas.endpoints import Endpoint
from gateway.schemas.events import Chunk, StreamDone, UsageReport
from gateway.schemas.openai import ChatRequest, Usage
from gateway.store.base import StoreUnavailable
from gateway.store.memory import MemoryStore
from gateway.telemetry.metrics import Metrics
from gateway.telemetry.tokens import TokenCounter

CHAT = Endpoint.CHAT
BODY: dict[str, Any] = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}


def key(body: dict[str, Any], tenant: str = "acme", version: str = "v1", targets: tuple[str, ...] = ("m/x",)) -> str:
    return cache_key(tenant, version, CHAT, "chat", targets, body)


def test_the_key_splits_on_what_changes_the_answer_only() -> None:
    base = key(BODY)
    assert key(dict(reversed(BODY.items()))) == base  # field order
    for field in EXCLUDED - {"model"}:
        assert key({**BODY, field: "anything"}) == base, field
    assert key({**BODY, "model": "another-alias"}) == base  # the resolved alias is what counts
    assert len({base, key(BODY, tenant="globex"), key(BODY, version="v2"), key(BODY, targets=("m/y",)),
                key({**BODY, "seed": 1}), key({**BODY, "new_param": True}), key({**BODY, "temperature": 0.5})}) == 7


def test_the_key_is_prefix_free() -> None:
    # the same characters split differently between fields must not collide
    assert cache_key("ab", "c", CHAT, "chat", (), BODY) != cache_key("a", "bc", CHAT, "chat", (), BODY)
    assert key({**BODY, "stop": ["a", "b"]}) != key({**BODY, "stop": ["ab"]})


def test_the_semantic_scope_leaves_out_the_last_message_only() -> None:
    one = semantic_scope("acme", "v1", CHAT, "chat", (), BODY)
    two = semantic_scope("acme", "v1", CHAT, "chat", (), {**BODY, "messages": [{"role": "user", "content": "yo"}]})
    assert one is not None and two is not None and one[0] == two[0] and (one[1], two[1]) == ("hi", "yo")
    system = {**BODY, "messages": [{"role": "system", "content": "x"}, *BODY["messages"]]}
    assert semantic_scope("acme", "v1", CHAT, "chat", (), system)[0] != one[0]  # type: ignore[index]
    image = {**BODY, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]}
    assert semantic_scope("acme", "v1", CHAT, "chat", (), image) is None
    assert semantic_scope("acme", "v1", Endpoint.EMBEDDINGS, "chat", (), {"input": "x"}) is None


@pytest.mark.parametrize("size", [10, 100_000])
def test_entries_round_trip_and_compress_above_the_threshold(size: int) -> None:
    entry = Entry("body", 1.5, body=b'{"a":"' + b"x" * size + b'"}', usage=Usage(1, 2, 3), provider="p", model="m")
    value = encode_entry(entry, 1024)
    assert value[:1] == (b"\x01" if size > 1024 else b"\x00")
    assert (len(value) < size / 10) if size > 1024 else True
    assert decode_entry(value) == entry


def test_corrupt_entries_and_bombs_decode_to_nothing() -> None:
    bomb = b"\x01" + zlib.compress(b"\x00" * (300 * 1024 * 1024), 9)
    for value in (b"", b"\x02abc", b"\x00not msgpack", b"\x01not zlib", b"\x00" + msgspec.msgpack.encode([1, 2]), bomb):
        assert decode_entry(value) is None


def chunk(delta: dict[str, Any], finish: str | None = None, index: int = 0) -> bytes:
    return msgspec.json.encode({"id": "c1", "object": "chat.completion.chunk", "created": 5, "model": "m",
                                "choices": [{"index": index, "delta": delta, "finish_reason": finish}]})


def test_a_stored_stream_assembles_into_the_complete_answer() -> None:
    chunks = [chunk({"role": "assistant", "content": ""}), chunk({"content": "Hel"}), chunk({"content": "lo"}),
              chunk({"tool_calls": [{"index": 0, "id": "t1", "type": "function",
                                     "function": {"name": "f", "arguments": '{"a"'}}]}),
              chunk({"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}), chunk({}, "tool_calls")]
    body = msgspec.json.decode(assemble_body(Entry("stream", 0, chunks=chunks, usage=Usage(3, 4, 7)), CHAT))
    assert body["object"] == "chat.completion" and body["id"] == "c1" and body["usage"]["total_tokens"] == 7
    message = body["choices"][0]["message"]
    assert message["content"] == "Hello" and body["choices"][0]["finish_reason"] == "tool_calls"
    call = {"id": "t1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    assert message["tool_calls"] == [call]


def test_a_complete_answer_splits_into_chunks_the_same_answer_comes_back_from() -> None:
    complete = {"id": "x", "object": "chat.completion", "created": 9, "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "one"}, "finish_reason": "stop"},
        {"index": 1, "message": {"role": "assistant", "content": "two"}, "finish_reason": "length"}]}
    chunks, base = split_body(msgspec.json.encode(complete), CHAT)
    assert base["object"] == "chat.completion.chunk" and len(chunks) == 4
    again = msgspec.json.decode(assemble_body(Entry("stream", 0, chunks=chunks), CHAT))
    assert [(c["message"]["content"], c["finish_reason"]) for c in again["choices"]] == [
        ("one", "stop"), ("two", "length")]


@pytest.mark.parametrize("endpoint", [CHAT, Endpoint.COMPLETIONS])
def test_logprobs_survive_a_hit_served_in_the_other_mode(endpoint: Endpoint) -> None:
    """Stored whole and served as a stream, or stored as a stream and served whole: the answer's logprobs come
    with it (they read null), joined in order."""
    chat = endpoint is CHAT
    tokens = [{"token": t, "logprob": -0.5, "bytes": list(t.encode()), "top_logprobs": []} for t in ("Hel", "lo")]
    def logprobs(part: list[dict[str, Any]]) -> dict[str, Any]:
        return ({"content": part, "refusal": None} if chat else
                {"tokens": [t["token"] for t in part], "token_logprobs": [t["logprob"] for t in part],
                 "top_logprobs": [{} for _ in part], "text_offset": [0] * len(part)})
    answer = ({"message": {"role": "assistant", "content": "Hello"}} if chat else {"text": "Hello"})
    complete = {"id": "x", "object": "chat.completion" if chat else "text_completion", "created": 9, "model": "m",
                "choices": [{"index": 0, **answer, "logprobs": logprobs(tokens), "finish_reason": "stop"}]}
    chunks, _ = split_body(msgspec.json.encode(complete), endpoint)
    streamed = [msgspec.json.decode(c)["choices"][0].get("logprobs") for c in chunks]
    assert [p for p in streamed if p] == [logprobs(tokens)]
    pieces = [("Hel", tokens[:1]), ("lo", tokens[1:])]
    stored = [msgspec.json.encode({"id": "c1", "object": "x", "created": 1, "model": "m", "choices": [
        {"index": 0, **({"delta": {"content": text}} if chat else {"text": text}), "logprobs": logprobs(part),
         "finish_reason": None}]}) for text, part in pieces]
    whole = msgspec.json.decode(assemble_body(Entry("stream", 0, chunks=stored), endpoint))
    got = whole["choices"][0]["logprobs"]
    assert (got["content"] if chat else got["tokens"]) == (tokens if chat else ["Hel", "lo"])


def test_a_refusal_stream_served_whole_has_no_content() -> None:
    chunks = [chunk({"role": "assistant", "refusal": "I can"}), chunk({"refusal": "not."}), chunk({}, "stop")]
    message = msgspec.json.decode(assemble_body(Entry("stream", 0, chunks=chunks), CHAT))["choices"][0]["message"]
    assert message["content"] is None and message["refusal"] == "I cannot."


async def test_a_replay_ends_with_usage_and_done() -> None:
    source = ReplaySource(Entry("body", 0, body=b'{"id":"x","choices":[{"index":0,"message":{"content":"a"}}]}',
                                usage=Usage(1, 1, 2)), CHAT)
    batches = [batch async for batch in source]
    assert len(batches) == 1
    kinds = [type(event) for event in batches[0]]
    assert kinds == [Chunk, Chunk, UsageReport, StreamDone]
    report = batches[0][2]
    assert isinstance(report, UsageReport) and b'"usage"' in (report.payload or b"")
    await source.aclose()


@pytest.mark.parametrize(("header", "expected"), [
    (b"no-cache", Directives(no_cache=True)),
    (b"No-Store, max-age=60", Directives(no_store=True, max_age=60.0)),
    (b"max-age=abc", Directives(max_age=0.0)),
    (b"max-age=-5", Directives(max_age=0.0)),
    (b"private", Directives()),
])
def test_cache_control(header: bytes, expected: Directives) -> None:
    assert directives([(b"Cache-Control", header)]) == expected
    assert directives([]) == Directives()


def test_cacheable_by_temperature_or_seed() -> None:
    def request(**fields: Any) -> ChatRequest:
        return msgspec.convert({"model": "m", "messages": [{"role": "user", "content": "x"}], **fields}, ChatRequest)

    when = CacheWhenSpec()
    assert cacheable(CHAT, request(temperature=0), when)
    assert not cacheable(CHAT, request(), when)  # OpenAI's default temperature is 1
    assert cacheable(CHAT, request(temperature=1.2, seed=3), when)
    assert not cacheable(CHAT, request(temperature=1.2, seed=3), CacheWhenSpec(seed=False))
    assert cacheable(CHAT, request(temperature=0.5), CacheWhenSpec(max_temperature=0.5))
    assert cacheable(Endpoint.EMBEDDINGS, None, when)


def test_plan_decides_lookup_and_store_from_mode_and_cache_control() -> None:
    """The one decision the stage serves by and `gateway explain` shows (no store is read)."""
    request = msgspec.convert({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 0},
                              ChatRequest)
    sampled = msgspec.convert({"model": "m", "messages": [{"role": "user", "content": "x"}]}, ChatRequest)
    on, none = CacheSpec(), Directives()
    assert plan(on, CHAT, request, none) == CachePlan(True, True, "mode on")
    assert plan(on, CHAT, sampled, none).bypass and not plan(on, CHAT, sampled, none).lookup
    assert plan(on, CHAT, request, Directives(no_cache=True)) == \
        CachePlan(False, True, "mode on, Cache-Control: no-cache")
    assert plan(on, CHAT, request, Directives(no_store=True)) == \
        CachePlan(True, False, "mode on, Cache-Control: no-store")
    both = plan(on, CHAT, request, Directives(no_cache=True, no_store=True))
    assert (both.lookup, both.store, both.bypass) == (False, False, True)
    assert plan(CacheSpec(mode="read-only"), CHAT, request, none) == CachePlan(True, False, "mode read-only")
    assert plan(CacheSpec(mode="write-only"), CHAT, request, none) == CachePlan(False, True, "mode write-only")
    # read-only with no-cache: nothing to do, but the request was cacheable (a miss, not a bypass)
    assert plan(CacheSpec(mode="read-only"), CHAT, request, Directives(no_cache=True)).bypass is False


# -- reads: batched for a shared store, decoded once per stored value ---------------------------------------


class _Many:
    """A `get_many` over a dict that records each call, and can be made to fail like a Redis outage."""

    def __init__(self, values: dict[str, bytes]) -> None:
        self.values, self.calls, self.down = values, [], False

    async def __call__(self, keys: Sequence[str]) -> list[bytes | None]:
        self.calls.append(list(keys))
        await asyncio.sleep(0)  # a round trip
        if self.down:
            raise StoreUnavailable("test: down")
        return [self.values.get(k) for k in keys]


async def test_lookups_of_one_loop_turn_go_out_as_one_batch() -> None:
    many = _Many({"a": b"1", "b": b"2"})
    gets = BatchedGets(many, asyncio.ensure_future)
    found = await asyncio.gather(gets.get("a"), gets.get("b"), gets.get("a"), gets.get("absent"))
    assert found == [b"1", b"2", b"1", None]
    assert many.calls == [["a", "b", "absent"]]  # one call, each key once
    assert await gets.get("b") == b"2" and many.calls[1:] == [["b"]]  # a later turn: a new batch


async def test_a_full_batch_starts_another() -> None:
    many = _Many({})
    gets = BatchedGets(many, asyncio.ensure_future)
    await asyncio.gather(*(gets.get(str(i)) for i in range(MAX_BATCH + 3)))
    assert [len(keys) for keys in many.calls] == [MAX_BATCH, 3]


async def test_a_failed_batch_fails_each_lookup_and_a_cancelled_one_leaves_the_others() -> None:
    many = _Many({"a": b"1"})
    gets = BatchedGets(many, asyncio.ensure_future)
    many.down = True
    results = await asyncio.gather(gets.get("a"), gets.get("b"), return_exceptions=True)
    assert all(isinstance(r, StoreUnavailable) for r in results)
    many.down = False
    left, stays = asyncio.ensure_future(gets.get("a")), asyncio.ensure_future(gets.get("a"))
    await asyncio.sleep(0)
    left.cancel()
    assert await stays == b"1" and left.cancelled()


async def test_a_key_written_again_is_decoded_again() -> None:
    policy = compile_text(textwrap.dedent("""\
        version: 1
        auth: none
        providers: {mock: {kind: openai, base_url: "http://127.0.0.1:9/v1", api_key_env: NONE}}
        prices: {m: {input_per_mtok: 1, output_per_mtok: 2}}
        models: {chat: {provider: mock, model: m, cache: {}}}
        """), "p.yaml", {"NONE": "x"})
    store = MemoryStore()
    cache = ResponseCache(policy, store, {}, Metrics(), TokenCounter())
    first = Entry("body", 1.0, body=b'{"a":1}', usage=Usage(1, 2, 3), provider="mock", model="m")
    await cache.write("chat", "k", first, 60, None, 1 << 20)
    assert await cache.read("k", None, "chat") == first
    assert await cache.read("k", None, "chat") is await cache.read("k", None, "chat")  # decoded once
    second = Entry("body", 2.0, body=b'{"a":2}', provider="mock", model="m")
    await cache.write("chat", "k", second, 60, None, 1 << 20)
    assert await cache.read("k", None, "chat") == second
    result = cache.result(first, "hit", None)
    assert (result.saved_prompt_tokens, result.saved_completion_tokens) == (1, 2)
    assert result.saved_usd == pytest.approx((1 * 1 + 2 * 2) / 1e6)



async def _absent() -> bool:
    """A flight's `present`: the entry never is in the cache."""
    return False


def _flights(store: MemoryStore, count: int = 1) -> tuple[list[Flights], list[asyncio.Task[Any]]]:
    """`count` replicas' flights sharing `store`, and the tasks they spawn (to wait for their unlocks)."""
    tasks: list[asyncio.Task[Any]] = []
    return [Flights(store, True, lambda coro: tasks.append(asyncio.ensure_future(coro))) for _ in range(count)], tasks


class _Interleaving(MemoryStore):
    """A memory store that runs `between` once, right after a read of the key `at` (another replica acting
    between this replica's read and its next call), as a network round trip would let it."""

    at = ""
    between: Any = None

    async def get(self, key: str) -> bytes | None:
        value = await super().get(key)
        if key == self.at and self.between is not None:
            between, self.between = self.between, None
            await between()
        return value


async def test_a_leader_whose_lock_expired_leaves_the_next_leaders_lock() -> None:
    """Two replicas' flights on one store: the first leader's lock runs out as it releases it, and the second
    takes it. The first must not free the second's lock (a third replica would lead beside it): a read of the
    lock then a delete would, when the second takes it between the two."""
    store = _Interleaving()
    (first, second), tasks = _flights(store, 2)
    taken: list[Any] = []

    async def second_leads() -> None:  # the first's lease ends; the second replica leads
        await store.delete(LOCK + "k")
        taken.append(await second.lead_or_wait("k", 30.0, _absent))

    leading = await first.lead_or_wait("k", 30.0, _absent)
    assert leading is not None and leading.locked
    store.at, store.between = LOCK + "k", second_leads
    leading.release()
    await asyncio.gather(*tasks)
    if not taken:  # the release read nothing: the second leads after it
        store.between = None
        await second_leads()
    assert taken[0] is not None and taken[0].locked
    assert await store.get(LOCK + "k") is not None  # still the second leader's
    taken[0].release()
    await asyncio.gather(*tasks)
    assert await store.get(LOCK + "k") is None


async def test_a_lock_the_store_could_not_release_is_released_when_it_answers_again() -> None:
    """A leader's answer comes while the store cannot answer: its unlock is asked again until the store takes it
    (within the lock's own expiry), so an outage leaves no lock for every replica's requests to wait out."""
    class Down(MemoryStore):
        failures = 0

        async def compare_and_delete(self, key: str, expected: bytes) -> bool:
            if self.failures:
                self.failures -= 1
                raise StoreUnavailable("test: the store went away")
            return await super().compare_and_delete(key, expected)

    store = Down()
    (flights,), tasks = _flights(store)

    leading = await flights.lead_or_wait("k", 30.0, _absent)
    assert leading is not None and leading.locked
    store.failures = 3
    started = asyncio.get_running_loop().time()
    leading.release()
    await asyncio.gather(*tasks)
    assert await store.get(LOCK + "k") is None  # released on the fourth try
    assert asyncio.get_running_loop().time() - started >= 3 * coalesce.UNLOCK_RETRY_S * 0.9
    expiring = await flights.lead_or_wait("e", 0.3, _absent)  # a store that stays down: given up at the lock's expiry
    assert expiring is not None
    store.failures = 1_000
    expiring.release()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)


async def test_an_unlock_retried_after_it_was_applied_leaves_the_next_flights_lock() -> None:
    """The store took an unlock but its answer was lost (a timeout): the retry must not free the lock a later
    flight of the same replica took meanwhile for the same key (each flight has its own token)."""
    class Lost(MemoryStore):
        lose = 0
        between: Any = None

        async def compare_and_delete(self, key: str, expected: bytes) -> bool:
            removed = await super().compare_and_delete(key, expected)
            if self.lose:
                self.lose -= 1
                if self.between is not None:
                    await self.between()
                raise StoreUnavailable("test: applied, but the answer was lost")
            return removed

    store = Lost()
    (flights,), tasks = _flights(store)

    first = await flights.lead_or_wait("k", 30.0, _absent)
    assert first is not None and first.locked
    later: list[Any] = []

    async def next_flight() -> None:  # the lock is gone: the replica's next request for the key leads
        later.append(await flights.lead_or_wait("k", 30.0, _absent))

    store.lose, store.between = 1, next_flight
    first.release()
    await asyncio.gather(*tasks)
    assert later[0] is not None and later[0].locked
    assert await store.get(LOCK + "k") == later[0].token  # the retry left the new flight's lock alone
