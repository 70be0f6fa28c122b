"""The cache key: everything that changes the answer, and nothing that does not.

The key is the SHA-256 of one msgpack array: a format tag, the tenant, the alias's
answer basis (`answer_basis`: what of the policy makes its answers, never its
cache settings), the endpoint, the alias with the targets it may reach, and the
request body minus the fields below. msgpack arrays and strings carry their lengths, so
the encoding is prefix-free (no two different inputs give the same bytes). The
body's top-level fields are sorted by name, so the order in which a client wrote
them does not matter; nested objects keep the order they were written in: a JSON
schema's `properties` are generated in that order (OpenAI's structured outputs),
so `{reasoning, answer}` and `{answer, reasoning}` are two answers. An integer
msgpack cannot hold (past 64 bits, which JSON allows) is keyed as its decimal
digits in a msgpack extension type of its own, which no other value encodes to.

What is left out, on purpose (`EXCLUDED`), and why:

* `model`: replaced by the resolved alias and its target set (an alias that now
  points elsewhere gets new keys; its answer basis changes too);
* `stream`, `stream_options`: how the answer is delivered, not what it is (a
  streamed answer serves a non-streamed request and the other way round);
* `user`, `metadata`, `store`, `prompt_cache_key`, `safety_identifier`: tags for
  the provider's abuse monitoring, logs and its own prompt cache, not inputs of
  the generation.

Everything else is in, unknown fields included: a field the gateway does not
know might change the answer, so it must split the key (a miss is safe, a wrong
hit is not). Text is keyed as sent, after the input guards rewrote it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

import msgspec

from ..policy.compiled import ModelRoute, ProviderConfig, Rule, Target
from ..schemas.endpoints import Endpoint

__all__ = ["EXCLUDED", "KEY_FORMAT", "SEMANTIC_TEXT_FIELDS", "answer_basis", "cache_key", "polarity", "semantic_scope",
           "target_basis"]

# 3: the alias's answer basis in place of the policy version; 2: nested objects in their own order, big integers
# (1 sorted every map)
KEY_FORMAT = "gw-cache-3"
EXCLUDED = frozenset({
    "model", "stream", "stream_options", "user", "metadata", "store", "prompt_cache_key", "safety_identifier",
})
# The prompt's text, which the semantic cache compares by meaning; every other field must match exactly.
SEMANTIC_TEXT_FIELDS = frozenset({"messages", "prompt"})
_SCOPE_EXCLUDED = EXCLUDED | SEMANTIC_TEXT_FIELDS

_encode = msgspec.msgpack.Encoder().encode  # maps in the order given: the top level is sorted by `_fields`
_BIG_INT = 1  # the msgpack extension type of an integer past 64 bits
_NUMBER = re.compile(r"[-\u2212]?\d+")  # a digit run and its sign: -5 is not 5 (U+2212, the minus sign, as "-")
# "not", "n't" and "cannot" count as one word; words that start with un-, non-, dis- (unsafe, uninstall, disable)
# count as they are, the prefix written with a hyphen or not ("non-toxic" is "nontoxic"): a hyphen-minus, U+2010,
# the non-breaking U+2011, or a soft hyphen (U+00AD, which the embedder's tokenizer drops).
_HYPHENS = "-\u00ad\u2010\u2011"
_NEGATION = re.compile(r"n['\u2019]t\b|\b(?:not|no|never|none|nothing|nobody|nowhere|neither|nor|cannot|without)\b"
                       rf"|\b(?:un|non|dis)[{_HYPHENS}]?[a-z]{{3,}}", re.IGNORECASE)
_NOT = frozenset({"n't", "n\u2019t", "cannot"})
_UNHYPHENATED = str.maketrans("", "", _HYPHENS)


def _digest(parts: list[Any]) -> str:
    try:
        packed = _encode(parts)
    except OverflowError:  # an integer msgpack cannot hold: the rare request that has one pays a second pass
        packed = _encode(_widened(parts))
    return hashlib.sha256(packed).hexdigest()


def _widened(value: Any) -> Any:
    """`value` with every integer past 64 bits as an extension value of its decimal digits."""
    if type(value) is int:
        return value if -(1 << 63) <= value < (1 << 64) else msgspec.msgpack.Ext(_BIG_INT, str(value).encode())
    if isinstance(value, dict):
        return {name: _widened(item) for name, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_widened(item) for item in value]
    return value


def _fields(body: dict[str, Any], leave_out: frozenset[str]) -> dict[str, Any]:
    """The body's fields but `leave_out`, the top level sorted by name (nested objects as written)."""
    return {name: body[name] for name in sorted(body) if name not in leave_out}


def cache_key(tenant: str, basis: str, endpoint: Endpoint, alias: str, targets: tuple[str, ...],
              body: dict[str, Any]) -> str:
    """The exact key of one request (hex SHA-256); `basis`: its plan's `answer_basis`."""
    return _digest([KEY_FORMAT, tenant, basis, endpoint.label, alias, targets, _fields(body, EXCLUDED)])


