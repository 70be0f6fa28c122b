"""Run the gateway under uvicorn: one process, or N workers sharing one socket.

SIGTERM (or Ctrl-C) stops accepting connections and lets in-flight requests,
streams included, finish within `server.drain_timeout_s`; `/readyz` answers 503
from the first signal on, so that a load balancer stops sending traffic.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import uvicorn
from uvicorn.supervisors import Multiprocess

from .app import POLICY_ENV
from .policy import Policy

__all__ = ["serve"]

log = logging.getLogger("gateway.server")


def serve(policy_path: Path, policy: Policy, host: str | None, port: int | None, workers: int) -> None:
    os.environ[POLICY_ENV] = str(policy_path.resolve())
    metrics_dir = None
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="gateway-metrics-")
    config = uvicorn.Config(
        "gateway.app:app_from_env",
        factory=True,
        host=host or policy.server.host,
        port=port or policy.server.port,
        workers=workers,
        loop="uvloop" if _has("uvloop") else "asyncio",
        http="httptools" if _has("httptools") else "h11",
        lifespan="on",
        access_log=False,
        log_level="info",
        timeout_graceful_shutdown=int(policy.server.drain_timeout_s) or 1,
        timeout_keep_alive=30,
        server_header=False,
        proxy_headers=False,
        log_config=None,
    )
    log.info("serving %s on %s:%s with %d worker(s)", policy_path, config.host, config.port, workers)
    try:
        if workers > 1:
            Multiprocess(config, sockets=[config.bind_socket()]).run()
        else:
            uvicorn.Server(config).run()
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True
