"""Virtual keys: how they are made, hashed at rest, and checked.

A virtual key is a high-entropy random token (256 bits from `generate_key`), so
one SHA-256 is enough to keep it safe at rest: a slow password hash exists to
make guessing a low-entropy secret expensive, and nobody guesses 256 bits, so it
would only add latency to every request. The policy stores `sha256:<hex>`; the
gateway hashes what a client presents and looks the record up by that digest.

Why the look-up needs no constant-time comparison: the timing of a dict look-up
can depend on the digest's hash bucket and on how many leading bytes the
presented digest shares with a stored one (bytes equality stops at the first
difference). An attacker chooses the presented key, not its digest: to make a
digest share a prefix with a stored one they must search for it blindly, and
even learning a stored digest in full would not let them in, since the gateway
only accepts a key that hashes to it, which takes a SHA-256 preimage. So the
timing reveals at most something about a stored digest, and a stored digest is
useless without a preimage. (Comparing the found record's digest with
`hmac.compare_digest` afterwards, as this module once did, compared the digest
with itself: the dict had already matched it.) A truly constant-time check would
have to scan every key on every request; it would buy nothing here.

This argument rests on the keys being high-entropy. An operator who hashes a
guessable key of their own (`gateway keys hash`) is protected by nothing but its
entropy, with or without constant-time comparison.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..policy.accounting_schema import BudgetSpec, LimitSpec

__all__ = ["KeyRing", "VirtualKey", "digest_of", "generate_key", "hash_key"]

KEY_PREFIX = "gw-"


def generate_key() -> str:
    """A new virtual key: 256 random bits, URL-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def digest_of(key: str) -> bytes:
    """The SHA-256 digest the key ring is indexed by.

    `surrogatepass` so that any string a client manages to send hashes (to a
    digest nothing matches) instead of raising.
    """
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def hash_key(key: str) -> str:
    """The form a key takes in the policy file."""
    return "sha256:" + digest_of(key).hex()


@dataclass(frozen=True, slots=True)
class VirtualKey:
    """One key's record: who it belongs to, which aliases it may use, until when.

    `expires_at` is in unix seconds; None means the key does not expire. It is
    there for keys created at run time (an admin API with expiry and revocation);
    keys from the policy file have none.
    """

    name: str
    tenant: str
    digest: bytes
    aliases: frozenset[str] | None  # None: every alias
    expires_at: float | None = None
    limits: LimitSpec | None = None  # this key's own rate limits (its tenant's and alias's apply too)
    budget: BudgetSpec | None = None
    key_id: str | None = None  # keys created at run time: the admin API's stable id (`vk_...`); policy keys: None

    def allows(self, alias: str) -> bool:
        return self.aliases is None or alias in self.aliases

    def expired(self, now: float) -> bool:
        """Whether the key is past its expiry at `now` (unix seconds); the expiry instant itself counts as past."""
        return self.expires_at is not None and now >= self.expires_at

    def __repr__(self) -> str:  # never print the digest: it identifies the key in logs and policy files
        return f"VirtualKey(name={self.name!r}, tenant={self.tenant!r})"


class KeyRing:
    """Look-up of presented keys by digest (see the module docstring for why this is safe)."""

    __slots__ = ("_by_digest", "names")

    def __init__(self, keys: Mapping[bytes, VirtualKey]) -> None:
        self._by_digest = dict(keys)
        self.names = frozenset(key.name for key in self._by_digest.values())  # keys made at run time may not reuse one

    def __len__(self) -> int:
        return len(self._by_digest)

    def find(self, presented: str, *, now: float | None = None) -> VirtualKey | None:
        """The record for a presented key, or None if it is unknown or expired.

        `now` (unix seconds) defaults to the current time; tests pass it to pin
        the clock. An expired key is answered exactly like an unknown one, so a
        client cannot tell an old key from a wrong one.
        """
        return self.find_digest(digest_of(presented), now=now)

    def find_digest(self, digest: bytes, *, now: float | None = None) -> VirtualKey | None:
        """`find` for a presented key already hashed (the run-time key look-up hashes once for both)."""
        record = self._by_digest.get(digest)
        if record is None:
            return None
        if record.expires_at is not None and record.expired(time.time() if now is None else now):
            return None
        return record
