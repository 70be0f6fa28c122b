"""The gateway's own recognizers, for what presidio lacks or finds too eagerly.

Presidio's date recognizer fires on every date, its URL recognizer on every URL,
and it has no street addresses. These recognizers look at the characters around
a match instead (presidio's context enhancer needs a spaCy pass for lemmas, which
the patterns engine does without): a date is a date of birth only next to "born", "DOB",
"geboren"...; an address next to "Inc.", "headquarters" or "office" is a
company's and scores low; an id number counts only next to the word that names
it, or when its checksum holds. The same class serves the policy's own
recognizers (regexes with context words, validators, deny lists).
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Callable, Sequence
from typing import Any

import regex  # type: ignore[import-untyped]  # presidio matches with it; no stubs
from presidio_analyzer import EntityRecognizer, Pattern, PatternRecognizer, RecognizerResult
from presidio_analyzer.pattern_recognizer import REGEX_TIMEOUT_SECONDS
from presidio_analyzer.predefined_recognizers import EmailRecognizer, IpRecognizer, PhoneRecognizer

from .gates import (
    OTHER,
    AllGates,
    AnyGate,
    AsciiWordGate,
    CapitalsGate,
    Gate,
    LiteralGate,
    RunGate,
    ShapeGate,
    WordGate,
    letters,
    literal,
)

__all__ = [
    "BUILTIN_GATES", "VALIDATORS", "ContextRecognizer", "EmailWindows", "IpWindows", "PhoneWindows",
    "gateway_recognizers", "iban_ok", "luhn_ok", "phone_windows", "token_windows",
]


def luhn_ok(text: str) -> bool:
    digits = [int(c) for c in text if c.isdigit()]
    if len(digits) < 12:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(text: str) -> bool:
    raw = "".join(c for c in text if c.isalnum()).upper()
    if len(raw) < 15 or not raw[:2].isalpha() or not raw[2:4].isdigit():
        return False
    moved = raw[4:] + raw[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def not_repeated(text: str) -> bool:
    digits = [c for c in text if c.isdigit()]
    return len(set(digits)) > 2 and "".join(digits) not in "01234567890123456789"


def ssn_ok(text: str) -> bool:
    digits = "".join(c for c in text if c.isdigit())
    area, group, serial = digits[:3], digits[3:5], digits[5:]
    return area not in ("000", "666") and not area.startswith("9") and group != "00" and serial != "0000" \
        and not_repeated(digits)


def dni_ok(text: str) -> bool:
    raw = text.upper().replace("-", "").replace(" ", "")
    return raw[:8].isdigit() and raw[8:] == "TRWAGMYFPDXBNJZSQVHLCKE"[int(raw[:8]) % 23]


VALIDATORS: dict[str, Callable[[str], bool]] = {"luhn": luhn_ok, "iban": iban_ok, "not_repeated": not_repeated}


class ContextRecognizer(PatternRecognizer):
    """A pattern recognizer whose context is the text around the match, in characters.

    `context`: words that raise the score by `boost` when found within `window` characters.
    `required`: the match is dropped unless a context word is near. `negative`: words that
    lower the score (a company's address). `validator`: a checksum the match must pass.
    `shape`: a gate no match can get past without (`gates.py`); `gate` adds the context words when
    they are required, and is what the patterns engine tests before calling `analyze`.
    """

    def __init__(
        self, entity: str, name: str, patterns: Sequence[Pattern], *, language: str = "en",
        context: Sequence[str] = (), required: bool = False, negative: Sequence[str] = (), window: int = 48,
        boost: float = 0.35, validator: Callable[[str], bool] | None = None, deny_list: Sequence[str] = (),
        shape: Gate | None = None,
    ) -> None:
        patterns = list(patterns)
        if deny_list:  # whole words, any case (presidio's own deny list follows the recognizer's flags)
            terms = "|".join(regex.escape(term) for term in sorted(deny_list, key=len, reverse=True))
            patterns.append(Pattern(f"{name}.deny", rf"(?i:(?<!\w)(?:{terms})(?!\w))", 1.0))
        # Case matters: `[A-Z]` in an id pattern means upper case (presidio's default flags ignore case).
        super().__init__(supported_entity=entity, name=name, supported_language=language, patterns=patterns,
                         global_regex_flags=regex.DOTALL | regex.MULTILINE)
        self._context = _words(context)
        self._negative = _words(negative)
        self._required = required
        self._window = window
        self._boost = boost
        self._check = validator
        self.gate = shape
        if required and context:
            self.gate = WordGate(context) if shape is None else AllGates(shape, WordGate(context))

    def analyze(self, text: str, entities: list[str], nlp_artifacts: Any = None,
                regex_flags: int | None = None) -> list[RecognizerResult]:
        if self._required and (self._context is None or self._context.search(text) is None):
            return []  # no context word anywhere, so none near a match: skip the patterns
        results: list[RecognizerResult] = super().analyze(text, entities, nlp_artifacts, regex_flags)
        kept = []
        for result in results:
            span = text[result.start:result.end]
            if self._check is not None and not self._check(span):
                continue
            before = text[max(0, result.start - self._window):result.start]
            after = text[result.end:result.end + self._window // 2]
            near = self._context is not None and bool(self._context.search(before) or self._context.search(after))
            if self._required and not near:
                continue
            if near:
                result.score = min(1.0, result.score + self._boost)
            if self._negative is not None and self._negative.search(before):
                result.score = max(0.0, result.score - 0.5)
            kept.append(result)
        return kept

    def validate_result(self, pattern_text: str) -> bool | None:
        return None  # validators run in `analyze`, with the rest of the context rules


def _words(words: Sequence[str]) -> re.Pattern[str] | None:
    if not words:
        return None
    return re.compile(r"(?i)(?<!\w)(?:" + "|".join(re.escape(w) for w in words) + r")(?!\w)")


_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec", "januar", "februar",
           "märz", "mai", "juni", "juli", "oktober", "dezember", "janvier", "février", "mars", "avril", "juin",
           "juillet", "août", "septembre", "octobre", "novembre", "décembre", "enero", "febrero", "marzo", "abril",
           "mayo", "junio", "julio", "agosto", "septiembre", "octubre", "noviembre", "diciembre")
_DATE = (r"(?i:\d{4}-\d{2}-\d{2}|\d{1,2}[./-]\d{1,2}[./-](?:19|20)\d{2}|"
         rf"(?:\d{{1,2}}(?:st|nd|rd|th)?\s+)?(?:{'|'.join(_MONTHS)})"
         r"[a-z]*\.?\s+(?:\d{1,2}(?:st|nd|rd|th)?,?\s+)?(?:19|20)\d{2})")
_DOB_WORDS = ("born", "birth", "birthday", "dob", "d.o.b", "date of birth", "birthdate", "geboren", "geb.",
              "geburtsdatum", "né", "née", "naissance", "nacido", "nacida", "nacimiento", "nato", "nata",
              "nascita", "nascido", "nascida", "geboortedatum", "b.")
_STREET_SUFFIX = (r"(?i:street|st|avenue|ave|road|rd|boulevard|blvd|lane|ln|drive|dr|way|court|ct|place|pl|"
                  r"terrace|close|crescent|parkway|pkwy|highway|hwy|square|sq|row|circle|cir|trail)\.?")
_CITY_TAIL = (r"(?:,?\s+(?i:apt\.?|suite|unit|flat)\s*\w+)?(?:,\s*[A-Z][\w'-]*(?:\s[A-Z][\w'-]*){0,2}){0,2}"
              r"(?:,?\s+[A-Z]{2})?(?:\s+\d{5}(?:-\d{4})?|\s+[A-Z]{1,2}\d[A-Z\d]?\s\d[A-Z]{2})?")
_STREET_WORDS = ("straße", "strasse", "str.", "weg", "gasse", "platz", "allee", "ring", "damm", "gracht", "straat",
                 "laan", "plein", "vej", "gade", "gatan", "vägen")
_STREETS_BEFORE = ("Calle", "Avenida", "Av.", "Paseo", "Plaza", "Via", "Viale", "Piazza", "Corso", "Rua", "Travessa")
_VOIE_WORDS = ("rue", "avenue", "boulevard", "bd", "place", "chemin", "allée", "impasse", "quai")
_ADDRESS = [
    # 221B Baker Street, London NW1 6XE / 742 Evergreen Terrace, Springfield, IL 62704
    rf"\b\d{{1,5}}[A-Za-z]?\s+(?:[A-Z][\w'.-]*\s+){{1,4}}{_STREET_SUFFIX}\b{_CITY_TAIL}",
    # Hauptstraße 12, 10115 Berlin / Keizersgracht 123, 1015 CJ Amsterdam
    rf"\b[A-ZÄÖÜ][\wäöüß-]*(?:{'|'.join(regex.escape(w) for w in _STREET_WORDS)})\s+\d{{1,4}}[a-z]?"
    r"(?:,\s*(?:\d{4,5}|\d{3}\s\d{2})(?:\s?[A-Z]{2})?\s+[A-ZÄÖÜ][\wäöü-]+)?",
    # 12 rue de la Paix, 75002 Paris / Calle Mayor 5, 28013 Madrid / Via Roma 10, 00184 Roma
    rf"(?i:\b\d{{1,4}},?\s+(?:{'|'.join(_VOIE_WORDS)})(?:\s+[\w'-]+){{1,5}}?)"
    r"(?=\s*(?:[,.;|\"]|$))"
    r"(?:,\s*\d{5}\s+[A-Z][\w-]+)?",
    rf"\b(?:{'|'.join(regex.escape(w) for w in _STREETS_BEFORE)})\s+(?:[\w'-]+\s+){{0,4}}?\d{{1,4}}"
    r"(?:,\s*\d{4,5}(?:-\d{3})?\s+[A-Z][\w-]+)?",
]
_COMPANY_WORDS = ("inc", "inc.", "ltd", "llc", "gmbh", "corp", "corporation", "headquarters", "headquartered", "hq",
                  "office", "offices", "campus", "store", "company", "ag", "s.a.", "plc", "museum", "university",
                  "embassy", "hotel", "station")
_GOV_IDS: list[tuple[str, str, float, Sequence[str], bool, Callable[[str], bool] | None]] = [
    # (name, regex, score, context words, context required, validator)
    ("us_ssn", r"\b\d{3}-\d{2}-\d{4}\b", 0.5, ("ssn", "social security", "social"), False, ssn_ok),
    ("us_ssn_plain", r"\b\d{9}\b", 0.1, ("ssn", "social security"), True, ssn_ok),
    ("uk_nino", r"\b[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]\s?\d{2}\s?\d{2}\s?\d{2}\s?[A-D]\b", 0.6,
     ("national insurance", "nino", "ni number"), False, None),
    ("passport", r"\b[A-Z]{1,2}\d{6,8}\b|\b\d{9}\b", 0.1, ("passport", "reisepass", "passeport", "pasaporte",
                                                           "passaporto"), True, None),
    ("es_dni", r"\b\d{8}-?[A-Z]\b", 0.5, ("dni", "nif"), False, dni_ok),
    ("it_cf", r"\b[A-Z]{6}\d{2}[A-EHLMPR-T]\d{2}[A-Z]\d{3}[A-Z]\b", 0.85, ("codice fiscale",), False, None),
    ("br_cpf", r"\b\d{3}\.\d{3}\.\d{3}-\d{2}\b", 0.75, ("cpf",), False, None),
    ("de_taxid", r"\b\d{2}\s?\d{3}\s?\d{3}\s?\d{3}\b", 0.1, ("steuer-id", "steueridentifikationsnummer", "steuer",
                                                            "tax id", "idnr"), True, not_repeated),
    ("fr_nir", r"\b[12]\s?\d{2}\s?(?:0[1-9]|1[0-2])\s?\d{2}\s?\d{3}\s?\d{3}\s?\d{2}\b", 0.6,
     ("sécurité sociale", "securite sociale", "nir", "insee"), False, None),
    ("in_aadhaar", r"\b[2-9]\d{3}\s\d{4}\s\d{4}\b", 0.3, ("aadhaar", "aadhar", "uidai"), True, None),
    ("ca_sin", r"\b\d{3}[ -]\d{3}[ -]\d{3}\b", 0.1, ("sin", "social insurance"), True, None),
    ("nl_bsn", r"\b\d{9}\b", 0.1, ("bsn", "burgerservicenummer"), True, None),
    ("driver_license", r"\b[A-Z]{1,2}\d{5,8}\b|\b[A-Z]\d{3}-\d{4}-\d{4}\b", 0.1,
     ("driver's license", "drivers license", "driver license", "driving licence", "führerschein", "dl#", "dl no"),
     True, None),
]
# Gate patterns over a shape (`gates.py`: `0` is a digit, DEL any non-ASCII character): what each
# recognizer's match must contain, with its word boundaries and look-arounds left out.
_S = rf"[\s{OTHER}]"  # a space, as `\s` in any of the regexes (`regex`'s \s is a subset of stdlib's + DEL)
# Digits in a row (spaces, dots, hyphens or slashes between them allowed: `RunGate`) in every match of
# each id's shape, where it has such a number: the run gate closes first, for all of them at once.
_GOV_ID_RUNS = {"us_ssn": 9, "us_ssn_plain": 9, "uk_nino": 6, "passport": 6, "es_dni": 8, "br_cpf": 11,
                "de_taxid": 11, "fr_nir": 15, "in_aadhaar": 12, "ca_sin": 9, "nl_bsn": 9, "driver_license": 5}
_GOV_ID_SHAPES: dict[str, tuple[str, ...]] = {
    "us_ssn": ("000-00-0000",),
    "us_ssn_plain": ("000000000",),
    "uk_nino": (rf"00{_S}?00{_S}?00",),
    "passport": ("000000",),  # both alternatives hold six digits in a row
    "es_dni": ("00000000",),
    "it_cf": ("00[A-Z]00[A-Z]000",),
    "br_cpf": (r"000\.000\.000-00",),
    "de_taxid": (rf"00{_S}?000{_S}?000{_S}?000",),
    "fr_nir": (rf"0{_S}?00{_S}?00{_S}?00{_S}?000{_S}?000{_S}?00",),
    "in_aadhaar": (rf"0000{_S}0000{_S}0000",),
    "ca_sin": ("000[ -]000[ -]000",),
    "nl_bsn": ("000000000",),
    "driver_license": ("00000", "000-0000-0000"),
}
_LETTER = f"[A-Za-z{OTHER}]"


def _month_ends() -> str:
    """Lookbehinds, one per length, for a run of letters that ends (backwards: starts) with a month."""
    by_length: dict[int, list[str]] = {}
    for month in _MONTHS:
        by_length.setdefault(len(month), []).append(letters(month[::-1]))
    first = "".join(sorted({c for m in _MONTHS for c in letters(m[0]).strip("[]")}))
    return f"(?<=[{first}])(?:" + "|".join(f"(?<={'|'.join(ms)})" for _, ms in sorted(by_length.items())) + ")"
  # a letter under IGNORECASE (K, the Kelvin sign, folds to k)
_DOB_SHAPE = AnyGate(AllGates(RunGate(6), ShapeGate("0000-00-00", "0[./-]00?[./-]0000")), ShapeGate(
    # The month-name form, backwards: year, spaces, maybe a day, spaces, a word that starts with a month.
    # In an ASCII text that word is the whole run of letters (the date starts at a word boundary), so the
    # run is taken whole and its end tested, instead of trying every month at every letter.
    backwards=[(rf"0000{_S}+(?:,?(?:{_LETTER}{_LETTER})?0?0{_S}+)?\.?[A-Za-z]*+{_month_ends()}",
                rf"0000{_S}+(?:,?(?:{_LETTER}{_LETTER})?0?0{_S}+)?\.?{_LETTER}*"
                rf"(?:{'|'.join(letters(m[::-1]) for m in _MONTHS)})")],
))
_streets_before = "|".join(literal(w[::-1]) for w in _STREETS_BEFORE)
# Possessive where the class that follows cannot match what the repeat gives back (letters, then spaces,
# then a capital; a word, then spaces): the same matches, without trying every shorter repeat.
_ADDRESS_SHAPE = AnyGate(
    ShapeGate(rf"0[A-Za-z]?+{_S}++[A-Z]",
              # the house number, then the street word (Hauptstraße 12)
              backwards=[rf"0{_S}+(?:{'|'.join(literal(w[::-1]) for w in _STREET_WORDS)})"]),
    # the house number, then the French word (12 rue de la Paix): only when one is there at all
    AllGates(AsciiWordGate(_VOIE_WORDS), ShapeGate(rf"0,?{_S}+(?:{'|'.join(letters(w) for w in _VOIE_WORDS)})")),
    # the house number, then a few words, then the word before them (Calle Mayor 5): only when that word is
    # there at all, which a few substring tests tell for a third of the regex's cost
    AllGates(LiteralGate(_STREETS_BEFORE), ShapeGate(backwards=[(
        rf"0[ \t\n\r\f\v]++(?:[0A-Za-z_'\-]++[ \t\n\r\f\v]++){{0,4}}?(?:{_streets_before})",
        rf"0{_S}+(?:[\w'\-{OTHER}]+{_S}+){{0,4}}(?:{_streets_before})")])),
)
_CARD = r"\b(?:2[2-7]\d{2}|62\d{2}|50[12]\d|6759)(?:[ -]?\d{4}){2}[ -]?\d{4,7}\b"
_PHONE_INTL = r"(?<![\w+])\+[1-9]\d{0,2}(?:[ .-]?\(?\d{1,4}\)?){2,5}(?![\w.-]?\d)"
_PHONE_WORDS = ("phone", "tel", "tel.", "mobile", "cell", "call", "telefon", "téléphone", "teléfono", "handy",
                "whatsapp")
_PERSONAL_URL = (r"(?i:\b(?:https?://)?(?:www\.)?(?:linkedin\.com/in|github\.com|gitlab\.com|twitter\.com|x\.com|"
                 r"facebook\.com|instagram\.com|tiktok\.com|medium\.com|mastodon\.social|keybase\.io)"
                 r"/@?[A-Za-z0-9_.-]{2,60}/?)(?![\w/])")

# Every profile domain ends in .com, .social or .io and is followed by a slash (backwards: the slash first).
_PERSONAL_URL_SHAPE = ShapeGate(backwards=[rf"/(?:{letters('moc')}|{letters('laicos')}|{letters('oi')})\."])


def _gov_id_gate(name: str) -> Gate:
    shape: Gate = ShapeGate(*_GOV_ID_SHAPES[name])
    if name == "it_cf":  # two digits, a capital other than X, two digits, in an ASCII text (`CapitalsGate`)
        shape = AllGates(CapitalsGate("00A00"), shape)
    digits = _GOV_ID_RUNS.get(name)
    return shape if digits is None else AllGates(RunGate(digits), shape)


def gateway_recognizers(language: str, entities: set[str]) -> list[PatternRecognizer]:
    out: list[PatternRecognizer] = []
    if "DATE_OF_BIRTH" in entities:
        out.append(ContextRecognizer("DATE_OF_BIRTH", "gateway.dob", [Pattern("date", rf"\b{_DATE}\b", 0.3)],
                                     language=language, context=_DOB_WORDS, required=True, window=40, boost=0.5,
                                     shape=_DOB_SHAPE))
    if "STREET_ADDRESS" in entities:
        out.append(ContextRecognizer(
            "STREET_ADDRESS", "gateway.address", [Pattern(f"address{i}", rx, 0.65) for i, rx in enumerate(_ADDRESS)],
            language=language, context=("address", "live", "lives", "living", "moved", "ship to", "deliver",
                                        "adresse", "wohne", "wohnt", "dirección", "indirizzo", "home"),
            negative=_COMPANY_WORDS, window=60, boost=0.2, shape=_ADDRESS_SHAPE))
    if "GOV_ID" in entities:
        for name, regex, score, context, required, validator in _GOV_IDS:
            out.append(ContextRecognizer("GOV_ID", f"gateway.{name}", [Pattern(name, regex, score)], language=language,
                                         context=context, required=required, window=40, boost=0.5,
                                         validator=validator, shape=_gov_id_gate(name)))
    if "CREDIT_CARD" in entities:  # brands presidio's card pattern misses: Mastercard 2-series, UnionPay, Maestro
        out.append(ContextRecognizer("CREDIT_CARD", "gateway.card", [Pattern("iin", _CARD, 0.9)], language=language,
                                     validator=luhn_ok,
                                     shape=AllGates(RunGate(16), ShapeGate("0000[ -]?0000[ -]?0000[ -]?0000"))))
    if "PHONE_NUMBER" in entities:  # international numbers that libphonenumber does not know as valid
        out.append(ContextRecognizer("PHONE_NUMBER", "gateway.phone_intl", [Pattern("intl", _PHONE_INTL, 0.45)],
                                     language=language, context=_PHONE_WORDS, window=30, boost=0.3,
                                     shape=ShapeGate(r"\+0")))
    if "PERSONAL_URL" in entities:
        out.append(ContextRecognizer("PERSONAL_URL", "gateway.personal_url", [Pattern("social", _PERSONAL_URL, 0.7)],
                                     language=language, shape=_PERSONAL_URL_SHAPE))
    return out


# A phone number as written has at least this many digits (trunk prefix and country code included): a
# shorter run of digits ("born 1984", "order 550") is never reported as a phone number.
PHONE_MIN_DIGITS = 7
# A letter-free run (letters except x and X, which libphonenumber accepts between digits and before an
# extension) with at least that many digits, from its start: a phone number never spans a letter, so such
# a run holds every candidate whole. The two classes do not overlap, so the scan is linear.
_RUN = re.compile(rf"(?<![\W\d_xX])(?:[\W_xX]*\d){{{PHONE_MIN_DIGITS}}}[\W\d_xX]*")


# Gates for presidio's own recognizers, by name (`gates.py`; the windowed e-mail and IP recognizers look
# for their triggers themselves). Their patterns: `CreditCardRecognizer().patterns` and so on.
BUILTIN_GATES: dict[str, Gate] = {
    # 4 digits, 3 to 4, 3 to 4, 3 to 5, each group after an optional space or hyphen
    "CreditCardRecognizer": AllGates(RunGate(13), ShapeGate("0000[- ]?0000?[- ]?0000?[- ]?000")),
    # \d{5}-\d{4}, \d{3}-\d{6}, \d{3}-\d{2}-\d{4}, \d{9}, \d{3}[- .]\d{2}[- .]\d{4}
    "UsSsnRecognizer": AllGates(RunGate(9), ShapeGate("000(?:00-0000|-000000|[- .]00[- .]0000|000000)")),
    # two capital letters and two digits (case matters: its flags have no IGNORECASE)
    # (in an ASCII text, two capitals, X among them, right before two digits: `CapitalsGate`)
    "IbanRecognizer": AllGates(CapitalsGate("AA00", "AX00", "XA00", "XX00"),
                               ShapeGate(f"00(?<=[A-Z{OTHER}][A-Z{OTHER}]00)")),
    # `IpWindows.trigger` (a digit, a dot and a digit, or a colon) and `EmailWindows.trigger`
    "IpRecognizer": ShapeGate(r"0\.0", ":"),
    "EmailRecognizer": ShapeGate("@"),
    # `phone_windows` is empty unless a letter-free stretch holds `PHONE_MIN_DIGITS` digits (letters: `_RUN`'s,
    # all but x and X: `RunGate`'s loose runs; DEL, any non-ASCII character, may be a digit)
    "PhoneRecognizer": RunGate(PHONE_MIN_DIGITS, loose=True),
}


def phone_windows(text: str) -> list[tuple[int, int]]:
    """The stretches of `text` that can hold a phone number: letter-free runs with at least
    `PHONE_MIN_DIGITS` digits, each with one character of each neighbour (the matcher checks that a number
    does not touch a letter), merged where they meet; empty for most prose."""
    windows: list[tuple[int, int]] = []
    for run in _RUN.finditer(text):
        lo, hi = max(0, run.start() - 1), min(len(text), run.end() + 1)
        if windows and windows[-1][1] >= lo:
            windows[-1] = (windows[-1][0], hi)
        else:
            windows.append((lo, hi))
    return windows


class PhoneWindows(PhoneRecognizer):
    """Presidio's phone recognizer, run only on the stretches that can hold a number.

    libphonenumber's matcher parses every run of digits once per region, which made it nine tenths of a
    `patterns` analysis of a 300-word prompt with a few years and order numbers in it. Handing it only the
    letter-free runs with enough digits finds the same numbers of seven digits and more: a candidate never
    crosses a letter, and each window keeps the characters the matcher looks at on either side.
    """

    def analyze(self, text: str, entities: list[str], nlp_artifacts: Any = None) -> list[RecognizerResult]:
        results: list[RecognizerResult] = []
        for lo, hi in phone_windows(text):
            found: list[RecognizerResult] = super().analyze(text[lo:hi], entities, nlp_artifacts)
            for result in found:
                result.start += lo
                result.end += lo
            results.extend(found)
        return results


_SPACES = " \t\n\r\f\v"
_MAX_SCORE, _MIN_SCORE = EntityRecognizer.MAX_SCORE, EntityRecognizer.MIN_SCORE
_SPACE = re.compile(r"[ \t\n\r\f\v]")


def token_windows(text: str, trigger: re.Pattern[str] | str) -> list[tuple[int, int]]:
    """The whitespace-delimited tokens of `text` that contain `trigger` (a regex, or a plain string: found
    with `str.find`, cheaper than a regex search), each with the space on either side.

    For recognizers whose matches never hold a space (e-mail and IP addresses): their patterns give the
    same results on these windows as on the whole text, since each window keeps the neighbour characters
    that word boundaries and look-arounds test. Linear in the text: each search starts past the last window.
    """
    windows: list[tuple[int, int]] = []
    pos = 0
    spaces = [c for c in _SPACES if c in text]  # the others are never found
    space = spaces[0] if len(spaces) == 1 else None  # most texts: only " ", one search and no generator
    size = len(text)
    while True:
        if isinstance(trigger, str):
            start = text.find(trigger, pos)
            if start < 0:
                break
            end = start + len(trigger)
        else:
            found = trigger.search(text, pos)
            if found is None:
                break
            start, end = found.span()
        if space is not None:
            lo = text.rfind(space, pos, start)
        else:
            lo = max((text.rfind(c, pos, start) for c in spaces), default=-1)
        if lo < 0:  # the token starts right after the last window, whose space it shares
            lo = max(0, pos - 1)
        if space is not None:
            after = text.find(space, end)
            hi = size if after < 0 else after + 1
        else:
            spaced = _SPACE.search(text, end)
            hi = size if spaced is None else spaced.end()
        if windows and windows[-1][1] >= lo:
            windows[-1] = (windows[-1][0], hi)
        else:
            windows.append((lo, hi))
        pos = hi
    return windows


class _TokenWindows:
    """Runs a pattern recognizer on `token_windows` only: presidio's e-mail and IP patterns are slow
    (milliseconds on a long prompt) and most of the text cannot hold their match.

    The windows are scanned joined, in one pass: presidio's fixed cost per call (timing, logging,
    deduplication) was most of the cost of a prompt with ten e-mail addresses. Joined windows find what
    each window finds alone: every window but the first starts with a space and every window but the last
    ends with one, and no match holds a space or looks past the character beside it. The pass is
    presidio's own (`PatternRecognizer.analyze`: same compiled patterns, validation, scores, timeout and
    deduplication); `explain = False` leaves out the explanation object it builds for every match, which
    only the AnalyzerEngine's context enhancer reads (the `ner` engine), not the patterns engine.
    """

    trigger: re.Pattern[str]
    literal: str | None = None  # the trigger, when it is a plain string
    deduplicated = True  # `_scan` ends with presidio's `remove_duplicates`, in its order
    explain = True
    # Whether `_scan` may use `_twins` (stdlib copies of the patterns) for short ASCII texts.
    twinned = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        recognizer: Any = self
        self._twins = _twins(recognizer.patterns, recognizer.global_regex_flags) if self.twinned else {}

    def analyze(self, text: str, entities: list[str], nlp_artifacts: Any = None,
                regex_flags: int | None = None) -> list[RecognizerResult]:
        windows = token_windows(text, self.literal or self.trigger)
        if not windows:
            return []
        starts = []  # where each window starts in the joined text
        size = 0
        for lo, hi in windows:
            starts.append(size)
            size += hi - lo
        found = self._scan("".join(text[lo:hi] for lo, hi in windows), regex_flags)
        for result in found:
            index = bisect_right(starts, result.start) - 1
            shift = windows[index][0] - starts[index]
            result.start += shift
            result.end += shift
        return found


    def _scan(self, text: str, regex_flags: int | None) -> list[RecognizerResult]:
        """presidio 2.2's `PatternRecognizer.__analyze_patterns`, explanations only if `explain`
        (`test_windowed_recognizers_find_what_presidio_finds` holds them to the same results)."""
        recognizer: Any = self  # the recognizer it is mixed into
        flags = regex_flags or recognizer.global_regex_flags
        entity = recognizer.supported_entities[0]
        metadata = {RecognizerResult.RECOGNIZER_NAME_KEY: recognizer.name,
                    RecognizerResult.RECOGNIZER_IDENTIFIER_KEY: recognizer.id}
        # presidio's own `invalidate_result` invalidates nothing: not called unless a subclass has its own
        invalidates = type(recognizer).invalidate_result is not PatternRecognizer.invalidate_result
        results: list[RecognizerResult] = []
        for pattern in recognizer.patterns:
            if not pattern.compiled_regex or pattern.compiled_with_flags != flags:
                pattern.compiled_with_flags = flags
                pattern.compiled_regex = regex.compile(pattern.regex, flags=flags)
            twin = self._twins.get(pattern.regex) if flags == recognizer.global_regex_flags else None
            if twin is not None and len(text) <= TWIN_CHARS and text.isascii():
                matches: Any = twin.finditer(text)
            else:
                matches = pattern.compiled_regex.finditer(text, timeout=REGEX_TIMEOUT_SECONDS)
            try:
                for match in matches:
                    start, end = match.span()
                    if start == end:
                        continue
                    matched = text[start:end]
                    valid = recognizer.validate_result(matched)
                    score = pattern.score if valid is None else (_MAX_SCORE if valid else _MIN_SCORE)
                    if invalidates and recognizer.invalidate_result(matched):
                        score = _MIN_SCORE
                    explanation: Any = None
                    if self.explain:
                        explanation = PatternRecognizer.build_regex_explanation(
                            recognizer.name, pattern.name, pattern.regex, pattern.score, valid, flags)
                        explanation.score = score
                    if score > _MIN_SCORE:
                        results.append(RecognizerResult(entity, start, end, score, explanation, dict(metadata)))
            except TimeoutError:
                continue  # presidio logs and skips the pattern, keeping what it found before
        if _apart(results):
            return sorted(results, key=_score_first)
        return list(EntityRecognizer.remove_duplicates(results))


# The longest text `_scan` hands to a stdlib twin: the `regex` module's timeout bounds a catastrophic
# pattern, the stdlib has none, so the twin only sees texts on which the worst case (presidio's e-mail
# pattern backtracks over a token for each of its starts: quadratic) is a few milliseconds.
TWIN_CHARS = 1024
_TWIN_FLAGS = re.IGNORECASE | re.MULTILINE | re.DOTALL


def _twins(patterns: Sequence[Pattern], flags: int) -> dict[str, re.Pattern[str]]:
    """Stdlib copies of presidio's patterns, by source, for ASCII texts.

    The `regex` module scans presidio's e-mail pattern at about half the speed of the stdlib `re` (on a
    prompt with ten addresses, a third of the cost of its analysis). On an ASCII text the two agree on
    what the e-mail pattern uses: `\\w`, `\\b` and its classes see only ASCII characters, which both class
    alike, and IGNORECASE folds none of them to another; `test_ascii_twins_find_what_the_regex_module_finds`
    holds them to it. A pattern that the stdlib cannot compile, or flags beyond these three, get no twin.
    """
    if flags & ~_TWIN_FLAGS:
        return {}
    twins = {}
    for pattern in patterns:
        try:
            twins[pattern.regex] = re.compile(pattern.regex, flags)
        except re.error:
            continue
    return twins


def _apart(results: list[RecognizerResult]) -> bool:
    """Whether results of one type, none empty and none scored 0 (as `_scan` makes them), follow each other
    without overlapping (one pattern's matches): presidio's `remove_duplicates` then drops none of them,
    and only orders them, as `_score_first` does."""
    end = -1
    for result in results:
        if result.start < end:
            return False
        end = result.end
    return True


def _score_first(result: RecognizerResult) -> tuple[float, int, int]:
    """presidio's order for what `remove_duplicates` returns."""
    return -result.score, result.start, -(result.end - result.start)


# Domains whose validity `EmailWindows` has asked tldextract about: the same few (gmail.com, the
# company's own) come back in every prompt. Bounded: cleared when full, as `pii._built` is.
_MAX_DOMAINS = 4096
_domains: dict[str, bool] = {}


class EmailWindows(_TokenWindows, EmailRecognizer):
    trigger = re.compile("@")
    literal = "@"
    twinned = True

    def validate_result(self, pattern_text: str) -> bool:
        """presidio's check (tldextract finds a public suffix), asked once per domain.

        It was half the cost of a prompt with ten addresses. For a match without `/`, `?` or `#`
        (which tldextract reads as the end of a URL's authority), tldextract reads only the domain:
        the host is what follows the match's one `@`. Any other match is asked about as it is.
        """
        domain = pattern_text.rpartition("@")[2]
        if "/" in pattern_text or "?" in pattern_text or "#" in pattern_text:
            return bool(EmailRecognizer.validate_result(self, pattern_text))
        found = _domains.get(domain)
        if found is None:
            if len(_domains) >= _MAX_DOMAINS:
                _domains.clear()
            found = _domains[domain] = bool(EmailRecognizer.validate_result(self, pattern_text))
        return found


class IpWindows(_TokenWindows, IpRecognizer):
    trigger = re.compile(r"\d\.\d|:")
