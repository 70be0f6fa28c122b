"""PII with presidio-analyzer: the `patterns` and `ner` engines, built once per runtime.

presidio and spaCy are imported when the first analyzer is built, not with this module: a
gateway without a pii guard never loads them.

`patterns`: presidio's pattern recognizers (e-mail, phone via `phonenumbers`,
cards with Luhn, IBANs with their checksum, IPs) and the gateway's own
(`recognizers.py`), called directly (`_Direct`): no spaCy at all, well under a
millisecond for a short text, run on the event loop. The phone, e-mail and IP
recognizers only see the parts of the text that can hold their match
(`windowed.py`: `PhoneWindows`, `token_windows`): they were nine tenths of the cost.
Each recognizer runs only when its gate (`gates.py`), a test in a microsecond or
two that it cannot match the text, lets the text through: most of them scanned
every prompt for nothing, and were most of the rest.
`ner`: the same plus a spaCy pipeline's named entities (PERSON, LOCATION...), loaded by
package name or from a directory
(offline); CPU-bound, so it runs on the guard pool (`pool.py`).

An `Engine` is plain data (picklable) so that a process pool can build the same
analyzer in each worker; `analyzer()` builds it once per process or runtime.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from functools import partial
from typing import Any

import msgspec

from ..policy.guard_check import NER_ENTITIES, default_entities, spacy_pipeline_found
from ..policy.guard_schema import Action, EntitySpec, PiiGuardSpec, RecognizerSpec
from .base import Finding, Where
from .common import GuardBase
from .holds import RegexHolds, pii_holds
from .normalize import canonical, canonical_open_from, original_span
from .pii_prefilter import prefilter
from .pool import INLINE_CHARS, INLINE_DIGITS, GuardPool, digit_count

__all__ = ["Engine", "PiiGuard", "analyze", "build_analyzer", "quiet_network"]

# Presidio's own scores where its defaults are tuned for recall on a single label, not for a gateway:
# a phone number scores 0.4 without a context word; an IBAN or a card whose checksum holds is sure.
_DEFAULT_THRESHOLDS = {"PHONE_NUMBER": 0.4, "PERSON": 0.5}
# Regions whose national formats libphonenumber looks for (each one is a pass over the text, the
# largest cost of an analysis); numbers written with a `+` are found whatever the region, and the
# gateway's own `phone_intl` recognizer catches those libphonenumber does not know as valid.
_PHONE_REGIONS = ("US", "GB", "DE", "FR", "IN", "CA", "BR", "AU")


@dataclass(frozen=True, slots=True)
class Engine:
    """What an analyzer is built from (hashable, picklable)."""

    kind: str  # patterns | ner
    model: str | None
    languages: tuple[str, ...]
    entities: tuple[str, ...]
    recognizers: tuple[tuple[str, bytes], ...]  # (name, the RecognizerSpec as JSON): hashable
    # Types in `entities` only because a custom recognizer names them (the policy lists no `entities`): only
    # that recognizer looks for them, the engine's own (presidio's URL, spaCy's LOCATION...) are not added.
    custom_only: tuple[str, ...] = ()


_lock = threading.Lock()
_MAX_BUILT = 16
_built: dict[Engine, Any] = {}


def quiet_network() -> None:
    """Keep tldextract (used by presidio's e-mail recognizer) off the network: its bundled suffix list."""
    import tldextract
    import tldextract.tldextract as tld

    tld.TLD_EXTRACTOR = tldextract.TLDExtract(suffix_list_urls=())


def analyzer(engine: Engine) -> Any:
    """The analyzer for `engine`, built once per process."""
    found = _built.get(engine)
    if found is None:
        with _lock:
            found = _built.get(engine)
            if found is None:
                if len(_built) >= _MAX_BUILT:  # many reloads with changed pii settings: start over
                    _built.clear()
                found = _built[engine] = build_analyzer(engine)
    return found


def build_analyzer(engine: Engine) -> Any:
    from presidio_analyzer import AnalyzerEngine, Pattern, RecognizerRegistry
    from presidio_analyzer.nlp_engine import NerModelConfiguration, SpacyNlpEngine
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer,
        DateRecognizer,
        IbanRecognizer,
        SpacyRecognizer,
        UkNinoRecognizer,
        UsSsnRecognizer,
    )

    from .recognizers import VALIDATORS, ContextRecognizer, gateway_recognizers
    from .windowed import EmailWindows, IpWindows, PhoneWindows, UrlWindows

    quiet_network()
    # Presidio logs matched text in places (an IBAN that fails validation, context words at debug):
    # the gateway never logs a finding's text, so its logger is silenced.
    logging.getLogger("presidio-analyzer").disabled = True
    wanted = set(engine.entities) - set(engine.custom_only)  # the types the engine's own recognizers look for
    registry = RecognizerRegistry(supported_languages=list(engine.languages))
    builtin: dict[str, Any] = {
        # The windowed ones keep presidio's names: findings and metrics name the recognizer.
        "EMAIL_ADDRESS": partial(EmailWindows, name="EmailRecognizer"), "CREDIT_CARD": CreditCardRecognizer,
        "IBAN_CODE": IbanRecognizer, "IP_ADDRESS": partial(IpWindows, name="IpRecognizer"),
        "US_SSN": UsSsnRecognizer, "UK_NINO": UkNinoRecognizer, "URL": partial(UrlWindows, name="UrlRecognizer"),
        "DATE_TIME": DateRecognizer,
    }
    for lang in engine.languages:
        for entity, recognizer in builtin.items():
            if entity in wanted:
                registry.add_recognizer(recognizer(supported_language=lang))
        if "PHONE_NUMBER" in wanted:
            registry.add_recognizer(PhoneWindows(supported_language=lang, supported_regions=_PHONE_REGIONS,
                                                  name="PhoneRecognizer"))
        for recognizer in gateway_recognizers(lang, wanted):
            registry.add_recognizer(recognizer)
        ner = sorted(wanted & NER_ENTITIES)
        if engine.kind == "ner" and ner:
            registry.add_recognizer(SpacyRecognizer(supported_language=lang, supported_entities=ner))
        for name, encoded in engine.recognizers:
            spec = msgspec.json.decode(encoded, type=RecognizerSpec)
            registry.add_recognizer(ContextRecognizer(
                spec.entity, f"policy.{name}", [Pattern(f"{name}{i}", p.regex, p.score) for i, p in
                                                enumerate(spec.patterns)],
                language=lang, context=spec.context, validator=VALIDATORS.get(spec.validator),
                deny_list=spec.deny_list))
    if engine.kind != "ner":
        for recognizer in registry.recognizers:
            if isinstance(recognizer, (EmailWindows, IpWindows)):
                recognizer.explain = False  # read by the AnalyzerEngine's context enhancer only
        return _Direct(list(registry.recognizers))
    if not spacy_pipeline_found(engine.model or ""):  # presidio would pip-install it (`spacy.cli.download`)
        raise OSError(f"the spaCy pipeline `{engine.model}` is not installed (nor a directory); the gateway never "
                      "downloads one")
    models = [{"lang_code": lang, "model_name": engine.model or ""} for lang in engine.languages]
    nlp_engine = SpacyNlpEngine(models=models, ner_model_configuration=NerModelConfiguration(
        labels_to_ignore=["CARDINAL", "ORDINAL", "QUANTITY", "PERCENT", "MONEY", "WORK_OF_ART", "LAW",
                          "LANGUAGE", "EVENT", "PRODUCT", "FAC", "TIME", "DATE"]))
    return AnalyzerEngine(registry=registry, nlp_engine=nlp_engine, supported_languages=list(engine.languages))


