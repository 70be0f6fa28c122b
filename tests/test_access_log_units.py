"""The access line's bytes, pinned: every field, its order, its rounding, for the kinds of requests there are.

The fast path (`log_access` to the one `JsonLinesHandler`) is checked byte for byte against lines written by an
earlier, plainer implementation; the path through `logging` (any other configuration) must give the same object.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.pipeline.context import RequestContext, RequestHead
from gateway.schemas.endpoints import Endpoint
from gateway.schemas.openai import CompletionTokensDetails, PromptTokensDetails, Usage
from gateway.telemetry import logs
from gateway.telemetry.access import AccessLines, Names, access_part

NOW = 1_780_392_700.1239  # 2026-06-02T09:31:40.123Z
POLICY = SimpleNamespace(policy=SimpleNamespace(version="sha256:0a1b2c3d4e5f"))
OTHER_POLICY = SimpleNamespace(policy=SimpleNamespace(version="sha256:ffff"))


def _ctx(**fields: Any) -> RequestContext:
    ctx = RequestContext("req_0a1b2c3d4e5f000000000001", Endpoint.CHAT, fields.pop("runtime", POLICY),  # type: ignore[arg-type]
                         RequestHead("POST", None, 10, 100), None, None, 0.0)  # type: ignore[arg-type]
    ctx.route = SimpleNamespace(alias="chat-model")  # type: ignore[assignment]
    ctx.key = SimpleNamespace(tenant="acme", name="key-1")  # type: ignore[assignment]
    ctx.target = SimpleNamespace(name="openai/gpt-4o-mini")  # type: ignore[assignment]
    ctx.provider = SimpleNamespace(name="openai")  # type: ignore[assignment]
    ctx.upstream_started = 1.0
    ctx.upstream_seconds = 0.8123456
    ctx.usage = Usage(12, 34, 46)
    ctx.cost_usd = 0.0000234
    ctx.headers = [(b"x-gateway-cost-usd", b"0.000023")]
    for name, value in fields.items():
        setattr(ctx, name, value)
    return ctx


def _names(ctx: RequestContext) -> Names:
    """As the telemetry stage names a finished request."""
    status = ctx.status
    return (ctx.endpoint_label, ctx.alias_label, status,
            ctx.provider.name if ctx.provider is not None and ctx.upstream_started else None,
            ctx.target.name if ctx.target is not None else None,
            ctx.key.tenant if ctx.key is not None else "anonymous", ctx.key.name if ctx.key is not None else None,
            ctx.error_code if status >= 400 else None)


def _session(header: bytes) -> Any:
    """A guard session as the access line reads it (`GuardSession.header`: what the guards did)."""
    return SimpleNamespace(header=lambda: header)


def _cases() -> dict[str, tuple[RequestContext, float]]:
    guards = (b"x-gateway-guards", b"pii:redact,injection:record")
    return {
        "success": (_ctx(), 0.8523456),
        "error": (_ctx(status=502, error_code="upstream_error", usage=None, cost_usd=None, headers=None), 1.2),
        "stream": (_ctx(stream=True, first_chunk_seconds=0.1234567, headers=None), 2.5),
        "no usage": (_ctx(usage=None, cost_usd=None), 0.9),
        "not found": (_ctx(status=404, error_code="model_not_found", route=None, target=None, provider=None,
                           upstream_seconds=0.0, usage=None, cost_usd=None, headers=None), 0.000321),
        "anonymous": (_ctx(key=None), 0.85),
        "cache hit": (_ctx(cache_result="hit", usage=Usage(), cost_usd=0.0, target=None, provider=None,
                           upstream_started=0.0, upstream_seconds=0.0,
                           headers=[(b"x-gateway-cache", b"hit"), (b"age", b"3")]), 0.0012),
        "cache miss": (_ctx(cache_result="miss", headers=[(b"x-gateway-cache", b"miss")]), 0.9),
        "guards": (_ctx(guard_session=_session(guards[1]), headers=[guards, (b"x-gateway-cost-usd", b"0.000023")]),
                   0.9),
        "guards blocked": (_ctx(status=400, error_code="content_policy_violation", guard_session=_session(b""),
                                target=None, provider=None, upstream_started=0.0, upstream_seconds=0.0, usage=None,
                                cost_usd=None, headers=None), 0.01),
        "attempts": (_ctx(attempts=[("openai/gpt-4o-mini", "error", 12.5), ("azure/gpt-4o", "ok", 800.25)],
                          fallback_reason="upstream_error", target=SimpleNamespace(name="azure/gpt-4o"),
                          provider=SimpleNamespace(name="azure")), 0.95),
        "attempts failed": (_ctx(status=503, error_code="upstream_unavailable", usage=None, cost_usd=None,
                                 attempts=[("a/m", "error", 1.0), ("b/m", "timeout", 30000.0)],
                                 fallback_reason="timeout", headers=None), 30.5),
        "one attempt failed": (_ctx(status=429, error_code="rate_limited", usage=None, cost_usd=None,
                                    attempts=[("openai/gpt-4o-mini", "rate_limited", 120.5)]), 0.3),
        "failed after the answer": (_ctx(status=502, error_code="upstream_error", stream=True,
                                         first_chunk_seconds=0.3, usage=None, cost_usd=None, headers=None), 5.0),
        "overloaded after the answer": (_ctx(status=503, error_code="upstream_overloaded", stream=True,
                                             first_chunk_seconds=0.05, usage=None, cost_usd=None, headers=None), 0.4),
        "cut on shutdown": (_ctx(status=503, error_code="shutting_down", stream=True, first_chunk_seconds=0.05,
                                 usage=None, cost_usd=None, headers=None), 0.4),
        "timed out after the answer": (_ctx(status=504, error_code="upstream_timeout", stream=True,
                                            first_chunk_seconds=0.05, usage=None, cost_usd=None, headers=None), 9.0),
        "client closed": (_ctx(status=499, error_code="client_closed_request", stream=True,
                               first_chunk_seconds=0.05, usage=None, cost_usd=None, headers=None), 0.4),
        "trace": (_ctx(traceparent=b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"), 0.9),
        "details": (_ctx(usage=Usage(100, 50, 150, PromptTokensDetails(cached_tokens=64),
                                     CompletionTokensDetails(reasoning_tokens=20))), 1.0),
        "null details": (_ctx(usage=Usage(100, 50, 150, PromptTokensDetails(cached_tokens=None),
                                          CompletionTokensDetails(reasoning_tokens=None))), 1.0),
        "estimated": (_ctx(usage_estimated=True, stream=True, first_chunk_seconds=0.2, rule="vip-tenant"), 3.0),
        "odd text": (_ctx(request_id='req_"\u2028\u00e9\\x', rule='r"1', target=SimpleNamespace(name='t"1'),
                          key=SimpleNamespace(tenant="t\u00e9", name='k"'), provider=SimpleNamespace(name="p\n")), 0.9),
        "embeddings": (_ctx(endpoint=Endpoint.EMBEDDINGS, usage=Usage(7, 0, 7)), 0.05),
        "slow": (_ctx(upstream_seconds=1234.5678949), 1234.9876549),
        "upstream longer": (_ctx(upstream_seconds=1.0), 0.999),  # the overhead never negative
        "rounding": (_ctx(upstream_seconds=0.000005, cost_usd=5e-10, first_chunk_seconds=0.0000049999), 0.000015),
        "big cost": (_ctx(cost_usd=12345.678901234567), 0.9),
        "no upstream started": (_ctx(upstream_started=0.0, status=502, error_code="upstream_error", usage=None,
                                     cost_usd=None, headers=None), 0.2),
        "other policy": (_ctx(runtime=OTHER_POLICY), 0.9),
    }


@pytest.fixture()
def direct(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """A stream for the handler, at a fixed time."""
    monkeypatch.setattr(time, "time", lambda: NOW)
    return io.StringIO()


@contextmanager
def _served(stream: io.StringIO) -> Iterator[logs.JsonLinesHandler]:
    """Logging as `configure_logging` leaves it, for the test's own call (pytest puts a handler of its own on the
    root for each phase of a test, and takes it off after)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    handler = logs.JsonLinesHandler(stream)
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def _taken(stream: io.StringIO) -> str:
    written = stream.getvalue()
    stream.seek(0)
    stream.truncate()
    return written


