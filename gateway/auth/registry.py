"""The admin API's operations on run-time keys: create, list, get, revoke, rotate, over the `Store`.

The store offers single-key atomic operations only, so each change is ordered so that a failure
half-way (Redis gone between two writes) never leaves a key that works but cannot be seen or
revoked, nor a key that holds a name while nobody was given its secret:

* create writes the record (a fresh id, compare-and-set on an absent key), then the digest pointer,
  and only then claims its name in the index (compare-and-set). The index is what makes a key seen:
  listed, holding its name, counted under `max_keys`; written last, it is the one write a failure
  can leave the caller unsure of. Whatever fails after the first write (a lost reply, a store that
  goes away, a name taken) is undone (`_undo`: pointer, record, index entry, in that order, retried
  a bounded number of times, each retry after a PING). The record goes before the index entry: an
  entry whose record is gone is dropped by the next create that wants its name or room (and by a
  listing), so a retry of the same name then succeeds. When the undo fails too (the store really
  is down), the 503 and the log name the key id left behind; `DELETE /admin/keys/<id>` removes
  whatever of it is left. A name (or a place under `max_keys`) held in the index by a key whose
  record the store has dropped since (expired past its retention, evicted) is reclaimed;
* revoke swaps the record for a `Revoked` marker by compare-and-set (a concurrent change wins,
  this one answers 409): from then on the key opens nothing. It then publishes the id and deletes
  the digest pointers and the marker: a retry after a failure finds the marker and finishes the
  job. Last it removes the index entry, which is cleanup (logged if it fails): the revocation has
  happened, and a listing drops an entry whose record is gone;
* rotate writes the new pointer, then swaps the record by compare-and-set (a concurrent change,
  a revocation included, wins, this one answers 409) and publishes the id; a failure in these
  steps puts the old record back (compare-and-set from the new one: only if the swap happened)
  and deletes the new pointer, so that a 503 leaves the old secret working rather than a key whose
  new secret nobody was given. Once the record is swapped and published, the rotation has
  happened: removing or shortening the old pointer is cleanup, logged if it fails, as a look-up
  always checks the record itself, so a pointer left behind opens nothing.

Revoke and rotate both change the record by compare-and-set against the value they read, so of
a revocation and a rotation of one key at the same moment exactly one succeeds.

Every `StoreUnavailable` propagates (`LeftBehind` when an undo failed): the caller answers 503 and
the operation may be retried.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import msgspec

from ..errors import KeyConflict
from ..store.base import Store, StoreUnavailable
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

__all__ = ["RETENTION_S", "KeyRegistry", "LeftBehind"]

log = logging.getLogger("gateway.keys")

RETENTION_S = 86_400.0
"""An expired key's record stays this long (listed as expired), then the store drops it."""
_CAS_ATTEMPTS = 16
_READ_BATCH = 32
_UNDO_ATTEMPTS = 3  # an undo's tries; each retry follows a PING, which ends the store's fail-fast once Redis answers

Index = dict[str, tuple[str, str]]
Undo = tuple[str, Callable[[], Awaitable[object]]]  # what a step removes (for the log), and the step


