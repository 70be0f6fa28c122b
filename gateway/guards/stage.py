"""The guard stage: input guards before the upstream call, output guards on its answer.

It sits after `Authorize` (the tenant and alias are known, so the right guards
apply) and before target selection: a blocked request never reaches an
upstream. It is built only when the policy defines guards, so a gateway without
guards pays nothing, not even a stage call; and a request whose (tenant, alias)
has no guard passes straight through, its stream bytes untouched.

The guards are those of the alias that will serve the request (`GuardRuntime.served`),
not only of the one it named: when that alias has routing rules, the stage finds the
rule the router will apply (`rule_alias`: `first_match` on the same facts, the body as the guards
leave it) and takes the guards of the alias it sends the request to. A rule with its
own targets keeps the named alias's guards; a `deny` rule is the router's to refuse. A
rule on the prompt's size has a body past `OFF_LOOP_CHARS` counted in a thread first
(`_counted`), and the count is the request's (`ctx.prompt_tokens`: the cache stage and
the router read it), forgotten when a guard rewrites the body.

Input: every text a request carries (found by `texts.py`: message text parts, a message's
read as the one text the model reads (`joined.py`), tool call arguments, tool results,
a completion's prompt, an embedding's input) is checked and rewritten in `ctx.body`, the dict
that is forwarded. Output: a complete answer is decoded, checked and re-encoded (a Responses
answer by `responses.py`); a stream gets a `StreamGuard`, which speaks the endpoint's chunk format. An error
raised for the request (an upstream's 4xx or 5xx, a 200 that is an error, a stream that failed before it began)
loses the upstream's own words when an output guard enforces (`stream.withhold`): they may quote the answer; so
does a complete answer's choice's `error`. A complete answer passes, under an enforcing guard, only the fields the
gateway knows, as a stream's chunks do (`answer_fields.CHUNK_FIELDS`, `ANSWER_CHOICE_FIELDS`, `DELTA_FIELDS`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any, TypeVar

import msgspec

from ..errors import ContentPolicyViolation, GatewayError, InvalidRequest
from ..pipeline.context import Reply, RequestContext
from ..pipeline.runner import Next
from ..policy.compiled import ModelRoute
from ..policy.guard_schema import StreamScanSpec
from ..routing.rules import Facts, count_first, reads_tokens, rule_alias
from ..schemas.endpoints import Endpoint
from ..telemetry.tokens import TokenCounter
from .answer_fields import (
    ANSWER_CHOICE_FIELDS,
    CHUNK_FIELDS,
    DELTA_FIELDS,
    drop_unknown,
    shape_beside,
    shape_content,
    withheld_error,
)
from .base import Finding, Guard
from .joined import Joined
from .pool import PER_TEXT, YIELD_CHARS
from .responses import guard_answer
from .runtime import GuardRuntime, GuardSet
from .session import GuardSession
from .stream import StreamGuard, enforcing, withhold
from .texts import BESIDE_CONTENT, answer_refs, input_texts, refuse_unreadable
from .verdict import apply

__all__ = ["GuardStage"]

HEADER = b"x-gateway-guards"
_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode
# The texts of a request found between two yields to the loop while they are listed: finding one costs 2-4 us, so
# listing 128,000 at once held the loop 0.4 s before the first was checked.
FOUND_TEXTS = 1024
T = TypeVar("T")
_SETTLE = 4  # guard sets applied to a request whose redactions change the rule that serves it (a backstop)


def _blocked(place: str, findings: list[Finding]) -> ContentPolicyViolation:
    guards = sorted({f.guard for f in findings})
    types = sorted({f.type for f in findings})
    return ContentPolicyViolation(
        f"The {place} was blocked by the gateway's content policy: guard {', '.join(guards)} "
        f"found {', '.join(types)}.",
    )


class GuardStage:
    name = "guards"

    def __init__(self, guards: GuardRuntime, stream_spec: StreamScanSpec, tokens: TokenCounter | None = None) -> None:
        self.guards = guards
        self.stream_spec = stream_spec
        self.tokens = tokens  # the router's counter: a rule on the prompt's size decides here as in `select`
        self._moves: dict[tuple[str, str], bool] = {}  # (tenant, alias): whether its rules may change its guards

    def __call__(self, ctx: RequestContext, call_next: Next) -> Awaitable[Reply]:
        """An alias without guards passes the request on unawaited (one coroutine frame fewer: see
        `pipeline.runner`); a guarded one goes through `_guarded`."""
        guard_set = self._served(ctx)
        if guard_set is None:
            return self._counted(ctx, call_next)
        if not guard_set:
            return call_next(ctx)
        return self._guarded(ctx, call_next, guard_set)

    async def _counted(self, ctx: RequestContext, call_next: Next) -> Reply:
        """A large prompt a rule weighs: counted in a thread, then served as any request."""
        await Facts.of(ctx, self.tokens).count_in_thread()
        guard_set = self._served(ctx)
        assert guard_set is not None  # (counted now)
        if not guard_set:
            return await call_next(ctx)
        return await self._guarded(ctx, call_next, guard_set)

    async def _served_counted(self, ctx: RequestContext) -> GuardSet:
        """`_served`, the prompt counted in a thread first when it asks for that."""
        guard_set = self._served(ctx)
        if guard_set is None:
            await Facts.of(ctx, self.tokens).count_in_thread()
            guard_set = self._served(ctx)
            assert guard_set is not None  # (counted now)
        return guard_set

    def _served(self, ctx: RequestContext) -> GuardSet | None:
        """The guards of the alias that will serve the request, as the body stands (see the module's docstring); None
        when that takes counting a prompt past `OFF_LOOP_CHARS` (`count_first`), to be counted in a thread first."""
        route = ctx.route
        assert route is not None
        alias = route.alias
        models = ctx.runtime.policy.models
        named = self.guards.served(ctx.tenant, alias, models)
        # (most aliases have no rules, and most rules keep the guards: no facts, no token count for them)
        if route.rules and self._rules_move(ctx.tenant, route, named, models):
            if count_first(ctx) and reads_tokens(route.rules):
                return None
            served = rule_alias(route.rules, alias, Facts.of(ctx, self.tokens))
            if served != alias:
                return self.guards.served(ctx.tenant, served, models)
        return named

    def _rules_move(self, tenant: str, route: ModelRoute, named: GuardSet, models: Mapping[str, ModelRoute]) -> bool:
        """Whether a rule of `route` may send a request of `tenant` to an alias with other guards (kept per tenant
        and alias: the policy's finite sets)."""
        key = (tenant, route.alias)
        moves = self._moves.get(key)
        if moves is None:
            moves = self._moves[key] = any(
                rule.alias is not None and self.guards.served(tenant, rule.alias, models) != named
                for rule in route.rules)
        return moves

    async def _guarded(self, ctx: RequestContext, call_next: Next, guard_set: GuardSet) -> Reply:
        assert ctx.route is not None
        session = GuardSession(self.guards.metrics)
        ctx.guard_session = session
        try:
            guard_set = await self._settled(ctx, guard_set, session)
        except ContentPolicyViolation as exc:
            header = session.header()
            exc.headers = {HEADER.decode(): header.decode()}
            # On the context too, for the access line (an error answer sends only the exception's headers).
            ctx.headers = [*(ctx.headers or ()), (HEADER, header)]
            raise
        session.pseudonyms.seal()  # (a placeholder made from now on is the answer's own: never restored)
        try:
            reply = await call_next(ctx)
        except GatewayError as exc:
            if exc.bare is not None and enforcing(guard_set.output):  # (an error that quotes an upstream)
                withhold(exc)
            raise
        if reply.stream is not None:
            if guard_set.output or session.pseudonyms:
                reply.stream.add(StreamGuard(self.guards, guard_set.output, session, self.stream_spec,
                                             ctx.endpoint, ctx.route.alias))
        elif reply.body is not None and reply.status == 200 and (guard_set.output or session.pseudonyms):
            _expect(session, guard_set.output)  # (a stream's header leaves before its output is read: input only)
            reply.body = await self._output(ctx, guard_set, session, reply.body)
        header = session.header()
        if header:  # (none for a stream whose guards are all on its output)
            ctx.headers = [*(ctx.headers or ()), (HEADER, header)]
        if reply.stream is not None:  # listed after the header, in the access line (made at the stream's end)
            _expect(session, guard_set.output)
        return reply

    async def _settled(self, ctx: RequestContext, guard_set: GuardSet, session: GuardSession) -> GuardSet:
        """Run `guard_set`'s input guards; when they changed the body of an alias with rules, the rule that serves it
        may have changed too (a redaction changes the prompt's token count): run the guards of the one it names now,
        until the body leaves a set's guards unchanged or the set is the one just run. The set that serves it."""
        assert ctx.route is not None
        for _ in range(_SETTLE):
            if guard_set.pseudonymizing:
                if ctx.endpoint is Endpoint.RESPONSES:
                    _refuse_upstream_history(ctx.body)
                session.pseudonyms.reserve(ctx.raw_body)  # (names the request holds are never issued)
            _expect(session, (*guard_set.limits, *guard_set.input))
            changed = await self._input(ctx, guard_set, session)
            if changed:
                ctx.prompt_tokens = None  # counted on the body before: a rule weighs the new one
            if not changed or not ctx.route.rules:
                return guard_set
            now = await self._served_counted(ctx)
            if now is guard_set:
                return guard_set
            guard_set = now
        raise ContentPolicyViolation("The request was blocked by the gateway's content policy: its guards' changes "
                                     "kept moving it to another alias with other guards.")

    async def _input(self, ctx: RequestContext, guard_set: GuardSet, session: GuardSession) -> bool:
        """Check and rewrite the request's texts; whether any was rewritten."""
        if guard_set.input or guard_set.limits:
            refuse_unreadable(ctx.endpoint, ctx.body, guard_set)
        refs = await _gathered(input_texts(ctx.endpoint, ctx.body))
        if guard_set.limits:
            texts = [container[key] for container, key, _ in refs]
            messages = _messages(ctx.endpoint, ctx.body)
            for limit in guard_set.limits:
                found = await limit.check_request_off_loop(texts, messages)
                session.note_findings(found, limit.mode, "input")
                if limit.mode == "enforce" and any(f.action == "block" for f in found):
                    raise _blocked("request", found)
        if not guard_set.input:
            return False
        blocking: list[Finding] = []
        changed = False
        checked = 0  # characters (and `PER_TEXT` per text) since the last yield to the loop (`YIELD_CHARS`)
        for container, key, where in refs:
            text = container[key]
            seams = container.seams if type(container) is Joined else ()  # (an image between text parts: `joined.py`)
            verdict = await self.guards.check(guard_set.input, text, where, session, seams)
            if verdict.decision == "block":
                blocking.extend(verdict.blocking)
            elif verdict.decision == "redact":
                if type(container) is Joined:  # a message's text parts read as one (`joined.py`)
                    container.rewrite(verdict.text, verdict.findings, session.pseudonyms)
                else:
                    container[key] = verdict.text
                changed = True
            checked += len(text) + PER_TEXT
            if checked >= YIELD_CHARS:
                checked = 0
                await asyncio.sleep(0)
        if blocking:
            raise _blocked("request", blocking)
        return changed

    async def _output(self, ctx: RequestContext, guard_set: GuardSet, session: GuardSession, body: bytes) -> bytes:
        try:
            data = _decode(body)
        except msgspec.DecodeError:
            return body
        if ctx.endpoint is Endpoint.RESPONSES:
            if not isinstance(data, dict):
                return body
            await guard_answer(self.guards, guard_set.output, session, data)
            return _encode(data)
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list):
            return body
        chat = ctx.endpoint is Endpoint.CHAT
        scrub = any(guard.mode == "enforce" for guard in guard_set.output)
        withholds = enforcing(guard_set.output)
        if scrub:  # only the fields the gateway knows: any other may hold text no guard reads (`answer_fields`)
            drop_unknown(data, CHUNK_FIELDS)
        key = "content" if chat else "text"
        checked = 0  # as `_input`'s: `n` choices of long answers, or of many tool calls
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            if scrub:
                if choice.get("logprobs") is not None:  # their tokens are the upstream's text: a redacted or
                    choice["logprobs"] = None  # blocked value would leave in them (a stream's are emptied too)
                # a stray copy of the text beside the one read (a `delta`, a `text`), or any field not known
                drop_unknown(choice, ANSWER_CHOICE_FIELDS[chat])
                if withholds and "error" in choice:  # (OpenRouter's, `finish_reason: "error"`: may quote the answer)
                    choice["error"] = withheld_error(choice["error"])
            holder = choice.get("message") if chat else choice
            if not isinstance(holder, dict):
                continue
            shape_content(holder, key, chat, scrub)  # (a list of parts read; another type dropped)
            if chat:
                shape_beside(holder, scrub)
                if scrub:  # (OpenRouter's `reasoning_details` among the fields dropped)
                    drop_unknown(holder, DELTA_FIELDS)
            for container, field, where, json_string in answer_refs(holder, key, chat):
                text = container[field]
                checked += len(text) + PER_TEXT
                if checked >= YIELD_CHARS:
                    checked = 0
                    await asyncio.sleep(0)
                enforced: list[Finding] = []
                if guard_set.output:
                    enforced, shadow = await self.guards.detect(guard_set.output, text, where)
                    session.note_findings(enforced, "enforce", "output")
                    session.note_findings(shadow, "shadow", "output")
                    if any(f.action == "block" for f in enforced):
                        holder[key] = None if chat else ""
                        for dropped in ("tool_calls", "function_call", "audio", "reasoning_blocks", *BESIDE_CONTENT):
                            holder.pop(dropped, None)
                        choice["finish_reason"] = "content_filter"
                        break
                # (never into the reasoning: Anthropic signed it as written, and it comes back unread: `pseudonyms.py`)
                restore = None if where.part == "reasoning" else partial(session.pseudonyms.restore,
                                                                         json_string=json_string)
                container[field] = apply(text, enforced, session.pseudonyms, restore)
        return _encode(data)


async def _gathered(found: Iterable[T]) -> list[T]:
    """`found` as a list, yielding to the loop after each `FOUND_TEXTS` of it (a request of a few texts never)."""
    gathered: list[T] = []
    for item in found:
        gathered.append(item)
        if len(gathered) % FOUND_TEXTS == 0:
            await asyncio.sleep(0)
    return gathered


def _refuse_upstream_history(body: Mapping[str, object]) -> None:
    """Refuse a Responses request that continues a conversation kept at the upstream (`previous_response_id`,
    `conversation`) when its guards pseudonymize: pseudonyms are numbered per request, so this turn's
    `<EMAIL_ADDRESS_1>` would be another value than the earlier turn's, and the answer would be restored wrong."""
    for param in ("previous_response_id", "conversation"):
        if body.get(param):
            raise InvalidRequest(
                f"`{param}` cannot be used on this model: its guards pseudonymize personal data, and pseudonyms are "
                "numbered per request, so the earlier turns kept at the upstream would not match this one's. Send "
                "the whole conversation in `input` instead (with `store: false`).", param=param)


def _messages(endpoint: Endpoint, body: dict[str, Any]) -> int:
    """How many messages a request holds, as `max_messages` counts them: a chat's messages (its system message one of
    them; a `/v1/messages` request arrives as chat, its `system` one of them too); a Responses request's `input` items
    (an input string: one) and its `instructions` as one more, the chat's system message; a completion's prompts and
    an embedding's inputs (a string: one). Never the texts: a message of three text parts is one message."""
    if endpoint is Endpoint.CHAT:
        return len(body.get("messages") or ())
    value = body.get("prompt" if endpoint is Endpoint.COMPLETIONS else "input")
    count = 1 if isinstance(value, str) else len(value) if isinstance(value, list) else 0
    if endpoint is Endpoint.RESPONSES:
        instructions = body.get("instructions")
        count += isinstance(instructions, str) and bool(instructions)
    return count


def _expect(session: GuardSession, guards: Sequence[Guard]) -> None:
    """Name each guard in the request's header before it runs."""
    for guard in guards:
        session.expect(guard.name, str(getattr(guard, "action", "block")))