class _Direct:
    """The patterns engine: the recognizers called directly, without presidio's AnalyzerEngine.

    The engine would tokenize every text with spaCy and run its lemma-based context enhancer,
    about half of the time of an analysis; pattern recognizers need neither (the gateway's own
    look at the characters around a match), so they are called as they are. Each recognizer with
    a gate (`gates.py`) runs only when its gate is open: most of them cannot match most texts, and
    a gate says so for a microsecond where the recognizer's own scan of a long prompt costs tens.
    """

    def __init__(self, recognizers: list[Any]) -> None:
        from .recognizers import ContextRecognizer
        from .windowed import BUILTIN_GATES

        self.recognizers = recognizers
        self.gated = [(r, r.gate if isinstance(r, ContextRecognizer) else BUILTIN_GATES.get(r.name))
                      for r in recognizers]
        # The gated recognizers for each (language, entities) asked for: the same one or two on every call.
        self._applicable: dict[tuple[str, tuple[str, ...]], list[tuple[Any, Any]]] = {}

    def applicable(self, language: str, entities: list[str]) -> list[tuple[Any, Any]]:
        """The gated recognizers that speak `language` and find one of `entities`, in registry order."""
        key = (language, tuple(entities))
        found = self._applicable.get(key)
        if found is None:
            wanted = set(entities)
            found = [(r, gate) for r, gate in self.gated
                     if r.supported_language == language and not wanted.isdisjoint(r.supported_entities)]
            if len(self._applicable) < 64:
                self._applicable[key] = found
        return found

    def analyze(self, text: str, language: str, entities: list[str], score_threshold: float,
                regex_flags: int) -> list[Any]:
        from presidio_analyzer import EntityRecognizer

        from .gates import TextShape

        wanted = set(entities)
        shape = TextShape(text)
        results: list[Any] = []
        sources = []
        for recognizer, gate in self.applicable(language, entities):
            if gate is not None and not gate(shape):
                continue
            found = len(results)
            for result in recognizer.analyze(text, entities, None):
                if result.score >= score_threshold and result.entity_type in wanted:
                    metadata = result.recognition_metadata or {}
                    metadata.setdefault("recognizer_name", recognizer.name)
                    result.recognition_metadata = metadata
                    results.append(result)
            if len(results) > found:
                sources.append(recognizer)
        if len(sources) == 1 and getattr(sources[0], "deduplicated", False):
            # One recognizer found everything, and deduplicated it itself: deduplicating again gives the
            # same list (dropping those under the threshold drops what they contained as well).
            return results
        return list(EntityRecognizer.remove_duplicates(results))


