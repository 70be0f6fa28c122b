"""The admin operations on run-time keys (`auth.registry`) against both stores, memory and Redis: a
revocation and a rotation of one key at the same moment cannot both succeed, an interrupted revocation
lets nobody in and is finished by a retry, and a name whose key the store has dropped is free again.

The races are played out deterministically: a probe around the store runs the other operation to its end
just before this one's compare-and-set, i.e. between its read and its write.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, cast

import pytest

from gateway.auth.dynamic import DynamicKeys
from gateway.auth.keys import digest_of
from gateway.auth.records import (
    INDEX,
    KeyRecord,
    Revoked,
    decode_index,
    decode_stored,
    digest_key,
    record_key,
)
from gateway.auth.registry import RETENTION_S, KeyRegistry
from gateway.errors import KeyConflict
from gateway.policy.keys_schema import DynamicKeysSpec
from gateway.store import Store, StoreUnavailable
from tests.support.redis_server import suite_redis_url
from tests.test_store import Stores


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with suite_redis_url() as url:
        yield url


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    stores = Stores(request.param, request.getfixturevalue("redis_url") if request.param == "redis" else None)
    yield await stores.new()
    await stores.close()


class Probe:
    """`store` with hooks: `before_cas[key]` runs once just before the next compare-and-set on `key`;
    `fail` names operations that raise `StoreUnavailable` (once each), as a store going away would."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.before_cas: dict[str, Callable[[], Awaitable[Any]]] = {}
        self.fail: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        if name in self.fail:
            self.fail.discard(name)

            async def failing(*_: Any, **__: Any) -> Any:
                raise StoreUnavailable(f"test: {name} failed")

            return failing
        return getattr(self.store, name)

    async def compare_and_set(self, key: str, expected: bytes | None, new: bytes, ttl_s: float | None) -> bool:
        step = self.before_cas.pop(key, None)
        if step is not None:
            await step()
        return await self.store.compare_and_set(key, expected, new, ttl_s)


def registry(store: Store | Probe, max_keys: int = 100) -> KeyRegistry:
    return KeyRegistry(cast("Store", store), max_keys=max_keys, static_names=frozenset())


async def create(keys: KeyRegistry, name: str | None = None, **fields: Any) -> tuple[KeyRecord, str]:
    args: dict[str, Any] = {"tenant": "acme", "name": name, "models": None, "expires_at": None, "limits": None,
                            "budget": None}
    return await keys.create(**{**args, **fields})


async def opens(store: Store, secret: str) -> str | None:
    """The id of the key `secret` opens, by a fresh look-up (no cache), or None."""
    found = await DynamicKeys(DynamicKeysSpec(enabled=True), store, frozenset(), "closed").find(
        digest_of(secret), secret)
    return None if found is None else found.key_id


async def indexed(store: Store) -> dict[str, tuple[str, str]]:
    return decode_index(await store.get(INDEX))


async def test_a_rotation_that_lands_first_makes_the_revocation_409(store: Store) -> None:
    record, secret = await create(registry(store), "raced")
    rotated: list[tuple[KeyRecord, str] | None] = []

    async def rotate() -> None:
        rotated.append(await registry(store).rotate(record.id, 0))

    probe = Probe(store)
    probe.before_cas[record_key(record.id)] = rotate  # after the revocation read the record, before it writes
    with pytest.raises(KeyConflict) as conflict:
        await registry(probe).revoke(record.id)
    assert conflict.value.status == 409 and conflict.value.code == "conflict"
    assert rotated and rotated[0] is not None
    new_record, new_secret = rotated[0]
    assert await opens(store, new_secret) == record.id  # the rotation's answer is a working secret
    assert await opens(store, secret) is None
    assert await registry(store).get(record.id) == new_record and record.id in await indexed(store)
    assert await registry(store).revoke(record.id)  # retried, the revocation goes through
    assert await opens(store, new_secret) is None and await registry(store).get(record.id) is None


async def test_a_revocation_that_lands_first_makes_the_rotation_409(store: Store) -> None:
    record, secret = await create(registry(store), "raced")
    revoked: list[bool] = []

    async def revoke() -> None:
        revoked.append(await registry(store).revoke(record.id))

    probe = Probe(store)
    probe.before_cas[record_key(record.id)] = revoke  # after the rotation read the record, before it writes
    with pytest.raises(KeyConflict) as conflict:
        await registry(probe).rotate(record.id, 3600)
    assert conflict.value.status == 409
    assert revoked == [True]
    assert await opens(store, secret) is None
    assert await store.get(record_key(record.id)) is None and record.id not in await indexed(store)
    assert await registry(store).rotate(record.id, 0) is None  # now simply gone: 404
    assert not await registry(store).revoke(record.id)