class LeftBehind(StoreUnavailable):
    """A change failed half-way and undoing it failed too: `left` says what of it the store may still hold."""

    def __init__(self, message: str, left: str) -> None:
        super().__init__(message)
        self.left = left


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
        record, stored = await self._new_record(tenant, name, models, digest_of(secret).hex(), now, expires_at,
                                                limits, budget)
        try:
            await self.store.set(digest_key(record.digest), record.id.encode(), _pointer_ttl(record.expires_at, now))
            await self._claim(record)  # last: the one write that makes the key seen (see the module's doc)
        except BaseException as exc:
            await self._undo_create(record, stored, exc)
            raise
        return record, secret

    async def _new_record(
        self, tenant: str, name: str | None, models: Sequence[str] | None, digest: str, now: float,
        expires_at: float | None, limits: LimitSpec | None, budget: BudgetSpec | None,
    ) -> tuple[KeyRecord, bytes]:
        """The record written under a fresh id (a collision is all but impossible), and its stored form."""
        for _ in range(_CAS_ATTEMPTS):
            key_id = new_key_id()
            record = KeyRecord(
                id=key_id, name=name or key_id, tenant=tenant, models=None if models is None else tuple(models),
                digest=digest, created_at=now, expires_at=expires_at, limits=limits, budget=budget,
            )
            stored = encode_record(record)
            try:
                written = await self.store.compare_and_set(record_key(key_id), None, stored,
                                                           _record_ttl(record, now))
            except BaseException as exc:
                if not isinstance(exc, StoreUnavailable) or exc.maybe_applied:  # its answer lost: written, maybe
                    await self._undo_create(record, stored, exc)
                raise
            if written:
                return record, stored
        raise KeyConflict("could not allocate a key id; retry")

    async def _undo_create(self, record: KeyRecord, stored: bytes, cause: BaseException) -> None:
        """Remove what a create that failed may have written; `LeftBehind` (from `cause`) when that fails too."""
        key_id = record.id
        left = await self._undo([
            ("digest pointer", lambda: self.store.delete(digest_key(record.digest))),
            ("record", lambda: self.store.compare_and_delete(record_key(key_id), stored)),
            ("index entry", lambda: self._update_index(
                lambda index: {k: v for k, v in index.items() if k != key_id})),
        ])
        if left:
            what = f"key {key_id} may be left half-created ({', '.join(left)}): its secret was never shown, so " \
                   f"nobody can use it; `DELETE /admin/keys/{key_id}` removes it"
            log.warning("a failed key creation could not be undone", extra={"fields": {
                "key_id": key_id, "name": record.name, "left": left}})
            if isinstance(cause, StoreUnavailable):
                raise LeftBehind(str(cause), what) from cause

    async def _undo(self, steps: list[Undo]) -> list[str]:
        """Run `steps` in order, best effort and bounded (`_UNDO_ATTEMPTS`); what those not done remove.

        Each step is idempotent. A step that fails stops the attempt (the order matters: see the module's doc);
        the next attempt, after a PING, starts from the step that failed."""
        pending = list(steps)
        for attempt in range(_UNDO_ATTEMPTS):
            try:
                while pending:
                    await pending[0][1]()
                    pending.pop(0)
                return []
            except Exception:  # noqa: BLE001 - an undo never replaces the failure that called for it
                if attempt + 1 < _UNDO_ATTEMPTS:
                    await self.store.ping()
        return [what for what, _ in pending]

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
            await self._unlist(key_id)
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
        await self._unlist(key_id)
        return True

    async def _unlist(self, key_id: str) -> None:
        """A revoked key's index entry removed: cleanup, logged if it fails. Its record is gone, so the entry
        opens nothing, and a listing (or a create that wants its name or room) drops it; answering 409 or 503
        for a key that was revoked (many revocations at once race for the index) told its caller otherwise."""
        try:
            await self._update_index(lambda index: {k: v for k, v in index.items() if k != key_id})
        except (KeyConflict, StoreUnavailable) as exc:
            log.warning("a revoked key's index entry was not removed (the next listing drops it): %s", exc,
                        extra={"fields": {"key_id": key_id}})

    async def rotate(self, key_id: str, grace_s: float) -> tuple[KeyRecord, str] | None:
        """A new secret for the same record; the old one stops now, or after `grace_s` seconds."""
        if not is_key_id(key_id):
            return None
        raw = await self.store.get(record_key(key_id))
        record = _live(raw)
        if record is None or raw is None:  # never created, expired past its retention, or revoked
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
        new_pointer, stored = digest_key(rotated.digest), encode_record(rotated)
        before = (raw, _record_ttl(record, now))
        try:
            await self.store.set(new_pointer, key_id.encode(), _pointer_ttl(record.expires_at, now))
        except StoreUnavailable as exc:  # nothing else written yet; a pointer to a record not naming it opens nothing
            if exc.maybe_applied:
                await self._undo([("the new digest pointer", lambda: self.store.delete(new_pointer))])
            raise
        try:
            swapped = await self.store.compare_and_set(record_key(key_id), raw, stored, _record_ttl(rotated, now))
            if swapped:
                await self._announce(key_id)
        except BaseException as exc:
            await self._undo_rotate(key_id, before, stored, new_pointer, exc)
            raise
        if not swapped:  # a concurrent change won: only the new pointer to remove
            await self._undo([("the new digest pointer", lambda: self.store.delete(new_pointer))])
            raise KeyConflict("the key changed while it was being rotated; retry")
        await self._drop_old_pointers(key_id, record, grace_until, now)
        return rotated, secret

    async def _undo_rotate(self, key_id: str, before: tuple[bytes, float | None], stored: bytes, new_pointer: str,
                           cause: BaseException) -> None:
        """The key as it was before a rotation that failed: the old record back with its TTL (only if the swap
        happened), the new pointer gone, every cache told; `LeftBehind` (from `cause`) when that fails too."""
        raw, ttl = before
        left = await self._undo([
            ("the rotated record", lambda: self.store.compare_and_set(record_key(key_id), stored, raw, ttl)),
            ("the new digest pointer", lambda: self.store.delete(new_pointer)),
            ("the caches' copies", lambda: self._announce(key_id)),
        ])
        if left:
            log.warning("a failed key rotation could not be undone", extra={"fields": {"key_id": key_id,
                                                                                       "left": left}})
            if isinstance(cause, StoreUnavailable):
                raise LeftBehind(str(cause), f"key {key_id} may hold a secret nobody was given: rotate it again, "
                                             "or revoke it") from cause

    async def _drop_old_pointers(self, key_id: str, record: KeyRecord, grace_until: float | None,
                                 now: float) -> None:
        """After a rotation: the old pointer removed, or kept only through the grace period; an earlier rotation's
        grace ends now. Cleanup only (the record names the digests that open the key): a failure is logged."""
        try:
            if grace_until is not None and grace_until > now:
                await self.store.set(digest_key(record.digest), key_id.encode(), grace_until - now)
            else:
                await self.store.delete(digest_key(record.digest))
            if record.previous_digest is not None:
                await self.store.delete(digest_key(record.previous_digest))
        except StoreUnavailable:
            log.warning("a rotated key's old digest pointer was not removed (it opens nothing)",
                        extra={"fields": {"key_id": key_id}})

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