def analyze(engine: Engine, text: str, threshold: float) -> list[tuple[str, int, int, float, str]]:
    """(type, start, end, score, recognizer) for every result; module-level so a process pool can call it. The
    engines (gates, recognizers, spaCy) read the canonical text (`normalize.canonical`: a card with no-break
    spaces or full-width digits is the ASCII one); spans are mapped back onto the original characters."""
    shown, where = canonical(text)
    found: list[tuple[str, int, int, float, str]] = []
    built = analyzer(engine)
    for lang in engine.languages:
        for r in built.analyze(shown, language=lang, entities=list(engine.entities), score_threshold=threshold,
                               regex_flags=re.DOTALL | re.MULTILINE):
            recognizer = (r.recognition_metadata or {}).get("recognizer_name", "presidio")
            found.append((r.entity_type, r.start, r.end, float(r.score), str(recognizer)))
    if where is None:
        return found
    return [(entity, *original_span(where, len(text), start, end), score, recognizer)
            for entity, start, end, score, recognizer in found]


class PiiGuard(GuardBase):
    kind = "pii"

    def __init__(self, name: str, spec: PiiGuardSpec, pool: GuardPool) -> None:
        super().__init__(name, spec)
        entities = tuple(spec.entities) or default_entities(spec.engine)
        # With no `entities` (the default set), each custom recognizer's type is looked for as well, at the
        # guard's threshold and action; listed `entities` must name it (`guard_check`: else never found).
        custom_only = () if spec.entities else tuple(sorted({r.entity for r in spec.recognizers.values()}
                                                             - set(entities)))
        entities += custom_only
        self.engine = Engine(spec.engine, spec.model, tuple(spec.languages), entities,
                             tuple((n, msgspec.json.encode(r)) for n, r in sorted(spec.recognizers.items())),
                             custom_only)
        self.pool = pool
        self.action = spec.action
        self.offload = spec.engine == "ner"
        self.phones = "PHONE_NUMBER" in entities  # a text of many digits goes to the pool (`INLINE_DIGITS`)
        self.actions: dict[str, Action] = {e: _own(spec, e).action or spec.action for e in entities}
        self.thresholds = {e: _threshold(spec, e) for e in entities}
        self.keep = {e: _keep(_own(spec, e).keep) for e in entities}
        self.floor = min(self.thresholds.values(), default=spec.threshold)
        self.prefilter = None if spec.recognizers else prefilter(entities)
        self.allow = frozenset(v.casefold() for v in spec.allow)
        self.allow_patterns = [re.compile(p) for p in spec.allow_patterns]
        # `round(score, 3)` goes through a decimal conversion (about as costly as building the finding):
        # the few scores the recognizers give are rounded once each (bounded: cleared when full).
        self._rounded: dict[float, float] = {}

    def build(self) -> None:
        """Build the analyzer now (at runtime start), not on the first request."""
        analyzer(self.engine)
        self.open_from("", 0)  # the stream holds, with the analyzer

    async def detect(self, text: str, where: Where) -> list[Finding]:
        found = self.detect_now(text, where)
        if found is not None:
            return found
        return self.findings(text, await self.pool.run(analyze, self.engine, text, self.floor))

    def detect_now(self, text: str, where: Where) -> list[Finding] | None:
        """The findings, when they are computed on the loop without waiting for anything (the patterns
        engine on a text of at most `INLINE_CHARS` characters and, looking for phone numbers, `INLINE_DIGITS`
        digits); None when `detect` has to hand the text to the pool."""
        if not text.strip() or (self.prefilter is not None and not self.prefilter.may_match(text)):
            return []
        if self.offload or len(text) > INLINE_CHARS or (self.phones and digit_count(text) > INLINE_DIGITS):
            return None
        return self.findings(text, analyze(self.engine, text, self.floor))

    def findings(self, text: str, raw: list[tuple[str, int, int, float, str]]) -> list[Finding]:
        out = []
        for entity, start, end, score, recognizer in raw:
            if score < self.thresholds.get(entity, 1.1):
                continue
            value = text[start:end]
            if not value.isascii():  # the value as the recognizer read it (`analyze`): for the tests below
                value = canonical(value)[0]
            if entity == "PHONE_NUMBER" and _DOTTED_QUAD.fullmatch(value):
                continue  # an IPv4 address, which libphonenumber accepts as a number with dots
            if entity == "PERSON" and recognizer == "SpacyRecognizer":
                score = _name_score(text, start, end, score)
                if score < self.thresholds[entity]:
                    continue
            if (self.allow and value.casefold() in self.allow) or (
                    self.allow_patterns and any(p.fullmatch(value) for p in self.allow_patterns)):
                continue  # (each test only when the policy lists values or patterns: most do not)
            rounded = self._rounded.get(score)
            if rounded is None:
                if len(self._rounded) >= 256:
                    self._rounded.clear()
                rounded = self._rounded[score] = round(score, 3)
            out.append(Finding(self.name, entity, start, end, rounded, recognizer, self.actions[entity],
                               self.keep[entity]))
        return out

    # Streams (`holds.py`): built with the analyzer, once per runtime; None when the engine cannot say
    # where a finding may start (a spaCy pipeline may tag any word as a name, reading its neighbours).
    _holds: RegexHolds | None = None
    _holds_built = False

    def open_from(self, text: str, start: int) -> int:
        holds = self._holds if self._holds_built else self._build_holds()
        return 0 if holds is None else canonical_open_from(holds.open_from, text, start)  # what `analyze` reads

    def context_reach(self) -> int:
        holds = self._holds if self._holds_built else self._build_holds()
        return 0 if holds is None else holds.reach

    def _build_holds(self) -> RegexHolds | None:
        self._holds = pii_holds(analyzer(self.engine).recognizers) if self.engine.kind == "patterns" else None
        self._holds_built = True
        return self._holds


