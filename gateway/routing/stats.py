"""What this process knows about each target's load and speed: requests in flight, latency averages.

Kept per process and per target name (`provider/model`), shared by every alias that lists the
target: the latency and least-busy strategies read it on every request, so it must be a field
read, not a store round trip. (Breaker state, which replicas must agree on, is in `breaker`.)
"""

from __future__ import annotations

__all__ = ["ALPHA", "FAILED_SAMPLE_S", "TargetStats"]

ALPHA = 0.3  # weight of the newest sample: a slowed target is noticed within a few requests
# A failed attempt is a sample this slow (or its own time, if longer): slower than a target that answers, so one that
# keeps failing goes behind those that answer, and its answers bring it back (`explore` tries it; each answer takes
# ALPHA of the gap off, so about ten of them undo one failure). Without it, a target that never
# answered stayed unmeasured (0: tried first) forever, and one that began failing kept its old, fast average.
FAILED_SAMPLE_S = 10.0
# The failures (`attempts.classify`) that say the target could not answer (a refused credential included: it will
# not answer until its key is fixed). Not a client error, a context overflow or
# a field the target lacks (the request's doing), a full local pool (this process's) or the alias's deadline.
_SLOW_FAILURES = frozenset({"connect", "timeout", "server_error", "rate_limit", "credentials"})


class TargetStats:
    """In-flight count and exponentially weighted moving averages of the time to the first content
    event (streams) and to the full answer (non-streamed); None until the first sample."""

    __slots__ = ("first_event_s", "full_answer_s", "in_flight", "read")

    def __init__(self) -> None:
        self.in_flight = 0
        # Whether a strategy of the running policy reads these (`strategies.reads_stats`, set by `Router.start`): only
        # then is a lone target's stream, which is not held, counted in flight to its end and timed to its first
        # content (`exchange`); otherwise it costs nothing beyond the request's own.
        self.read = False
        self.first_event_s: float | None = None
        self.full_answer_s: float | None = None

    def release(self) -> None:
        self.in_flight -= 1

    def observe(self, stream: bool, seconds: float) -> None:
        if stream:
            old = self.first_event_s
            self.first_event_s = seconds if old is None else old + ALPHA * (seconds - old)
        else:
            old = self.full_answer_s
            self.full_answer_s = seconds if old is None else old + ALPHA * (seconds - old)

    def failed(self, kind: str, stream: bool, seconds: float) -> None:
        """A failed attempt of kind `kind` (`attempts.classify`) that took `seconds`."""
        if kind in _SLOW_FAILURES:
            self.observe(stream, max(seconds, FAILED_SAMPLE_S))

    def latency(self, stream: bool) -> float:
        """The average that matters for this request; 0 when unknown, so an unmeasured target is tried."""
        value = self.first_event_s if stream else self.full_answer_s
        if value is None:  # fall back on the other kind of sample, if any
            value = self.full_answer_s if stream else self.first_event_s
        return 0.0 if value is None else value
