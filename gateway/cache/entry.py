"""A cached answer as stored: a complete body or a stream's chunks, msgpack, compressed above a size.

One byte tells how the rest is stored (`0`: raw msgpack, `1`: zlib), so that an
entry can be read whatever the threshold was when it was written. zlib, not zstd:
on sample chat answers and streams level 6 compressed as well as zstd's level 3
or better (docs/cache.md has the figures); zstd was about twice as fast, but an
answer is compressed once per miss, and zlib needs no dependency.

Encoding is bounded by the entry's size limit: an answer that cannot fit is not
compressed at all (past what zlib could ever bring under the limit) or only until
the compressed output passes the limit. Large entries are encoded and decoded in
a worker thread (`ENCODE_INLINE_BYTES`, `DECODE_INLINE_BYTES`): compressing 16 KiB
took about 0.6 ms, a 6 MB embeddings answer 0.8 s, which on the event loop stalls
every request of the process; a thread hop costs about 0.1-0.2 ms.

Decoding never trusts the bytes: anything that does not decode to a well-formed
entry (a corrupt value, another program's key, a value nested past Python's
recursion limit, figures no answer has: an infinite
`created`, a negative cost, usage that is not `usable`) is `None`, which the cache
treats as a miss. Nor does a hit trust the answer inside: served in its own form it goes
out as stored, so `load_entry` also refuses an entry that is not an answer of
the request's endpoint (`holds_answer`), checked as it is decoded (in the same
worker thread for a large one), so that a decoded entry the cache keeps is never
checked again. A miss's answer is checked so before it is stored (`pack_entry`):
an upstream's 200 that is not an answer is never written, to be read back as
corrupt by every later request of its key.
"""

from __future__ import annotations

import asyncio
import zlib
from math import isfinite
from typing import Literal

import msgspec

from ..schemas.endpoints import Endpoint
from ..schemas.openai import Usage

__all__ = ["DECODE_INLINE_BYTES", "ENCODE_INLINE_BYTES", "Entry", "NotAnAnswer", "decode_entry", "encode_entry",
           "holds_answer", "load_entry", "pack_entry"]

_RAW, _ZLIB = b"\x00", b"\x01"
_MAX_INFLATE = 256 * 1024 * 1024  # a decompression bomb in a shared Redis is a miss, not an outage
# zlib's best ratio is about 1032:1 (a deflate block codes at most 258 bytes in about 2 bits): raw bytes past this
# many times the limit can never be compressed under it.
_MAX_RATIO = 1032
_STEP = 256 * 1024  # compressed piece by piece, checking the output's size after each piece
ENCODE_INLINE_BYTES = 8 * 1024  # raw entries up to this size are encoded on the event loop (measured: ~0.1 ms)
DECODE_INLINE_BYTES = 72 * 1024  # stored values, and inflated bytes, decoded on the loop up to this size


class Entry(msgspec.Struct, array_like=True, frozen=True):
    """What a hit replays. `kind` says which form was stored; the other form is derived on a hit."""

    kind: Literal["body", "stream"]
    created: float  # unix time of the original answer (the `age` header)
    body: bytes = b""  # kind "body": the JSON response as the upstream sent it
    chunks: list[bytes] = []  # kind "stream": each chunk's JSON payload, in the original chunking
    usage: Usage | None = None
    usage_chunk: bytes | None = None  # the upstream's usage-only chunk, if it sent one
    provider: str = ""  # who answered
    model: str = ""
    cost_usd: float | None = None  # what the answer cost, as accounting priced it: what a hit saves (None: not known)
    usage_estimated: bool = False  # `usage` is the gateway's estimate (the upstream sent none): never replayed
    # A stream that came without usage for a client that had not asked for it (`stream_options.include_usage`): its
    # upstream may not have been asked (a provider's `stream_usage: false`), so it is a miss for a client that asks
    usage_unasked: bool = False


class _TooLarge(Exception):
    pass


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Entry)


def answer_bytes(entry: Entry) -> int:
    """The answer's own bytes (body, chunks, usage chunk): about its raw encoded size."""
    return len(entry.body) + sum(len(chunk) for chunk in entry.chunks) + len(entry.usage_chunk or b"")


def encode_entry(entry: Entry, compress_min_bytes: int, max_bytes: int | None = None) -> bytes | None:
    """The stored value, or None when it would be larger than `max_bytes` (compressed or not, whichever is
    smaller). Compression stops as soon as its output passes the limit."""
    raw = _encoder.encode(entry)  # a copy of the answer's bytes: cheap beside compressing them
    if max_bytes is not None and len(raw) > max_bytes * _MAX_RATIO:
        return None
    if len(raw) >= compress_min_bytes:
        # no larger than the raw form (else no use), and within the limit
        packed = _compress(raw, len(raw) if max_bytes is None else min(max_bytes, len(raw)))
        if packed is not None:
            return _ZLIB + packed
    return _RAW + raw if max_bytes is None or len(raw) + 1 <= max_bytes else None


def _compress(raw: bytes, limit: int) -> bytes | None:
    """`raw` compressed, or None as soon as the output (with its tag byte) would be larger than `limit`."""
    compressor = zlib.compressobj(6)
    view = memoryview(raw)
    parts: list[bytes] = []
    size = 1
    for start in range(0, len(raw), _STEP):
        part = compressor.compress(view[start:start + _STEP])
        size += len(part)
        if size > limit:
            return None
        parts.append(part)
    parts.append(compressor.flush())
    return None if size + len(parts[-1]) > limit else b"".join(parts)


