"""An upstream's `Retry-After`, read strictly, and the value a client may be told.

RFC 9110 (section 10.2.3) allows two forms: delta-seconds (ASCII digits, nothing else) or an
HTTP-date (IMF-fixdate, or one of the two obsolete forms a recipient must still accept).
`str.isdigit` is not a test for the first: it holds for "²", "①" or "٣", which `int` and
`float` then refuse or read as another number, so only "0"-"9" count here. Anything else
(a sign, a fraction, "Infinity", a date with a numeric zone) is no hint at all.

OpenAI (Azure OpenAI too) also sends `retry-after-ms` on a 429, the same wait in milliseconds,
which the openai and anthropic SDKs read before `Retry-After`: `upstream_wait` reads it first,
as strictly (ASCII digits, an optional fraction: no sign, exponent, "inf" or "NaN"), so a wait
of 250 ms is not rounded up to a second, for the gateway's own retry or for the client.

What the gateway itself waits is capped by the target's `retry_after_max_s` (`routing`);
what a client is told is the upstream's own figure, in both headers (`wait_headers`:
delta-seconds rounded up, and milliseconds), capped at `MAX_RETRY_AFTER_S`: an upstream's
daily quota may honestly ask for hours, but not for decades, and a figure past 2**31
breaks clients that read it into a 32-bit integer.
"""

from __future__ import annotations

import calendar
import math
import re
import time
from collections.abc import Mapping

__all__ = ["MAX_RETRY_AFTER_S", "RETRY_AFTER_MS", "client_retry_after", "retry_after_seconds", "upstream_wait",
           "wait_headers"]

MAX_RETRY_AFTER_S = 86_400  # a day: the longest window an upstream's rate limits use (requests per day)

_MONTHS = {name: number for number, name in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), start=1)}
_TIME = r"(\d\d):(\d\d):(\d\d)"
_DAY = "(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)"
_MONTH = "([A-Z][a-z]{2})"
_IMF_FIXDATE = re.compile(rf"{_DAY}, (\d\d) {_MONTH} (\d{{4}}) {_TIME} GMT", re.ASCII)  # Sun, 06 Nov 1994 08:49:37 GMT
_RFC850 = re.compile(  # Sunday, 06-Nov-94 08:49:37 GMT
    rf"(?:Mon|Tues|Wednes|Thurs|Fri|Satur|Sun)day, (\d\d)-{_MONTH}-(\d\d) {_TIME} GMT", re.ASCII)
_ASCTIME = re.compile(rf"{_DAY} {_MONTH} ([ \d]\d) {_TIME} (\d{{4}})", re.ASCII)  # Sun Nov  6 08:49:37 1994
_ALL_DIGITS = re.compile(r"[0-9]+", re.ASCII)
_MILLISECONDS = re.compile(r"([0-9]+)(?:\.[0-9]+)?", re.ASCII)  # `retry-after-ms`: "1500", "12.5"
RETRY_AFTER_MS = "retry-after-ms"  # (as OpenAI spells it; an error's headers hold it so, beside "Retry-After")


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait by a `Retry-After` value (0 for a date in the past), or None when it is not one."""
    if not value:
        return None
    value = value.strip(" \t")  # optional whitespace around a field value (RFC 9110, 5.5)
    if _ALL_DIGITS.fullmatch(value):
        digits = value.lstrip("0") or "0"
        # past ten digits it is more than any cap; `int` of thousands of digits would even raise
        return float(int(digits)) if len(digits) <= 10 else math.inf
    when = _http_date(value)
    if when is None:
        return None
    return max(0.0, when - (time.time() if now is None else now))


def upstream_wait(headers: Mapping[str, str]) -> float | None:
    """The seconds an upstream's answer asks to wait: its `retry-after-ms` (the finer), else its `Retry-After`, or
    None when it sends neither as one. `headers`: an aiohttp response's (any case) or a `GatewayError`'s."""
    value = headers.get(RETRY_AFTER_MS)
    if value:
        value = value.strip(" \t")
        if match := _MILLISECONDS.fullmatch(value):
            # past ten digits it is more than any cap (a day is 8 digits of milliseconds); `float` reads the rest
            return float(value) / 1000 if len(match[1].lstrip("0")) <= 10 else math.inf
    return retry_after_seconds(headers.get("Retry-After"))


def wait_headers(seconds: float) -> dict[str, str]:
    """What a client is told to wait `seconds`: `Retry-After` (whole seconds, rounded up) and `retry-after-ms`
    (milliseconds, rounded up), both capped at `MAX_RETRY_AFTER_S`."""
    if seconds < MAX_RETRY_AFTER_S:  # (`round`: 1.1 s is 1100 ms, not the 1100.0000000000002 a float makes of it)
        return {"Retry-After": str(math.ceil(seconds)), RETRY_AFTER_MS: str(math.ceil(round(seconds * 1000, 6)))}
    return {"Retry-After": str(MAX_RETRY_AFTER_S), RETRY_AFTER_MS: str(MAX_RETRY_AFTER_S * 1000)}


def client_retry_after(seconds: float) -> str:
    """The `Retry-After` to send a client for a wait of `seconds`: whole seconds, rounded up, capped."""
    return str(math.ceil(seconds)) if seconds < MAX_RETRY_AFTER_S else str(MAX_RETRY_AFTER_S)


def _http_date(value: str) -> float | None:
    """An HTTP-date's POSIX time (RFC 9110, 5.6.7), or None."""
    if match := _IMF_FIXDATE.fullmatch(value):
        day, month, year, hour, minute, second = match.groups()
    elif match := _RFC850.fullmatch(value):
        day, month, short_year, hour, minute, second = match.groups()
        # a two-digit year more than 50 years ahead is the last such year in the past (RFC 9110, 5.6.7)
        this_year = time.gmtime().tm_year
        full = this_year - this_year % 100 + int(short_year)
        year = str(full - 100 if full > this_year + 50 else full)
    elif match := _ASCTIME.fullmatch(value):
        month, day, hour, minute, second, year = match.groups()
    else:
        return None
    number = _MONTHS.get(month)
    if number is None:
        return None
    full_year, day_of_month = int(year), int(day)
    clock = (int(hour), int(minute), int(second))
    if not (full_year >= 1 and 1 <= day_of_month <= calendar.monthrange(full_year, number)[1]
            and clock[0] <= 23 and clock[1] <= 59 and clock[2] <= 60):
        return None
    return float(calendar.timegm((full_year, number, day_of_month, *clock, 0, 0, 0)))
