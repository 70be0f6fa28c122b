"""Keys created at run time, as the store keeps them: the record, its codec, and where it lives.

Layout in the `Store` (each name under the store's own prefix):

| store key | value |
| --- | --- |
| `keys:rec:<id>` | the `KeyRecord` (JSON), the one source of truth about a key (a `Revoked` marker in a revocation) |
| `keys:dig:<sha256 hex>` | the id whose secret hashes to this digest: the look-up index |
| `keys:index` | `{id: [tenant, name]}` of every key, for listing and unique names |
| channel `keys:changes` | the id of a key just revoked or rotated: every replica drops it from its cache |

A look-up follows the digest to an id and then checks the record itself: a digest pointer left
behind by a revocation or rotation that failed half-way therefore lets nobody in, since the
record no longer names that digest. The secret itself is never stored; the digest is
SHA-256 of it (see `auth.keys` for why that is enough for a 256-bit random key).

A revocation first swaps the record for a `Revoked` marker by compare-and-set (the store has no
compare-and-delete), so that it and a concurrent rotation, which swaps the record the same way,
cannot both succeed. The marker opens nothing and is neither shown nor listed; it names the
digest pointers still to delete, so that a revocation interrupted half-way is finished by a retry.
A reader that predates the marker cannot decode it as a record and so lets nobody in.
"""

from __future__ import annotations

import re
import secrets
from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

from ..policy.accounting_schema import BudgetSpec, LimitSpec
from .keys import KEY_PREFIX, VirtualKey

__all__ = [
    "CHANNEL",
    "INDEX",
    "CorruptRecord",
    "KeyRecord",
    "Revoked",
    "decode_index",
    "decode_record",
    "decode_stored",
    "digest_key",
    "encode_index",
    "encode_record",
    "encode_revoked",
    "is_key_id",
    "looks_like_key",
    "new_key_id",
    "public_view",
    "record_key",
    "virtual_key",
]

CHANNEL = "keys:changes"
INDEX = "keys:index"
_ID = re.compile(r"^vk_[0-9a-f]{16}$")
_HEX = Annotated[str, Meta(pattern=r"^[0-9a-f]{64}(?!\n)$")]
# `generate_key`'s shape: the prefix and 32 random bytes in unpadded URL-safe base64 (43 characters).
_KEY_SHAPE = re.compile(rf"^{re.escape(KEY_PREFIX)}[A-Za-z0-9_-]{{43}}$")


class KeyRecord(Struct, frozen=True, kw_only=True):
    """One key created at run time. `digest` is the current secret's SHA-256 (hex); after a rotation
    with a grace period, `previous_digest` still opens the key until `previous_until` (unix seconds)."""

    v: int = 1  # the record format, for a later change
    id: str
    name: str
    tenant: str
    models: tuple[str, ...] | None  # None: every alias
    digest: _HEX
    created_at: float
    expires_at: float | None = None
    limits: LimitSpec | None = None
    budget: BudgetSpec | None = None
    rotated_at: float | None = None
    previous_digest: _HEX | None = None
    previous_until: float | None = None

    def __repr__(self) -> str:  # never print a digest
        return f"KeyRecord(id={self.id!r}, name={self.name!r}, tenant={self.tenant!r})"


