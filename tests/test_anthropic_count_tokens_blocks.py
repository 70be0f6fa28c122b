"""`/v1/messages/count_tokens` counts what Anthropic counts: images by their size, thinking in the current turn only.

Through the Anthropic SDK against a served gateway. An image costs about `width * height / 750` tokens after
Anthropic's down-scaling (long edge at most 1,568 px, at most about 1,600 tokens), its size read from the image's
header; an image whose size the gateway cannot know (a URL, unreadable data) counts as the most an image costs.
Thinking blocks count in the current assistant turn (the tool loop after the last user message), not in earlier
turns, which Anthropic strips; redacted thinking counts as about the text its data holds. The ids that tie tool
results to their calls count too.
"""

from __future__ import annotations

import base64
import struct
import zlib
from collections.abc import Iterator
from typing import Any

import anthropic
import pytest

from gateway.translate.image_tokens import MAX_IMAGE_TOKENS, image_size, size_tokens
from tests.conftest import FULL_KEY, RunningGateway

QUESTION = {"type": "text", "text": "What is in this picture?"}


@pytest.fixture
def sdk(gateway: RunningGateway) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=gateway.url, api_key=FULL_KEY, max_retries=0, timeout=30) as client:
        yield client


def count(sdk: anthropic.Anthropic, messages: list[dict[str, Any]], **extra: Any) -> int:
    return sdk.messages.count_tokens(model="chat", messages=messages, **extra).input_tokens  # type: ignore[arg-type]


# -- images of each type the Messages API takes, made here ----------------------------------------------------

