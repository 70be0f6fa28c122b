"""What of an error message a client may see: an upstream's, scrubbed of credentials and addresses; its own, bounded.

An upstream's error text is useful to a client ("max_tokens is too large") but may
carry what must never reach one: the gateway's own provider credential echoed back,
internal addresses and host names, credential-shaped tokens. It is kept apart from
the error tree (`errors`) because it is a parser of hostile text with rules of its
own, run only on error paths.

A 400 that quotes what the client sent (an unknown model, field or enum value) quotes
it through `printable` (msgspec's messages through `validation_error`): a bounded,
printable form, not a megabyte of it with the escape sequences a terminal or log
viewer showing the error would act on.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from urllib.parse import urlsplit

from .secret_removal import prepare_secrets, remove_secrets, spaced

__all__ = ["ECHO_LIMIT", "prepare_secrets", "printable", "remove_secrets", "sanitize_upstream_message",
           "validation_error"]

# The characters of a client's value an error message quotes: enough to recognise it.
ECHO_LIMIT = 64
# msgspec's path to a bad value (`messages[0].content[2].type`): the schema's names and indexes, but nested arrays
# and objects make it long, and where no path follows, the tail of the client's own text may look like one.
_PATH_LIMIT = 200
# A message the gateway did not expect to quote client text: bounded all the same.
_MESSAGE_LIMIT = 500
# msgspec's messages that quote the client's value: as its repr (`Invalid enum value 'x'`), or a field name as it
# is (`Object contains unknown field `x``, control characters and all).
_QUOTING = ("Invalid enum value ", "Invalid value ", "Object contains unknown field ")
_QUOTES = frozenset("'\"`")

# The scrub is a set of shape rules plus removal of the configured secrets by
# value. It runs only on error paths, but it runs on text an upstream controls,
# so every pattern is compiled once (at import; the configured secrets' in a
# worker thread, see `secret_removal`) and written to be linear: runs are
# matched possessively or by one unambiguous class, starts are pinned to token
# boundaries by look-behinds, and anything not decidable by a cheap regex is
# decided in a small Python callback instead of by backtracking.

_MAX_UPSTREAM_MESSAGE = 500
# The shape rules read at most this much of a message (secret removal reads all
# of it, see `sanitize_upstream_message`).
_SCAN_WINDOW = 2 * _MAX_UPSTREAM_MESSAGE

_REDACTED = "[redacted]"
_HOST = "[host]"
_ADDRESS = "[address]"


# scheme://anything up to white space, quotes, angle brackets, parentheses or
# braces; a bracketed IPv6 host is allowed. Trailing sentence punctuation is given
# back. The alternatives start with disjoint characters, so backtracking is linear.
_URL = re.compile(
    r"(?<![\w+.-])[A-Za-z][A-Za-z0-9+.-]{0,31}://"
    r"(?:\[[^\s\]]{0,64}\]|[^\s'\"<>()\[\]{}`\\])*"
    r"(?<![.,;:!?])"
)
# An Authorization-style credential; the callback spares prose ("Basic auth").
_AUTH_VALUE = re.compile(r"\b(?:bearer|basic)\s+([A-Za-z0-9._~+/=*-]+)", re.IGNORECASE)
# [IPv6] or [IPv6%zone], with an optional :port; the callback validates.
_IPV6_BRACKETED = re.compile(r"\[([0-9A-Fa-f:.]{2,64})(?:%[\w-]{1,32})?\](?::\d{1,5})?")
# A bare run of hex digits, colons and dots holding a colon, with an optional
# %zone; the callback decides whether it is an IPv6 address (see the docstring).
_IPV6_BARE = re.compile(r"(?<![\w:.%-])(?=[0-9A-Fa-f.]*+:)([0-9A-Fa-f:.]++)(?:%[\w-]{1,32})?(?![\w-])")
# Dotted quads with an optional :port, also glued to a word by an underscore or a letter on their left
# (`backend_10.0.0.5:8080`) or an underscore on their right; the callback spares versions glued to a letter.
_IPV4 = re.compile(r"(?<![\d.])((?:\d{1,3}\.){3}\d{1,3})(:\d{1,5})?(?![^\W_]|\.\w)")
# A dotted name or a name:port, starting at a token boundary; the callback
# applies the host-name rule. Labels are matched possessively.
_HOST_LIKE = re.compile(
    r"(?<![\w.-])(?=[A-Za-z0-9-]*+[.:])"
    r"(?P<name>[A-Za-z0-9-]++(?:\.[A-Za-z0-9-]++)*+)"
    r"(?::(?P<port>\d{1,5})(?!\w|[.:]\d)|(?![\w-]|\.[\w-]))"
)
# Tokens shaped like API keys: vendor prefixes always; the generic words only
# when a digit follows, so error codes such as `token_limit_exceeded` survive.
_KEY_SHAPED = re.compile(
    r"\b(?:(?:sk|pk|rk|gw)[-_][A-Za-z0-9*_-]{6,}"
    r"|(?:key|api|token)[-_](?=[A-Za-z0-9*_-]*?\d)[A-Za-z0-9*_-]{6,})",
    re.IGNORECASE,
)
# Any long opaque token (hashes, raw keys, session ids).
_OPAQUE = re.compile(r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{32,}+")

_HEX_GROUP = re.compile(r"[0-9A-Fa-f]{1,4}")
_IPV4_TAIL = re.compile(r"(?:\d{1,3}\.){3}\d{1,3}")

# Last labels that make a one-dot name a host: common public TLDs and the
# suffixes used for private names. Country codes that double as file extensions
# or English words (py, rs, sh, md, pl, pt, so, cc, in, it, is, me, to, ...) are
# left out on purpose: `main.py` and `retry.Is` are not hosts.
_HOST_SUFFIXES = frozenset(
    {
        # public
        "com", "net", "org", "edu", "gov", "mil", "int", "io", "ai", "dev", "app", "cloud", "co",
        "us", "uk", "eu", "de", "fr", "nl", "ch", "se", "jp", "cn", "kr", "au", "ca", "br", "ru",
        "info", "biz", "xyz", "tech", "online", "site",
        # private
        "internal", "intranet", "intra", "local", "localdomain", "localhost", "lan", "home", "corp",
        "private", "priv", "svc", "cluster", "consul", "test", "example", "invalid", "arpa",
    }
)


def printable(text: str, limit: int = ECHO_LIMIT) -> str:
    """`text` as an error message quotes it: its first `limit` characters, each one not printable as `?` (escape
    sequences, line breaks), and `...` when cut. The one form every 400 quoting a client's value uses."""
    short = text[:limit]
    if not short.isprintable():
        short = "".join(c if c.isprintable() else "?" for c in short)
    return short + "..." if len(text) > limit else short


