"""Policy: the YAML file's schema, its loading with located errors, and its compiled form."""

from .compile import compile_text, load_policy
from .compiled import ModelRoute, Policy, ProviderConfig, Target, Timeouts
from .loader import PolicyError, PolicyIssue

__all__ = [
    "ModelRoute",
    "Policy",
    "PolicyError",
    "PolicyIssue",
    "ProviderConfig",
    "Target",
    "Timeouts",
    "compile_text",
    "load_policy",
]
