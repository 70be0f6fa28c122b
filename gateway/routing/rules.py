"""Conditional rules, evaluated before the strategy: the first rule whose conditions all hold wins.

Rules arrive compiled (`policy.compiled.Match`): sets to test membership in, header
names already lower-case bytes, thresholds as ints. Nothing is parsed here. The
facts a rule reads come from the request that is already decoded; the only costly
one, the prompt's token count, is computed at most once per request and only when a
rule that needs it is reached; for a body past `OFF_LOOP_CHARS`, in a thread, before the
rules are matched (`Facts.count_in_thread`, which an async caller awaits first:
`count_first`). The guard and cache stages and the router each match the rules, so the
count is kept on the request (`RequestContext.prompt_tokens`, through `Facts.of`) for
whichever asks next; a guard that rewrites the body forgets it.

Each fact reads the fields of the endpoint the request came in by: a chat's `messages`
and `response_format`; a Responses request's `instructions`, `input` items (their
`input_image` parts) and `text.format`; a completion's `prompt`. A `/v1/messages`
request is already the chat request here (translated at ingress). The token count is
the gateway's one prompt estimate (`accounting.prompt.PromptEstimator.estimate_body`,
the figure token limits reserve with and `count_tokens` answers): message texts with
their overhead, tool definitions and images, so that a rule on the prompt's size sees
what fills the upstream's context.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..accounting.prompt import PromptEstimator, estimate_prompt
from ..auth.keys import VirtualKey
from ..policy.compiled import Match, Rule
from ..schemas.endpoints import Endpoint
from ..telemetry.tokens import TokenCounter
from ..telemetry.usage import OFF_LOOP_CHARS

if TYPE_CHECKING:
    from ..pipeline.context import RequestContext

__all__ = ["Facts", "count_first", "first_match", "matches", "reads_tokens", "rule_alias"]

_JSON_FORMATS = frozenset({"json_object", "json_schema"})
_IMAGE_PARTS = frozenset({"image_url", "input_image"})  # chat's image part, and the Responses API's
# Without a counter (a router made without one): every text at about four characters a token, as a counter with no
# encoding loaded estimates it.
_ROUGH = PromptEstimator(TokenCounter(), keep=False)


class Facts:
    """What rules and sticky assignment may read about one request."""

    __slots__ = ("_ctx", "_prompt_tokens", "body", "endpoint", "headers", "key", "model", "tokens")

    def __init__(
        self, body: dict[str, Any], key: VirtualKey | None, headers: Sequence[tuple[bytes, bytes]],
        tokens: TokenCounter | None, model: str | None = None, ctx: RequestContext | None = None,
        endpoint: Endpoint | None = None,
    ) -> None:
        self.body = body
        # The API the body came in by, whose fields the prompt count reads (`ctx`'s; None: the one its fields name).
        self.endpoint = ctx.endpoint if ctx is not None else endpoint
        self.key = key
        self.headers = headers
        self.tokens = tokens
        self.model = model  # for the tokenizer: the upstream model of the alias asked for
        self._ctx = ctx  # the request whose `prompt_tokens` holds the count (None: kept here, for this one's reader)
        self._prompt_tokens: int | None = None

    @classmethod
    def of(cls, ctx: RequestContext, tokens: TokenCounter | None) -> Facts:
        """The facts of a request being served: its prompt counted at most once for every stage that asks (on
        `ctx`), with the tokenizer of the alias it is routed from (`ctx.route`, the same for every one of them)."""
        route = ctx.route
        return cls(ctx.body, ctx.key, ctx.head.raw_headers, tokens, route.upstream_model if route is not None else None,
                   ctx)

    @property
    def tenant(self) -> str:
        return self.key.tenant if self.key is not None else "anonymous"

    @property
    def key_name(self) -> str | None:
        return self.key.name if self.key is not None else None

    def header(self, name: bytes) -> str | None:
        """A request header's value (`name` lower-case); the first one when repeated. Read as UTF-8, as clients send
        text (a rule's `x-user: ["\u2603"]` matched no request when read as latin-1), else as latin-1 (any bytes)."""
        for raw_name, value in self.headers:
            if raw_name == name:
                try:
                    return value.decode()
                except UnicodeDecodeError:
                    return value.decode("latin-1")
        return None

    @property
    def user(self) -> str | None:
        value = self.body.get("user")
        return value if isinstance(value, str) else None

    def metadata(self, field: str) -> str | None:
        metadata = self.body.get("metadata")
        value = metadata.get(field) if isinstance(metadata, dict) else None
        return value if isinstance(value, str) else None

    @property
    def prompt_tokens(self) -> int:
        """The prompt's token count (`estimate_body`: tiktoken, an estimate without the encoding), counted once."""
        ctx = self._ctx
        count = self._prompt_tokens if ctx is None else ctx.prompt_tokens
        if count is None:
            count = self._count()
            self._keep(count)
        return count

    async def count_in_thread(self) -> None:
        """Count the prompt now, in a thread: tiktoken holds the event loop, not the GIL, and a prompt of a few MB
        takes it seconds, every other request of the process waiting (asked for a body past `OFF_LOOP_CHARS`, as
        the usage count does: `telemetry.usage`)."""
        ctx = self._ctx
        if (self._prompt_tokens if ctx is None else ctx.prompt_tokens) is None:
            self._keep(await asyncio.to_thread(self._count))

    def _keep(self, count: int) -> None:
        if self._ctx is None:
            self._prompt_tokens = count
        else:
            self._ctx.prompt_tokens = count

    def _count(self) -> int:
        if self.tokens is None:
            return _ROUGH.estimate_body(self.body, self.model, self.endpoint)
        return estimate_prompt(self.tokens, self.body, self.model, self.endpoint)

    @property
    def has_tools(self) -> bool:
        """Chat's and the Responses API's `tools` (a Messages request's are chat tools by now), or `functions`."""
        tools = self.body.get("tools") or self.body.get("functions")
        return isinstance(tools, list) and bool(tools)

    @property
    def has_images(self) -> bool:
        """A chat message or a Responses input item has an image part (a part's `type` read only as a string: a
        client's object there is no image, and must not fail the set's look-up)."""
        for message in _messages(self.body):
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list) and any(
                isinstance(part, dict) and isinstance(kind := part.get("type"), str) and kind in _IMAGE_PARTS
                for part in content
            ):
                return True
        return False

    @property
    def json_response(self) -> bool:
        """Chat's `response_format`, or the Responses API's `text.format`, asks for JSON (an object or a schema)."""
        response_format = self.body.get("response_format")
        if response_format is None:
            text = self.body.get("text")
            response_format = text.get("format") if isinstance(text, dict) else None
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        return isinstance(kind, str) and kind in _JSON_FORMATS

    def sticky_value(self, sticky: str) -> str | None:
        """The caller's identity for sticky assignment; None (then drawn at random) when absent."""
        if sticky == "tenant":
            return self.tenant
        if sticky == "key":
            return self.key_name
        if sticky == "user":
            return self.user
        return self.header(sticky.removeprefix("header:").lower().encode("latin-1"))