def validation_error(exc: Exception) -> tuple[str, str]:
    """A msgspec `ValidationError` as (message, path) a client may be shown, the path without its `$.` (`""`: none).

    msgspec quotes the bad value whole (`Invalid enum value '<a megabyte>'`), an unknown field's name even with its
    control characters: that value is cut to `ECHO_LIMIT` printable characters, the path (what follows the last
    ` - at `$`) to `_PATH_LIMIT`, any other message to `_MESSAGE_LIMIT`. Error path only."""
    text = str(exc)
    message, at, path = text.rpartition(" - at `$")
    if not at or not path.endswith("`"):
        message, path = text, "`"
    return _bounded(message), printable(path[:-1].lstrip("."), _PATH_LIMIT)


def _bounded(message: str) -> str:
    for prefix in _QUOTING:
        if message.startswith(prefix):
            value = message[len(prefix):]
            quote = value[:1]
            if len(value) > 1 and quote in _QUOTES and value.endswith(quote):
                return f"{prefix}{quote}{printable(value[1:-1])}{quote}"
            return prefix + printable(value)
    return printable(message, _MESSAGE_LIMIT)


def sanitize_upstream_message(
    message: object, *, secrets: Iterable[str] = (), public_hosts: Iterable[str] = ()
) -> str:
    """Make an upstream's error message safe to show a client.

    `secrets` are the provider's resolved credential header values (`Bearer sk-...`,
    a raw api-key value); `public_hosts` are host names a client may see (the
    provider's own public API host). Both are optional. A non-string gives "".

    Removed, in this order:

    - every configured secret, by value, anywhere in the whole message (before the
      message is cut, so no cut can leave half of one): the value as given and
      without a `Bearer `/`Basic ` prefix, each character as itself or escaped
      (percent-encoded, JSON `\\uXXXX`/`\\/`, an HTML character reference: an
      encoder escapes some characters and keeps others), also when white space or
      an invisible character (any of those shown as a space below) splits it,
      replaced by `[redacted]`.
      Values shorter than 6 characters are skipped (too many false hits on
      ordinary words). Partially masked echoes are not
      the secret and are not touched by this step (`sk-***1234` still goes below,
      by its key shape; `ending in 1234` stays). Called on an event loop before
      the pattern for these secrets is built (`prepare_secrets`, which providers
      run when they start and before a new token is used), one for up to 256
      characters of secrets is built there (milliseconds), a longer one in a
      worker thread, and meanwhile the secrets are removed as given and a
      message that may hold one escaped (a `%`, `&` or `\\`) is replaced whole.
    - URLs (`scheme://...`) -> `[url]`, whatever their host.
    - `Bearer <token>` / `Basic <token>` -> `[redacted]`, unless the token is plain
      prose: letters only and lower case or shorter than 6 ("Basic auth").
    - IPv6 addresses, bracketed or not, with an optional %zone and :port ->
      `[address]`. A bare candidate must contain a decimal digit and be a valid
      address: hex groups of 1-4 digits, either compressed with exactly one `::`
      (at most 7 groups) or all 8 groups; an embedded IPv4 tail is allowed, as is
      a trailing :port. So `fd00::1:8000`, `2001:db8::5` and `::1` go, while times
      (`10:30`, `10:30:45`: no `::`, too few groups) and code (`a::b`, `std::vector`:
      no digit / not hex) stay.
    - IPv4 addresses with an optional :port -> `[address]` (a four-part version
      number such as `1.2.3.4` looks the same and goes too), also when glued to a
      name by an underscore (`backend_10.0.0.5:8080`, `10.0.0.5_eth0`) or, on its
      left, by a letter, when it is a valid address with a :port or in a private,
      loopback or link-local range (`host10.0.0.5`, `node7.1.2.3:8080`) and the
      letter is not a lone `v`: versions such as `v1.2.3.4`, `v10.0.0.1` and
      `python3.11.4.1` stay.
    - host names -> `[host]` (the :port with them), unless listed in
      `public_hosts` (compared case-insensitively, port or not). A dotted name is a
      host when its last label is 2-24 letters and either that label is a known
      public TLD or private suffix (`com`, `io`, `internal`, `local`, `svc`, ...),
      or the name has at least two dots, is all lower case and has no all-digit
      label. A `name:port` (port of 1-5 digits, name holding a letter) is a host
      when the name is a host by that rule, or the port has 4-5 digits, or the
      name is `localhost` or contains a digit or a hyphen: `vllm-gpu-7:8000`,
      `vllm-0.vllm-headless:8000`, `vllm:8000`, `localhost:80` go; `error:500`,
      `status:429`, `main.py:42` stay. A hyphenated `retry-after:30` goes too:
      that is the price of catching `inference-api:80`.
    - key-shaped tokens (`sk-`, `pk-`, `rk-`, `gw-` + 6 or more characters; `key-`,
      `api-`, `token-` + 6 or more with a digit) and opaque runs of 32 or more
      `[A-Za-z0-9_-]` -> `[redacted]`.

    What survives: sentence ends (`retry.Thanks`), versions (`v1.2.3`), decimals,
    file names (`config.yaml`), model names (`gpt-4o-mini`, `claude-3.5-sonnet`,
    `meta-llama/Llama-3.1-8B`, `llama3:8b`), Python paths with a capital
    (`torch.cuda.OutOfMemoryError`), field paths (`body.messages.0.content`).
    Lower-case dotted names with two or more dots (`openai.types.chat`) cannot be
    told apart from internal host names and are scrubbed; so are dated model names
    of 32 characters or more.

    Only the first 1,000 characters are scanned by the shape rules; when that cut
    falls inside a word, the word is dropped so that no half of an address or key
    survives it. Characters a reader does not see as one (control, format,
    separator, private-use, unassigned and default-ignorable ones: those the
    secret removal reads across) become spaces, runs of white space collapse,
    and the result is at most 500 characters.
    """
    if not isinstance(message, str) or not message:
        return ""
    text = remove_secrets(message, secrets)
    cut_word = len(text) > _SCAN_WINDOW and _in_word(text[_SCAN_WINDOW - 1]) and _in_word(text[_SCAN_WINDOW])
    text = " ".join(spaced(text[:_SCAN_WINDOW]).split())
    if cut_word:  # the window ends inside a word: drop it rather than show half an address or key
        text = text.rpartition(" ")[0]
    public = _host_names(public_hosts)
    text = _URL.sub("[url]", text)
    text = _AUTH_VALUE.sub(_auth_value, text)
    text = _IPV6_BRACKETED.sub(_ipv6_or_keep, text)
    text = _IPV6_BARE.sub(_ipv6_or_keep, text)
    text = _IPV4.sub(_ipv4_or_keep, text)
    text = _HOST_LIKE.sub(lambda match: _host_or_keep(match, public), text)
    text = _KEY_SHAPED.sub(_REDACTED, text)
    text = _OPAQUE.sub(_REDACTED, text)
    return text[:_MAX_UPSTREAM_MESSAGE].rstrip()