def png(width: int, height: int) -> bytes:
    """A real PNG: black, RGB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = (b"\x00" + b"\x00" * 3 * width) * height
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))


def gif(width: int, height: int) -> bytes:
    """A GIF89a whose screen is `width` x `height`, with one 1 x 1 image in it."""
    return (b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
            + b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02\x44\x01\x00;")


def jpeg(width: int, height: int) -> bytes:
    """A JPEG's segments up to its scan: JFIF, then 100 KB of metadata (two APP segments, as EXIF and ICC profiles
    come before the frame) so that the frame header lies far into the base64 text."""
    def segment(marker: int, data: bytes) -> bytes:
        return bytes([0xFF, marker]) + struct.pack(">H", len(data) + 2) + data

    frame = struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00"
    return (b"\xff\xd8" + segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
            + segment(0xE1, b"Exif\x00\x00" + b"e" * 50_000) + segment(0xE2, b"ICC_PROFILE\x00" + b"i" * 50_000)
            + segment(0xDB, b"\x00" + b"\x01" * 64) + segment(0xC0, frame)
            + segment(0xDA, b"\x01\x01\x00\x00\x3f\x00") + b"\x00" * 16 + b"\xff\xd9")


def webp(kind: str, width: int, height: int) -> bytes:
    if kind == "VP8 ":  # lossy: a key frame's header
        data = b"\x00\x00\x00\x9d\x01\x2a" + struct.pack("<HH", width, height) + b"\x00" * 10
    elif kind == "VP8L":  # lossless: 14 bits each, less one
        data = b"\x2f" + struct.pack("<I", (width - 1) | (height - 1) << 14) + b"\x00" * 10
    else:  # VP8X, extended: the canvas, 24 bits each, less one
        data = b"\x00\x00\x00\x00" + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    chunk = kind.encode() + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def image(data: bytes, media_type: str = "image/png") -> dict[str, Any]:
    return {"type": "image", "source": {"type": "base64", "media_type": media_type,
                                        "data": base64.b64encode(data).decode()}}


# -- images ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("width", "height", "tokens"), [
    (200, 200, 54), (1000, 1000, 1334), (1092, 1092, 1590),  # Anthropic's own examples
    (3000, 1500, MAX_IMAGE_TOKENS),  # scaled down to 1568 x 784, then to about 1,600 tokens
    (1568, 400, 837),  # a long edge at the limit
])
def test_an_image_costs_what_its_size_does(sdk: anthropic.Anthropic, width: int, height: int, tokens: int) -> None:
    text_only = count(sdk, [{"role": "user", "content": [QUESTION]}])
    with_image = count(sdk, [{"role": "user", "content": [image(png(width, height)), QUESTION]}])
    assert with_image - text_only == tokens == size_tokens(width, height)


def test_images_of_every_type_and_in_tool_results_count(sdk: anthropic.Anthropic) -> None:
    text_only = count(sdk, [{"role": "user", "content": [QUESTION]}])
    for block, tokens in [(image(jpeg(800, 600), "image/jpeg"), 640), (image(gif(300, 150), "image/gif"), 60),
                          (image(webp("VP8X", 1200, 900), "image/webp"), 1440)]:
        assert count(sdk, [{"role": "user", "content": [block, QUESTION]}]) - text_only == tokens
    call = {"type": "tool_use", "id": "toolu_1", "name": "screenshot", "input": {}}
    loop = [{"role": "user", "content": "Look at the screen."}, {"role": "assistant", "content": [call]}]
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "the screen"}]}
    tool = {"name": "screenshot", "input_schema": {"type": "object"}}
    plain = count(sdk, [*loop, {"role": "user", "content": [result]}], tools=[tool])
    shot = {**result, "content": [*result["content"], image(png(1000, 1000))]}
    assert count(sdk, [*loop, {"role": "user", "content": [shot]}], tools=[tool]) - plain == 1334


def test_an_image_of_unknown_size_counts_as_the_most_an_image_costs(sdk: anthropic.Anthropic) -> None:
    """A URL image is not fetched to be counted, and data that is no image the gateway reads has no size: each is
    counted as the most an image costs, an upper bound rather than nothing."""
    text_only = count(sdk, [{"role": "user", "content": [QUESTION]}])
    url = {"type": "image", "source": {"type": "url", "url": "https://images.example/photo.jpg"}}
    not_an_image = image(b"not an image at all", "image/png")
    for block in (url, not_an_image):
        assert count(sdk, [{"role": "user", "content": [block, QUESTION]}]) - text_only == MAX_IMAGE_TOKENS


def test_image_sizes_are_read_from_each_types_header() -> None:
    def size(data: bytes) -> tuple[int, int] | None:
        return image_size(base64.b64encode(data).decode())

    assert size(png(640, 480)) == (640, 480)
    assert size(gif(320, 200)) == (320, 200)
    assert size(jpeg(4032, 3024)) == (4032, 3024)
    for kind in ("VP8 ", "VP8L", "VP8X"):
        assert size(webp(kind, 1024, 768)) == (1024, 768)
    assert image_size(base64.encodebytes(jpeg(800, 600)).decode()) == (800, 600)  # base64 in lines
    for junk in (b"", b"\xff\xd8\xff\xd9", b"GIF8", b"RIFF\x00\x00\x00\x00WEBPXXXX", b"\x89PNG\r\n\x1a\n"):
        assert size(junk) is None
    assert image_size("@@ not base64 @@") is None


# -- thinking, and the ids of tool calls ----------------------------------------------------------------------

THOUGHT = "Let me think about which tool answers this best, and what to ask of it. " * 20
THINKING = {"type": "thinking", "thinking": THOUGHT, "signature": "sig-abc"}
CALL = {"type": "tool_use", "id": "toolu_01", "name": "lookup", "input": {"q": "weather"}}
RESULT = {"type": "tool_result", "tool_use_id": "toolu_01", "content": "sunny"}
TOOLS = [{"name": "lookup", "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}}]


def tool_loop(*assistant: dict[str, Any], tool_use_id: str = "toolu_01") -> list[dict[str, Any]]:
    call, result = {**CALL, "id": tool_use_id}, {**RESULT, "tool_use_id": tool_use_id}
    return [{"role": "user", "content": "What is the weather?"},
            {"role": "assistant", "content": [*assistant, call]},
            {"role": "user", "content": [result]}]


def test_thinking_counts_in_the_current_turn_only(sdk: anthropic.Anthropic) -> None:
    """Anthropic strips earlier turns' thinking from the input; the thinking of the turn still in its tool loop is
    read, and counted (here as the same text as a text block would be)."""
    bare = count(sdk, tool_loop(), tools=TOOLS)
    as_text = count(sdk, tool_loop({"type": "text", "text": THOUGHT}), tools=TOOLS) - bare
    assert as_text > 200
    assert count(sdk, tool_loop(THINKING), tools=TOOLS) - bare == as_text
    data = base64.b64encode(b"\x07" * 3000).decode()  # encrypted: about the text its 3,000 bytes hold
    redacted = {"type": "redacted_thinking", "data": data}
    assert count(sdk, tool_loop(redacted), tools=TOOLS) - bare == 750
    hello = {"type": "text", "text": "Hello"}
    earlier = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": [THINKING, redacted, hello]}]
    stripped = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": [hello]}]
    latest = [{"role": "user", "content": "And now?"}]
    assert count(sdk, [*earlier, *latest]) == count(sdk, [*stripped, *latest])  # a finished turn: not counted
    assert count(sdk, [*earlier, *tool_loop(THINKING)], tools=TOOLS) == \
        count(sdk, [*stripped, *tool_loop(THINKING)], tools=TOOLS)  # only the current turn's thinking counts


def test_the_ids_that_tie_results_to_calls_count(sdk: anthropic.Anthropic) -> None:
    short = count(sdk, tool_loop(tool_use_id="t1"), tools=TOOLS)
    long = count(sdk, tool_loop(tool_use_id="toolu_01A09q90qw90lq917835lq9bCdEfGhIjKlMnOpQr"), tools=TOOLS)
    assert long - short >= 20  # the id twice (the call's, its result's), each far more tokens than `t1`