def answer_basis(models: Mapping[str, ModelRoute], providers: Mapping[str, ProviderConfig], alias: str,
                 rule: Rule | None, *more: Any) -> str:
    """What of the policy makes the answers of `alias` when `rule` applies (None: no rule), as a hex digest: a
    reload that changes any of it starts fresh keys for the alias, one that changes nothing of it keeps them.

    That is every target the request may reach: the route the rule sends it to (its own targets, another alias,
    or the alias itself) and, followed through, each `context_fallback`; of each target, `target_basis`. Not in
    it: the alias's `cache:` block (a `write-only` fill is served once the mode is `on`, an `on` cache is frozen
    by `read-only`, replicas in different modes share entries), weights, strategy, retries, timeouts, prices,
    limits, budgets, keys, and guards (an input guard's rewrite is keyed as the text it forwards; an answer a
    guard changed is never stored, and a hit passes the output guards of the policy serving it). `more`: what
    else the caller keys by (the semantic cache's embedder). Computed once per policy load, not per request.
    """
    route = rule.route if rule is not None and rule.route is not None else \
        models[rule.alias if rule is not None and rule.alias is not None else alias]
    reach: list[Any] = []
    seen: set[str] = set()
    while True:
        reach.append([target_basis(target, providers[target.provider]) for target in route.targets])
        seen.add(route.alias)
        fallback = route.context_fallback
        if fallback is None or fallback in seen or fallback not in models:
            break
        route = models[fallback]
    return _digest([KEY_FORMAT + "/basis", reach, list(more)])


def target_basis(target: Target, provider: ProviderConfig) -> list[Any]:
    """What of one target makes its answers: its provider (kind, URL, query, options, the headers it sends but its
    credentials: rotating a key changes no answer) and model, the fields it adds to the body (`extra_body`), and
    whether its streams ask for usage (a stored stream holds that chunk)."""
    secrets = provider.secrets
    headers = sorted((name.lower(), value) for name, value in provider.headers.items()
                     if not any(secret and secret in value for secret in secrets))
    options = None if provider.options is None else msgspec.to_builtins(provider.options)
    return [provider.name, provider.kind, provider.base_url, sorted(provider.query.items()), headers, options,
            provider.stream_usage, target.upstream_model, msgspec.to_builtins(dict(target.extra_body))]


def polarity(text: str) -> tuple[list[str], list[str]]:
    """What a semantic match must share word for word: the numbers (digit runs with a minus sign written against
    them, in order: "9.11 or 9.9" is not "9.9 or 9.11", "-5 degrees" not "5 degrees") and the negations as a
    multiset (`not`/`n't`/`cannot` as one word, `no`, `never`, `without`..., and words of un-, non-, dis- and
    three letters more, as written but for a hyphen after the prefix: `unsafe`, `disable`, `non-toxic` (as
    `nontoxic`), but also `under`). The embedding barely tells "safe" from "unsafe" or 100 from 250
    (docs/cache.md)."""
    negations = sorted(_negation(word) for word in _NEGATION.findall(text))
    numbers = _NUMBER.findall(text)
    if "\u2212" in text:
        numbers = [number.replace("\u2212", "-") for number in numbers]
    return numbers, negations


def _negation(word: str) -> str:
    """How a negation counts: `not` for its contractions, other words lower-cased and without their hyphen."""
    word = word.lower()
    return "not" if word in _NOT else word.translate(_UNHYPHENATED)


def semantic_scope(tenant: str, basis: str, endpoint: Endpoint, alias: str, targets: tuple[str, ...],
                   body: dict[str, Any]) -> tuple[str, str] | None:
    """The namespace a semantic match is looked for in, and the text compared by meaning; None: not comparable.

    Only the last message (or the prompt) is compared by meaning; everything else must
    be equal: tenant, alias, sampling parameters, tools, response format, and every
    earlier message word for word (a system prompt or a conversation so far). So a
    paraphrase never borrows an answer made under other parameters or in another
    conversation. A last message that is not plain text (an image) is not comparable. The text's numbers and
    negations (`polarity`) are part of the scope: prompts that differ in them are never compared.
    """
    fields = _fields(body, _SCOPE_EXCLUDED)
    if endpoint is Endpoint.CHAT:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
            return None
        last = messages[-1]
        text = last.get("content")
        if not isinstance(text, str) or set(last) - {"role", "content"}:
            return None
        context: Any = [messages[:-1], last.get("role")]
    elif endpoint is Endpoint.COMPLETIONS:
        text = body.get("prompt")
        if not isinstance(text, str):
            return None
        context = None
    else:
        return None
    scope = _digest([KEY_FORMAT + "/semantic", tenant, basis, endpoint.label, alias, targets, fields, context,
                     polarity(text)])
    return scope, text
