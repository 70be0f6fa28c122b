"""A busy connection pool is not a refused counter: the accounting ledger keeps what it could not write.

With every pooled Redis connection in use (`state.max_connections`), an operation fails before it is sent and the
store stays healthy (`redis_client`: a full pool says nothing of Redis). The ledger took "failed, not applied, store
healthy" for a counter the store refuses (another program's value there) and dropped the usage for good, logging a
false error; budget deltas and slot releases read the same test. A refusal is now `StoreRefused` (an error reply),
and anything else not applied waits for the next flush.

A real Redis: a store of one connection, held by a BLPOP while the ledger flushes.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest
import redis.asyncio as aredis

from gateway.accounting.ledger import Ledger, usage_key
from gateway.store import RedisStore, StoreConfig
from tests.support.redis_server import suite_redis_url

DAY = "2026-12-07"


@pytest.fixture
def url() -> Iterator[str]:
    with suite_redis_url() as found:
        yield found


async def test_usage_written_while_the_pool_is_busy_is_kept_for_the_next_flush(url: str,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    prefix = f"gwtest:{uuid.uuid4().hex}:"
    store = RedisStore(StoreConfig(backend="redis", url=url, key_prefix=prefix, max_connections=1,
                                   connect_timeout_s=5.0, op_timeout_s=1.0, backoff_min_s=0.05, backoff_max_s=0.2))
    await store.start()
    raw = aredis.Redis.from_url(url)
    try:
        assert store._handle is not None
        held = asyncio.create_task(store._handle.client.blpop([prefix + "held"], timeout=30))  # the one connection
        await asyncio.sleep(0.3)
        ledger = Ledger(store)
        ledger.record("chat", None, None, DAY, 1500, 10, 0, 20, 0)
        await ledger.flush()  # nothing can be sent
        assert store.healthy
        assert "refused usage counter" not in caplog.text
        await raw.rpush(prefix + "held", b"go")
        await held
        await ledger.flush()  # the pool is free again: the usage is written now
        keys = [prefix + usage_key("model", "chat", DAY, field) for field in ("requests", "completion_tokens")]
        assert await raw.mget(keys) == [b"1000000", b"20000000"]  # (in millionths)
    finally:
        keys = [key async for key in raw.scan_iter(match=prefix + "*", count=1000)]
        if keys:
            await raw.delete(*keys)
        await raw.aclose()
        await store.aclose()
