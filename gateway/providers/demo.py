"""The built-in demo model: answers in-process, deterministically, streamed or not.

It lets a newcomer run the gateway with no API key and no network, and it gives
tests and demos a model whose every answer is known in advance. Usage figures are
real token counts (tiktoken) of the prompt and of the answer.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import operator
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from ..errors import InvalidRequest
from ..policy.compiled import ProviderConfig
from ..schemas.endpoints import Endpoint
from ..schemas.events import DONE, Chunk, StreamEvent, UsageReport
from ..schemas.openai import Usage, listed_prompts
from ..telemetry.tokens import TokenCounter, message_text
from .base import Call, Completion, check_endpoint

__all__ = ["DemoProvider", "demo_reply"]

_encode = msgspec.json.Encoder().encode
_FINGERPRINT = "fp_gateway_demo"
_EMBEDDING_DIMENSIONS = 256
_MAX_DEMO_DIMENSIONS = 4096
_MAX_EMBEDDING_INPUTS = 2048  # OpenAI's own cap on an embeddings request's inputs
_MAX_DEMO_VALUES = _MAX_EMBEDDING_INPUTS * 1024  # inputs x dimensions: ~2M numbers, ~20 MB of JSON
_SLICE_VALUES = 16_384  # numbers made between two turns other requests get at the event loop (~8 ms of hashing)
# Answers (choices) a chat or completions request may ask for: prompts x `n`. OpenAI's own cap on `n`, so any chat
# request is answered; a completions request's prompts multiply it, and its answers are made, counted and (streamed)
# re-sent in every chunk on the event loop: 4,000 prompts x 128 made half a million answers (100 MB), holding every
# other request of the process for seconds. 128 take about a millisecond, streamed or not.
_MAX_DEMO_ANSWERS = 128


def demo_reply(prompt: str) -> str:
    """The demo model's answer: fixed words plus a short, deterministic echo of the prompt."""
    words = prompt.split()
    echo = " ".join(words[:12]) + (" ..." if len(words) > 12 else "")
    said = f' You said: "{echo}".' if echo else ""
    return (f"Hello! This is the gateway's built-in demo model answering.{said} "
            "Point a model alias at a real provider to get real answers.")


