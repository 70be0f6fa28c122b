"""The admin API's operations on run-time keys: create, list, get, revoke, rotate, over the `Store`.

The store offers single-key atomic operations only, so each change is ordered so that a failure
half-way (Redis gone between two writes) never leaves a key that works but cannot be seen or
revoked:

* create writes the record, then claims its name in the index (compare-and-set), then the digest
  pointer: until the pointer exists, the key opens nothing; a record whose index claim failed is
  deleted again. A name (or a place under `max_keys`) held in the index by a key whose record
  the store has dropped since (expired past its retention, evicted) is reclaimed;
* revoke swaps the record for a `Revoked` marker by compare-and-set (a concurrent change wins,
  this one answers 409): from then on the key opens nothing. It then publishes the id and deletes
  the digest pointers, the marker and the index entry: a retry after a failure finds the marker
  and finishes the job;
* rotate writes the new pointer, then swaps the record by compare-and-set (a concurrent change,
  a revocation included, wins, this one answers 409), then removes or shortens the old pointer.
  A look-up always checks the record itself, so a pointer left behind opens nothing.

Revoke and rotate both change the record by compare-and-set against the value they read, so of
a revocation and a rotation of one key at the same moment exactly one succeeds.

Every `StoreUnavailable` propagates: the caller answers 503 and the operation may be retried.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import msgspec

from ..errors import KeyConflict
from ..store.base import Store
from .keys import digest_of, generate_key
from .records import (
    CHANNEL,
    INDEX,
    KeyRecord,
    Revoked,
    decode_index,
    decode_stored,
    digest_key,
    encode_index,
    encode_record,
    encode_revoked,
    is_key_id,
    new_key_id,
    record_key,
)

if TYPE_CHECKING:
    from ..policy.accounting_schema import BudgetSpec, LimitSpec
    from .dynamic import DynamicKeys

__all__ = ["RETENTION_S", "KeyRegistry"]

RETENTION_S = 86_400.0
"""An expired key's record stays this long (listed as expired), then the store drops it."""
_CAS_ATTEMPTS = 16
_READ_BATCH = 32

Index = dict[str, tuple[str, str]]


