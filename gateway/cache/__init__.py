"""Response caching: exact and semantic, over the shared `Store` (memory or Redis), safe by default.

`CacheStage` sits after authorization and the input guards, before target
selection; `ResponseCache` is the runtime service it uses. See docs/cache.md.
"""

from __future__ import annotations

from .control import CacheResult
from .service import ResponseCache
from .stage import CacheStage

__all__ = ["CacheResult", "CacheStage", "ResponseCache"]
