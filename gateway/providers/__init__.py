"""Providers: one module per upstream API behind the `Provider` protocol."""

from __future__ import annotations

from collections.abc import Callable

from ..policy.compiled import ProviderConfig
from ..telemetry.tokens import TokenCounter
from .base import Call, ChunkStream, Completion, Provider
from .demo import DemoProvider
from .openai_compat import OpenAICompatProvider

__all__ = ["Call", "ChunkStream", "Completion", "Provider", "build_provider"]

_FACTORIES: dict[str, Callable[[ProviderConfig, TokenCounter], Provider]] = {
    "openai": lambda config, tokens: OpenAICompatProvider(config),
    "demo": lambda config, tokens: DemoProvider(config, tokens),
}


def build_provider(config: ProviderConfig, tokens: TokenCounter) -> Provider:
    """The provider object for a policy entry, by its `kind`."""
    return _FACTORIES[config.kind](config, tokens)