async def test_many_revocations_and_rotations_at_once_leave_nothing_behind(store: Store) -> None:
    """Truly concurrent calls (on Redis they interleave): each succeeds, finds no key, or answers 409, and
    once the key is revoked no secret any of them returned has a pointer left in the store."""
    keys = registry(store)
    record, secret = await create(keys, "crowd")

    async def call(n: int) -> tuple[str, Any]:
        try:
            if n % 3 == 0:
                return "revoke", await keys.revoke(record.id)
            return "rotate", await keys.rotate(record.id, 0)
        except KeyConflict:
            return "conflict", None

    results = await asyncio.gather(*(call(n) for n in range(12)))
    secrets = [secret] + [r[1] for kind, r in results if kind == "rotate" and r is not None]
    await keys.revoke(record.id)  # alone now: revokes the key if every revocation above lost
    for given in secrets:
        assert await store.get(digest_key(digest_of(given).hex())) is None
        assert await opens(store, given) is None
    assert await store.get(record_key(record.id)) is None and record.id not in await indexed(store)


async def test_an_interrupted_revocation_lets_nobody_in_and_a_retry_finishes_it(store: Store) -> None:
    record, secret = await create(registry(store), "cut")
    rotated = await registry(store).rotate(record.id, 3600)  # two secrets work: the new one and the old one
    assert rotated is not None
    _, new_secret = rotated
    probe = Probe(store)
    probe.fail.add("publish")  # the store goes away right after the record was swapped for the marker
    with pytest.raises(StoreUnavailable):
        await registry(probe).revoke(record.id)
    stored = await store.get(record_key(record.id))
    assert stored is not None and isinstance(decode_stored(stored), Revoked)
    for given in (secret, new_secret):
        assert await store.get(digest_key(digest_of(given).hex())) is not None  # pointers still there ...
        assert await opens(store, given) is None  # ... and they open nothing
    assert await registry(store).get(record.id) is None  # 404, not a 503 for an unreadable record
    assert await registry(store).rotate(record.id, 0) is None
    assert await registry(store).page(None, limit=10, after=None) == ([], False)
    assert await registry(store).revoke(record.id)  # the retry finishes the job
    for given in (secret, new_secret):
        assert await store.get(digest_key(digest_of(given).hex())) is None
    assert await store.get(record_key(record.id)) is None and record.id not in await indexed(store)
    assert not await registry(store).revoke(record.id)


async def test_a_revocation_cut_before_its_index_update_is_done_and_its_entry_cleaned_up(store: Store) -> None:
    """The store goes away after the record was dropped, before the index forgot the key: the key is revoked (it
    opens nothing, and the caller is told so: a 503 invited a retry of what was done), and its index entry, left
    behind, is dropped by the next listing; a second revocation finds no such key."""
    record, secret = await create(registry(store), "late")
    probe = Probe(store)

    async def gone() -> None:
        raise StoreUnavailable("test: the store went away")

    probe.before_cas[INDEX] = gone
    assert await registry(probe).revoke(record.id) is True
    assert await store.get(record_key(record.id)) is None and record.id in await indexed(store)
    assert await opens(store, secret) is None
    assert await registry(store).page(None, limit=10, after=None) == ([], False)
    assert record.id not in await indexed(store)
    assert await registry(store).revoke(record.id) is False  # now there is no such key


async def test_a_name_whose_key_the_store_dropped_is_free_again(store: Store) -> None:
    now = 1_000_000_000.0
    # a key created (by the registry's clock) so long ago that the store drops its record in 0.3 s
    old = KeyRegistry(store, max_keys=2, static_names=frozenset(), wall=lambda: now)
    dropped, _ = await create(old, "reused", expires_at=now - RETENTION_S + 0.3)
    live, _ = await create(registry(store, max_keys=2), "kept")
    assert set(await indexed(store)) == {dropped.id, live.id}
    with pytest.raises(KeyConflict) as taken:
        await create(registry(store, max_keys=2), "reused")
    assert taken.value.code == "name_taken"
    await asyncio.sleep(0.5)
    assert await store.get(record_key(dropped.id)) is None  # gone, but its name is still in the index
    assert dropped.id in await indexed(store)
    made, secret = await create(registry(store, max_keys=2), "reused")  # reclaimed, without a listing first
    assert await opens(store, secret) == made.id
    assert await indexed(store) == {live.id: ("acme", "kept"), made.id: ("acme", "reused")}
    with pytest.raises(KeyConflict) as still:  # a live key's name stays taken
        await create(registry(store, max_keys=2), "kept")
    assert still.value.code == "name_taken"


async def test_a_name_held_by_an_interrupted_revocation_is_free_again(store: Store) -> None:
    record, _ = await create(registry(store), "halfway")
    probe = Probe(store)
    probe.fail.add("publish")
    with pytest.raises(StoreUnavailable):
        await registry(probe).revoke(record.id)
    made, secret = await create(registry(store), "halfway")
    assert made.id != record.id and await opens(store, secret) == made.id
    assert record.id not in await indexed(store)