HEAD = '{"ts":"2026-06-02T09:31:40.123Z","level":"info","logger":"gateway.access","msg":"request",'
# Written by the line's earlier implementation (one 27-field struct, encoded whole) for `_cases`, after `HEAD`.
EXPECTED: dict[str, str] = {
    'success': (
        '"request_id":"req_0a1b2c3d4e5f000000000001","endpoint":"chat","model":"chat-model","tenant":"acme","key"'
        ':"key-1","provider":"openai","target":"openai/gpt-4o-mini","rule":null,"attempts":[{"target":"openai/gpt'
        '-4o-mini","outcome":"ok"}],"fallback_reason":null,"stream":false,"status":200,"error":null,"total_ms":85'
        '2.35,"upstream_ms":812.35,"overhead_ms":40.0,"first_chunk_ms":null,"prompt_tokens":12,"completion_tokens'
        '":34,"cached_tokens":0,"reasoning_tokens":0,"tokens_estimated":false,"cost_usd":0.0000234,"cache":null,"'
        'guards":null,"trace":null,"policy_version":"sha256:0a1b2c3d4e5f"}'
    ),
    'error': (
        '"request_id":"req_0a1b2c3d4e5f000000000001","endpoint":"chat","model":"chat-model","tenant":"acme","key"'
        ':"key-1","provider":"openai","target":"openai/gpt-4o-mini","rule":null,"attempts":[{"target":"openai/gpt'
        '-4o-mini","outcome":"error"}],"fallback_reason":null,"stream":false,"status":502,"error":"upstream_error'
        '","total_ms":1200.0,"upstream_ms":812.35,"overhead_ms":387.654,"first_chunk_ms":null,"prompt_tokens":nul'
        'l,"completion_tokens":null,"cached_tokens":null,"reasoning_tokens":null,"tokens_estimated":false,"cost_u'
        'sd":null,"cache":null,"guards":null,"trace":null,"policy_version":"sha256:0a1b2c3d4e5f"}'
    ),
    'stream': (
        '"request_id":"req_0a1b2c3d4e5f000000000001","endpoint":"chat","model":"chat-model","tenant":"acme","key"'
        ':"key-1","provider":"openai","target":"openai/gpt-4o-mini","rule":null,"attempts":[{"target":"openai/gpt'
        '-4o-mini","outcome":"ok"}],"fallback_reason":null,"stream":true,"status":200,"error":null,"total_ms":250'
        '0.0,"upstream_ms":812.35,"overhead_ms":1687.654,"first_chunk_ms":123.46,"prompt_tokens":12,"completion_t'
        'okens":34,"cached_tokens":0,"reasoning_tokens":0,"tokens_estimated":false,"cost_usd":0.0000234,"cache":n'
        'ull,"guards":null,"trace":null,"policy_version":"sha256:0a1b2c3d4e5f"}'
    ),
    'no usage': (
        '"request_id":"req_0a1b2c3d4e5f000000000001","endpoint":"chat","model":"chat-model","tenant":"acme","key"'
        ':"key-1","provider":"openai","target":"openai/gpt-4o-mini","rule":null,"attempts":[{"target":"openai/gpt'
        '-4o-mini","outcome":"ok"}],"fallback_reason":null,"stream":false,"status":200,"error":null,"total_ms":90'
        '0.0,"upstream_ms":812.35,"overhead_ms":87.654,"first_chunk_ms":null,"prompt_tokens":null,"completion_tok'
        'ens":null,"cached_tokens":null,"reasoning_tokens":null,"tokens_estimated":false,"cost_usd":null,"cache":'
        'null,"guards":null,"trace":null,"policy_version":"sha256:0a1b2c3d4e5f"}'
    ),
    'not found': (
        '"request_id":"req_0a1b2c3d4e5f000000000001","endpoint":"chat","model":"unknown","tenant":"acme","key":"k'
        'ey-1","provider":null,"target":null,"rule":null,"attempts":[],"fallback_reason":null,"stream":false,"sta'
        'tus":404,"error":"model_not_found","total_ms":0.32,"upstream_ms":0.0,"overhead_ms":0.321,"first_chunk_ms'
        '":null,"prompt_tokens":null,"completion_tokens":null,"cached_tokens":null,"reasoning_tokens":null,"token'
        's_estimated":false,"cost_usd":null,"cache":null,"guards":null,"trace":null,"policy_version":"sha256:0a1b'
        '2c3d4e5f"}'
    ),
    'anonymous': (
        '"request_id":"req_0a1b2c3d4e5f000000000001","endpoint":"chat","model":"chat-model","tenant":"anonymous",'
        '"key":null,"provider":"openai","target":"openai/gpt-4o-mini","rule":null,"attempts":[{"target":"openai/g'
        'pt-4o-mini","outcome":"ok"}],"fallback_reason":null,"stream":false,"status":200,"error":null,"total_ms":'
        '850.0,"upstream_ms":812.35,"overhead_ms":37.654,"first_chunk_ms":null,"prompt_tokens":12,"completion_tok'
        'ens":34,"cached_tokens":0,"reasoning_tokens":0,"tokens_estimated":false,"cost_usd":0.0000234,"cache":nul'
        'l,"guards":null,"trace":null,"policy_version":"sha256:0a1b2c3d4e5f"}'
    ),
    'cache hit': (
        '"request_id":"req_0a1b2c3d4e5f000000000001","endpoint":"chat","model":"chat-model","tenant":"acme","key"'
        ':"key-1","provider":null,"target":null,"rule":null,"attempts":[],"fallback_reason":null,"stream":false,"'
        'status":200,"error":null,"total_ms":1.2,"upstream_ms":0.0,"overhead_ms":1.2,"first_chunk_ms":null,"promp'
        't_tokens":0,"completion_tokens":0,"cached_tokens":0,"reasoning_tokens":0,"tokens_estimated":false,"cost_'
        'usd":0.0,"cache":"hit","guards":null,"trace":null,"policy_version":"sha256:0a1b2c3d4e5f"}'
    ),
    'cache miss': (
        '"request_id":"req_0a1b2c3d4e5f000000000001","endpoint":"chat","model":"chat-model","tenant":"acme","key"'
        ':"key-1","provider":"openai","target":"openai/gpt-4o-mini","rule":null,"attempts":[{"target":"openai/gpt'
        '-4o-mini","outcome":"ok"}],"fallback_reason":null,"stream":false,"status":200,"error":null,"total_ms":90'
        '0.0,"upstream_ms":812.35,"overhead_ms":87.654,"first_chunk_ms":null,"prompt_tokens":12,"completion_token'
        's":34,"cached_tokens":0,"reasoning_tokens":0,"tokens_estimated":false,"cost_usd":0.0000234,"cache":"miss'
        '","guards":null,"trace":null,"policy_version":"sha256:0a1b2c3d4e5f"}'
    ),
    'guards': (
        '"request_id":"req_0a1b2c3d4e5f000000000001","endpoint":"chat","model":"chat-model","tenant":"acme","key"'
        ':"key-1","provider":"openai","target":"openai/gpt-4o-mini","rule":null,"attempts":[{"target":"openai/gpt'
        '-4o-mini","outcome":"ok"}],"fallback_reason":null,"stream":false,"status":200,"error":null,"total_ms":90'
        '0.0,"upstream_ms":812.35,"overhead_ms":87.654,"first_chunk_ms":null,"prompt_tokens":12,"completion_token'
        's":34,"cached_tokens":0,"reasoning_tokens":0,"tokens_estimated":false,"cost_usd":0.0000234,"cache":null,'
        '"guards":"pii:redact,injection:record","trace":null,"policy_version":"sha256:0a1b2c3d4e5f"}'
    ),
    'guards blocked': (
        '"request_id":"req_0a1b2c3d4e5f000000000001","endpoint":"chat","model":"chat-model","tenant":"acme","key"'
        ':"key-1","provider":null,"target":null,"rule":null,"attempts":[],"fallback_reason":null,"stream":false,"'
        'status":400,"error":"content_policy_violation","total_ms":10.0,"upstream_ms":0.0,"overhead_ms":10.0,"fir'
        'st_chunk_ms":null,"prompt_tokens":null,"completion_tokens":null,"cached_tokens":null,"reasoning_tokens":'
        'null,"tokens_estimated":false,"cost_usd":null,"cache":null,"guards":null,"trace":null,"policy_version":"'
        'sha256:0a1b2c3d4e5f"}'
    ),
    'attempts': (
        '"request_id":"req_0a1b2c3d4e5f000000000001","endpoint":"chat","model":"chat-model","tenant":"acme","key"'
        ':"key-1","provider":"azure","target":"azure/gpt-4o","rule":null,"attempts":[{"target":"openai/gpt-4o-min'
        'i","outcome":"error","ms":12.5},{"target":"azure/gpt-4o","outcome":"ok","ms":800.25}],"fallback_reason":'
        '"upstream_error","stream":false,"status":200,"error":null,"total_ms":950.0,"upstream_ms":812.35,"overhea'
        'd_ms":137.654,"first_chunk_ms":null,"prompt_tokens":12,"completion_tokens":34,"cached_tokens":0,"reasoni'
        'ng_tokens":0,"tokens_estimated":false,"cost_usd":0.0000234,"cache":null,"guards":null,"trace":null,"poli'
        'cy_version":"sha256:0a1b2c3d4e5f"}'
    ),
    'attempts failed': (
        '"request_id":"req_0a1b2c3d4e5f000000000001","endpoint":"chat","model":"chat-model","tenant":"acme","key"'
        ':"key-1","provider":"openai","target":"openai/gpt-4o-mini","rule":null,"attempts":[{"target":"a/m","outc'
        'ome":"error","ms":1.0},{"target":"b/m","outcome":"timeout","ms":30000.0}],"fallback_reason":"timeout","s'
        'tream":false,"status":503,"error":"upstream_unavailable","total_ms":30500.0,"upstream_ms":812.35,"overhe'
        'ad_ms":29687.654,"first_chunk_ms":null,"prompt_tokens":null,"completion_tokens":null,"cached_tokens":nul'
        'l,"reasoning_tokens":null,"tokens_estimated":false,"cost_usd":null,"cache":null,"guards":null,"trace":nu'
        'll,"policy_version":"sha256:0a1b2c3d4e5f"}'
    ),
    'one attempt failed': (
        '"request_id":"req_0a1b2c3d4e5f000000000001","endpoint":"chat","model":"chat-model","tenant":"acme","key"'
        ':"key-1","provider":"openai","target":"openai/gpt-4o-mini","rule":null,"attempts":[{"target":"openai/gpt'
        '-4o-mini","outcome":"rate_limited","ms":120.5}],"fallback_reason":null,"stream":false,"status":429,"erro'
        'r":"rate_limited","total_ms":300.0,"upstream_ms":812.35,"overhead_ms":0.0,"first_chunk_ms":null,"prompt_'
        'tokens":null,"completion_tokens":null,"cached_tokens":null,"reasoning_tokens":null,"tokens_estimated":fa'
        'lse,"cost_usd":null,"cache":null,"guards":null,"trace":null,"policy_version":"sha256:0a1b2c3d4e5f"}'
    ),
    'failed after the answer': (
        '"request_id":"req_0a1b2c3d4e5f000000000001","endpoint":"chat","model":"chat-model","tenant":"acme","key"'
        ':"key-1","provider":"openai","target":"openai/gpt-4o-mini","rule":null,"attempts":[{"target":"openai/gpt'
        '-4o-mini","outcome":"error"}],"fallback_reason":null,"stream":true,"status":502,"error":"upstream_error"'
        ',"total_ms":5000.0,"upstream_ms":812.35,"overhead_ms":4187.654,"first_chunk_ms":300.0,"prompt_tokens":nu'
        'll,"completion_tokens":null,"cached_tokens":null,"reasoning_tokens":null,"tokens_estimated":false,"cost_'
        'usd":null,"cache":null,"guards":null,"trace":null,"policy_version":"sha256:0a1b2c3d4e5f"}'
    ),
    'overloaded after the answer': (
        '"request_id":"req_0a1b2c3d4e5f000000000001","endpoint":"chat","model":"chat-model","tenant":"acme","key":'
        '"key-1","provider":"openai","target":"openai/gpt-4o-mini","rule":null,"attempts":[{"target":"openai/gpt-4'
        'o-mini","outcome":"error"}],"fallback_reason":null,"stream":true,"status":503,"error":"upstream_overloa'
        'ded","total_ms":400.0,"upstream_ms":812.35,"overhead_ms":0.0,"first_chunk_ms":50.0,"prompt_tokens":null,"completion_'
        'tokens":null,"cached_tokens":null,"reasoning_tokens":null,"tokens_estimated":false,"cost_usd":null,"cache'
        '":null,"guards":null,"trace":null,"policy_version":"sha256:0a1b2c3d4e5f"}'
    ),
    'cut on shutdown': (
        '"request_id":"req_0a1b2c3d4e5f000000000001","endpoint":"chat","model":"chat-model","tenant":"acme","key":'
        '"key-1","provider":"openai","target":"openai/gpt-4o-mini","rule":null,"attempts":[{"target":"openai/gpt-4'
        'o-mini","outcome":"ok"}],"fallback_reason":null,"stream":true,"status":503,"error":"shutting_down","total'
        '_ms":400.0,"upstream_ms":812.35,"overhead_ms":0.0,"first_chunk_ms":50.0,"prompt_tokens":null,"completion_'
        'tokens":null,"cached_tokens":null,"reasoning_tokens":null,"tokens_estimated":false,"cost_usd":null,"cache'
        '":null,"guards":null,"trace":null,"policy_version":"sha256:0a1b2c3d4e5f"}'
    ),
    'timed out after the answer': (
        '"request_id":"req_0a1b2c3d4e5f000000000001","endpoint":"chat","model":"chat-model","tenant":"acme","key":'
        '"key-1","provider":"openai","target":"openai/gpt-4o-mini","rule":null,"attempts":[{"target":"openai/gpt-4'
        'o-mini","outcome":"error"}],"fallback_reason":null,"stream":true,"status":504,"error":"upstream_timeout",'
        '"total_ms":9000.0,"upstream_ms":812.35,"overhead_ms":8187.654,"first_chunk_ms":50.0,"prompt_tokens":null,'
        '"completion_tokens":null,"cached_tokens":null,"reasoning_tokens":null,"tokens_estimated":false,"cost_usd"'
        ':null,"cache":null,"guards":null,"trace":null,"policy_version":"sha256:0a1b2c3d4e5f"}'
    ),
    'client closed': (
        '"request_id":"req_0a1b2c3d4e5f000000000001","endpoint":"chat","model":"chat-model","tenant":"acme","key"'
        ':"key-1","provider":"openai","target":"openai/gpt-4o-mini","rule":null,"attempts":[{"target":"openai/gpt'
        '-4o-mini","outcome":"ok"}],"fallback_reason":null,"stream":true,"status":499,"error":"client_closed_requ'
        'est","total_ms":400.0,"upstream_ms":812.35,"overhead_ms":0.0,"first_chunk_ms":50.0,"prompt_tokens":null,'
        '"completion_tokens":null,"cached_tokens":null,"reasoning_tokens":null,"tokens_estimated":false,"cost_usd'
        '":null,"cache":null,"guards":null,"trace":null,"policy_version":"sha256:0a1b2c3d4e5f"}'
    ),
    'trace': (
        '"request_id":"req_0a1b2c3d4e5f000000000001","endpoint":"chat","model":"chat-model","tenant":"acme","key"'
        ':"key-1","provider":"openai","target":"openai/gpt-4o-mini","rule":null,"attempts":[{"target":"openai/gpt'
        '-4o-mini","outcome":"ok"}],"fallback_reason":null,"stream":false,"status":200,"error":null,"total_ms":90'
        '0.0,"upstream_ms":812.35,"overhead_ms":87.654,"first_chunk_ms":null,"prompt_tokens":12,"completion_token'
        's":34,"cached_tokens":0,"reasoning_tokens":0,"tokens_estimated":false,"cost_usd":0.0000234,"cache":null,'
        '"guards":null,"trace":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01","policy_version":"sha256'
        ':0a1b2c3d4e5f"}'
    ),
    'details': (
        '"request_id":"req_0a1b2c3d4e5f000000000001","endpoint":"chat","model":"chat-model","tenant":"acme","key"'
        ':"key-1","provider":"openai","target":"openai/gpt-4o-mini","rule":null,"attempts":[{"target":"openai/gpt'
        '-4o-mini","outcome":"ok"}],"fallback_reason":null,"stream":false,"status":200,"error":null,"total_ms":10'
        '00.0,"upstream_ms":812.35,"overhead_ms":187.654,"first_chunk_ms":null,"prompt_tokens":100,"completion_to'
        'kens":50,"cached_tokens":64,"reasoning_tokens":20,"tokens_estimated":false,"cost_usd":0.0000234,"cache":'
        'null,"guards":null,"trace":null,"policy_version":"sha256:0a1b2c3d4e5f"}'
    ),
    'null details': (
        '"request_id":"req_0a1b2c3d4e5f000000000001","endpoint":"chat","model":"chat-model","tenant":"acme","key"'
        ':"key-1","provider":"openai","target":"openai/gpt-4o-mini","rule":null,"attempts":[{"target":"openai/gpt'
        '-4o-mini","outcome":"ok"}],"fallback_reason":null,"stream":false,"status":200,"error":null,"total_ms":10'
        '00.0,"upstream_ms":812.35,"overhead_ms":187.654,"first_chunk_ms":null,"prompt_tokens":100,"completion_to'
        'kens":50,"cached_tokens":0,"reasoning_tokens":0,"tokens_estimated":false,"cost_usd":0.0000234,"cache":nu'
        'll,"guards":null,"trace":null,"policy_version":"sha256:0a1b2c3d4e5f"}'
    ),
    'estimated': (
        '"request_id":"req_0a1b2c3d4e5f000000000001","endpoint":"chat","model":"chat-model","tenant":"acme","key"'
        ':"key-1","provider":"openai","target":"openai/gpt-4o-mini","rule":"vip-tenant","attempts":[{"target":"op'
        'enai/gpt-4o-mini","outcome":"ok"}],"fallback_reason":null,"stream":true,"status":200,"error":null,"total'
        '_ms":3000.0,"upstream_ms":812.35,"overhead_ms":2187.654,"first_chunk_ms":200.0,"prompt_tokens":12,"compl'
        'etion_tokens":34,"cached_tokens":0,"reasoning_tokens":0,"tokens_estimated":true,"cost_usd":0.0000234,"ca'
        'che":null,"guards":null,"trace":null,"policy_version":"sha256:0a1b2c3d4e5f"}'
    ),
    'odd text': (
        '"request_id":"req_\\"\u2028\xe9\\\\x","endpoint":"chat","model":"chat-model","tenant":"t\xe9","key":"k\\'
        '"","provider":"p\\n","target":"t\\"1","rule":"r\\"1","attempts":[{"target":"t\\"1","outcome":"ok"}],"fal'
        'lback_reason":null,"stream":false,"status":200,"error":null,"total_ms":900.0,"upstream_ms":812.35,"overh'
        'ead_ms":87.654,"first_chunk_ms":null,"prompt_tokens":12,"completion_tokens":34,"cached_tokens":0,"reason'
        'ing_tokens":0,"tokens_estimated":false,"cost_usd":0.0000234,"cache":null,"guards":null,"trace":null,"pol'
        'icy_version":"sha256:0a1b2c3d4e5f"}'
    ),
    'embeddings': (
        '"request_id":"req_0a1b2c3d4e5f000000000001","endpoint":"embeddings","model":"chat-model","tenant":"acme"'
        ',"key":"key-1","provider":"openai","target":"openai/gpt-4o-mini","rule":null,"attempts":[{"target":"open'
        'ai/gpt-4o-mini","outcome":"ok"}],"fallback_reason":null,"stream":false,"status":200,"error":null,"total_'
        'ms":50.0,"upstream_ms":812.35,"overhead_ms":0.0,"first_chunk_ms":null,"prompt_tokens":7,"completion_toke'
        'ns":0,"cached_tokens":0,"reasoning_tokens":0,"tokens_estimated":false,"cost_usd":0.0000234,"cache":null,'
        '"guards":null,"trace":null,"policy_version":"sha256:0a1b2c3d4e5f"}'
    ),
    'slow': (
        '"request_id":"req_0a1b2c3d4e5f000000000001","endpoint":"chat","model":"chat-model","tenant":"acme","key"'
        ':"key-1","provider":"openai","target":"openai/gpt-4o-mini","rule":null,"attempts":[{"target":"openai/gpt'
        '-4o-mini","outcome":"ok"}],"fallback_reason":null,"stream":false,"status":200,"error":null,"total_ms":12'
        '34987.65,"upstream_ms":1234567.89,"overhead_ms":419.76,"first_chunk_ms":null,"prompt_tokens":12,"complet'
        'ion_tokens":34,"cached_tokens":0,"reasoning_tokens":0,"tokens_estimated":false,"cost_usd":0.0000234,"cac'
        'he":null,"guards":null,"trace":null,"policy_version":"sha256:0a1b2c3d4e5f"}'
    ),
    'upstream longer': (
        '"request_id":"req_0a1b2c3d4e5f000000000001","endpoint":"chat","model":"chat-model","tenant":"acme","key"'
        ':"key-1","provider":"openai","target":"openai/gpt-4o-mini","rule":null,"attempts":[{"target":"openai/gpt'
        '-4o-mini","outcome":"ok"}],"fallback_reason":null,"stream":false,"status":200,"error":null,"total_ms":99'
        '9.0,"upstream_ms":1000.0,"overhead_ms":0.0,"first_chunk_ms":null,"prompt_tokens":12,"completion_tokens":'
        '34,"cached_tokens":0,"reasoning_tokens":0,"tokens_estimated":false,"cost_usd":0.0000234,"cache":null,"gu'
        'ards":null,"trace":null,"policy_version":"sha256:0a1b2c3d4e5f"}'
    ),
    'rounding': (
        '"request_id":"req_0a1b2c3d4e5f000000000001","endpoint":"chat","model":"chat-model","tenant":"acme","key"'
        ':"key-1","provider":"openai","target":"openai/gpt-4o-mini","rule":null,"attempts":[{"target":"openai/gpt'
        '-4o-mini","outcome":"ok"}],"fallback_reason":null,"stream":false,"status":200,"error":null,"total_ms":0.'
        '02,"upstream_ms":0.01,"overhead_ms":0.01,"first_chunk_ms":0.0,"prompt_tokens":12,"completion_tokens":34,'
        '"cached_tokens":0,"reasoning_tokens":0,"tokens_estimated":false,"cost_usd":1e-9,"cache":null,"guards":nu'
        'll,"trace":null,"policy_version":"sha256:0a1b2c3d4e5f"}'
    ),
    'big cost': (
        '"request_id":"req_0a1b2c3d4e5f000000000001","endpoint":"chat","model":"chat-model","tenant":"acme","key"'
        ':"key-1","provider":"openai","target":"openai/gpt-4o-mini","rule":null,"attempts":[{"target":"openai/gpt'
        '-4o-mini","outcome":"ok"}],"fallback_reason":null,"stream":false,"status":200,"error":null,"total_ms":90'
        '0.0,"upstream_ms":812.35,"overhead_ms":87.654,"first_chunk_ms":null,"prompt_tokens":12,"completion_token'
        's":34,"cached_tokens":0,"reasoning_tokens":0,"tokens_estimated":false,"cost_usd":12345.678901235,"cache"'
        ':null,"guards":null,"trace":null,"policy_version":"sha256:0a1b2c3d4e5f"}'
    ),
    'no upstream started': (
        '"request_id":"req_0a1b2c3d4e5f000000000001","endpoint":"chat","model":"chat-model","tenant":"acme","key"'
        ':"key-1","provider":null,"target":"openai/gpt-4o-mini","rule":null,"attempts":[{"target":"openai/gpt-4o-'
        'mini","outcome":"error"}],"fallback_reason":null,"stream":false,"status":502,"error":"upstream_error","t'
        'otal_ms":200.0,"upstream_ms":0.0,"overhead_ms":200.0,"first_chunk_ms":null,"prompt_tokens":null,"complet'
        'ion_tokens":null,"cached_tokens":null,"reasoning_tokens":null,"tokens_estimated":false,"cost_usd":null,"'
        'cache":null,"guards":null,"trace":null,"policy_version":"sha256:0a1b2c3d4e5f"}'
    ),
    'other policy': (
        '"request_id":"req_0a1b2c3d4e5f000000000001","endpoint":"chat","model":"chat-model","tenant":"acme","key"'
        ':"key-1","provider":"openai","target":"openai/gpt-4o-mini","rule":null,"attempts":[{"target":"openai/gpt'
        '-4o-mini","outcome":"ok"}],"fallback_reason":null,"stream":false,"status":200,"error":null,"total_ms":90'
        '0.0,"upstream_ms":812.35,"overhead_ms":87.654,"first_chunk_ms":null,"prompt_tokens":12,"completion_token'
        's":34,"cached_tokens":0,"reasoning_tokens":0,"tokens_estimated":false,"cost_usd":0.0000234,"cache":null,'
        '"guards":null,"trace":null,"policy_version":"sha256:ffff"}'
    ),
}


