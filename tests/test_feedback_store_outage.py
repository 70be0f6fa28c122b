"""Feedback when the store does not answer: a 503 `store_unavailable` with `Retry-After: 1`, as every other outage's
503 has (it had none, H59), and the metrics untouched."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.store.base import StoreUnavailable
from gateway.store.memory import MemoryStore
from gateway.telemetry.feedback import FeedbackStoreUnavailable, take_feedback


class _Away(MemoryStore):
    async def get(self, key: str) -> Any:
        raise StoreUnavailable("test: the store is away", maybe_applied=False)


def test_feedback_while_the_store_is_away_is_a_503_with_retry_after() -> None:
    async def main() -> None:
        store = _Away()
        with pytest.raises(FeedbackStoreUnavailable) as raised:
            await take_feedback(store, None, "acme", b'{"request_id": "req_1", "score": 1}',  # type: ignore[arg-type]
                                frozenset())
        error = raised.value
        assert error.status == 503 and error.code == "store_unavailable"
        assert error.headers == {"Retry-After": "1"}

    asyncio.run(main())
