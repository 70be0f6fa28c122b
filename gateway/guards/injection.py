"""Prompt injection and jailbreak detection: scored pattern sets in several languages, a
model-based engine, and a pluggable classifier.

Each pattern has a weight; a text's score is `1 - prod(1 - w)` over the patterns
it matches, so one strong signal ("ignore all previous instructions") is enough
and several weak ones add up. Patterns run on the folded text (`normalize.fold`),
so case, accents, homoglyphs and zero-width characters do not hide an attack; the
Russian and Chinese ones on `normalize.fold_native`'s (case and invisible characters:
look-alike folding would turn Cyrillic words Latin).

`engine: model` scores the text with all-MiniLM-L6-v2 and a logistic head trained on
the evaluation set (`injection_model.py`), on the guard pool; `engine: both` takes the
higher of the two scores, and asks the model only when the patterns alone stay below
the threshold. The default is `patterns` (docs/guards.md, "Injection: patterns against
a model", says why). A classifier (`classifier: "module:factory"` in the policy; the
factory returns an object with `score(text) -> float` in [0, 1]) is combined the same
way: asked only when the other scores stay below the threshold, the higher score wins.
It is the policy owner's code, so it runs on the guard pool under `timeout_s`, never on
the event loop (`classifiers.py`).

The patterns check a text of at most `INLINE_CHARS` characters on the event loop, and a longer one
on the guard pool, each regex tried only where its lead matches, one slice at a time (`slices.py`).
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Sequence

from ..policy.cache_check import default_model_dir
from ..policy.guard_schema import InjectionGuardSpec
from .base import Finding, Where
from .classifiers import Classifier, OwnClassifier, classifier_score
from .common import GuardBase
from .normalize import fold, fold_native
from .pool import INLINE_CHARS, GuardPool
from .slices import Searchable, Sliced

__all__ = ["PATTERNS", "Classifier", "InjectionGuard", "injection_score", "injection_score_long"]

log = logging.getLogger("gateway.guards")

_IGNORE = r"(ignore|disregard|forget|skip|override|bypass|drop)"
_PRIOR = r"(all |any |the |your |my )*(previous|prior|above|earlier|preceding|initial|original|system|existing)"
_RULES = r"(instructions?|prompts?|rules|directives|guidelines|commands|context|messages?|constraints)"
# (regex, weight, lead): the lead is what every match of the regex starts with (its `\b` left out). A long
# text is searched for the lead, slice by slice, and the regex tried only where it matches (`slices.py`).
PATTERNS: list[tuple[str, float, str]] = [
    # English
    (rf"\b{_IGNORE}\s+{_PRIOR}\s+{_RULES}", 0.9, _IGNORE),
    (rf"\b{_IGNORE}\s+(everything|all)\s+(you were told|above|before|said)", 0.85, _IGNORE),
    (r"\b(reveal|print|show|repeat|output|leak|display|tell me)\b.{0,40}\b(system|hidden|secret|initial)\s+"
     r"(prompt|instructions?|message|rules)", 0.8, "(reveal|print|show|repeat|output|leak|display|tell me)"),
    (r"\bwhat (is|was|are) your (system )?(prompt|instructions)\b", 0.55, "what "),
    (r"\byou are (now )?(dan|stan|dude|aim|an? unrestricted|an? unfiltered|jailbroken|free from)", 0.9, "you are "),
    (r"\bdo anything now\b", 0.9, "do anything now"),
    (r"\b(developer|god|jailbreak|unrestricted|debug|sudo) mode\b", 0.75,
     "(developer|god|jailbreak|unrestricted|debug|sudo) mode"),
    (r"\b(pretend|act|behave|roleplay|imagine)\b.{0,40}\b(no|without|free of|zero)\s+(restrictions|rules|limits|"
     r"filters|guidelines|ethics|censorship|content polic)", 0.85, "(pretend|act|behave|roleplay|imagine)"),
    (r"\bno (longer )?(bound|restricted|limited) by\b.{0,30}\b(rules|guidelines|polic|openai|anthropic)", 0.8, "no "),
    (r"\b(new|updated|real) (system )?(instructions?|rules)\s*:", 0.6, "(new|updated|real) "),
    (r"(^|\n)\s*(#{2,}|\[|<\|?|<<)\s*(system|sys|im_start|admin)\b", 0.7, r"(^|\n)"),
    (r"</?(system|instructions?)>", 0.55, "<"),
    (r"\bjailbreak", 0.6, "jailbreak"),
    (r"\bfrom now on,? you (will|must|shall|are)\b", 0.45, "from now on"),
    (r"\b(override|disable|turn off|remove)\b.{0,30}\b(safety|content|guard ?rails?|filters?|moderation)", 0.75,
     "(override|disable|turn off|remove)"),
    (r"\bstay in character\b", 0.4, "stay in character"),
    (r"\bsimulate\b.{0,30}\b(unfiltered|uncensored|evil)\b", 0.75, "simulate"),
    # German
    (r"\b(ignoriere|ignorier|vergiss|missachte)\b.{0,30}\b(vorherigen|bisherigen|obigen|alle|vorigen)\b.{0,20}"
     r"\b(anweisungen|instruktionen|regeln|befehle)", 0.9, "(ignoriere|ignorier|vergiss|missachte)"),
    (r"\b(zeige|verrate|gib)\b.{0,30}\b(systemprompt|system-prompt|anweisungen)", 0.6, "(zeige|verrate|gib)"),
    # French
    (r"\b(ignore|ignorez|oublie|oubliez)\b.{0,30}\b(instructions|consignes|regles)\b.{0,20}"
     r"\b(precedentes|anterieures|ci-dessus)", 0.9, "(ignore|ignorez|oublie|oubliez)"),
    (r"\b(ignore|ignorez|oublie|oubliez)\b.{0,10}\b(toutes? )?(les |tes |vos )?(instructions|consignes|regles)", 0.75,
     "(ignore|ignorez|oublie|oubliez)"),
    # Spanish
    (r"\b(ignora|ignore|olvida|olvide)\b.{0,30}\b(instrucciones|reglas|indicaciones)\b.{0,20}"
     r"\b(anteriores|previas|de arriba)", 0.9, "(ignora|ignore|olvida|olvide)"),
    (r"\b(ignora|olvida)\b.{0,10}\b(todas )?(las |tus )?(instrucciones|reglas)", 0.75, "(ignora|olvida)"),
    # Italian
    (r"\b(ignora|dimentica)\b.{0,30}\b(istruzioni|regole)\b.{0,20}\b(precedenti|sopra)", 0.9, "(ignora|dimentica)"),
    # Portuguese
    (r"\b(ignore|ignora|esqueca)\b.{0,30}\b(instrucoes|regras)\b.{0,20}\b(anteriores|acima)", 0.9,
     "(ignore|ignora|esqueca)"),
    # Dutch
    (r"\b(negeer|vergeet)\b.{0,30}\b(vorige|eerdere|bovenstaande|alle)\b.{0,20}\b(instructies|regels)", 0.9,
     "(negeer|vergeet)"),
]
# Non-Latin scripts, matched on the case-folded text without homoglyph folding (which would turn
# Cyrillic words into Latin look-alikes).
NATIVE_PATTERNS: list[tuple[str, float, str]] = [
    (r"(игнорируй|игнорируйте|забудь|забудьте)\s.{0,30}(инструкции|правила|указания)", 0.9,
     "(игнорируй|игнорируйте|забудь|забудьте)"),
    (r"(忽略|无视|忘记).{0,10}(之前|以前|上面|所有).{0,10}(指令|指示|说明|规则)", 0.9, "(忽略|无视|忘记)"),
]


# Words one of which every match of a pattern holds after its lead, by lead, for the patterns whose lead is
# common in prose (`show`, `act`, `new `) or is no word (a line's start): each group is one of the regex's
# required alternations, each alternative opening with one of the words (`tests/test_guard_slices.py` checks
# that against the parsed regex). A text without one of a group is not searched for the pattern (`Sliced`).
NEEDS: dict[str, tuple[tuple[str, ...], ...]] = {
    "(reveal|print|show|repeat|output|leak|display|tell me)": (("system", "hidden", "secret", "initial"),
                                                              ("prompt", "instruction", "message", "rules")),
    "(pretend|act|behave|roleplay|imagine)": (("restrictions", "rules", "limits", "filters", "guidelines", "ethics",
                                               "censorship", "content polic"),),
    "(new|updated|real) ": (("instruction", "rules"),),
    r"(^|\n)": (("sys", "im_start", "admin"),),
}
# A text at least this long is searched from the leads (`_LED`): on a shorter one a pass of each regex costs less
# than the leads' checks (measured: 15 against 20 µs at 48 characters, 41 against 22 at 100).
_LED_FROM_CHARS = 64


def _compiled(patterns: list[tuple[str, float, str]], prefix: str,
              deadline: float | None = None) -> list[tuple[Searchable, float, str]]:
    """(regex, weight, name) of each pattern; with a deadline, each regex to be searched from its lead (slice by
    slice, and not at all in a text without the words it needs)."""
    out: list[tuple[Searchable, float, str]] = []
    for i, (rx, weight, lead) in enumerate(patterns):
        regex = re.compile(rx, re.DOTALL)
        searched = regex if deadline is None else Sliced(regex, lead, deadline, needs=NEEDS.get(lead, ()))
        out.append((searched, weight, f"injection.{prefix}{i}"))
    return out


_COMPILED = _compiled(PATTERNS, "p")
_NATIVE = _compiled(NATIVE_PATTERNS, "n")
# From the leads, with no deadline: for a text on the loop of at least `_LED_FROM_CHARS` characters, where a pass
# of each regex (a `\b` and an alternation tried at every offset) cost about 370 ns a character, 740 µs for 2,000.
_LED = _compiled(PATTERNS, "p", math.inf)
_LED_NATIVE = _compiled(NATIVE_PATTERNS, "n", math.inf)


def injection_score(text: str, *, patterns: Sequence[tuple[Searchable, float, str]] | None = None,
                    native_patterns: Sequence[tuple[Searchable, float, str]] | None = None,
                    ) -> tuple[float, list[tuple[int, int, str]]]:
    """The text's score in [0, 1] and the matched spans (offsets into `text`). `patterns` and
    `native_patterns`: the regexes as they are searched (`injection_score_long`: slice by slice until a deadline);
    by default, from their leads, or one pass of each on a text shorter than `_LED_FROM_CHARS`."""
    led = len(text) >= _LED_FROM_CHARS
    if patterns is None:
        patterns = _LED if led else _COMPILED
    if native_patterns is None:
        native_patterns = _LED_NATIVE if led else _NATIVE
    folded, where = fold(text)
    miss = 1.0
    spans: list[tuple[int, int, str]] = []
    for pattern, weight, name in patterns:
        match = pattern.search(folded)
        if match is not None and match.end() > match.start():
            miss *= 1.0 - weight
            spans.append((where[match.start()], where[match.end() - 1] + 1, name))
    if not text.isascii():
        native, at = fold_native(text)  # case-folded, invisible characters dropped, the script's own letters kept
        for pattern, weight, name in native_patterns:
            match = pattern.search(native)
            if match is not None and match.end() > match.start():
                miss *= 1.0 - weight
                spans.append((at[match.start()], at[match.end() - 1] + 1, name))
    return 1.0 - miss, spans


def injection_score_long(text: str, deadline: float) -> tuple[float, list[tuple[int, int, str]]]:
    """`injection_score(text)` on a pool worker: each regex tried only where its lead matches, the lead
    searched slice by slice (`slices.py`) until `deadline` (`time.monotonic()`); the same score and spans."""
    return injection_score(text, patterns=_compiled(PATTERNS, "p", deadline),
                           native_patterns=_compiled(NATIVE_PATTERNS, "n", deadline))


class InjectionGuard(GuardBase):
    kind = "injection"

    def __init__(self, name: str, spec: InjectionGuardSpec, pool: GuardPool | None = None) -> None:
        super().__init__(name, spec)
        self.action = spec.action
        self.threshold = spec.threshold
        self.patterns = spec.engine in ("patterns", "both")
        self.model_dir: str | None = None  # set: the model engine runs, with the files of this directory
        if spec.engine != "patterns":
            found = spec.model_dir or default_model_dir()
            self.model_dir = str(found) if found is not None else ""  # "": missing, a failure on every check
        self.pool = pool
        self.classifier = spec.classifier  # "module:factory", scored on the pool (`classifiers.py`)
        self._own = OwnClassifier(spec.classifier) if spec.classifier is not None else None  # this runtime's

    def build(self) -> None:
        """Load the model and make the classifier now (at runtime start, off the loop), not on the first
        request. One that fails is logged here and fails every check (`fail:` decides), so the gateway still
        starts."""
        if self.model_dir:
            from .injection_model import load_model

            try:
                load_model(self.model_dir)
            except Exception as exc:  # noqa: BLE001 -- missing, unreadable or malformed files: every check fails
                log.error("guard %s: the injection model did not load: %s", self.name, type(exc).__name__)
        if self._own is not None and not self._in_processes():  # (a process pool's workers make their own)
            try:
                self._own.make()
            except Exception as exc:  # noqa: BLE001 -- the policy owner's factory failed: every check fails
                log.error("guard %s: the injection classifier did not load: %s", self.name, type(exc).__name__)

    def detect_now(self, text: str, where: Where) -> list[Finding] | None:
        """The finding of a text of at most `INLINE_CHARS` characters, on the loop, when neither a model nor a
        classifier is asked; None otherwise: `detect` hands a longer text's patterns, the model and the
        classifier to the pool."""
        if self.model_dir is not None or self.classifier is not None or len(text) > INLINE_CHARS:
            return None
        score, spans = injection_score(text) if self.patterns else (0.0, [])
        return self._decide(text, score, spans, spans[0][2] if spans else "injection")

    async def detect(self, text: str, where: Where) -> list[Finding]:
        score: float = 0.0
        spans: list[tuple[int, int, str]] = []
        if self.patterns:
            score, spans = injection_score(text) if len(text) <= INLINE_CHARS else await self._score_long(text)
        recognizer = spans[0][2] if spans else "injection"
        if self.model_dir is not None and score < self.threshold:
            learned = await self._model_score(text)
            if learned > score:
                score, recognizer = learned, "injection.model"
        if self.classifier is not None and score < self.threshold:
            learned = await self._classifier_score(text)
            if learned > score:
                score, recognizer = learned, "injection.classifier"
        return self._decide(text, score, spans, recognizer)

    def _decide(self, text: str, score: float, spans: list[tuple[int, int, str]], recognizer: str) -> list[Finding]:
        """The finding, if the score reaches the threshold."""
        if score < self.threshold:
            return []
        start, end = (min(s for s, _, _ in spans), max(e for _, e, _ in spans)) if spans else (0, len(text))
        if recognizer == "injection.model":
            start, end = 0, len(text)  # the model points at no span: the whole text
        return [Finding(self.name, "PROMPT_INJECTION", start, end, round(score, 3), recognizer, self.action)]

    async def _score_long(self, text: str) -> tuple[float, list[tuple[int, int, str]]]:
        deadline = time.monotonic() + self.timeout_s
        if self.pool is None:  # a guard built on its own (tests, tools): no pool to hand the text to
            return injection_score_long(text, deadline)
        return await self.pool.run(injection_score_long, text, deadline)

    def _in_processes(self) -> bool:
        return self.pool is not None and self.pool.spec.kind == "process"

    async def _classifier_score(self, text: str) -> float:
        assert self._own is not None
        if self.pool is None:  # a guard built on its own (tests, tools)
            return self._own.score(text)
        if self._in_processes():  # each worker's own, by path (`classifiers.warm`)
            return await self.pool.run(classifier_score, self._own.path, text)
        return await self.pool.run(self._own.score, text)

    async def _model_score(self, text: str) -> float:
        from .injection_model import score_text

        if not self.model_dir:
            raise FileNotFoundError("no all-MiniLM-L6-v2 model directory")
        if self.pool is None:
            return score_text(self.model_dir, text)
        return await self.pool.run(score_text, self.model_dir, text)