def test_access_lines_are_the_pinned_bytes(direct: io.StringIO) -> None:
    """Through `log_access` to the handler, with the request's names' part kept by `AccessLines` (as before the
    telemetry stage hands it in), then handed in, then made afresh on each line (past the kept ones' limit)."""
    cases = _cases()
    assert set(cases) == set(EXPECTED)
    kept, unkept = AccessLines(), AccessLines(limit=0)
    with _served(direct) as handler:
        for lines, handed in ((kept, False), (kept, False), (kept, True), (unkept, False)):
            for name, (ctx, total) in cases.items():
                names = _names(ctx)
                part = access_part(names, ctx.runtime.policy) if handed else None
                logs.log_access(lines.line(ctx, total, names, part))
                assert _taken(direct) == HEAD + EXPECTED[name] + "\n", name
                assert logs._direct == [handler]  # written by the handler itself, not through `logging`


def test_an_access_line_through_logging_carries_the_fields_of_the_written_line(direct: io.StringIO) -> None:
    """Logging configured otherwise (a second handler): the record's fields are the written line's, in order."""
    lines = AccessLines()
    records: list[logging.LogRecord] = []
    capture = logging.Handler()
    capture.emit = records.append  # type: ignore[method-assign]
    with _served(direct):
        logging.getLogger().addHandler(capture)
        for name, (ctx, total) in _cases().items():
            logs.log_access(lines.line(ctx, total, _names(ctx)))
            fields = records.pop().fields  # type: ignore[attr-defined]
            expected = json.loads(HEAD + EXPECTED[name])
            assert json.loads(_taken(direct)) == expected, name  # the handler's record, as `JsonFormatter` makes it
            assert fields == json.loads("{" + EXPECTED[name]) and list(fields) == list(expected)[4:], name