def _in_word(char: str) -> bool:
    return char.isprintable() and not char.isspace()


def _host_names(hosts: Iterable[str]) -> frozenset[str]:
    """Lower-case host names; entries may also be given as URLs or host:port."""
    if isinstance(hosts, str):
        hosts = (hosts,)
    names: set[str] = set()
    for entry in hosts:
        if not isinstance(entry, str) or not entry.strip():
            continue
        entry = entry.strip()
        try:
            name = urlsplit(entry if "://" in entry else "//" + entry).hostname
        except ValueError:
            continue
        if name:
            names.add(name.rstrip("."))
    return frozenset(names)


def _auth_value(match: re.Match[str]) -> str:
    value = match[1]
    core = value.rstrip(".,;:!?")
    if not core or (core.isalpha() and (core.islower() or len(core) < 6)):
        return match[0]  # prose: "Bearer token", "Basic auth"
    return _REDACTED + value[len(core):]


def _ipv6_or_keep(match: re.Match[str]) -> str:
    candidate = match[1]
    core = candidate.rstrip(".")
    if not _is_ipv6(core):
        return match[0]
    return _ADDRESS + candidate[len(core):] if match[0][0] != "[" else _ADDRESS


def _is_ipv6(text: str) -> bool:
    """An IPv6 address, optionally followed by :port, holding a decimal digit."""
    if not any(c.isdigit() for c in text):
        return False
    if _is_ipv6_address(text):
        return True
    head, colon, port = text.rpartition(":")
    return bool(colon) and port.isdigit() and len(port) <= 5 and _is_ipv6_address(head)


