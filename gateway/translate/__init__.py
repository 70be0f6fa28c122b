"""Translation between wire formats: pure functions and per-stream translators, no I/O.

Providers use the `chat_to_*` modules to speak their upstream's API; the HTTP
edge uses the ingress modules to accept other clients' formats (Anthropic's
Messages) on top of the one internal, OpenAI-shaped request.
"""