class NotAnAnswer(Exception):
    """What a miss would store is not an answer of its endpoint (`holds_answer`): an upstream's 200 `{}` or
    `{"choices": []}`, a stream without a choice. Stored, every hit of its key would read it back as a corrupt entry
    until it expired."""


async def pack_entry(entry: Entry, compress_min_bytes: int, max_bytes: int,
                     endpoint: Endpoint | None = None) -> bytes | None:
    """`encode_entry`, in a worker thread when the entry is large; `NotAnAnswer` when `entry` is not an answer of
    `endpoint` (None: not checked), checked in that same thread."""
    if answer_bytes(entry) <= ENCODE_INLINE_BYTES:
        return _pack(entry, compress_min_bytes, max_bytes, endpoint)
    return await asyncio.to_thread(_pack, entry, compress_min_bytes, max_bytes, endpoint)


def _pack(entry: Entry, compress_min_bytes: int, max_bytes: int, endpoint: Endpoint | None) -> bytes | None:
    if endpoint is not None and not holds_answer(entry, endpoint):
        raise NotAnAnswer
    return encode_entry(entry, compress_min_bytes, max_bytes)


def decode_entry(value: bytes, max_inflate: int = _MAX_INFLATE) -> Entry | None:
    """The entry, or None for anything that is not one (a corrupt value is a miss). `_TooLarge` when a
    compressed value inflates past a `max_inflate` below the bomb bound (`load_entry` goes on in a thread)."""
    try:
        if value[:1] == _ZLIB:
            inflater = zlib.decompressobj()
            raw = inflater.decompress(value[1:], max_inflate)
            if not inflater.eof:  # stopped at the bound (or cut short: then a miss either way)
                if max_inflate < _MAX_INFLATE:
                    raise _TooLarge
                return None
        elif value[:1] == _RAW:
            raw = value[1:]
        else:
            return None
        entry = _decoder.decode(raw)
    except (zlib.error, msgspec.DecodeError, msgspec.ValidationError, RecursionError):  # (nested past the limit)
        return None
    return entry if _believable(entry) else None


def _believable(entry: Entry) -> bool:
    """Whether the figures a hit counts can be: a finite `created` (its `age`), a cost finite and not below 0 (or
    not known), usage `usable` (or none). Any other (a bad write, another program's key) would make every hit of
    the key fail (a counter cannot go down, an infinite age has no header): a corrupt entry, a miss, replaced."""
    cost, usage = entry.cost_usd, entry.usage
    return (isfinite(entry.created) and (cost is None or (isfinite(cost) and cost >= 0.0))
            and (usage is None or usage.usable()))


async def load_entry(value: bytes, endpoint: Endpoint | None) -> Entry | None:
    """`decode_entry` on the event loop for small values, in a worker thread for large ones; None too for an entry
    that is not an answer of `endpoint` (None: not checked)."""
    if len(value) <= DECODE_INLINE_BYTES:
        try:
            return _answer(decode_entry(value, DECODE_INLINE_BYTES), endpoint)
        except _TooLarge:
            pass
    return await asyncio.to_thread(_load_large, value, endpoint)


def _load_large(value: bytes, endpoint: Endpoint | None) -> Entry | None:
    return _answer(decode_entry(value), endpoint)


def _answer(entry: Entry | None, endpoint: Endpoint | None) -> Entry | None:
    return entry if entry is None or endpoint is None or holds_answer(entry, endpoint) else None


# What a hit needs of a stored answer to go out as one: the shape an SDK parses, nothing more. Each field the
# check does not need is skipped by the decoder, not built (an embeddings answer of megabytes included).
class _Object(msgspec.Struct, gc=False):
    """Any JSON object."""


class _Answer(msgspec.Struct, gc=False):
    """A complete chat or text completion: `choices`, a list of objects."""

    choices: list[_Object]


class _Embeddings(msgspec.Struct, gc=False):
    data: list[msgspec.Raw]


class _Piece(msgspec.Struct, gc=False):
    """A stream chunk: one without `choices` (an upstream's extra piece) is kept as the upstream sent it."""

    choices: list[_Object] | None = None


_read_answer = msgspec.json.Decoder(_Answer).decode
_read_embeddings = msgspec.json.Decoder(_Embeddings).decode
_read_piece = msgspec.json.Decoder(_Piece).decode


def holds_answer(entry: Entry, endpoint: Endpoint) -> bool:
    """Whether `entry` is an answer of `endpoint` that a client can read: a complete one a JSON object with its
    `choices` a list of objects, at least one (`data` a list: embeddings), a stream's every piece a JSON object whose
    `choices` are objects (a usage-only piece has none) and some piece with a choice (nothing answers nothing).

    Run once per distinct stored value, as it is decoded: a stream's pieces are each decoded here (about 0.2 us
    a usual chunk, measured), which a hit of a value the cache keeps decoded never pays again."""
    try:
        if entry.kind == "body":
            if endpoint is Endpoint.EMBEDDINGS:
                _read_embeddings(entry.body)
                return True
            return bool(_read_answer(entry.body).choices)  # `choices: []` answers nothing, as a stream without one
        if endpoint is Endpoint.EMBEDDINGS:  # never streamed
            return False
        if entry.usage_chunk is not None:
            _read_piece(entry.usage_chunk)
        answered = False
        for payload in entry.chunks:
            if _read_piece(payload).choices:
                answered = True
        return answered
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return False
