"""An OpenAI-compatible LLM gateway: route, guard, cache and measure model traffic."""

__version__ = "0.1.0"