def _is_ipv6_address(text: str) -> bool:
    if text.count("::") > 1 or ":::" in text:
        return False
    if "." in text:  # embedded IPv4 tail (::ffff:10.0.0.1) counts as two groups
        head, colon, tail = text.rpartition(":")
        if not colon or not _IPV4_TAIL.fullmatch(tail):
            return False
        text = head + ":0:0"
    if "::" in text:
        left, right = text.split("::")
        groups = (left.split(":") if left else []) + (right.split(":") if right else [])
        return len(groups) <= 7 and all(_HEX_GROUP.fullmatch(group) for group in groups)
    groups = text.split(":")
    return len(groups) == 8 and all(_HEX_GROUP.fullmatch(group) for group in groups)


def _ipv4_or_keep(match: re.Match[str]) -> str:
    start, text = match.start(), match.string
    if start and text[start - 1].isalpha():  # glued to a word by a letter: a name with an address, or a version
        lone_v = text[start - 1] in "vV" and (start == 1 or not (text[start - 2].isalnum() or text[start - 2] == "_"))
        try:
            internal = ipaddress.IPv4Address(match[1]).is_private
        except ValueError:  # a number over 255, or a leading zero: not an address
            return match[0]
        if lone_v or not (internal or match[2]):
            return match[0]
    return _ADDRESS


def _host_or_keep(match: re.Match[str], public: frozenset[str]) -> str:
    name, port = match["name"], match["port"]
    lower = name.lower()
    if lower in public or not any(c.isalpha() for c in name):
        return match[0]  # a public host, or a number (time, version, decimal)
    if _is_dotted_host(name):
        return _HOST
    if port is not None and (len(port) >= 4 or lower == "localhost" or any(c.isdigit() or c == "-" for c in name)):
        return _HOST
    return match[0]


def _is_dotted_host(name: str) -> bool:
    labels = name.split(".")
    if len(labels) < 2:
        return False
    last = labels[-1]
    if not (2 <= len(last) <= 24 and last.isascii() and last.isalpha()):
        return False
    if last.lower() in _HOST_SUFFIXES:
        return True
    return len(labels) >= 3 and name.islower() and not any(label.isdigit() for label in labels)