def _changes(handler: logging.Handler, capture: logging.Handler) -> list[tuple[str, Any, Any]]:
    """Each change to logging that decides where an access line goes: its name, how it is made and undone."""
    root, parent, access = logging.getLogger(), logging.getLogger("gateway"), logging.getLogger("gateway.access")
    nothing = logging.Filter("nothing")  # (a name no record of these has)
    changes: list[tuple[str, Any, Any]] = []
    for logger in (root, parent, access):
        changes += [(f"a handler on {logger.name}", partial(logger.addHandler, capture),
                     partial(logger.removeHandler, capture)),
                    (f"{logger.name} at WARNING", partial(logger.setLevel, logging.WARNING),
                     partial(logger.setLevel, logger.level))]
    for logger in (parent, access):
        changes.append((f"{logger.name} not propagating", partial(setattr, logger, "propagate", False),
                        partial(setattr, logger, "propagate", True)))
    return [*changes,
            ("logging disabled", partial(logging.disable, logging.INFO), partial(logging.disable, logging.NOTSET)),
            ("the access logger disabled", partial(setattr, access, "disabled", True),
             partial(setattr, access, "disabled", False)),
            ("a filter on the access logger", partial(access.addFilter, nothing),
             partial(access.removeFilter, nothing)),
            ("the handler at WARNING", partial(handler.setLevel, logging.WARNING), partial(handler.setLevel, 0)),
            ("a filter on the handler", partial(handler.addFilter, nothing), partial(handler.removeFilter, nothing)),
            ("another formatter", partial(handler.setFormatter, logging.Formatter("%(levelname)s %(message)s")),
             partial(handler.setFormatter, logs.JsonFormatter()))]