class DemoProvider:
    endpoints = frozenset({Endpoint.CHAT, Endpoint.COMPLETIONS, Endpoint.EMBEDDINGS})

    def __init__(self, config: ProviderConfig, tokens: TokenCounter | None = None) -> None:
        self.name = config.name
        self.config = config
        self.tokens = tokens or TokenCounter()
        self.stream_usage_expected = True
        self._delay = config.chunk_delay_ms / 1000
        self._ids = itertools.count(1)  # per provider: answers' ids are unique within one runtime

    async def start(self) -> None:
        await asyncio.to_thread(self.tokens.load)

    async def close(self) -> None:
        return None

    def _prompts(self, call: Call) -> list[str]:
        """The prompts answered: a chat's last user message; a completions request's prompt, or each prompt it
        lists (token ids read as no text)."""
        body = call.body
        if call.endpoint is Endpoint.CHAT:
            messages = body.get("messages")
            listed = messages if isinstance(messages, list) else []
            users = [m for m in listed if isinstance(m, dict) and m.get("role") == "user"]
            return ["\n".join(message_text(users[-1:])) if users else ""]
        return [item if isinstance(item, str) else "" for item in listed_prompts(body.get("prompt"))]

    def _answers(self, call: Call) -> list[str]:
        """Each choice's answer, in order: `n` for each prompt (as OpenAI numbers a completions request's), at most
        `_MAX_DEMO_ANSWERS` of them, checked before any is made."""
        n = _choices(call)
        prompts = 1 if call.endpoint is Endpoint.CHAT else len(listed_prompts(call.body.get("prompt")))
        if prompts * n > _MAX_DEMO_ANSWERS:
            raise InvalidRequest(f"the demo model makes at most {_MAX_DEMO_ANSWERS} answers a request (prompts x n: "
                                 f"{prompts} x {n})", param="prompt" if prompts > _MAX_DEMO_ANSWERS else "n")
        return [demo_reply(prompt) for prompt in self._prompts(call) for _ in range(n)]

    def _usage(self, call: Call, answers: list[str]) -> Usage:
        if call.endpoint is Endpoint.CHAT:
            texts = message_text(call.body.get("messages"))
            prompt_tokens = sum(self.tokens.count(t) for t in texts) + 3 * len(call.body.get("messages") or ()) + 3
        else:  # each prompt, and the suffix (the text after the insertion point) read with each
            prompts = listed_prompts(call.body.get("prompt"))
            prompt_tokens = sum(self.tokens.count(item) if isinstance(item, str) else len(item)
                                if isinstance(item, list) else 0 for item in prompts)
            suffix = call.body.get("suffix")
            if isinstance(suffix, str) and suffix:
                prompt_tokens += self.tokens.count(suffix) * len(prompts)
        completion_tokens = sum(self.tokens.count(answer) for answer in answers)
        return Usage(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens)

    async def complete(self, call: Call) -> Completion:
        check_endpoint(self, call.endpoint)
        if call.endpoint is Endpoint.EMBEDDINGS:
            return await self._embeddings(call)
        answers = self._answers(call)
        usage = self._usage(call, answers)
        created, model = int(time.time()), call.body["model"]
        if call.endpoint is Endpoint.CHAT:
            body: dict[str, Any] = {
                "id": f"chatcmpl-demo-{next(self._ids)}", "object": "chat.completion", "created": created,
                "model": model,
                "system_fingerprint": _FINGERPRINT,
                "choices": [
                    {"index": i, "message": {"role": "assistant", "content": answer, "refusal": None},
                     "logprobs": None, "finish_reason": "stop"} for i, answer in enumerate(answers)
                ],
            }
        else:
            body = {
                "id": f"cmpl-demo-{next(self._ids)}", "object": "text_completion", "created": created, "model": model,
                "system_fingerprint": _FINGERPRINT,
                "choices": [{"index": i, "text": answer, "logprobs": None, "finish_reason": "stop"}
                            for i, answer in enumerate(answers)],
            }
        body["usage"] = _usage_object(usage)
        return Completion(_encode(body), usage)

    async def open_stream(self, call: Call) -> DemoStream:
        check_endpoint(self, call.endpoint)
        return DemoStream(self, call, self._answers(call))  # made here: a request over the bound is refused, not cut

    async def _embeddings(self, call: Call) -> Completion:
        """Deterministic vectors of the inputs, checked first, made and encoded an input at a time on the event loop,
        which other requests get between slices of about `_SLICE_VALUES` numbers: hashing up to `_MAX_DEMO_VALUES`
        numbers at once held every other request of the process (a worker thread did not help: the hashing is
        Python, and the loop then waited for the GIL)."""
        inputs = _embedding_inputs(call.body.get("input"))
        dims = call.body.get("dimensions") or _EMBEDDING_DIMENSIONS
        if dims > _MAX_DEMO_DIMENSIONS:
            raise InvalidRequest(f"the demo model makes at most {_MAX_DEMO_DIMENSIONS} dimensions", param="dimensions")
        if len(inputs) * dims > _MAX_DEMO_VALUES:
            raise InvalidRequest(f"the demo model makes at most {_MAX_DEMO_VALUES} numbers a request (inputs x "
                                 f"dimensions: {len(inputs)} x {dims})", param="input")
        as_base64 = call.body.get("encoding_format") == "base64"
        items: list[bytes] = []
        prompt_tokens = made = 0
        for index, item in enumerate(inputs):
            text = item if isinstance(item, str) else " ".join(map(str, item))
            prompt_tokens += self.tokens.count(item) if isinstance(item, str) else len(item)
            vector = _vector(text, dims)
            embedding: Any = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode() if as_base64 else vector
            items.append(_encode({"object": "embedding", "index": index, "embedding": embedding}))
            made += dims
            if made >= _SLICE_VALUES:
                made = 0
                await asyncio.sleep(0)
        body = b"".join((b'{"object":"list","data":[', b",".join(items), b'],"model":', _encode(call.body["model"]),
                         b',"usage":', _encode({"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}), b"}"))
        return Completion(body, Usage(prompt_tokens, 0, prompt_tokens))


def _embedding_inputs(raw: Any) -> list[str | list[int]]:
    """An embeddings request's inputs: a text or one token-id list alone, else each item of the list, which must be
    a text or a token-id list (the schema lets a mixed list such as `["a", 1]` through), at most
    `_MAX_EMBEDDING_INPUTS` of them, as OpenAI takes."""
    if isinstance(raw, str) or (isinstance(raw, list) and raw and type(raw[0]) is int):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise InvalidRequest("`input` must be a text, a list of token ids, or a list of either", param="input")
    if len(raw) > _MAX_EMBEDDING_INPUTS:
        raise InvalidRequest(f"`input` holds {len(raw)} items; at most {_MAX_EMBEDDING_INPUTS}", param="input")
    for item in raw:
        if not isinstance(item, str) and not (isinstance(item, list) and all(type(t) is int for t in item)):
            raise InvalidRequest("each item of `input` must be a text or a list of token ids", param="input")
    return raw


def _usage_object(usage: Usage) -> dict[str, int]:
    """OpenAI's usage object, every count written (`Usage` leaves out a count of 0, which the SDKs read as None)."""
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens}


def _choices(call: Call) -> int:
    n = call.body.get("n")
    return n if isinstance(n, int) and n > 0 else 1


# A hash byte's value in [-1, 1), looked up rather than computed: a large batch reads millions of them.
_BYTE_VALUES = [(b - 127.5) / 127.5 for b in range(256)]


def _vector(text: str, dims: int) -> list[float]:
    """A deterministic unit vector derived from the text."""
    seed = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    blocks = b"".join(hashlib.sha256(seed + counter.to_bytes(4, "little")).digest()
                      for counter in range(-(-dims // 32)))
    values = list(map(_BYTE_VALUES.__getitem__, blocks[:dims]))
    norm = sum(map(operator.mul, values, values)) ** 0.5 or 1.0
    return [round(v / norm, 6) for v in values]


class DemoStream:
    """The demo answer as OpenAI chunk events, one word a chunk (one batch each, like a real upstream)."""

    def __init__(self, provider: DemoProvider, call: Call, answers: list[str]) -> None:
        self._provider = provider
        self._call = call
        self._answers = answers

    def __aiter__(self) -> AsyncIterator[list[StreamEvent]]:
        return self._batches()

    async def aclose(self) -> None:
        return None

    async def _batches(self) -> AsyncIterator[list[StreamEvent]]:
        call, provider = self._call, self._provider
        chat = call.endpoint is Endpoint.CHAT
        answers = self._answers
        words = [answer.split(" ") for answer in answers]
        base = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-demo-{next(provider._ids)}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": call.body["model"], "system_fingerprint": _FINGERPRINT,
        }

        def chunk(pieces: dict[int, str | None], finish: str | None, first: bool = False) -> Chunk:
            """A chunk of the choices in `pieces` (index -> its text, None: none)."""
            if chat:
                choices = [{"index": i, "delta": {"role": "assistant", "content": "", "refusal": None} if first else (
                    {"content": piece} if piece is not None else {}), "logprobs": None, "finish_reason": finish}
                           for i, piece in pieces.items()]
            else:
                choices = [{"index": i, "text": piece or "", "logprobs": None, "finish_reason": finish}
                           for i, piece in pieces.items()]
            return Chunk.of({**base, "choices": choices})

        every: dict[int, str | None] = dict.fromkeys(range(len(answers)))
        if chat:
            yield [chunk(every, None, first=True)]
        for step in range(max(map(len, words))):  # a word of each answer that has one left, a chunk a step
            if provider._delay:
                await asyncio.sleep(provider._delay)
            yield [chunk({i: (w[step] if step == 0 else " " + w[step]) for i, w in enumerate(words) if step < len(w)},
                         None)]
        usage = provider._usage(call, answers)
        usage_chunk = _encode({**base, "choices": [], "usage": _usage_object(usage)})
        yield [chunk(every, "stop"), UsageReport(usage, usage_chunk), DONE]
