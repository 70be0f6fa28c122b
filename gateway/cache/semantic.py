"""The semantic cache: prompts compared by meaning, within one scope (tenant, alias, parameters, context).

An index per scope holds unit vectors and the exact cache key each was stored
under; a lookup embeds the prompt, finds the most similar vector (a matrix-vector
product: brute force is exact and takes about a millisecond at 10,000 vectors of
384 floats), and, above the threshold, reads the answer under that exact key in
the `Store`. So the answers themselves live where the exact cache keeps them
(memory or Redis, with their TTLs), and an index entry whose answer expired is a
miss that removes it.

Replicas share vectors through the store's pub/sub: each stored vector is
published once, and every replica adds it to its own index. A replica that
starts later learns only what is stored after it started (its exact cache is
shared from the first request). The index is bounded per scope (`max_entries`,
oldest first) and in scopes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec
import numpy as np
import numpy.typing as npt
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]  # the package has no type hints

from ..errors import GatewayError
from ..providers.base import Call, Provider
from ..schemas.endpoints import Endpoint
from ..store.base import Channel, Store, StoreUnavailable
from .minilm import MiniLM

__all__ = ["AliasEmbedder", "Embedder", "LocalEmbedder", "SemanticIndex", "SemanticShare", "TooLong"]

log = logging.getLogger("gateway.cache")
Vector = npt.NDArray[np.float32]
CHANNEL = "cache:semantic"
MAX_SCOPES = 10_000


class TooLong(Exception):
    """The text is longer than the embedder reads: its vector would stand for its beginning only, and a prompt
    that shares that beginning (a long document, another question after it) would be served its answer."""


class Embedder(Protocol):
    async def embed(self, text: str) -> Vector | None:
        """The unit vector of `text`, or None when it cannot be had now (busy, failed): a miss. Raises `TooLong`
        when the model would read only part of `text` (the prompt is then not comparable)."""
        ...


class LocalEmbedder:
    """all-MiniLM-L6-v2 in this process, off the event loop, with a bounded number of texts in the queue."""

    def __init__(self, model_dir: str, max_pending: int = 16) -> None:
        self.model_dir = model_dir
        self.model: MiniLM | None = None
        self._pending = 0
        self._max_pending = max_pending

    async def start(self) -> None:
        if self.model is None:
            self.model = await asyncio.to_thread(MiniLM, self.model_dir)
            # One prompt is a handful of 384-wide rows: BLAS threads only spin on it, and on a busy machine
            # they made an embedding 10x slower (measured: 1 s against 76 ms on a loaded 2-core machine).
            threadpool_limits(limits=1, user_api="blas")

    async def embed(self, text: str) -> Vector | None:
        if self.model is None or self._pending >= self._max_pending:
            return None
        self._pending += 1
        try:
            vector = await asyncio.to_thread(self.model.embed_whole, text)
        finally:
            self._pending -= 1
        if vector is None:
            raise TooLong  # past the model's 256 word pieces (the tokenizer's own count, no second pass)
        return vector


class AliasEmbedder:
    """Embeddings from an alias of the policy: its first target, called like any embeddings request.

    Its model's window is the upstream's to enforce: OpenAI's and Azure's refuse a longer input (an error here:
    no semantic lookup), but a server that truncates silently cannot be seen from here (docs/cache.md)."""

    def __init__(self, provider: Provider, upstream_model: str) -> None:
        self.provider = provider
        self.upstream_model = upstream_model

    async def embed(self, text: str) -> Vector | None:
        call = Call(Endpoint.EMBEDDINGS, {"model": self.upstream_model, "input": text}, False, "cache-embedding")
        try:
            data = (await self.provider.complete(call)).data()
            vector = np.asarray(data["data"][0]["embedding"], dtype=np.float32)
        except (GatewayError, KeyError, IndexError, TypeError, ValueError):
            log.warning("cache: the embeddings alias failed; semantic lookup skipped")
            return None
        norm = float(np.linalg.norm(vector))
        return vector / norm if norm > 0 else None


@dataclass(slots=True)
class _Scope:
    """One scope's vectors: rows `[0, used)` of `vectors` are written; once `used` reaches `max_entries` they are a
    ring, whose row `oldest` the next vector replaces. `keys` is each row's key (None: its vector was removed, a
    hole, listed in `holes` until the ring writes over it); `rows` each key's row."""

    vectors: Vector
    keys: list[str | None] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)
    holes: set[int] = field(default_factory=set)
    used: int = 0
    oldest: int = 0