def test_log_access_writes_what_logging_would_whatever_logging_is_changed_to(direct: io.StringIO) -> None:
    """Changed any way that matters, and changed back, logging gets each line as a record would go (its output,
    and any other handler's records, compared with a record logged as such); unchanged, the handler itself."""
    lines = AccessLines()
    ctx, total = _cases()["success"]
    records: list[logging.LogRecord] = []
    capture = logging.Handler()
    capture.emit = records.append  # type: ignore[method-assign]

    def written(direct_line: bool) -> tuple[str, list[Any]]:
        line = lines.line(ctx, total, _names(ctx))
        if direct_line:
            logs.log_access(line)
        else:  # what logging does with the line's record
            logs.access_log.info("request", extra={"fields": line.fields()})
        taken = [record.fields for record in records]  # type: ignore[attr-defined]
        records.clear()
        return _taken(direct), taken

    as_served = (HEAD + EXPECTED["success"] + "\n", [])
    with _served(direct) as handler:
        for change, make, undo in _changes(handler, capture):
            assert written(True) == as_served and logs._direct == [handler], change  # straight to the handler
            make()
            try:
                assert written(True) == written(False), change
                assert logs._direct == [None], change
            finally:
                undo()
        assert written(True) == as_served and logs._direct == [handler]


def test_lines_queued_before_logging_changed_go_where_logging_sends_a_record_when_written(direct: io.StringIO) -> None:
    """`log_access_of` queues a line for the handler found when logging was last checked. Changed any way that
    matters before the line is written (up to `_FLUSH_AFTER_S` later), logging gets it then, as it gets a record
    logged then; changed back, the handler writes the lines itself again."""
    lines = AccessLines()
    ctx, total = _cases()["success"]
    records: list[logging.LogRecord] = []
    capture = logging.Handler()
    capture.emit = records.append  # type: ignore[method-assign]

    def taken() -> tuple[str, list[Any]]:
        fields = [record.fields for record in records]  # type: ignore[attr-defined]
        records.clear()
        return _taken(direct), fields

    def queued_then(change: Any) -> tuple[str, list[Any]]:
        async def run() -> None:
            logs.log_access_of(lines, ctx, total, _names(ctx), None)
            change()
            assert _taken(direct) == "" and not records  # not written yet
            await asyncio.sleep(logs._FLUSH_AFTER_S * 3)

        asyncio.run(run())
        return taken()

    def logged_now() -> tuple[str, list[Any]]:
        logs.access_log.info("request", extra={"fields": lines.line(ctx, total, _names(ctx)).fields()})
        return taken()

    as_served = (HEAD + EXPECTED["success"] + "\n", [])
    with _served(direct) as handler:
        for change, make, undo in _changes(handler, capture):
            logs.log_access(lines.line(ctx, total, _names(ctx)))  # logging checked: the handler's own
            assert taken() == as_served and logs._direct == [handler], change
            try:
                assert queued_then(make) == logged_now(), change
            finally:
                undo()
        assert queued_then(lambda: None) == as_served


