"""Constants shared by the pass-through apps (kept free of framework imports)."""

from __future__ import annotations

import os

#: Bodies containing these literal bytes are treated as streaming requests.
STREAM_MARK = b'"stream":true'
UPSTREAM = os.environ.get("BENCH_UPSTREAM", "http://127.0.0.1:8081").rstrip("/")
JSON_URL = f"{UPSTREAM}/json/v1/chat/completions"
SSE_URL = f"{UPSTREAM}/sse/v1/chat/completions"
UPSTREAM_HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench"}
#: Upstream connection pool size (the benchmark policy uses the same value).
POOL_SIZE = 256
JSON_MEDIA = "application/json"
SSE_MEDIA = "text/event-stream"
