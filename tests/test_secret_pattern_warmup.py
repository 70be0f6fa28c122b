"""The removal of a provider's credentials from an upstream's error never stalls the event loop.

The pattern that removes a configured secret in every spelling (`sanitize`) costs time to build, more the
longer the secret: over a second for a 2,000-character Entra token and its `Bearer` form. It used to be built
on the event loop at the first upstream error after a provider started or its credential rotated, and the
whole gateway stood still meanwhile. A ticker task's largest gap measures the stall around that first error, through
real providers in front of the project's mock upstreams; each test uses credentials of its own (random), so
that no test finds a pattern another one built. The secret must still be gone from that first error, in every
spelling (tests/test_secret_spellings.py), also when the pattern is not ready yet (`sanitize`'s fallback).
"""

from __future__ import annotations

import asyncio
import base64
import gc
import os
import secrets
import textwrap
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from gateway.errors import GatewayError
from gateway.policy import compile_text
from gateway.providers.azure import AzureProvider
from gateway.providers.base import Call
from gateway.providers.openai_compat import OpenAICompatProvider
from gateway.sanitize import remove_secrets, sanitize_upstream_message
from gateway.schemas.endpoints import Endpoint
from gateway.server import _GC_THRESHOLDS
from gateway.upstream.client import ConnectionGate
from tests.support.mock_upstream import MockUpstream
from tests.test_secret_spellings import SPELLINGS, EchoingUpstream

# A stall of the loop the tests tolerate: generous (a busy machine), far below the seconds the build took on it.
MAX_GAP_S = 0.3
LONG = 3000  # a long Entra access token (they run to a few thousand characters)

T = TypeVar("T")


@pytest.fixture(autouse=True)
def server_collector() -> Iterator[None]:
    """The collector as the server sets it once started (`server.py`: the heap frozen, a large young
    generation). Left as pytest has it, every full collection that a build's allocations trigger walks pytest's
    whole heap and the build's own tree, holding the GIL, and so the loop, for a tenth of a second: a stall of
    the test process's making, not the gateway's."""
    thresholds = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(*_GC_THRESHOLDS)
    yield
    gc.set_threshold(*thresholds)
    gc.unfreeze()


def long_secret(length: int = LONG) -> str:
    """A base64-style credential with `/` and `+` (escaped by some encoders and kept by others)."""
    text = base64.b64encode(secrets.token_bytes(length)).decode()
    return "".join(ch for ch in text if ch != "=")[:length - 4] + "/+Ab"


def leaked(secret: str, text: str) -> bool:
    """Whether a recognisable piece of `secret` (any 12 characters of it in a row) is in `text`."""
    return any(secret[i:i + 12] in text for i in range(len(secret) - 11))