def _messages(body: dict[str, Any]) -> list[Any]:
    """The messages whose content parts may hold an image: a chat's `messages`, else a Responses request's `input`
    items (an embedding's or a string input has none)."""
    messages = body.get("messages")
    if isinstance(messages, list):
        return messages
    items = body.get("input")
    return items if isinstance(items, list) else []


def matches(match: Match, alias: str, facts: Facts) -> bool:
    """Whether every condition of `match` holds; cheap tests first, the token count last."""
    if match.alias is not None and alias not in match.alias:
        return False
    if match.tenant is not None and facts.tenant not in match.tenant:
        return False
    if match.key is not None and facts.key_name not in match.key:
        return False
    if match.user is not None and facts.user not in match.user:
        return False
    for name, values in match.headers:
        value = facts.header(name)
        if value is None or (values is not None and value not in values):
            return False
    for field, allowed in match.metadata:
        if facts.metadata(field) not in allowed:
            return False
    if match.has_tools is not None and facts.has_tools is not match.has_tools:
        return False
    if match.json_response is not None and facts.json_response is not match.json_response:
        return False
    if match.has_images is not None and facts.has_images is not match.has_images:
        return False
    if match.needs_tokens:
        count = facts.prompt_tokens
        if match.prompt_tokens_over is not None and count <= match.prompt_tokens_over:
            return False
        if match.prompt_tokens_under is not None and count >= match.prompt_tokens_under:
            return False
    return True


def reads_tokens(rules: Sequence[Rule]) -> bool:
    """Whether a rule among `rules` reads the prompt's token count (the only fact worth counting off the loop)."""
    return any(rule.match.needs_tokens for rule in rules)


def count_first(ctx: RequestContext) -> bool:
    """Whether the request's prompt, when a rule about to be matched weighs it (`reads_tokens`), is to be counted in a
    thread first (`await Facts.of(...).count_in_thread()`): not counted yet, and a body past `OFF_LOOP_CHARS`."""
    return ctx.prompt_tokens is None and len(ctx.raw_body) > OFF_LOOP_CHARS


def first_match(rules: Sequence[Rule], alias: str, facts: Facts) -> Rule | None:
    """The first rule that applies to the request: its conditions hold, and, if it sends the request to another
    alias, the caller's key may use that alias (`VirtualKey.allows`, as a budget downgrade asks). A rule whose alias
    the key's `models` exclude is skipped, not applied: else a client meeting its conditions (a header it sends) is
    answered by an alias it may not name. The router, the guard and cache stages and the dry run all ask here, so
    they agree on the rule. A rule with its own targets, or a `deny`, applies to every key."""
    key = facts.key
    for rule in rules:
        if rule.alias is not None and key is not None and not key.allows(rule.alias):
            continue
        if matches(rule.match, alias, facts):
            return rule
    return None


def rule_alias(rules: Sequence[Rule], alias: str, facts: Facts) -> str:
    """The alias a request for `alias` is served by, as far as its rules decide: the one the first rule that applies
    names; `alias` itself when none applies, or when that rule has its own targets or denies (the guard stage and the
    dry run ask which alias's guards run)."""
    rule = first_match(rules, alias, facts)
    return rule.alias if rule is not None and rule.alias is not None else alias
