"""Guards: PII (presidio), secrets, prompt injection, deny lists and input limits, on input and output,
streamed output included. See docs/guards.md."""

from .base import Finding, Guard, GuardFailure, Where
from .runtime import GuardRuntime, GuardSet
from .stage import GuardStage
from .verdict import Verdict

__all__ = ["Finding", "Guard", "GuardFailure", "GuardRuntime", "GuardSet", "GuardStage", "Verdict", "Where"]
