"""The patterns that remove a provider's secrets stay bounded in memory while an Entra token file rotates.

A pattern per set of secrets (`secret_removal`) is about 1.4 MB for two 2,000-character tokens. Each rotation of
an Azure provider's token file makes a new set (the new token and the one it replaced); the replaced sets' patterns
used to stay, in the module's own cache (256 of them) and in the `re` module's (512), so a gateway with hourly
rotation grew by hundreds of MB over days. Each built pattern is watched here by a weak reference: one that
anything still holds (either cache) stays alive. The current token must still go from an error in every spelling.
"""

from __future__ import annotations

import asyncio
import gc
import os
import re
import sys
import textwrap
import weakref
from pathlib import Path

import pytest

from gateway import secret_removal
from gateway.policy import compile_text
from gateway.providers.azure import AzureProvider
from gateway.sanitize import remove_secrets
from gateway.upstream.client import ConnectionGate
from tests.test_secret_pattern_warmup import first_error, leaked, long_secret, until
from tests.test_secret_spellings import SPELLINGS, EchoingUpstream


def alive(refs: list[weakref.ref[re.Pattern[str]]]) -> list[re.Pattern[str]]:
    gc.collect()
    return [pattern for pattern in (ref() for ref in refs) if pattern is not None]


def test_300_rotations_keep_only_the_pattern_in_use() -> None:
    """The cache API as an Azure provider drives it: build the next set's pattern, then switch to it."""
    owner = object()
    refs: list[weakref.ref[re.Pattern[str]]] = []
    previous = long_secret(128)
    for _ in range(300):
        token = long_secret(128)
        key = (token, previous)
        secret_removal.prepare_secrets(key)
        secret_removal.use_secrets(owner, key)
        pattern = secret_removal._PATTERNS[key]
        assert pattern is not None
        refs.append(weakref.ref(pattern))
        previous = token
    del pattern
    assert remove_secrets(f"bad key {SPELLINGS['all-json-u'](previous)}!", key) == "bad key [redacted]!"
    assert alive(refs) == [refs[-1]()], f"{len(alive(refs))} of 300 replaced patterns still held"
    secret_removal.use_secrets(owner, None)  # the provider closed: nothing of its sets stays
    assert alive(refs) == []


def test_sets_nobody_uses_stay_within_the_byte_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sets prepared without an owner (a fixed key's provider, one a reload replaced) are kept up to a total size
    in bytes, the oldest out first, however many there are (100 of about 90 KB here)."""
    budget = 2_000_000
    monkeypatch.setattr(secret_removal, "_MAX_SPARE_BYTES", budget, raising=False)  # (absent before the bound)
    refs: list[weakref.ref[re.Pattern[str]]] = []
    for _ in range(100):
        key = (long_secret(128),)
        secret_removal.prepare_secrets(key)
        pattern = secret_removal._PATTERNS[key]
        assert pattern is not None
        refs.append(weakref.ref(pattern))
    kept = alive(refs)
    held = sum(sys.getsizeof(pattern) + sys.getsizeof(pattern.pattern) for pattern in kept)
    assert held <= budget, f"{len(kept)} patterns of {held} bytes kept"
    assert kept and kept[-1] is refs[-1]()  # the newest stays


def test_the_re_module_caches_no_pattern_of_a_secret() -> None:
    """Neither the built pattern nor the plain one that stands in while it is built stays in `re`'s cache."""
    caches = [cache for cache in (getattr(re, "_cache", None), getattr(re, "_cache2", None)) if isinstance(cache, dict)]
    marker = "b15-ordinary-pattern-" + long_secret(16)
    re.compile(marker)
    assert any(key[1] == marker for cache in caches for key in cache), "re caches elsewhere now: update the guard"
    secret, other = long_secret(150), long_secret(150)

    async def on_the_loop() -> str:
        text = remove_secrets(f"echo {other}", (other,))  # not prepared, too long to build here: the stand-in
        await until(lambda: (other,) in secret_removal._PATTERNS, "the pattern built off the loop")
        return text

    secret_removal.prepare_secrets((secret,))
    assert asyncio.run(on_the_loop()) == "echo [redacted]"
    assert remove_secrets(f"echo {secret}", (secret,)) == "echo [redacted]"
    built = [secret_removal._PATTERNS[(secret,)], secret_removal._PATTERNS[(other,)]]
    assert not [pattern for cache in caches for pattern in cache.values() if any(pattern is own for own in built)]
    assert not [key for cache in caches for key in cache if isinstance(key[1], str) and re.escape(other) in key[1]]


async def test_a_rotating_token_file_keeps_one_pattern_and_every_spelling_goes(tmp_path: Path) -> None:
    """Through a real Azure provider, its token file rotated by replacing it as a sidecar does."""
    token_file = tmp_path / "token"
    token = long_secret(2000)
    token_file.write_text(token)
    refs: list[weakref.ref[re.Pattern[str]]] = []
    with EchoingUpstream(api_key=None) as upstream:
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
        refresher = provider.token_file
        assert refresher is not None
        await provider.start()
        try:
            for rotation in range(6):
                if rotation:
                    token = long_secret(2000)
                    (tmp_path / "token.new").write_text(token)
                    os.replace(tmp_path / "token.new", token_file)
                    await until(lambda new=token: refresher.secrets[:1] == (new,), "the rotated token")
                pattern = secret_removal._PATTERNS.get(provider.secrets())
                assert isinstance(pattern, re.Pattern)
                refs.append(weakref.ref(pattern))
                del pattern
                for spelling in SPELLINGS:
                    message = await first_error(provider, f"echo-{spelling}")
                    assert "Invalid credential [redacted] for model" in message, message
                    assert not leaked(token, message) and "%2" not in message and "&#" not in message, message
            assert alive(refs) == [refs[-1]()], f"{len(alive(refs))} of 6 rotations' patterns still held"
        finally:
            await provider.close()
    assert alive(refs) == []
