"""OpenAI's rate-limit response headers, from the gateway's own request and token windows.

OpenAI sends `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` on every answer; clients (the official
SDKs' retry logic, LangChain, ...) read them to pace themselves. Several limits may apply to one request
(its key's, its tenant's, its alias's): the headers describe the tightest of the caller's own, its key's and its
tenant's, the one with the fewest left (`tighter`: requests among the request windows, tokens among the token
windows), since that count is what a client paces itself by. An alias's window counts every tenant's requests
together: shown, it would tell one tenant how much the others sent, so it shows only in the 429 it causes. A 429
shows the window that refused it, whoever's it is, with nothing left (`refused_windows`): the one its `Retry-After`
is about; its other windows as they stand once the refused request gave back what it took (`given_back`). A
request a budget refuses after its limits admitted it shows its windows so too (`headers_given_back`).
"""

from __future__ import annotations

from ..store.base import WindowReservation

__all__ = ["duration", "given_back", "headers_given_back", "rate_limit_headers", "refused_windows", "request_headers",
           "tighter", "tightest"]


def duration(seconds: float) -> str:
    """OpenAI's format for a reset time: `20ms`, `1s`, `6m0s`, `1h2m3s`."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    whole = int(seconds + 0.999)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def tighter(answer: WindowReservation, than: WindowReservation) -> bool:
    """Whether `answer` has fewer left than `than` (requests, or tokens: both windows of one kind), as the
    `x-ratelimit-remaining-*` header reads it (never below 0). Ranked by share of the limit, a key's `rpm: 2` with 1
    left lost to its tenant's `rpm: 100` with 39 left: the client read 39, sent again, and met a 429.

    Of two with as many left, the one that resets later: once the client has spent what is left, that is when it
    may send again (the earlier reset frees the other window, while the later one still refuses). A few float
    comparisons, no division and no property call: asked per shown window on every request with more than one
    (`Admission._admit_in_line`)."""
    left = answer[2] - answer[1]  # `answer.remaining`, without its property call
    other = than[2] - than[1]
    left = left if left > 0.0 else 0.0
    other = other if other > 0.0 else 0.0
    return left < other or (left == other and answer[3] > than[3])  # (`reset_s`)


def tightest(answers: list[WindowReservation]) -> WindowReservation | None:
    """The answer with the fewest left (`tighter`)."""
    if not answers:
        return None
    found = answers[0]
    for answer in answers[1:]:
        if tighter(answer, found):
            found = answer
    return found


def refused_windows(kind: str, full: WindowReservation | None, requests: WindowReservation | None,
                    tokens: WindowReservation | None, too_large: bool = False,
                    ) -> tuple[WindowReservation | None, WindowReservation | None]:
    """The windows a 429 shows: the window that refused (`full`, of `kind`) in its kind's place, the caller's own
    tightest (`requests`, `tokens`, as they stand once the refused request gave back what it took: `given_back`)
    in the other's. The refusing window shows nothing left (a `tpm` window refuses a request larger than what is
    left, which may be more than 0) and its reset is the 429's `Retry-After`; `too_large`: a request larger than
    the whole window, which no wait makes room for (no `Retry-After`), shows the window as it is. Ranked with the
    others (`tighter`), it could lose a tie: another window with nothing left and a later reset (a key's `rpm: 2`
    refused with 47 s to go, its tenant's `rpm: 3` shown instead: 0 left, 58 s, beside `Retry-After: 47`). An
    alias's window shows there too: the client learns it is full, and when it will not be, which the refusal tells
    it anyway."""
    if full is None:  # (a concurrency limit: no window)
        return requests, tokens
    if not too_large and full[1] < full[2]:  # (`total`, `limit`): nothing left
        full = full._replace(total=full[2])
    return (full, tokens) if kind == "rpm" else (requests, full)


def given_back(answer: WindowReservation | None, amount: float) -> WindowReservation | None:
    """A window's answer as it stands once a refused request gave back what it took there (`amount`, when the
    answer took it: `ok`), as a store that takes a request's reservations together answers it
    (`Store.reserve_together`); a refusal's only, never an admitted request's."""
    if answer is None or not answer[0]:
        return answer
    return answer._replace(total=answer[1] - amount)


def headers_given_back(headers: list[tuple[bytes, bytes]], tokens: int) -> list[tuple[bytes, bytes]]:
    """An admitted request's window headers (`rate_limit_headers`, among others) as they stand once it gave back what
    its limits took (a request, `tokens`): a request a budget refused after its limits admitted it (`given_back` for
    windows no longer at hand: kept, each admitted request would pay for them). Every window shown took it (one
    that did not fit would have refused it first), so each has that much more left: the tightest stays the
    tightest (`tighter`), and what it shows, `limit - total` in whole numbers and never below 0 as `total` was at
    most `limit`, is that many more."""
    given: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        if name == b"x-ratelimit-remaining-requests":
            value = b"%d" % (int(value) + 1)
        elif name == b"x-ratelimit-remaining-tokens":
            value = b"%d" % (int(value) + tokens)
        given.append((name, value))
    return given


_REQUESTS = (b"x-ratelimit-limit-requests", b"x-ratelimit-remaining-requests", b"x-ratelimit-reset-requests")
_TOKENS = (b"x-ratelimit-limit-tokens", b"x-ratelimit-remaining-tokens", b"x-ratelimit-reset-tokens")


def rate_limit_headers(
    requests: WindowReservation | None, tokens: WindowReservation | None,
) -> list[tuple[bytes, bytes]]:
    """The three headers of each window given (limit, remaining, reset), as bytes: the limit and the reset
    headers are made once per value pair (a policy's limits and a window's whole seconds take few), only the
    remaining count per request."""
    if tokens is None:
        return [] if requests is None else _window(_REQUESTS, _FIXED_REQUESTS, requests)
    if requests is None:
        return _window(_TOKENS, _FIXED_TOKENS, tokens)
    return [*_window(_REQUESTS, _FIXED_REQUESTS, requests), *_window(_TOKENS, _FIXED_TOKENS, tokens)]


def request_headers(requests: WindowReservation) -> list[tuple[bytes, bytes]]:
    """`rate_limit_headers(requests, None)` (the usual limits: requests per minute only), with `_window`'s
    steps in line."""
    _, total, limit, reset = requests
    if reset >= 1:
        whole = int(reset + 0.999)
        pair = _FIXED_REQUESTS.get((limit, whole))
        if pair is None:
            pair = _fixed(_REQUESTS, _FIXED_REQUESTS, limit, whole)
        return [pair[0], (b"x-ratelimit-remaining-requests", b"%d" % (limit - total) if limit > total else b"0"),
                pair[1]]
    return _window(_REQUESTS, _FIXED_REQUESTS, requests)


_Fixed = dict[tuple[float, int], tuple[tuple[bytes, bytes], tuple[bytes, bytes]]]
_FIXED_REQUESTS: _Fixed = {}  # (limit, whole seconds to reset) -> (limit header, reset header), per window kind
_FIXED_TOKENS: _Fixed = {}
_FIXED_KEPT = 1024  # pairs kept per kind (a policy's few limits times 60 seconds; past it, made each time)


def _window(names: tuple[bytes, bytes, bytes], fixed: _Fixed, answer: WindowReservation) -> list[tuple[bytes, bytes]]:
    _, total, limit, reset = answer
    if reset >= 1:  # the usual case: the limit and reset headers looked up (one dict look-up, no call)
        pair = fixed.get((limit, int(reset + 0.999)))
        if pair is None:
            pair = _fixed(names, fixed, limit, int(reset + 0.999))
        limit_header, reset_header = pair
    else:  # the window's last second: in milliseconds, formatted each time
        limit_header, reset_header = (names[0], b"%d" % round(limit)), (names[2], duration(reset).encode())
    return [limit_header, (names[1], b"%d" % (limit - total) if limit > total else b"0"), reset_header]


def _fixed(names: tuple[bytes, bytes, bytes], fixed: _Fixed, limit: float,
           whole: int) -> tuple[tuple[bytes, bytes], tuple[bytes, bytes]]:
    """A window's limit header and its reset header for a whole number of seconds, kept in `fixed`."""
    pair = (names[0], b"%d" % round(limit)), (names[2], duration(whole).encode())
    if len(fixed) < _FIXED_KEPT:
        fixed[(limit, whole)] = pair
    return pair