class Ticker:
    """The largest gap between the ticks of a task that wakes every 5 ms: how long the loop stood still."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(0.005)
            now = loop.time()
            self.worst = max(self.worst, now - last)
            last = now

    async def __aenter__(self) -> Ticker:
        self._task = asyncio.create_task(self._tick())
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def first_error(provider: OpenAICompatProvider, model: str) -> str:
    """The client-visible message of the error the upstream answers `model` with."""
    call = Call(Endpoint.CHAT, {"model": model, "messages": [{"role": "user", "content": "hi"}]}, False, "req-b12")
    with pytest.raises(GatewayError) as caught:
        await provider.complete(call)
    return caught.value.message


def openai_provider(base_url: str, key: str) -> OpenAICompatProvider:
    policy = textwrap.dedent(f"""\
        version: 1
        auth: none
        providers:
          up: {{kind: openai, base_url: {base_url}, api_key_env: B12_KEY}}
        models:
          chat: {{provider: up, model: m}}
        """)
    config = compile_text(policy, "p.yaml", {"B12_KEY": key}).providers["up"]
    return OpenAICompatProvider(config, ConnectionGate("up", 4, 5.0, None))


async def until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def started(provider: OpenAICompatProvider, use: Callable[[], Awaitable[T]]) -> T:
    await provider.start()
    try:
        return await use()
    finally:
        await provider.close()


async def test_the_first_error_of_a_provider_with_a_long_key_does_not_stall_the_loop() -> None:
    key = long_secret()
    with MockUpstream(api_key=None) as upstream:
        provider = openai_provider(upstream.base_url, key)
        async with Ticker() as ticker:
            message = await started(provider, lambda: first_error(provider, "fault-echo-secrets"))
    assert "Incorrect API key provided: [redacted]." in message, message
    assert not leaked(key, message), message
    assert ticker.worst < MAX_GAP_S, f"the event loop stood still for {ticker.worst:.2f} s"


@pytest.mark.parametrize("spelling", list(SPELLINGS))
async def test_the_first_error_loses_the_key_in_every_spelling_without_a_stall(spelling: str) -> None:
    key = long_secret()
    with EchoingUpstream(api_key=None) as upstream:
        provider = openai_provider(upstream.base_url, key)
        async with Ticker() as ticker:
            message = await started(provider, lambda: first_error(provider, f"echo-{spelling}"))
    assert not leaked(key, message) and "%2" not in message and "&#" not in message, message
    assert "Invalid credential [redacted] for model" in message, message
    assert ticker.worst < MAX_GAP_S, f"the event loop stood still for {ticker.worst:.2f} s"


async def test_a_rotated_entra_token_is_scrubbed_from_the_first_error_without_a_stall(tmp_path: Path) -> None:
    first, second = long_secret(), long_secret()
    token_file = tmp_path / "token"
    token_file.write_text(first)
    with MockUpstream(api_key=None) as upstream:
        policy = textwrap.dedent(f"""\
            version: 1
            auth: none
            providers:
              az:
                kind: azure
                base_url: {upstream.base_url.removesuffix("/v1")}
                azure: {{entra_token_file: {token_file}, entra_token_refresh_s: 0.1}}
            models:
              chat: {{provider: az, model: m}}
            """)
        provider = AzureProvider(compile_text(policy, "p.yaml", {}).providers["az"], ConnectionGate("az", 4, 5.0, None))
        assert provider.token_file is not None
        refresher = provider.token_file

        async def rotate_then_fail() -> tuple[str, str]:
            before = await first_error(provider, "fault-echo-secrets")
            replacement = tmp_path / "token.new"
            replacement.write_text(second)
            os.replace(replacement, token_file)  # as a sidecar does: a new file in one step
            await until(lambda: refresher.secrets[:1] == (second,), "the rotated token")
            return before, await first_error(provider, "fault-echo-secrets")

        async with Ticker() as ticker:
            before, after = await started(provider, rotate_then_fail)
    assert upstream.requests[-1].headers["authorization"] == f"Bearer {second}"
    for message in (before, after):
        assert "Incorrect API key provided: [redacted]." in message, message
        assert not leaked(first, message) and not leaked(second, message), message
    assert ticker.worst < MAX_GAP_S, f"the event loop stood still for {ticker.worst:.2f} s"


@pytest.mark.parametrize("spelling", list(SPELLINGS))
async def test_a_pattern_not_built_yet_lets_no_spelling_through_and_does_not_stall(spelling: str) -> None:
    """`sanitize` called on the loop with secrets nobody prepared (no provider start, no warm-up): no
    stall, no secret in any spelling, neither in an error message nor in the text beside one."""
    key = long_secret()
    message = f"Invalid credential {SPELLINGS[spelling](key)} for model m"
    async with Ticker() as ticker:
        await asyncio.sleep(0.02)
        cleaned = sanitize_upstream_message(message, secrets=(f"Bearer {key}",))
        beside = remove_secrets(message, (f"Bearer {key}",))
        await asyncio.sleep(0.02)
    for text in (cleaned, beside):
        assert not leaked(key, text) and "%2" not in text and "&#" not in text, text
        assert "[redacted]" in text, text
    assert ticker.worst < MAX_GAP_S, f"the event loop stood still for {ticker.worst:.2f} s"
    # ... and once the pattern is ready (built off the loop meanwhile), the removal is exact again
    await until(lambda: remove_secrets(message, (f"Bearer {key}",)) == "Invalid credential [redacted] for model m",
                "the exact removal")


async def test_a_plain_echo_split_by_white_space_goes_exactly_even_before_the_pattern_is_ready() -> None:
    key = long_secret()
    wrapped = "\n".join(key[i:i + 76] for i in range(0, len(key), 76))  # as a PEM-style wrap leaves it
    message = f"Invalid credential Bearer {wrapped}, see the docs"
    async with Ticker() as ticker:
        await asyncio.sleep(0.02)
        beside = remove_secrets(message, (f"Bearer {key}",))
        cleaned = sanitize_upstream_message(message, secrets=(f"Bearer {key}",))
        await asyncio.sleep(0.02)
    assert beside == "Invalid credential [redacted], see the docs"
    assert cleaned == "Invalid credential [redacted], see the docs"
    assert ticker.worst < MAX_GAP_S, f"the event loop stood still for {ticker.worst:.2f} s"