class Revoked(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a revocation leaves in a record's place until it has finished (see the module's doc): the
    key opens nothing from the moment it is written. `digests` are the pointers still to delete."""

    revoked_at: float  # unix seconds
    id: str
    digests: tuple[_HEX, ...]

    def __repr__(self) -> str:  # never print a digest
        return f"Revoked(id={self.id!r})"


class CorruptRecord(ValueError):
    """A stored value that is not a record this version can read (answered as an unknown key)."""


_encode = msgspec.json.Encoder().encode
_record_decoder = msgspec.json.Decoder(KeyRecord)
_revoked_decoder = msgspec.json.Decoder(Revoked)
_index_decoder = msgspec.json.Decoder(dict[str, tuple[str, str]])


def encode_record(record: KeyRecord) -> bytes:
    return _encode(record)


def decode_record(raw: bytes) -> KeyRecord:
    try:
        record = _record_decoder.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise CorruptRecord(f"not a key record: {type(exc).__name__}") from None
    if record.v != 1 or not _ID.match(record.id):
        raise CorruptRecord(f"unknown key record version {record.v} or id")
    return record


def encode_revoked(marker: Revoked) -> bytes:
    return _encode(marker)


def decode_stored(raw: bytes) -> KeyRecord | Revoked:
    """What a record's store key holds: the record, or the marker of a revocation under way."""
    try:
        return decode_record(raw)
    except CorruptRecord as not_a_record:
        try:
            marker = _revoked_decoder.decode(raw)
        except (msgspec.DecodeError, UnicodeDecodeError):
            raise not_a_record from None
        if not _ID.match(marker.id):
            raise not_a_record from None
        return marker


def encode_index(index: dict[str, tuple[str, str]]) -> bytes:
    return _encode(index)


def decode_index(raw: bytes | None) -> dict[str, tuple[str, str]]:
    """The id → (tenant, name) index; absent reads as empty."""
    if raw is None:
        return {}
    try:
        return _index_decoder.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise CorruptRecord("the key index is not readable") from exc


def record_key(key_id: str) -> str:
    return f"keys:rec:{key_id}"


def digest_key(digest_hex: str) -> str:
    return f"keys:dig:{digest_hex}"


def new_key_id() -> str:
    """A stable id for a new key: random, so it says nothing about the secret."""
    return "vk_" + secrets.token_hex(8)


def is_key_id(text: str) -> bool:
    return _ID.match(text) is not None


def looks_like_key(credential: str) -> bool:
    """Whether a presented credential could be a key the admin API made; anything else is refused
    without a store look-up (so junk credentials cost the store nothing)."""
    return len(credential) == len(KEY_PREFIX) + 43 and _KEY_SHAPE.match(credential) is not None


def virtual_key(record: KeyRecord, digest: bytes, now: float, static_names: frozenset[str]) -> VirtualKey | None:
    """The `VirtualKey` that `digest` opens according to `record`, or None when it opens nothing
    (revoked by rotation, past its grace period, or a stale pointer).

    A static key added to the policy later under the same name keeps its name: this key then
    goes by its id, so that rules and accounting never mistake one for the other.
    """
    hexed = digest.hex()
    expires_at = record.expires_at
    if hexed != record.digest:
        if hexed != record.previous_digest or record.previous_until is None or now >= record.previous_until:
            return None
        expires_at = record.previous_until if expires_at is None else min(expires_at, record.previous_until)
    name = record.id if record.name in static_names else record.name
    aliases = None if record.models is None else frozenset(record.models)
    return VirtualKey(name, record.tenant, digest, aliases, expires_at=expires_at, limits=record.limits,
                      budget=record.budget, key_id=record.id)


def public_view(record: KeyRecord, now: float) -> dict[str, Any]:
    """What the admin API shows of a record: everything but its digests (and never the secret)."""
    grace = record.previous_until if record.previous_until is not None and record.previous_until > now else None
    return {
        "object": "gateway.key",
        "id": record.id,
        "name": record.name,
        "tenant": record.tenant,
        "models": ["*"] if record.models is None else list(record.models),
        "created_at": int(record.created_at),
        "expires_at": _whole(record.expires_at),
        "expired": record.expires_at is not None and now >= record.expires_at,
        "rotated_at": _whole(record.rotated_at),
        "previous_key_valid_until": _whole(grace),
        "limits": msgspec.to_builtins(record.limits) if record.limits is not None else None,
        "budget": msgspec.to_builtins(record.budget) if record.budget is not None else None,
    }


def _whole(seconds: float | None) -> int | float | None:
    if seconds is None:
        return None
    return int(seconds) if float(seconds).is_integer() else round(seconds, 3)
