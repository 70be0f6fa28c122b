"""Virtual keys: how they are made, hashed at rest, and checked.

A virtual key is a high-entropy random token, so one SHA-256 is enough to keep it
safe at rest (a slow password hash would only add latency to every request). The
policy stores `sha256:<hex>`; the gateway hashes what a client presents, finds the
record by digest, and confirms with a constant-time comparison.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["KeyRing", "VirtualKey", "digest_of", "generate_key", "hash_key"]

KEY_PREFIX = "gw-"


def generate_key() -> str:
    """A new virtual key: 256 random bits, URL-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def digest_of(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def hash_key(key: str) -> str:
    """The form a key takes in the policy file."""
    return "sha256:" + digest_of(key).hex()


@dataclass(frozen=True, slots=True)
class VirtualKey:
    """One key's record: who it belongs to and which aliases it may use."""

    name: str
    tenant: str
    digest: bytes
    aliases: frozenset[str] | None  # None: every alias

    def allows(self, alias: str) -> bool:
        return self.aliases is None or alias in self.aliases

    def __repr__(self) -> str:  # never print the digest
        return f"VirtualKey(name={self.name!r}, tenant={self.tenant!r})"


class KeyRing:
    """Look-up of presented keys by digest."""

    __slots__ = ("_by_digest",)

    def __init__(self, keys: Mapping[bytes, VirtualKey]) -> None:
        self._by_digest = dict(keys)

    def __len__(self) -> int:
        return len(self._by_digest)

    def find(self, presented: str) -> VirtualKey | None:
        digest = digest_of(presented)
        record = self._by_digest.get(digest)
        if record is None or not hmac.compare_digest(record.digest, digest):
            return None
        return record
