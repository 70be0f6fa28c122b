"""Virtual keys: generation, hashing, look-up, expiry, and that records never print their digest."""

from __future__ import annotations

import re
import time

from gateway.auth.keys import KEY_PREFIX, KeyRing, VirtualKey, digest_of, generate_key, hash_key


def _record(key: str, *, expires_at: float | None = None, aliases: frozenset[str] | None = None) -> VirtualKey:
    return VirtualKey("k", "t", digest_of(key), aliases, expires_at=expires_at)


def test_find_known_and_unknown_keys() -> None:
    key, other = generate_key(), generate_key()
    record = _record(key)
    ring = KeyRing({record.digest: record})
    assert len(ring) == 1
    assert ring.find(key) is record
    assert ring.find(other) is None
    assert ring.find(key + "x") is None
    assert ring.find(key[:-1]) is None
    assert ring.find("") is None
    assert ring.find("\ud800 lone surrogate") is None  # hashes, matches nothing, does not raise


def test_positional_construction_still_works() -> None:
    # The policy compiler builds records positionally, without an expiry.
    key = generate_key()
    record = VirtualKey("k", "t", digest_of(key), None)
    assert record.expires_at is None
    assert KeyRing({record.digest: record}).find(key) is record


def test_expired_keys_are_not_found() -> None:
    key = generate_key()
    record = _record(key, expires_at=1_000.0)
    ring = KeyRing({record.digest: record})
    assert ring.find(key, now=999.9) is record
    assert ring.find(key, now=1_000.0) is None  # the expiry instant is already past
    assert ring.find(key, now=1_000.1) is None
    assert record.expired(1_000.0) and not record.expired(999.0)


def test_expiry_uses_the_clock_by_default() -> None:
    past, future = generate_key(), generate_key()
    records = [_record(past, expires_at=time.time() - 1), _record(future, expires_at=time.time() + 3600)]
    ring = KeyRing({record.digest: record for record in records})
    assert ring.find(past) is None
    assert ring.find(future) is records[1]


def test_keys_without_expiry_never_expire() -> None:
    key = generate_key()
    record = _record(key)
    assert KeyRing({record.digest: record}).find(key, now=1e12) is record
    assert not record.expired(1e12)


def test_hash_format() -> None:
    key = generate_key()
    hashed = hash_key(key)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", hashed)
    assert hashed == "sha256:" + digest_of(key).hex()
    # A published SHA-256 test vector: the format is plain SHA-256 of the UTF-8 key.
    assert hash_key("abc") == "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert len(digest_of(key)) == 32


def test_generated_keys_are_unique_and_url_safe() -> None:
    keys = {generate_key() for _ in range(1000)}
    assert len(keys) == 1000
    for key in keys:
        assert key.startswith(KEY_PREFIX)
        assert re.fullmatch(r"gw-[A-Za-z0-9_-]{43}", key)  # 32 random bytes, base64url without padding


def test_repr_never_prints_the_key_or_digest() -> None:
    key = generate_key()
    record = _record(key, expires_at=123.0, aliases=frozenset({"a"}))
    for text in (repr(record), str(record), f"{record!r}", repr([record])):
        assert key not in text
        assert record.digest.hex() not in text
        assert repr(record.digest) not in text
    assert "name='k'" in repr(record) and "tenant='t'" in repr(record)


def test_allows() -> None:
    limited = _record(generate_key(), aliases=frozenset({"a"}))
    everything = _record(generate_key())
    assert limited.allows("a") and not limited.allows("b")
    assert everything.allows("anything")
