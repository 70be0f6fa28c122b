"""The `telemetry:` section of the policy: metric label caps, quality signals, feedback, payload log, tracing.

Kept apart from `schema.py` (like the guards' and accounting's) so that the telemetry module owns its own
shapes. Every part is off unless the policy turns it on, except the label caps, which always apply: a feature
that is off is not even a stage in the pipeline.
"""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta, Struct

from .guard_schema import GuardName, GuardSpec

__all__ = [
    "FeedbackSpec",
    "LabelCapsSpec",
    "PayloadLogSpec",
    "QualitySpec",
    "TelemetrySpec",
    "TracingSpec",
]

LabelValue = Annotated[str, Meta(pattern=r"^[a-z][a-z0-9_-]{0,31}(?!\n)$", description="a lower-case label value")]
EnvVarName = Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}(?!\n)$")]
# `schema.HeaderName`, equal to it (so that an error says what a header name is): `schema` imports this module.
HeaderName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+(?!\n)$")]


class _Spec(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Common options: reject unknown fields, immutable."""


class LabelCapsSpec(_Spec, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """How many distinct values of each policy-defined label become series; the rest count as `other`."""

    aliases: Annotated[int, Meta(ge=1, le=10_000)] = 200
    targets: Annotated[int, Meta(ge=1, le=10_000)] = 200
    tenants: Annotated[int, Meta(ge=1, le=10_000)] = 100
    keys: Annotated[int, Meta(ge=0, le=10_000)] = 100  # 0: no key names in labels at all


class QualitySpec(_Spec, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Answer quality signals as metrics: finish reasons, refusals, empty and truncated answers, invalid JSON,
    schema violations, malformed tool calls. Reads every answer (streams too) when on."""

    enabled: bool = False
    max_text_bytes: Annotated[int, Meta(ge=1_024, le=16 * 1024 * 1024)] = 1024 * 1024  # past this: not checked


class FeedbackSpec(_Spec, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """`POST /v1/feedback`: a score per request id, for requests answered in the last `ttl_s` seconds."""

    enabled: bool = False
    ttl_s: Annotated[float, Meta(ge=60, le=30 * 86_400)] = 86_400.0
    labels: list[LabelValue] = []  # the labels a feedback may carry; any other becomes `other`


class PayloadLogSpec(_Spec, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Prompts and answers, PII redacted, to a rotating file or a Redis stream. Off by default: it holds text."""

    enabled: bool = False
    sink: Literal["file", "redis"] = "file"
    # file: where; rotated at `max_bytes`, `backups` old files kept (0: the file is emptied at `max_bytes`); with
    # `--workers N`, the workers write and rotate this one file together
    path: str = "gateway-payloads.jsonl"
    max_bytes: Annotated[int, Meta(ge=1_024, le=1024 * 1024 * 1024)] = 64 * 1024 * 1024
    backups: Annotated[int, Meta(ge=0, le=100)] = 5
    stream: Annotated[str, Meta(pattern=r"^[A-Za-z0-9:_.{}-]{1,64}(?!\n)$")] = "payloads"  # redis: stream key
    max_entries: Annotated[int, Meta(ge=100, le=100_000_000)] = 100_000  # redis: MAXLEN ~ (retention)
    max_text_chars: Annotated[int, Meta(ge=64, le=1_000_000)] = 16_384  # per text, after redaction
    # entries waiting to be written (and 16 Mi characters of text in all); beyond: dropped
    queue: Annotated[int, Meta(ge=16, le=1_000_000)] = 10_000
    # The guards that redact every logged text, prompts and answers, whatever their `places` say: any finding is
    # replaced, whatever its action, and a text a guard failed to check (an error, a timeout) is withheld whole,
    # whatever its `fail` says; empty: a `pii` guard (patterns engine) and a `secrets` guard.
    redact: dict[GuardName, GuardSpec] = {}


class TracingSpec(_Spec, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """W3C trace context: accept `traceparent`, forward it upstream with the client's `tracestate`, echo it;
    optionally export spans (OTLP), those of sampled traces."""

    enabled: bool = False
    otlp_endpoint: str | None = None  # e.g. http://collector:4318/v1/traces (OTLP/HTTP, JSON encoding)
    otlp_headers_env: dict[HeaderName, EnvVarName] = {}  # header name -> environment variable holding its value
    service_name: Annotated[str, Meta(min_length=1, max_length=128)] = "llm-gateway"
    batch_size: Annotated[int, Meta(ge=1, le=10_000)] = 512
    flush_interval_s: Annotated[float, Meta(ge=0.05, le=60)] = 2.0
    queue: Annotated[int, Meta(ge=16, le=1_000_000)] = 8_192  # spans waiting; beyond: dropped and counted


class TelemetrySpec(_Spec, kw_only=True, frozen=True, forbid_unknown_fields=True):
    labels: LabelCapsSpec = LabelCapsSpec()
    quality: QualitySpec = QualitySpec()
    feedback: FeedbackSpec = FeedbackSpec()
    payload_log: PayloadLogSpec = PayloadLogSpec()
    tracing: TracingSpec = TracingSpec()
