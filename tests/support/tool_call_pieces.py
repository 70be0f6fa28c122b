"""Pieces of streamed tool calls, as the scripted upstreams of the tool-call-id tests send them."""

from __future__ import annotations

from typing import Any

__all__ = ["piece"]


def piece(index: int, call_id: str | None, name: str | None, arguments: str) -> dict[str, Any]:
    """A conformant stream's piece of a call: the id, type and name on its first piece only."""
    if call_id is None:
        return {"index": index, "function": {"arguments": arguments}}
    return {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
