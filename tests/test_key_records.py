"""Keys created at run time, unit level: the record codec, what a digest opens, and the cached look-up
(`auth.dynamic`) over a real memory store: single flight, negative cache, junk refused without a store
call, invalidation, and `on_unavailable` when the store fails."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from gateway.auth.dynamic import DynamicKeys
from gateway.auth.keys import digest_of, generate_key
from gateway.auth.records import (
    CorruptRecord,
    KeyRecord,
    Revoked,
    decode_index,
    decode_record,
    decode_stored,
    digest_key,
    encode_index,
    encode_record,
    encode_revoked,
    is_key_id,
    looks_like_key,
    new_key_id,
    public_view,
    record_key,
    virtual_key,
)
from gateway.auth.registry import KeyRegistry
from gateway.errors import KeyConflict, KeysUnavailable
from gateway.policy import PolicyError, compile_text
from gateway.policy.accounting_schema import BudgetSpec, LimitSpec
from gateway.policy.keys_schema import DynamicKeysSpec
from gateway.store import MemoryStore, StoreUnavailable


def _record(secret: str, **fields: Any) -> KeyRecord:
    base: dict[str, Any] = {"id": new_key_id(), "name": "svc", "tenant": "acme", "models": ("chat",),
                            "digest": digest_of(secret).hex(), "created_at": 1_000.0}
    return KeyRecord(**{**base, **fields})


# -- the codec -----------------------------------------------------------------------------------------


def test_a_record_survives_the_codec_with_every_field() -> None:
    secret = generate_key()
    record = _record(secret, expires_at=2_000.5, limits=LimitSpec(rpm=60, concurrent=2),
                     budget=BudgetSpec(usd=12.5, period="day", mode="soft"), rotated_at=1_500.0,
                     previous_digest=digest_of(generate_key()).hex(), previous_until=1_600.0)
    assert decode_record(encode_record(record)) == record
    assert decode_record(encode_record(_record(secret, models=None))).models is None


@pytest.mark.parametrize("raw", [
    b"", b"not json", b"[]", b'{"id": "vk_0000000000000000"}', b"\xff\xfe",
    b'{"v": 2, "id": "vk_0000000000000000", "name": "a", "tenant": "t", "models": null, "digest": "' + b"0" * 64
    + b'", "created_at": 1}',
    b'{"id": "../etc", "name": "a", "tenant": "t", "models": null, "digest": "' + b"0" * 64 + b'", "created_at": 1}',
    b'{"id": "vk_0000000000000000", "name": "a", "tenant": "t", "models": null, "digest": "zz", "created_at": 1}',
    b'{"id": "vk_0000000000000000", "name": "a", "tenant": "t", "models": null, "digest": "' + b"0" * 64
    + b'", "created_at": 1, "budget": {"usd": -1}}',
])
def test_unreadable_records_are_corrupt_not_crashes(raw: bytes) -> None:
    with pytest.raises(CorruptRecord):
        decode_record(raw)


def test_a_revocation_marker_is_not_a_record() -> None:
    record = _record(generate_key(), previous_digest=digest_of(generate_key()).hex(), previous_until=5_000.0)
    marker = Revoked(revoked_at=2_000.0, id=record.id, digests=(record.digest, str(record.previous_digest)))
    raw = encode_revoked(marker)
    assert decode_stored(raw) == marker and decode_stored(encode_record(record)) == record
    with pytest.raises(CorruptRecord):  # a reader that knows records only lets nobody in with it
        decode_record(raw)
    assert record.digest not in repr(marker)
    for junk in (b"junk", b'{"revoked_at": 1, "id": "../x", "digests": []}', b'{"revoked_at": 1}'):
        with pytest.raises(CorruptRecord):
            decode_stored(junk)


def test_the_index_codec() -> None:
    index = {"vk_0000000000000001": ("acme", "a"), "vk_0000000000000002": ("globex", "b")}
    assert decode_index(encode_index(index)) == index
    assert decode_index(None) == {}
    with pytest.raises(CorruptRecord):
        decode_index(b'{"vk_1": 5}')


def test_records_never_print_or_show_a_digest() -> None:
    secret = generate_key()
    record = _record(secret, previous_digest=digest_of(generate_key()).hex(), previous_until=5_000.0)
    shown = msgspec.json.encode(public_view(record, now=1_000.0)).decode()
    assert record.digest not in repr(record) and record.digest not in shown
    assert str(record.previous_digest) not in shown and secret not in shown
    assert "digest" not in shown
    assert public_view(record, now=1_000.0)["previous_key_valid_until"] == 5_000
    assert public_view(record, now=6_000.0)["previous_key_valid_until"] is None


def test_ids_and_key_shapes() -> None:
    ids = {new_key_id() for _ in range(100)}
    assert len(ids) == 100 and all(is_key_id(i) for i in ids)
    assert not is_key_id("vk_123") and not is_key_id("VK_0000000000000000")
    assert all(looks_like_key(generate_key()) for _ in range(100))
    for junk in ("", "sk-123", "gw-short", generate_key() + "x", generate_key()[:-1] + "!", "Bearer " + generate_key()):
        assert not looks_like_key(junk)


# -- what a digest opens ---------------------------------------------------------------------------------


def test_the_current_secret_opens_the_key_with_its_limits_budget_and_expiry() -> None:
    secret = generate_key()
    record = _record(secret, expires_at=9_000.0, limits=LimitSpec(rpm=5), budget=BudgetSpec(usd=1))
    key = virtual_key(record, digest_of(secret), now=1_000.0, static_names=frozenset())
    assert key is not None
    assert (key.name, key.tenant, key.key_id, key.aliases) == ("svc", "acme", record.id, frozenset({"chat"}))
    assert (key.limits, key.budget, key.expires_at) == (LimitSpec(rpm=5), BudgetSpec(usd=1), 9_000.0)
    every = virtual_key(_record(secret, models=None), digest_of(secret), 1_000.0, frozenset())
    assert every is not None and every.aliases is None


def test_an_old_secret_opens_the_key_only_within_its_grace_period() -> None:
    old, new = generate_key(), generate_key()
    record = _record(new, previous_digest=digest_of(old).hex(), previous_until=2_000.0, expires_at=5_000.0)
    during = virtual_key(record, digest_of(old), now=1_500.0, static_names=frozenset())
    assert during is not None and during.expires_at == 2_000.0  # the grace end, not the key's expiry
    assert virtual_key(record, digest_of(old), now=2_000.0, static_names=frozenset()) is None
    assert virtual_key(record, digest_of(new), now=2_500.0, static_names=frozenset()) is not None
    assert virtual_key(record, digest_of(generate_key()), now=1_500.0, static_names=frozenset()) is None


def test_a_name_taken_later_by_a_policy_key_is_not_shadowed() -> None:
    secret = generate_key()
    record = _record(secret, name="billing")
    key = virtual_key(record, digest_of(secret), now=1_000.0, static_names=frozenset({"billing"}))
    assert key is not None and key.name == record.id


# -- the cached look-up over a real memory store ---------------------------------------------------------


class CountingStore(MemoryStore):
    """A memory store that counts reads and can be switched to fail like an unreachable Redis."""

    def __init__(self) -> None:
        super().__init__()
        self.gets = 0
        self.down = False
        self.delay = 0.0

    async def get(self, key: str) -> bytes | None:
        self.gets += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.down:
            raise StoreUnavailable("test: down")
        return await super().get(key)


async def _setup(**spec: Any) -> tuple[CountingStore, DynamicKeys, KeyRegistry]:
    store = CountingStore()
    await store.start()
    mode = spec.pop("mode", "open")
    dynamic = DynamicKeys(DynamicKeysSpec(enabled=True, **spec), store, frozenset({"static"}), mode)
    await dynamic.start()
    registry = KeyRegistry(store, max_keys=3, static_names=frozenset({"static"}), dynamic=dynamic)
    return store, dynamic, registry


async def _create(registry: KeyRegistry, name: str | None = None, **fields: Any) -> tuple[KeyRecord, str]:
    args: dict[str, Any] = {"tenant": "acme", "name": name, "models": None, "expires_at": None, "limits": None,
                            "budget": None}
    return await registry.create(**{**args, **fields})


def test_lookups_are_cached_and_shared() -> None:
    async def main() -> None:
        store, dynamic, registry = await _setup()
        record, secret = await _create(registry, "a")
        digest = digest_of(secret)
        store.gets, store.delay = 0, 0.05
        found = await asyncio.gather(*(dynamic.find(digest, secret) for _ in range(20)))
        assert all(k is not None and k.key_id == record.id for k in found)
        assert store.gets == 2 and dynamic.store_lookups == 1  # single flight: pointer and record, once
        assert await dynamic.find(digest, secret) is found[0] and store.gets == 2  # cached
        await dynamic.aclose()
        await store.aclose()

    asyncio.run(main())


def test_junk_costs_no_store_call_and_unknown_keys_are_remembered() -> None:
    async def main() -> None:
        store, dynamic, _ = await _setup(negative_ttl_s=60)
        for junk in ("sk-wrong", "", "x" * 5000, "gw-" + "a" * 42):
            assert await dynamic.find(digest_of(junk), junk) is None
        assert store.gets == 0
        unknown = generate_key()
        results = await asyncio.gather(*(dynamic.find(digest_of(unknown), unknown) for _ in range(10)))
        assert results == [None] * 10
        assert await dynamic.find(digest_of(unknown), unknown) is None
        assert dynamic.store_lookups == 1 and store.gets == 1  # one pointer read, then the negative cache
        await dynamic.aclose()
        await store.aclose()

    asyncio.run(main())


def test_store_lookups_in_flight_are_bounded() -> None:
    async def main() -> None:
        store, dynamic, _ = await _setup(max_lookups=3)
        store.delay = 0.02
        active = peak = 0
        original = store.get

        async def tracking(key: str) -> bytes | None:
            nonlocal active, peak
            active += 1
            peak = max(peak, active)
            try:
                return await original(key)
            finally:
                active -= 1

        store.get = tracking  # type: ignore[method-assign]  # a probe around the real store's read
        keys = [generate_key() for _ in range(30)]
        assert await asyncio.gather(*(dynamic.find(digest_of(k), k) for k in keys)) == [None] * 30
        assert peak == 3 and dynamic.store_lookups == 30
        await dynamic.aclose()
        await store.aclose()

    asyncio.run(main())


def test_revoke_and_rotate_stop_the_cached_secret_at_once() -> None:
    async def main() -> None:
        _store, dynamic, registry = await _setup(cache_ttl_s=300)
        record, secret = await _create(registry, "a")
        assert await dynamic.find(digest_of(secret), secret) is not None
        rotated, new_secret = await registry.rotate(record.id, 0) or (None, "")
        assert rotated is not None and rotated.id == record.id and new_secret != secret
        assert await dynamic.find(digest_of(secret), secret) is None
        assert (await dynamic.find(digest_of(new_secret), new_secret)) is not None
        assert await registry.revoke(record.id)
        assert await dynamic.find(digest_of(new_secret), new_secret) is None
        assert not await registry.revoke(record.id)
        assert await registry.get(record.id) is None
        await dynamic.aclose()
        await _store.aclose()

    asyncio.run(main())


def test_a_published_change_empties_another_replicas_cache() -> None:
    async def main() -> None:
        store, dynamic, _ = await _setup(cache_ttl_s=300)
        other = DynamicKeys(DynamicKeysSpec(enabled=True, cache_ttl_s=300), store, frozenset(), "open")
        await other.start()
        await asyncio.sleep(0)  # its listener subscribes
        lone = KeyRegistry(store, max_keys=10, static_names=frozenset())  # no local cache: pub/sub only
        record, secret = await _create(lone, "a")
        assert await other.find(digest_of(secret), secret) is not None
        assert await lone.revoke(record.id)
        for _ in range(100):
            if len(other) == 0:
                break
            await asyncio.sleep(0.01)
        assert await other.find(digest_of(secret), secret) is None
        await other.aclose()
        await dynamic.aclose()
        await store.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("mode", ["open", "closed"])
def test_a_failing_store_follows_on_unavailable(mode: str) -> None:
    async def main() -> None:
        store, dynamic, registry = await _setup(cache_ttl_s=0.05, mode=mode)
        _, seen = await _create(registry, "seen")
        _, unseen = await _create(registry, "unseen")
        assert await dynamic.find(digest_of(seen), seen) is not None
        await asyncio.sleep(0.06)  # the cached entry is stale now
        store.down = True
        if mode == "open":
            assert await dynamic.find(digest_of(seen), seen) is not None
        else:
            with pytest.raises(KeysUnavailable):
                await dynamic.find(digest_of(seen), seen)
        with pytest.raises(KeysUnavailable) as caught:
            await dynamic.find(digest_of(unseen), unseen)
        assert caught.value.status == 503
        store.down = False
        assert await dynamic.find(digest_of(unseen), unseen) is not None
        await dynamic.aclose()
        await store.aclose()

    asyncio.run(main())


def test_names_are_unique_and_the_key_count_is_capped() -> None:
    async def main() -> None:
        store, dynamic, registry = await _setup()
        first, first_secret = await _create(registry, "a")
        with pytest.raises(KeyConflict) as taken:
            await _create(registry, "a")
        assert taken.value.param == "name"
        with pytest.raises(KeyConflict):
            await _create(registry, "static")  # a policy key's name
        await _create(registry, "b")
        await _create(registry)  # named by its id
        with pytest.raises(KeyConflict) as full:
            await _create(registry, "d")
        assert full.value.code == "too_many_keys"
        await store.delete(record_key(first.id))  # a record gone behind the index's back: pruned, room again
        await _create(registry, "d")
        page, more = await registry.page(None, limit=2, after=None)
        assert len(page) == 2 and more
        rest, more = await registry.page(None, limit=10, after=page[-1].id)
        assert len(rest) == 1 and not more
        assert await store.get(digest_key(first.digest)) is not None  # its pointer is left, and opens nothing
        assert await dynamic.find(digest_of(first_secret), first_secret) is None
        await dynamic.aclose()
        await store.aclose()

    asyncio.run(main())


# -- the policy's `dynamic_keys` section ----------------------------------------------------------------

_POLICY = """\
version: 1
auth: {auth}
providers: {{demo: {{kind: demo}}}}
models: {{demo: {{provider: demo, model: demo-1}}}}
{extra}"""


def test_dynamic_keys_in_the_policy() -> None:
    on = compile_text(_POLICY.format(auth="keys", extra="dynamic_keys: {enabled: true, cache_ttl_s: 1}\n"))
    assert on.dynamic_keys.enabled and on.dynamic_keys.cache_ttl_s == 1 and len(on.keys) == 0  # no static key needed
    assert any("admin_token_env" in warning for warning in on.warnings)  # nobody here can create one
    assert not compile_text(_POLICY.format(auth="none", extra="")).dynamic_keys.enabled
    with pytest.raises(PolicyError) as no_keys:
        compile_text(_POLICY.format(auth="keys", extra=""))
    assert "dynamic_keys" in str(no_keys.value)
    with pytest.raises(PolicyError) as open_door:
        compile_text(_POLICY.format(auth="none", extra="dynamic_keys:\n  enabled: true\n"), "p.yaml")
    assert "p.yaml:6: dynamic_keys.enabled" in str(open_door.value)
    for bad in ("{enabled: yes please}", "{cache_ttl_s: 0}", "{max_keys: -1}", "{on_unavailable: maybe}",
                "{ttl: 5}"):
        with pytest.raises(PolicyError):
            compile_text(_POLICY.format(auth="keys", extra=f"dynamic_keys: {bad}\n"))


def test_serve_refuses_several_workers_with_run_time_keys_in_memory(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(_POLICY.format(auth="keys", extra="dynamic_keys: {enabled: true}\n"))
    done = subprocess.run([sys.executable, "-m", "gateway", "serve", "--policy", str(policy), "--workers", "2",
                           "--port", "1"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "--workers" in done.stderr and "redis" in done.stderr


def test_a_reload_adopts_the_keys_found_before() -> None:
    async def main() -> None:
        store, dynamic, registry = await _setup()
        _, kept = await _create(registry, "kept")
        _, renamed = await _create(registry, "soon-static")
        for secret in (kept, renamed):
            assert await dynamic.find(digest_of(secret), secret) is not None
        after = DynamicKeys(DynamicKeysSpec(enabled=True), store, frozenset({"soon-static"}), "open")
        after.adopt(dynamic)
        store.down = True  # an outage right after the reload: only what was adopted still works
        assert await after.find(digest_of(kept), kept) is not None
        with pytest.raises(KeysUnavailable):
            await after.find(digest_of(renamed), renamed)
        await dynamic.aclose()
        await store.aclose()

    asyncio.run(main())


def test_a_key_revoked_between_a_reloads_adoption_and_its_start_is_forgotten_by_the_new_runtime() -> None:
    """A reload's runtime adopts the keys found before when it is built, and listens only once it starts (a guard's
    analyzers may take seconds in between). A revocation heard meanwhile, by the old runtime's listener (another
    replica's call) or its admin call (`forget`), is passed on: the new runtime used to be swapped in holding the
    revoked key, and to accept it for `cache_ttl_s`."""
    async def main() -> None:
        store, dynamic, registry = await _setup(cache_ttl_s=300)
        await dynamic.start()
        heard, told = await _create(registry, "heard"), await _create(registry, "told")
        for _, secret in (heard, told):
            assert await dynamic.find(digest_of(secret), secret) is not None
        after = DynamicKeys(DynamicKeysSpec(enabled=True, cache_ttl_s=300), store, frozenset(), "open")
        after.adopt(dynamic)
        assert len(after) == 2
        lone = KeyRegistry(store, max_keys=10, static_names=frozenset())  # another replica: pub/sub only
        assert await lone.revoke(heard[0].id)
        for _ in range(100):
            if len(after) == 1:
                break
            await asyncio.sleep(0.01)
        dynamic.forget(told[0].id)  # this replica's own admin call, on the runtime it acquired
        assert len(after) == 0
        assert await after.find(digest_of(heard[1]), heard[1]) is None
        await after.start()  # listening before it serves: the old runtime may stop listening once it does
        await dynamic.aclose()
        other = await _create(registry, "other")
        assert await after.find(digest_of(other[1]), other[1]) is not None
        assert await lone.revoke(other[0].id)
        for _ in range(100):
            if len(after) == 0:
                break
            await asyncio.sleep(0.01)
        assert await after.find(digest_of(other[1]), other[1]) is None
        await after.aclose()
        await store.aclose()

    asyncio.run(main())


def test_a_redis_state_without_its_url_is_an_error_or_a_warning_never_a_crash() -> None:
    text = _POLICY.format(auth="keys", extra="state: {backend: redis, url_env: GW_UNSET_REDIS_URL}\n"
                                             "dynamic_keys: {enabled: true}\n")
    checked = compile_text(text, "p.yaml", env={}, require_env=False)
    assert any("GW_UNSET_REDIS_URL" in warning for warning in checked.warnings)
    with pytest.raises(PolicyError) as served:
        compile_text(text, "p.yaml", env={})
    assert "p.yaml:5: state.url_env" in str(served.value)