class KeyRegistry:
    """Admin operations against one runtime's store; `dynamic` (this process's cache) forgets at once."""

    def __init__(
        self, store: Store, *, max_keys: int, static_names: frozenset[str], dynamic: DynamicKeys | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.max_keys = max_keys
        self.static_names = static_names
        self.dynamic = dynamic
        self._wall = wall

    async def create(
        self, *, tenant: str, name: str | None, models: Sequence[str] | None, expires_at: float | None,
        limits: LimitSpec | None, budget: BudgetSpec | None,
    ) -> tuple[KeyRecord, str]:
        """A new key: its record and its secret (shown once, never stored)."""
        if name is not None and name in self.static_names:
            raise KeyConflict(f"the name `{name}` is a key of the policy file", param="name", code="name_taken")
        now = self._wall()
        secret = generate_key()
        for _ in range(_CAS_ATTEMPTS):  # a fresh id until one is free (a collision is all but impossible)
            key_id = new_key_id()
            record = KeyRecord(
                id=key_id, name=name or key_id, tenant=tenant, models=None if models is None else tuple(models),
                digest=digest_of(secret).hex(), created_at=now, expires_at=expires_at, limits=limits, budget=budget,
            )
            written = await self.store.compare_and_set(record_key(key_id), None, encode_record(record),
                                                       _record_ttl(record, now))
            if written:
                break
        else:
            raise KeyConflict("could not allocate a key id; retry")
        try:
            await self._claim(record)
        except BaseException:
            await self.store.delete(record_key(record.id))
            raise
        await self.store.set(digest_key(record.digest), record.id.encode(), _pointer_ttl(record.expires_at, now))
        return record, secret

    async def _claim(self, record: KeyRecord) -> None:
        def add(index: Index) -> Index:
            if any(name == record.name for _, name in index.values()):
                raise KeyConflict(f"a key named `{record.name}` exists already", param="name", code="name_taken")
            if len(index) >= self.max_keys:
                raise KeyConflict(f"this gateway holds its maximum of {self.max_keys} keys "
                                  "(dynamic_keys.max_keys); revoke some first", code="too_many_keys")
            return {**index, record.id: (record.tenant, record.name)}

        pruned: set[str] = set()  # each kind of conflict earns one clean-up of entries whose record is gone
        while True:
            try:
                await self._update_index(add)
                return
            except KeyConflict as exc:
                if exc.code not in ("name_taken", "too_many_keys") or exc.code in pruned:
                    raise
                pruned.add(exc.code)
                index = decode_index(await self.store.get(INDEX))
                suspects = list(index) if exc.code == "too_many_keys" else [
                    i for i, (_, name) in index.items() if name == record.name]
                if not await self._prune(suspects):
                    raise

    async def get(self, key_id: str) -> KeyRecord | None:
        if not is_key_id(key_id):
            return None
        return _live(await self.store.get(record_key(key_id)))

    async def page(self, tenant: str | None, *, limit: int, after: str | None) -> tuple[list[KeyRecord], bool]:
        """A page of records by id (`after` the given id), of one tenant or all; whether more follow."""
        index = decode_index(await self.store.get(INDEX))
        ids = sorted(i for i, (owner, _) in index.items() if (tenant is None or owner == tenant)
                     and (after is None or i > after))
        records: list[KeyRecord] = []
        missing: list[str] = []
        seen = 0
        while seen < len(ids) and len(records) < limit:
            batch = ids[seen:seen + _READ_BATCH]
            for key_id, raw in zip(batch, await self._read(batch), strict=True):
                seen += 1
                record = _live(raw)
                if record is None:
                    missing.append(key_id)  # expired past its retention, revoked, or a revocation under way
                    continue
                records.append(record)
                if len(records) == limit:
                    break
        if missing:
            await self._update_index(lambda index: {k: v for k, v in index.items() if k not in missing})
        return records, seen < len(ids)

    async def revoke(self, key_id: str) -> bool:
        """Whether a key was revoked (False: no such key). It stops working before this returns.

        `KeyConflict` (409) when the record changed since it was read (a concurrent rotation or
        revocation won). An interrupted revocation is finished here: from its `Revoked` marker, or, when it
        failed after dropping the record, from the index that still lists the key."""
        if not is_key_id(key_id):
            return False
        raw = await self.store.get(record_key(key_id))
        if raw is None:  # no such key; or a revocation stopped it and dropped its record, then failed: finished here
            if key_id not in decode_index(await self.store.get(INDEX)):
                return False
            await self._update_index(lambda index: {k: v for k, v in index.items() if k != key_id})
            return True
        stored = decode_stored(raw)
        if isinstance(stored, Revoked):
            marker = stored
        else:
            marker = Revoked(revoked_at=self._wall(), id=key_id, digests=tuple(
                d for d in (stored.digest, stored.previous_digest) if d is not None))
            if not await self.store.compare_and_set(record_key(key_id), raw, encode_revoked(marker), RETENTION_S):
                raise KeyConflict("the key changed while it was being revoked; retry")
        await self._announce(key_id)  # the key opens nothing since the swap: now no cache holds it either
        for digest in marker.digests:
            await self.store.delete(digest_key(digest))
        await self.store.delete(record_key(key_id))  # the marker: nothing but a revocation writes over one
        await self._update_index(lambda index: {k: v for k, v in index.items() if k != key_id})
        return True

    async def rotate(self, key_id: str, grace_s: float) -> tuple[KeyRecord, str] | None:
        """A new secret for the same record; the old one stops now, or after `grace_s` seconds."""
        if not is_key_id(key_id):
            return None
        raw = await self.store.get(record_key(key_id))
        record = _live(raw)
        if record is None:  # never created, expired past its retention, or revoked
            return None
        now = self._wall()
        if record.expires_at is not None and record.expires_at <= now:  # listed a day more, but a secret would not work
            raise KeyConflict("the key has expired: create a new one", code="key_expired")
        secret = generate_key()
        grace_until = now + grace_s if grace_s > 0 else None
        if grace_until is not None and record.expires_at is not None:
            grace_until = min(grace_until, record.expires_at)
        rotated = msgspec.structs.replace(
            record, digest=digest_of(secret).hex(), rotated_at=now,
            previous_digest=record.digest if grace_until is not None else None, previous_until=grace_until,
        )
        new_pointer = digest_key(rotated.digest)
        await self.store.set(new_pointer, key_id.encode(), _pointer_ttl(record.expires_at, now))
        if not await self.store.compare_and_set(record_key(key_id), raw, encode_record(rotated),
                                                _record_ttl(rotated, now)):
            await self.store.delete(new_pointer)
            raise KeyConflict("the key changed while it was being rotated; retry")
        if grace_until is not None and grace_until > now:
            await self.store.set(digest_key(record.digest), key_id.encode(), grace_until - now)
        else:
            await self.store.delete(digest_key(record.digest))
        if record.previous_digest is not None:  # an earlier rotation's grace period ends now
            await self.store.delete(digest_key(record.previous_digest))
        await self._announce(key_id)
        return rotated, secret

    # -- internals -------------------------------------------------------------------------------------

    async def _announce(self, key_id: str) -> None:
        """Every replica's cache drops the key: this one at once, the others when the message arrives."""
        if self.dynamic is not None:
            self.dynamic.forget(key_id)
        await self.store.publish(CHANNEL, key_id.encode())

    async def _read(self, ids: Sequence[str]) -> list[bytes | None]:
        return list(await asyncio.gather(*(self.store.get(record_key(i)) for i in ids)))

    async def _prune(self, ids: Sequence[str]) -> bool:
        """Drop the index entries among `ids` whose record is gone (or revoked); whether any was."""
        gone: set[str] = set()
        for start in range(0, len(ids), _READ_BATCH):
            batch = ids[start:start + _READ_BATCH]
            gone.update(i for i, raw in zip(batch, await self._read(batch), strict=True) if _live(raw) is None)
        if gone:
            await self._update_index(lambda current: {k: v for k, v in current.items() if k not in gone})
        return bool(gone)

    async def _update_index(self, change: Callable[[Index], Index]) -> None:
        for _ in range(_CAS_ATTEMPTS):
            raw = await self.store.get(INDEX)
            index = decode_index(raw)
            updated = change(index)
            if updated == index:
                return
            if await self.store.compare_and_set(INDEX, raw, encode_index(updated), None):
                return
        raise KeyConflict("too many concurrent key changes; retry")


def _live(raw: bytes | None) -> KeyRecord | None:
    """The record a stored value holds; None when absent or revoked (`CorruptRecord` when unreadable)."""
    if raw is None:
        return None
    stored = decode_stored(raw)
    return stored if isinstance(stored, KeyRecord) else None


def _pointer_ttl(expires_at: float | None, now: float) -> float | None:
    """A digest pointer lives until its key expires (at least a moment, for an expiry just past)."""
    return None if expires_at is None else max(0.001, expires_at - now)


def _record_ttl(record: KeyRecord, now: float) -> float | None:
    if record.expires_at is None:
        return None
    ttl = record.expires_at - now + RETENTION_S
    return ttl if math.isfinite(ttl) and ttl > 0 else RETENTION_S