class SemanticIndex:
    """Vectors per scope, at most `max_entries` each (the oldest replaced first); `nearest` is exact (cosine of unit
    vectors).

    A scope's matrix is a ring buffer: adding to a full scope writes one row over the oldest, and removing a vector
    leaves a hole (its key gone, its row skipped by `nearest`) that the ring fills in its turn. Shifting the matrix
    instead cost a copy of all of it per vector added at the bound, on the event loop: 1.6 ms at 384 dimensions,
    14 ms at 1,536, up to 117 ms at 3,072 (a stall of every request of the process per stored answer)."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._scopes: OrderedDict[str, _Scope] = OrderedDict()

    def __len__(self) -> int:
        return sum(len(scope.rows) for scope in self._scopes.values())

    def add(self, scope_id: str, key: str, vector: Vector) -> None:
        """Remember `vector` under `key`. A vector that is not one row of the scope's width, or not finite, is dropped
        before anything changes: another embedder's (a replica mid-deploy, a reload that changed it), whose row write
        failed after its bookkeeping and left a key on another entry's vector (served at similarity 1.0), or a NaN,
        which would win every look-up."""
        if vector.ndim != 1 or not np.isfinite(vector).all():
            log.warning("semantic cache: dropped a vector that is not one finite row")
            return
        scope = self._scopes.get(scope_id)
        if scope is not None and scope.vectors.shape[1] != vector.shape[0]:
            log.warning("semantic cache: dropped a vector of %d dimensions where its scope holds %d",
                        vector.shape[0], scope.vectors.shape[1])
            return
        if scope is None:
            scope = self._scopes[scope_id] = _Scope(np.empty((min(16, self.max_entries), vector.shape[0]), np.float32))
            while len(self._scopes) > MAX_SCOPES:
                self._scopes.popitem(last=False)
        self._scopes.move_to_end(scope_id)
        if key in scope.rows:
            return
        if scope.used < self.max_entries:  # not full yet: the next row, the matrix grown when it has no more
            row = scope.used
            if row == scope.vectors.shape[0]:
                grown = np.empty((min(self.max_entries, row * 2), vector.shape[0]), np.float32)
                grown[:row] = scope.vectors[:row]
                scope.vectors = grown
            scope.keys.append(key)
            scope.used += 1
        else:  # full: over the oldest row
            row = scope.oldest
            scope.oldest = (row + 1) % self.max_entries
            replaced = scope.keys[row]
            if replaced is None:
                scope.holes.discard(row)
            else:
                del scope.rows[replaced]
            scope.keys[row] = key
        scope.vectors[row] = vector
        scope.rows[key] = row

    def nearest(self, scope_id: str, vector: Vector) -> tuple[str, float] | None:
        scope = self._scopes.get(scope_id)
        if scope is None or not scope.rows or scope.vectors.shape[1] != vector.shape[0]:
            return None
        scores = scope.vectors[: scope.used] @ vector
        if scope.holes:  # removed vectors never match
            scores[list(scope.holes)] = -np.inf
        best = int(np.argmax(scores))
        key = scope.keys[best]
        assert key is not None  # (some row holds a vector: `rows` is not empty)
        return key, float(scores[best])

    def remove(self, scope_id: str, key: str) -> None:
        scope = self._scopes.get(scope_id)
        if scope is None:
            return
        row = scope.rows.pop(key, None)
        if row is not None:
            scope.keys[row] = None
            scope.holes.add(row)


class _Shared(msgspec.Struct, array_like=True):
    origin: str
    scope: str
    key: str
    vector: bytes


class SemanticShare:
    """Publishes this replica's new vectors and adds other replicas' to the local indexes."""

    def __init__(self, store: Store, indexes: dict[str, SemanticIndex]) -> None:
        self.store = store
        self.indexes = indexes  # by alias
        self.origin = os.urandom(8).hex()
        self._channel: Channel | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        try:
            self._channel = await self.store.subscribe(CHANNEL)
        except StoreUnavailable:
            log.warning("cache: cannot subscribe to shared semantic vectors; this replica keeps its own")
            return
        self._task = asyncio.create_task(self._listen(self._channel), name="cache-semantic-share")

    async def aclose(self) -> None:
        if self._channel is not None:
            await self._channel.aclose()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def publish(self, alias: str, scope: str, key: str, vector: Vector) -> None:
        message = msgspec.msgpack.encode(_Shared(self.origin, f"{alias}\x00{scope}", key, vector.tobytes()))
        with contextlib.suppress(StoreUnavailable):
            await self.store.publish(CHANNEL, message)

    async def _listen(self, channel: Channel) -> None:
        decode: Callable[[bytes], Any] = msgspec.msgpack.Decoder(_Shared).decode
        async for message in channel:
            try:
                shared = decode(message)
            except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):  # any client of the store may
                continue  # publish here: a message that is not a vector is dropped, and the listening goes on
            alias, _, scope = shared.scope.partition("\x00")
            index = self.indexes.get(alias)
            if shared.origin == self.origin or index is None or not shared.vector or len(shared.vector) % 4:
                continue
            try:
                index.add(scope, shared.key, np.frombuffer(shared.vector, dtype=np.float32).copy())
            except Exception:  # a bug: logged, and the listening goes on (one message must not end it)
                log.exception("semantic cache: a shared vector could not be added")