@pytest.mark.parametrize("times", [
    [NOW, NOW + 0.0005, NOW + 0.001, NOW + 0.8765, NOW + 1.0001, NOW + 0.5, NOW + 86_400.999, NOW - 3.25],
    [1_780_392_700.0, 1_780_392_700.999999, 1_780_392_701.0, 1_780_392_699.9999999],
])
def test_a_lines_time_is_the_time_a_record_would_show(
    direct: io.StringIO, monkeypatch: pytest.MonkeyPatch, times: list[float],
) -> None:
    """Across milliseconds and seconds, forwards and back (a clock set back): the head a record would have."""
    lines = AccessLines()
    ctx, total = _cases()["success"]
    with _served(direct) as handler:
        for now in times:
            monkeypatch.setattr(time, "time", lambda now=now: now)
            logs.log_access(lines.line(ctx, total, _names(ctx)))
            assert json.loads(_taken(direct))["ts"] == logs._timestamp(now), now
        assert logs._direct == [handler]


def test_access_lines_made_when_written_are_the_pinned_bytes_and_a_bad_one_loses_only_itself(
    direct: io.StringIO, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`log_access_of` (the telemetry stage's): the handler keeps what a line is made of, and makes the lines that
    wait when it writes them, on a loop after `_FLUSH_LINES` lines or `_FLUSH_AFTER_S`: the same bytes, in
    order, each at the time its request ended; one that fails to be made (a bug) is reported and the rest go
    on."""
    cases = _cases()
    lines = AccessLines()
    broken = _ctx(usage=object())  # (no token counts to read: `line` fails)
    expected = "".join(HEAD + EXPECTED[name] + "\n" for name in cases)

    async def run() -> str:
        for name, (ctx, total) in cases.items():
            logs.log_access_of(lines, ctx, total, _names(ctx), None)
            if name == "success":
                logs.log_access_of(lines, broken, 1.0, _names(broken), None)
        waiting = _taken(direct)  # nothing yet: fewer than `_FLUSH_LINES` wait, and the timer has not run
        monkeypatch.setattr(time, "time", lambda: NOW + 5.0)  # made later, each line still says when it ended
        await asyncio.sleep(logs._FLUSH_AFTER_S * 3)
        return waiting

    with _served(direct):
        assert len(cases) + 1 < logs._FLUSH_LINES
        assert asyncio.run(run()) == ""
        assert _taken(direct) == expected
    assert "Traceback" in capsys.readouterr().err
