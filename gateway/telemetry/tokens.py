"""Token counting with tiktoken, for what an upstream does not report (and the demo model).

tiktoken downloads its encodings on first use; offline, point `TIKTOKEN_CACHE_DIR`
at a folder that holds them. If the encoding cannot be loaded, counting falls back
to an estimate (about four characters a token) and says so once in the log,
rather than failing requests.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

__all__ = ["TokenCounter", "message_text"]

log = logging.getLogger("gateway.tokens")


class TokenCounter:
    """Counts tokens of one encoding. Load it once (off the event loop) with `load()`."""

    def __init__(self, encoding: str = "o200k_base") -> None:
        self.encoding_name = encoding
        self._encoding: Any = None
        self._lock = threading.Lock()
        self._failed = False

    def load(self) -> bool:
        """Blocking: read (or download) the encoding. True when exact counts are available."""
        with self._lock:
            if self._encoding is None and not self._failed:
                try:
                    import tiktoken

                    self._encoding = tiktoken.get_encoding(self.encoding_name)
                except Exception as exc:  # noqa: BLE001 -- any failure here only degrades counts to estimates
                    self._failed = True
                    log.warning("tiktoken encoding %s unavailable (%s); token counts are estimates",
                                self.encoding_name, type(exc).__name__)
        return self._encoding is not None

    @property
    def exact(self) -> bool:
        return self._encoding is not None

    def count(self, text: str) -> int:
        if self._encoding is not None:
            return len(self._encoding.encode_ordinary(text))
        return max(1, (len(text) + 3) // 4) if text else 0


def message_text(messages: object) -> list[str]:
    """The text parts of chat messages (string contents and `text` content parts)."""
    texts: list[str] = []
    if not isinstance(messages, list):
        return texts
    for message in messages:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str))
    return texts
