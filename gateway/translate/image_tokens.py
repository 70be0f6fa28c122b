"""What an image costs a Claude model, for `/v1/messages/count_tokens`: Anthropic's published rule, from the image's
size as its header says.

Anthropic's vision docs: an image costs about `width * height / 750` tokens (rounded up: 1000 x 1000 px is 1,334),
after the API scales it down, keeping its aspect ratio, until its long edge is at most 1,568 px and it costs at most
about 1,600 tokens. The size is read from the header of a base64 image (PNG, GIF, WebP, JPEG: the types Anthropic
takes), decoding only the few bytes it needs. An image whose size cannot be known (a URL image, which the gateway
does not fetch to count it, or data it cannot read) counts as the most an image costs, `MAX_IMAGE_TOKENS`: an upper
bound, never zero. A model that reads images at a higher resolution than this rule assumes costs more for an image
over 1,568 px than this says.
"""

from __future__ import annotations

import binascii
import math
import re

__all__ = ["LONG_EDGE", "MAX_IMAGE_TOKENS", "PIXELS_PER_TOKEN", "image_size", "image_tokens", "size_tokens"]

PIXELS_PER_TOKEN = 750
LONG_EDGE = 1568
MAX_IMAGE_TOKENS = 1600
_SPACE = re.compile(r"\s+")
_JPEG_SEGMENTS = 512  # a JPEG header's segments looked through for its frame (EXIF, ICC, ... come first)
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def size_tokens(width: int, height: int) -> int:
    """Tokens of a `width` x `height` image, by Anthropic's rule (see the module's docstring)."""
    if width <= 0 or height <= 0:
        return MAX_IMAGE_TOKENS
    scale = min(1.0, LONG_EDGE / max(width, height))
    return min(math.ceil(width * scale * height * scale / PIXELS_PER_TOKEN), MAX_IMAGE_TOKENS)


def image_tokens(url: str) -> int:
    """Tokens of an image part's URL (a `data:` URL of base64 data, or a URL): `MAX_IMAGE_TOKENS` when its size
    cannot be read."""
    comma = url.find(",", 0, 256) if url[:5].lower() == "data:" else -1
    size = image_size(url, comma + 1) if comma > 0 and url[:comma].lower().endswith(";base64") else None
    return size_tokens(*size) if size is not None else MAX_IMAGE_TOKENS


def image_size(text: str, start: int = 0) -> tuple[int, int] | None:
    """(width, height) of a base64 PNG, GIF, WebP or JPEG image (`text` from `start`), from its header; None when it
    is none of them or cannot be read."""
    size = _read_size(_Base64(text, start))
    if size is None and _SPACE.search(text, start, start + 4096) is not None:  # broken into lines: read it whole
        size = _read_size(_Base64(_SPACE.sub("", text[start:]), 0))
    return size


class _Base64:
    """The bytes of base64 text (from `start`), decoded only where they are read."""

    __slots__ = ("start", "text")

    def __init__(self, text: str, start: int) -> None:
        self.text = text
        self.start = start

    def read(self, offset: int, count: int) -> bytes:
        """`count` bytes from `offset` (fewer at the end, or where the text is not base64)."""
        first, last = offset // 3, (offset + count + 2) // 3
        try:
            decoded = binascii.a2b_base64(self.text[self.start + first * 4:self.start + last * 4])
        except (binascii.Error, ValueError):
            return b""
        return decoded[offset - first * 3:offset - first * 3 + count]


def _read_size(data: _Base64) -> tuple[int, int] | None:
    head = data.read(0, 32)
    if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
        return int.from_bytes(head[6:8], "little"), int.from_bytes(head[8:10], "little")
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return _webp_size(head)
    if head[:2] == b"\xff\xd8":
        return _jpeg_size(data)
    return None


def _webp_size(head: bytes) -> tuple[int, int] | None:
    kind = head[12:16]
    if kind == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":  # lossy: the key frame's size, 14 bits each
        return int.from_bytes(head[26:28], "little") & 0x3FFF, int.from_bytes(head[28:30], "little") & 0x3FFF
    if kind == b"VP8L" and head[20:21] == b"\x2f":  # lossless: 14 bits each, less one
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if kind == b"VP8X":  # extended: the canvas, 24 bits each, less one
        return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
    return None


def _jpeg_size(data: _Base64) -> tuple[int, int] | None:
    """The size in a JPEG's frame header (SOFn), found by walking its segments from the start of the image."""
    offset = 2
    for _ in range(_JPEG_SEGMENTS):
        head = data.read(offset, 9)
        if len(head) < 4 or head[0] != 0xFF:
            return None
        marker = head[1]
        if marker == 0xFF:  # fill bytes before a marker
            offset += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            offset += 2
            continue
        if marker in _SOF:
            if len(head) < 9:
                return None
            return int.from_bytes(head[7:9], "big"), int.from_bytes(head[5:7], "big")
        if marker in (0xD9, 0xDA):  # the end of the image, or its scan, before any frame header
            return None
        offset += 2 + int.from_bytes(head[2:4], "big")
    return None