_DOTTED_QUAD = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")
_PARTICLES = frozenset({"van", "von", "der", "den", "de", "del", "della", "di", "da", "dos", "du", "le", "la", "al",
                        "el", "bin", "ibn", "ben", "ter", "zu", "y", "e"})
_NOT_IN_NAMES = frozenset("0123456789@/|()[]{}<>=:;#*_\\\"")


def _name_score(text: str, start: int, end: int, score: float) -> float:
    """A spaCy PERSON that does not look like a name scores 0: a lower-case word that is no particle
    (a small English model tags "Merci de mettre" or "ich wohne"), digits or symbols. A single word at
    the start of a sentence is weak evidence (capitalized anyway): its score drops by 0.3."""
    value = text[start:end]
    words = value.split()
    if not words or any(c in _NOT_IN_NAMES for c in value):
        return 0.0
    if any(not w[0].isupper() and w.casefold() not in _PARTICLES for w in words if w[0].isalpha()):
        return 0.0
    if not any(w[0].isupper() for w in words):
        return 0.0
    if len(words) == 1:
        before = text[:start].rstrip()
        if not before or before[-1] in ".!?:\n":
            return score - 0.3
    return score


def _own(spec: PiiGuardSpec, entity: str) -> EntitySpec:
    return spec.entities.get(entity) or EntitySpec()


def _keep(keep: int | None) -> int:
    return 4 if keep is None else keep


def _threshold(spec: PiiGuardSpec, entity: str) -> float:
    own = spec.entities.get(entity)
    if own is not None and own.threshold is not None:
        return own.threshold
    return min(spec.threshold, _DEFAULT_THRESHOLDS.get(entity, spec.threshold))
