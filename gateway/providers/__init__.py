"""Providers: one module per upstream API behind the `Provider` protocol, registered by kind."""

from __future__ import annotations

from collections.abc import Callable

from ..policy.compiled import ProviderConfig
from ..telemetry.tokens import TokenCounter
from ..upstream.client import ConnectionGate, GateObserver
from .anthropic import AnthropicProvider
from .azure import AzureProvider
from .base import Call, Completion, Provider
from .demo import DemoProvider
from .gemini import GeminiProvider
from .openai_compat import OpenAICompatProvider

__all__ = ["ENDPOINTS_BY_KIND", "Call", "Completion", "Provider", "build_provider"]

_Factory = Callable[[ProviderConfig, TokenCounter, GateObserver | None], Provider]

def _gate(config: ProviderConfig, observer: GateObserver | None) -> ConnectionGate:
    return ConnectionGate(config.name, config.pool_size, config.pool_timeout_s, observer)


# The registry: the one place a provider kind is named (its policy traits: `policy/provider_schema.py`).
_FACTORIES: dict[str, _Factory] = {
    "openai": lambda config, tokens, observer: OpenAICompatProvider(config, _gate(config, observer)),
    "azure": lambda config, tokens, observer: AzureProvider(config, _gate(config, observer)),
    "anthropic": lambda config, tokens, observer: AnthropicProvider(config, _gate(config, observer)),
    "gemini": lambda config, tokens, observer: GeminiProvider(config, _gate(config, observer)),
    "demo": lambda config, tokens, observer: DemoProvider(config, tokens),
}


# The endpoints each kind serves, without building a provider (the offline tools' router: `gateway explain`).
ENDPOINTS_BY_KIND = {"openai": OpenAICompatProvider.endpoints, "azure": AzureProvider.endpoints,
                     "anthropic": AnthropicProvider.endpoints, "gemini": GeminiProvider.endpoints,
                     "demo": DemoProvider.endpoints}


def build_provider(config: ProviderConfig, tokens: TokenCounter, observer: GateObserver | None = None) -> Provider:
    """The provider object for a policy entry, by its `kind`."""
    return _FACTORIES[config.kind](config, tokens, observer)
