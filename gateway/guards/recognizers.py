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
from collections.abc import Callable, Sequence
from typing import Any

import regex  # type: ignore[import-untyped]  # presidio matches with it; no stubs
from presidio_analyzer import Pattern, PatternRecognizer, RecognizerResult

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

__all__ = ["VALIDATORS", "ContextRecognizer", "gateway_recognizers", "iban_ok", "luhn_ok"]


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


# The codice fiscale's check letter: each of the first 15 characters' value, from this table at odd positions
# (1st, 3rd...) and its own (a digit's value, a letter's place in the alphabet) at even ones, summed mod 26.
_CF_ODD = dict(zip("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", (
    1, 0, 5, 7, 9, 13, 15, 17, 19, 21, 1, 0, 5, 7, 9, 13, 15, 17, 19, 21, 2, 4, 18, 20, 11, 3, 6, 8, 12, 14, 16, 10,
    22, 25, 24, 23), strict=True))


def cf_ok(text: str) -> bool:
    """An Italian codice fiscale whose 16th character is its check letter."""
    raw = text.upper()
    if len(raw) != 16 or not raw.isascii() or not raw.isalnum():  # (`\d` and IGNORECASE take more than ASCII)
        return False
    total = sum(_CF_ODD[c] if i % 2 == 0 else (int(c) if c.isdigit() else ord(c) - 65) for i, c in enumerate(raw[:15]))
    return raw[15] == chr(65 + total % 26)


def cpf_ok(text: str) -> bool:
    """A Brazilian CPF whose two check digits are right (mod 11), and not one digit repeated (`111.111.111-11`)."""
    digits = [int(c) for c in text if c.isdigit()]
    if len(digits) != 11 or len(set(digits)) == 1:
        return False
    return all(sum(digits[i] * (n + 1 - i) for i in range(n)) * 10 % 11 % 10 == digits[n] for n in (9, 10))


def nir_ok(text: str) -> bool:
    """A French NIR (numéro de sécurité sociale) whose last two digits are its key: 97 less the rest mod 97."""
    digits = "".join(c for c in text if c.isdigit())
    return len(digits) == 15 and 97 - int(digits[:13]) % 97 == int(digits[13:])


def nino_ok(text: str) -> bool:
    """A UK National Insurance number without one of the prefixes never issued (BG, GB, KN, NK, NT, TN, ZZ): it has
    no check digit, so this is all a shape can tell."""
    return text[:2].upper() not in ("BG", "GB", "KN", "NK", "NT", "TN", "ZZ")


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
     ("national insurance", "nino", "ni number"), False, nino_ok),
    ("passport", r"\b[A-Z]{1,2}\d{6,8}\b|\b\d{9}\b", 0.1, ("passport", "reisepass", "passeport", "pasaporte",
                                                           "passaporto"), True, None),
    ("es_dni", r"\b\d{8}-?[A-Z]\b", 0.5, ("dni", "nif"), False, dni_ok),
    ("it_cf", r"\b[A-Z]{6}\d{2}[A-EHLMPR-T]\d{2}[A-Z]\d{3}[A-Z]\b", 0.85, ("codice fiscale",), False, cf_ok),
    ("br_cpf", r"\b\d{3}\.\d{3}\.\d{3}-\d{2}\b", 0.75, ("cpf",), False, cpf_ok),
    ("de_taxid", r"\b\d{2}\s?\d{3}\s?\d{3}\s?\d{3}\b", 0.1, ("steuer-id", "steueridentifikationsnummer", "steuer",
                                                            "tax id", "idnr"), True, not_repeated),
    ("fr_nir", r"\b[12]\s?\d{2}\s?(?:0[1-9]|1[0-2])\s?\d{2}\s?\d{3}\s?\d{3}\s?\d{2}\b", 0.6,
     ("sécurité sociale", "securite sociale", "nir", "insee"), False, nir_ok),
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
# In the form for a text with other characters, DEL is a digit and a space at once, so a gate that reads
# `[0 DEL]` then `_S+` would start at every DEL of a run of spaces and DEL and read on to the run's end:
# quadratic over Chinese or Cyrillic prose (seconds at 16K characters, on the event loop). A match that
# starts at a later DEL of such a run also starts at its first DEL (the run that follows is longer), so the
# run is entered at its first DEL only (the look-behind fails at once anywhere else): the same verdicts.
_RUN_DIGIT = rf"(?<![\s{OTHER}])\s*+{OTHER}"
_street_words = "|".join(literal(w[::-1]) for w in _STREET_WORDS)
_voie_words = "|".join(letters(w) for w in _VOIE_WORDS)
# Possessive where the class that follows cannot match what the repeat gives back (letters, then spaces,
# then a capital; a word, then spaces): the same matches, without trying every shorter repeat.
_ADDRESS_SHAPE = AnyGate(
    ShapeGate((rf"0[A-Za-z]?+{_S}++[A-Z]", rf"(?:0[A-Za-z]?+|{OTHER}[A-Za-z]|{_RUN_DIGIT}){_S}++[A-Z]"),
              # the house number, then the street word (Hauptstraße 12)
              backwards=[(rf"0{_S}+(?:{_street_words})", rf"(?:0|{_RUN_DIGIT}){_S}++(?:{_street_words})")]),
    # the house number, then the French word (12 rue de la Paix): only when one is there at all
    AllGates(AsciiWordGate(_VOIE_WORDS), ShapeGate((rf"0,?{_S}+(?:{_voie_words})",
                                                    rf"(?:0,?|{OTHER},|{_RUN_DIGIT}){_S}+(?:{_voie_words})"))),
    # the house number, then a few words, then the word before them (Calle Mayor 5): only when that word is
    # there at all, which a few substring tests tell for a third of the regex's cost. In a text with other
    # characters, DEL is a letter and a space at once, and the words between could be split every way
    # (polynomial, for each start): there the gate asks only for the word and a space after it.
    AllGates(LiteralGate(_STREETS_BEFORE), ShapeGate(backwards=[(
        rf"0[ \t\n\r\f\v]++(?:[0A-Za-z_'\-]++[ \t\n\r\f\v]++){{0,4}}?(?:{_streets_before})",
        rf"{_S}(?:{_streets_before})")])),
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

