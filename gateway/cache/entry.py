"""A cached answer as stored: a complete body or a stream's chunks, msgpack, compressed above a size.

One byte tells how the rest is stored (`0`: raw msgpack, `1`: zlib), so that an
entry can be read whatever the threshold was when it was written. zlib, not zstd:
on sample chat answers and streams level 6 compressed as well as zstd's level 3
or better (docs/cache.md has the figures); zstd was about twice as fast, but an
answer is compressed once per miss, and zlib needs no dependency.

Decoding never trusts the bytes: anything that does not decode to a well-formed
entry (a corrupt value, another program's key) is `None`, which the cache treats
as a miss.
"""

from __future__ import annotations

import zlib
from typing import Literal

import msgspec

from ..schemas.openai import Usage

__all__ = ["Entry", "decode_entry", "encode_entry"]

_RAW, _ZLIB = b"\x00", b"\x01"
_MAX_INFLATE = 256 * 1024 * 1024  # a decompression bomb in a shared Redis is a miss, not an outage


class Entry(msgspec.Struct, array_like=True, frozen=True):
    """What a hit replays. `kind` says which form was stored; the other form is derived on a hit."""

    kind: Literal["body", "stream"]
    created: float  # unix time of the original answer (the `age` header)
    body: bytes = b""  # kind "body": the JSON response as the upstream sent it
    chunks: list[bytes] = []  # kind "stream": each chunk's JSON payload, in the original chunking
    usage: Usage | None = None
    usage_chunk: bytes | None = None  # the upstream's usage-only chunk, if it sent one
    provider: str = ""  # who answered: the saved cost is priced from it
    model: str = ""


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Entry)


def encode_entry(entry: Entry, compress_min_bytes: int) -> bytes:
    raw = _encoder.encode(entry)
    if len(raw) >= compress_min_bytes:
        packed = zlib.compress(raw, 6)
        if len(packed) < len(raw):
            return _ZLIB + packed
    return _RAW + raw


def decode_entry(value: bytes) -> Entry | None:
    """The entry, or None for anything that is not one (a corrupt value is a miss)."""
    try:
        if value[:1] == _ZLIB:
            inflater = zlib.decompressobj()
            raw = inflater.decompress(value[1:], _MAX_INFLATE)
            if inflater.unconsumed_tail:
                return None
        elif value[:1] == _RAW:
            raw = value[1:]
        else:
            return None
        return _decoder.decode(raw)
    except (zlib.error, msgspec.DecodeError, msgspec.ValidationError):
        return None
