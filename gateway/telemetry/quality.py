"""Answer quality signals, per alias and target: finish reasons, refusals, empty and truncated answers,
invalid JSON when JSON was asked for, schema violations, malformed tool calls.

Built only when `telemetry.quality.enabled`: off, it is not in the pipeline and a
stream's bytes pass untouched. On, a complete answer is decoded once, and a
stream's chunks are read as they pass (text kept up to `max_text_bytes`, past
which the JSON checks are skipped). Only the first choice is checked; every
choice's finish reason is counted (the reading: `quality_reading`). Responses
answers are read from their `response` object (`quality_responses`). Nothing of
the text is kept or logged: the signals are counters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from ..pipeline.context import Reply, RequestContext
from ..schemas.endpoints import Endpoint
from .answers import Answer, Asked
from .metrics import Metrics
from .quality_reading import (
    CALL_FINISHES,
    JSON_KINDS,
    NOTHING_ASKED,
    PlainStreamQuality,
    StreamQuality,
    add_legacy_call,
    read_payload,
    read_typed,
)
from .quality_responses import ResponsesStreamQuality, answer_of, decode_response, responses_asked
from .refusals import NOT_INITIALS, cannot_become_refusal, looks_like_refusal
from .schema_check import SchemaChecks, load
from .series import Children, loop_value

__all__ = ["Answer", "Asked", "QualitySignals", "chat_asked", "signals_for", "signals_of"]

_decode = msgspec.json.Decoder().decode
_FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "content_filter", "function_call"})


_CHAT, _COMPLETIONS, _RESPONSES = Endpoint.CHAT, Endpoint.COMPLETIONS, Endpoint.RESPONSES
_MAX_SERIES = 10_000  # (alias, target) pairs whose labels are kept; past this, looked up each time


def _parse(text: str) -> tuple[bool, Any]:
    try:
        return True, _decode(text)
    except (msgspec.DecodeError, UnicodeEncodeError):
        return False, None


def chat_asked(request: dict[str, Any]) -> Asked:
    """Chat and completions: `response_format`, `tools` (`{"type": "function", "function": {...}}`, or of another
    type, named in the part of that type: `{"type": "custom", "custom": {"name": ...}}`) and the legacy
    `functions` (`[{"name": ..., "parameters": ...}]`)."""
    if "response_format" not in request and "tools" not in request and "functions" not in request:
        return NOTHING_ASKED  # the common request asks none of them
    response_format = request.get("response_format")
    kind = schema = None
    if isinstance(response_format, dict):
        kind = response_format.get("type")
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
    tools: dict[str, Any] = {}
    names: set[str] = set()
    offered, legacy = request.get("tools"), request.get("functions")
    offered, legacy = offered if isinstance(offered, list) else [], legacy if isinstance(legacy, list) else []
    for tool in offered:
        if not isinstance(tool, dict):
            continue
        function = tool.get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            tools[function["name"]] = function.get("parameters")
            names.add(function["name"])
            continue
        typed = tool.get("type")
        part = tool.get(typed) if isinstance(typed, str) else None
        name = part.get("name") if isinstance(part, dict) else tool.get("name")
        if isinstance(name, str):
            names.add(name)
    for function in legacy:
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            tools.setdefault(function["name"], function.get("parameters"))
            names.add(function["name"])
    return Asked(kind if isinstance(kind, str) else None, schema, tools, frozenset(names), bool(offered or legacy))


def signals_of(answer: Answer, request: dict[str, Any]) -> list[str]:
    """The quality problems of one chat or completions answer, given the request it answers."""
    return signals_for(answer, chat_asked(request))


def signals_for(answer: Answer, asked: Asked) -> list[str]:
    """The quality problems of one answer, given what its request asked (response format and tools)."""
    found: list[str] = []
    text = answer.text[0] if len(answer.text) == 1 else "".join(answer.text)
    reasons = answer.finish_reasons
    if "length" in reasons:
        found.append("truncated")
    if answer.refusal or looks_like_refusal(text):
        found.append("refusal")
    elif ((not text or text.isspace()) and not answer.tool_calls and not answer.overflow  # (a refusal is not empty)
          and "function_call" not in reasons):  # (a legacy call that was not read: `_malformed_tool_call`)
        found.append("empty")
    kind = asked.json_kind
    if kind in JSON_KINDS and not answer.overflow and not answer.tool_calls and text.strip():
        ok, value = _parse(text)
        if not ok:
            found.append("invalid_json")
        elif kind == "json_schema" and isinstance(asked.schema, dict) and (
                SchemaChecks().violates(asked.schema, value, len(text))):  # (bounded: `schema_check`)
            found.append("schema_violation")
    if (answer.tool_calls or "tool_calls" in reasons or "function_call" in reasons) and (
            _malformed_tool_call(answer, asked)):
        found.append("malformed_tool_call")
    return found


def _malformed_tool_call(answer: Answer, asked: Asked) -> bool:
    """A tool call (or a `tool_calls` finish reason: a skimmed stream's calls are not read; a legacy `function_call`,
    or its finish reason, alike) when the request offered no tool; or a function call whose arguments are not a JSON
    object, that names no tool the request offered, or whose arguments do not fit that tool's `parameters`. A call
    of another type (a chat custom tool's: no name nor arguments in `function`, read as [""]) is judged only by the
    first rule."""
    if not asked.offers_tools:
        return True
    names, schemas = asked.names, asked.tools
    checks = SchemaChecks()  # every call's arguments checked within one budget
    for parts in answer.tool_calls.values():
        if len(parts) == 1 and not parts[0]:  # not a function call
            continue
        name, arguments = parts[0], "".join(parts[1:])
        ok, value = _parse(arguments or "{}")
        if not ok or not isinstance(value, dict):
            return True
        if names is not None and name not in names:
            return True
        schema = schemas.get(name)
        if isinstance(schema, dict) and checks.violates(schema, value, len(arguments)):
            return True
    return False


class QualitySignals:
    """Checks each chat, completions or Responses answer (complete or streamed) and counts what it finds; the
    telemetry stage runs `prepare` and `read` in its own frame (one coroutine fewer for a request's task to
    resume through than a stage of its own)."""

    def __init__(self, metrics: Metrics, max_text_bytes: int) -> None:
        self.metrics = metrics
        self.limit = max_text_bytes
        load()  # the schema checks' libraries, imported now rather than on the event loop at the first answer
        # Labels: aliases, targets, closed sets. Counted on the event loop's thread only (`loop_child`).
        self._checked = Children(metrics.quality_checked, loop_only=True)
        self._finish_reasons = Children(metrics.finish_reasons, loop_only=True)
        self._signals = Children(metrics.quality_signals, loop_only=True)
        # (alias, target name) -> (alias label, target label, `checked` counter, finish reason -> counter), the
        # counters as `loop_value`s: this stage lives as long as its policy, so the labels cannot change.
        self._series: dict[tuple[str, str | None], tuple[str, str, Any, dict[str, Any]]] = {}
        # (alias, target name, finish reason) -> the common answer's counters (`count_finish`), `loop_value`s.
        self._plain: dict[tuple[str, str | None, str], tuple[Any, Any, Any]] = {}

    def prepare(self, ctx: RequestContext) -> None:
        """Before the request goes on: a chat or completions answer's choices are to be read."""
        endpoint = ctx.endpoint
        if endpoint is _CHAT or endpoint is _COMPLETIONS:  # (`is`, not a set: an enum's hash is a Python call)
            # The provider's decode reads the choices too (a stream's chunks, or a complete answer's with its
            # usage): no second decode here (set before the body is read: whether it streams is not known yet).
            ctx.read_choices = True

    def read(self, ctx: RequestContext, reply: Reply) -> None:
        """A complete answer (`reply.stream` None; streams: `read_stream`), read and counted now (embeddings: none).

        The common answer first, in line (this runs for every request): a chat answer whose choices the provider
        read (`ctx.read_choices`), to a request that asked for no JSON and offered no tools, with one choice of
        text that cannot be a refusal (so not empty either), no tool calls, no refusal field and a finish
        reason `stop`, or another than `tool_calls` and `function_call` (a call's, a legacy call's, which the typed
        view does not read: the common answer's `stop` passes at the first comparison): no check can fail but
        `truncated` (`length`), so only its finish reason is counted (`count_finish`); what `signals_for` finds is
        the same."""
        read = reply.choices_of
        if read is not None and read[0] is reply.body and reply.status == 200 and ctx.endpoint is _CHAT:
            choices = read[1]
            body = ctx.body
            if len(choices) == 1 and "response_format" not in body and "tools" not in body:
                choice = choices[0]
                message = choice.message
                reason = choice.finish_reason
                if (message is not None and reason is not None and choice.index == 0 and choice.text is None
                        and not message.tool_calls and not message.refusal
                        and (reason == "stop" or reason not in CALL_FINISHES)):
                    content = message.content
                    if content and (content[:1] in NOT_INITIALS or cannot_become_refusal(content)):
                        self.count_finish(ctx, reason)
                        return
        self._read(ctx, reply)

    def read_stream(self, ctx: RequestContext, reply: Reply) -> None:
        """A stream (`reply.stream`), whose chunks are read as they pass and counted at its end.

        The common stream first, in line: a chat stream to a request that asked for no JSON, offered no tools (nor
        legacy `functions`) and asked for one answer (`n`) gets a `PlainStreamQuality`, fed by the provider's decode
        (`ReplyStream.read_choices`) and kept on `ctx.quality_reader` for the telemetry stage to end
        (`PlainStreamQuality.end`) in its own end hook: it is no stream stage (one end hook fewer to run, no
        coroutine for it). Any other stream gets a `StreamQuality` stage (`_read`)."""
        if ctx.endpoint is _CHAT and reply.status == 200:
            body = ctx.body
            if ("response_format" not in body and "tools" not in body and "functions" not in body
                    and ("n" not in body or body["n"] == 1)):
                plain = PlainStreamQuality(self)
                if reply.stream.read_choices(plain):  # type: ignore[union-attr]
                    ctx.quality_reader = plain
                    return
        self._read(ctx, reply)

    def _read(self, ctx: RequestContext, reply: Reply) -> None:
        """`read` and `read_stream`, for every answer but the common ones."""
        if reply.status != 200:
            return
        endpoint = ctx.endpoint
        if endpoint is _RESPONSES:
            self._responses(ctx, reply)
            return
        chat = endpoint is _CHAT
        if not chat and endpoint is not _COMPLETIONS:  # embeddings have no text
            return
        stream = reply.stream
        if stream is not None:
            reader = StreamQuality(self, chat_asked(ctx.body), chat)
            if chat and "functions" in ctx.body:  # a legacy call's pieces are in the chunks' payloads only
                reader.legacy = True
            elif stream.read_choices(reader):
                reader.reads_events = False
            stream.add(reader)
        elif reply.body is not None:
            read = reply.choices_of
            asked = chat_asked(ctx.body)
            answer = Answer()
            if read is not None and read[0] is reply.body:  # the provider read them (`ctx.read_choices`)
                read_typed(answer, read[1], chat, self.limit)
            else:
                try:
                    read_payload(answer, reply.body, chat, "message" if chat else "_", self.limit)
                except msgspec.DecodeError:
                    return
            if chat and not answer.tool_calls and (not answer.size or "function_call" in answer.finish_reasons):
                # a legacy call's candidate (no text, or that finish reason): read apart, as no typed view holds it
                add_legacy_call(answer, reply.body, self.limit)
            self.count(ctx, answer, asked)

    def count_finish(self, ctx: RequestContext, reason: str) -> None:
        """`counts(ctx, (reason,), ("truncated",) if reason == "length" else ())`, with the counters looked up once
        per alias, target and finish reason (`_plain`)."""
        route, target = ctx.route, ctx.target
        named = (route.alias if route is not None else "unknown", target.name if target is not None else None, reason)
        found = self._plain.get(named)
        if found is None:
            found = self._plain_counters(ctx, named)
        checked, counted, truncated = found
        checked._value += 1  # (`loop_value`s: no call)
        counted._value += 1
        if truncated is not None:
            truncated._value += 1

    def _plain_counters(self, ctx: RequestContext, named: tuple[str, str | None, str]) -> tuple[Any, Any, Any]:
        labels = ctx.runtime.policy.labels
        model, target = labels.alias(named[0]), labels.target(named[1])
        reason = named[2] if named[2] in _FINISH_REASONS else "other"  # an upstream's odd reasons: one label
        found = (loop_value(self._checked(model, target)), loop_value(self._finish_reasons(model, target, reason)),
                 loop_value(self._signals(model, target, "truncated")) if named[2] == "length" else None)
        if len(self._plain) < _MAX_SERIES:
            self._plain[named] = found
        return found

    def _responses(self, ctx: RequestContext, reply: Reply) -> None:
        """A Responses answer: its `response` object (`quality_responses`), complete or at a stream's end."""
        if reply.stream is not None:
            reply.stream.add(ResponsesStreamQuality(self))
        elif reply.body is not None:
            try:
                answer = answer_of(decode_response(reply.body), self.limit)
            except (msgspec.DecodeError, msgspec.ValidationError):
                return
            if answer is not None:
                self.count(ctx, answer, responses_asked(ctx.body))

    def count(self, ctx: RequestContext, answer: Answer, asked: Asked) -> None:
        """One answer checked: its finish reasons and the problems found (`signals_for`) counted."""
        self.counts(ctx, answer.finish_reasons, signals_for(answer, asked))

    def counts(self, ctx: RequestContext, finish_reasons: Sequence[str], signals: Sequence[str]) -> None:
        """One answer checked, with these finish reasons and these problems."""
        route = ctx.route  # `ctx.alias_label`, in line
        named = (route.alias if route is not None else "unknown", ctx.target.name if ctx.target is not None else None)
        found = self._series.get(named)
        if found is None:  # the labels and their children, once per alias and target
            labels = ctx.runtime.policy.labels
            model, target = labels.alias(named[0]), labels.target(named[1])
            found = (model, target, loop_value(self._checked(model, target)), {})
            if len(self._series) < _MAX_SERIES:
                self._series[named] = found
        model, target, checked, reasons = found
        checked._value += 1  # (`loop_value`: no call)
        for reason in finish_reasons:
            label = reason if reason in _FINISH_REASONS else "other"  # an upstream's odd reasons: one label
            counted = reasons.get(label)
            if counted is None:
                counted = reasons[label] = loop_value(self._finish_reasons(model, target, label))
            counted._value += 1
        for signal in signals:
            self._signals(model, target, signal).inc()
