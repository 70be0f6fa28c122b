"""Where the texts of a request and of a complete chat answer are: what the guards read and write back.

A text the guards do not find is a text they let through unread, so every shape a client or an upstream
may use is found here, or refused when it cannot be read (a prompt sent as token ids, under input
guards). Two shapes are normalized so that they can be read: tool call arguments sent as a JSON
object instead of a string become that object's JSON (the form OpenAI's API takes and gives), and an
answer's content sent as a list of parts becomes OpenAI's fields (`spread_parts`). A request's text parts of one
message are read as one text, joined as an answer's are, across an image between them too (`_parts`, `joined.py`): the
model reads them so, and a value cut across two parts was found in neither.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgspec

from ..errors import InvalidRequest
from ..schemas.endpoints import Endpoint
from .base import Part, Where, enforcing
from .joined import TEXT, Joined
from .window import ANSWER, REASONING, TOOL

__all__ = ["BESIDE_CONTENT", "answer_refs", "input_texts", "joined_parts", "refuse_unreadable", "spread_parts",
           "text_arguments"]

_encode = msgspec.json.Encoder().encode
Ref = tuple[Any, Any, Where]  # (container, key, where): container[key] is the text
# Text fields of a chat answer's message (and of a chunk's delta) beside `content`, checked as it is: the refusal,
# and the reasoning that OpenAI-compatible servers of reasoning models return (`reasoning_content`: DeepSeek, vLLM;
# `reasoning`: OpenRouter, Groq, Ollama), which often repeats what the prompt held. By field, where its text is.
BESIDE_CONTENT: dict[str, Where] = {"refusal": ANSWER, "reasoning_content": REASONING, "reasoning": REASONING}
# The fields of an answer (and of a chunk) no guard reads (OpenRouter's `reasoning_details`, a `message` beside a
# chunk's `delta`, an upstream's note) are not listed here: an enforcing guard passes only the fields the gateway
# knows (`answer_fields.CHUNK_FIELDS`, `CHOICE_FIELDS`, `DELTA_FIELDS`).
_PROMPT_FIELDS: dict[Endpoint, tuple[str, Part]] = {Endpoint.COMPLETIONS: ("prompt", "prompt"),
                                                    Endpoint.EMBEDDINGS: ("input", "embedding_input")}


def text_arguments(function: dict[str, Any], key: str = "arguments") -> bool:
    """Whether `function[key]` is a string, once arguments sent as a JSON object or array are made one."""
    value = function.get(key)
    if isinstance(value, dict | list):
        function[key] = value = _encode(value).decode()
    return isinstance(value, str)


def joined_parts(parts: list[Any]) -> str:
    """The text of a list of content parts: its text parts', joined (what a client shows of it)."""
    return "".join(part["text"] for part in parts
                   if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str))


def spread_parts(holder: dict[str, Any], key: str) -> None:
    """A chat message's (or delta's) `content` given as a list of parts, as OpenAI's fields, where the guards
    read them: the text parts' text as the content, a refusal part's as `refusal`, a thinking part's (Mistral's:
    a string, or a list of text parts) as `reasoning_content`, each after what that field already holds. Other
    parts (an image) are dropped: no guard can read them."""
    texts: list[str] = []
    refusals: list[str] = []
    thoughts: list[str] = []
    for part in holder[key]:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            refusals.append(part["refusal"])
        elif kind == "thinking":
            inner = part.get("thinking")
            thoughts.append(inner if isinstance(inner, str) else joined_parts(inner) if isinstance(inner, list) else "")
    holder[key] = "".join(texts)
    for field, found in (("refusal", refusals), ("reasoning_content", thoughts)):
        if any(found):
            before = holder.get(field)
            holder[field] = (before if isinstance(before, str) else "") + "".join(found)


def input_texts(endpoint: Endpoint, body: dict[str, Any]) -> Iterator[Ref]:
    """Every text of a request, as a place it can be written back to."""
    if endpoint is Endpoint.CHAT:
        yield from _chat_texts(body)
    elif endpoint is Endpoint.RESPONSES:
        yield from _responses_texts(body)
    else:
        field, part = _PROMPT_FIELDS.get(endpoint, ("input", "embedding_input"))
        value = body.get(field)
        if isinstance(value, str):
            yield body, field, Where("input", part)
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, str):
                    yield value, index, Where("input", part)
        if endpoint is Endpoint.COMPLETIONS and isinstance(body.get("suffix"), str):
            yield body, "suffix", Where("input", "prompt")


def refuse_unreadable(endpoint: Endpoint, body: dict[str, Any], guard_set: Any) -> None:
    """A 400 for a prompt `guard_set`'s input guards and limits cannot read, token ids (the upstream decodes them
    into any text), when one of them would change or stop the request (`enforcing`). Guards in shadow mode, or that
    only record, change nothing: turned on to be watched, they refused every client that sends token ids
    (LangChain's embeddings do), and now let them pass, unread."""
    field = _PROMPT_FIELDS[endpoint][0] if endpoint in _PROMPT_FIELDS else None
    value = body.get(field) if field else None
    if (isinstance(value, list) and any(isinstance(item, int) or isinstance(item, list) for item in value)
            and enforcing((*guard_set.limits, *guard_set.input))):
        raise InvalidRequest(f"`{field}` as token ids cannot be checked by this alias's input guards: send it as text",
                             param=field, code="unsupported_value")


def _chat_texts(body: dict[str, Any]) -> Iterator[Ref]:
    """A chat's texts. Each field is read only as the type it must have (a list, a dict, a string): any other
    value holds no text to check, and goes on as sent, for the upstream to refuse."""
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else ():
        if not isinstance(message, dict):
            continue
        part: Part = "tool_result" if message.get("role") in ("tool", "function") else "message"
        yield from _content(message, "content", Where("input", part))
        if isinstance(message.get("refusal"), str):  # an assistant turn's refusal, sent back as history
            yield message, "refusal", Where("input", "message")
        calls = message.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and text_arguments(function):
                yield function, "arguments", Where("input", "tool_arguments")
            custom = call.get("custom") if isinstance(call, dict) else None
            if isinstance(custom, dict) and isinstance(custom.get("input"), str):
                yield custom, "input", Where("input", "tool_arguments")
        legacy = message.get("function_call")
        if isinstance(legacy, dict) and text_arguments(legacy):
            yield legacy, "arguments", Where("input", "tool_arguments")
    prediction = body.get("prediction")
    if isinstance(prediction, dict):
        yield from _content(prediction, "content", Where("input", "message"))


def _content(holder: dict[str, Any], key: str, where: Where) -> Iterator[Ref]:
    """A message's content: a string, or its text and refusal parts (its text parts as one text: `_parts`)."""
    content = holder.get(key)
    if isinstance(content, str):
        yield holder, key, where
    elif isinstance(content, list):
        yield from _parts(content, where)


def _parts(items: list[Any], where: Where, beside: tuple[str, ...] = ()) -> Iterator[Ref]:
    """A list of parts' texts: each run of text parts (a string `text`) as one text, the model's reading of them
    (`joined.Joined`; a run of one: that part, as it is), each refusal part's on its own, and each part's fields in
    `beside` (a shell command's `stdout`, `stderr`) on their own. A part with no text (an image, an audio clip, a
    file, a value that is no part) is passed over, not a run's end: the model reads the texts on either side of an
    image one after the other, and a key cut in two around one reached the upstream whole. A part with a text of its
    own (a refusal, a `beside` field) ends a run: that text sits between the two."""
    run: list[dict[str, Any]] = []
    gaps: list[int] = []  # the parts of the run that come after a part without text (`Joined.seams`)
    for item in items:
        if not isinstance(item, dict):
            continue  # (a value that is no part: the upstream's to refuse)
        refusal = item.get("type") == "refusal"
        own = ["refusal"] if refusal and isinstance(item.get("refusal"), str) else []
        own += [field for field in beside if isinstance(item.get(field), str)]
        if not refusal and isinstance(item.get(TEXT), str):
            run.append(item)
        elif own:
            if run:
                yield _run(run, gaps, where)
                run, gaps = [], []
        elif run and (not gaps or gaps[-1] != len(run)):
            gaps.append(len(run))
        for field in own:
            yield item, field, where
    if run:
        yield _run(run, gaps, where)


def _run(run: list[dict[str, Any]], gaps: list[int], where: Where) -> Ref:
    """A run of text parts as one text: a single part as it is, more as a `Joined`."""
    if len(run) == 1:
        return run[0], TEXT, where
    return Joined(run, [gap for gap in gaps if gap < len(run)]), TEXT, where


def _responses_texts(body: dict[str, Any]) -> Iterator[Ref]:
    """A Responses request's texts: instructions, a prompt template's variables, the input string or its items'
    text parts, tool calls' arguments and tool outputs, and the hosted tools' texts (`_hosted_texts`). An item's
    `type` is read only as a string (any other value: no type, and never a failed look-up in the sets below)."""
    if isinstance(body.get("instructions"), str):
        yield body, "instructions", Where("input", "message")
    prompt = body.get("prompt")
    variables = prompt.get("variables") if isinstance(prompt, dict) else None
    for name, value in variables.items() if isinstance(variables, dict) else ():
        if isinstance(value, str):
            yield variables, name, Where("input", "message")
        elif isinstance(value, dict) and isinstance(value.get("text"), str):
            yield value, "text", Where("input", "message")
    value = body.get("input")
    if isinstance(value, str):
        yield body, "input", Where("input", "message")
        return
    for item in value if isinstance(value, list) else ():
        if not isinstance(item, dict):
            continue
        output = item.get("output")
        if isinstance(output, str):
            yield item, "output", Where("input", "tool_result")
        if isinstance(output, list):  # its text parts, a shell command's output (`shell_call_output`)
            yield from _parts(output, Where("input", "tool_result"), _OUTPUT_PART_TEXTS)
        kind = item.get("type")
        if not isinstance(kind, str):
            kind = None
        if kind in _CALLS_WITH_ARGUMENTS and text_arguments(item):
            yield item, "arguments", Where("input", "tool_arguments")
        if kind in _CALL_TEXTS and isinstance(item.get(_CALL_TEXTS[kind]), str):
            yield item, _CALL_TEXTS[kind], Where("input", "tool_arguments")
        if kind == "mcp_approval_response" and isinstance(item.get("reason"), str):
            yield item, "reason", Where("input", "message")
        yield from _action_texts(item, kind)
        yield from _hosted_texts(item, kind)
        summary = item.get("summary") if kind == "reasoning" else None
        if isinstance(summary, list):
            yield from _parts(summary, Where("input", "message"))
        yield from _content(item, "content", Where("input", "message"))


# The text fields of a Responses tool output's parts beside their `text` (`shell_call_output`'s command outputs; text
# parts, `function_call_output`'s, are read as any parts' text: `_parts`), the calls whose `arguments` are a JSON
# string (a function's, a remote MCP server tool's), and the calls whose one field holds what the model wrote for the
# tool (a custom tool's input, the code interpreter's code).
_OUTPUT_PART_TEXTS = ("stdout", "stderr")
_CALLS_WITH_ARGUMENTS = frozenset({"function_call", "mcp_call"})
_CALL_TEXTS = {"custom_tool_call": "input", "code_interpreter_call": "code"}


def _action_texts(item: dict[str, Any], kind: str | None) -> Iterator[Ref]:
    """What a shell call ran (`action.commands`) and the diff of an `apply_patch_call` (`operation.diff`): the
    model's earlier output sent back as history, and a place a secret it read may sit in."""
    if kind == "shell_call" or kind == "local_shell_call":
        action = item.get("action")
        commands = action.get("commands") or action.get("command") if isinstance(action, dict) else None
        for index, command in enumerate(commands) if isinstance(commands, list) else ():
            if isinstance(command, str):
                yield commands, index, Where("input", "tool_arguments")
    elif kind == "apply_patch_call":
        operation = item.get("operation")
        if isinstance(operation, dict) and isinstance(operation.get("diff"), str):
            yield operation, "diff", Where("input", "tool_arguments")


def _hosted_texts(item: dict[str, Any], kind: str | None) -> Iterator[Ref]:
    """The texts of the Responses API's hosted tools' items sent back as history: what the tool gave (the code
    interpreter's logs, the file search's results, an MCP call's error) and what the model wrote for it (the file
    search's queries, the web search's query or pattern, the text a computer call typed). An MCP call's `output` is
    any tool's output, read as one (`_responses_texts`)."""
    if kind == "code_interpreter_call":
        outputs = item.get("outputs")
        for output in outputs if isinstance(outputs, list) else ():
            if isinstance(output, dict) and isinstance(output.get("logs"), str):
                yield output, "logs", Where("input", "tool_result")
    elif kind == "file_search_call":
        results = item.get("results")
        for result in results if isinstance(results, list) else ():
            if isinstance(result, dict) and isinstance(result.get("text"), str):
                yield result, "text", Where("input", "tool_result")
        queries = item.get("queries")
        for index, query in enumerate(queries) if isinstance(queries, list) else ():
            if isinstance(query, str):
                yield queries, index, Where("input", "tool_arguments")
    elif kind == "mcp_call" and isinstance(item.get("error"), str):
        yield item, "error", Where("input", "tool_result")
    elif kind in _ACTION_TEXTS and isinstance(action := item.get("action"), dict):
        for field in _ACTION_TEXTS[kind]:
            if isinstance(action.get(field), str):
                yield action, field, Where("input", "tool_arguments")


# The fields of a hosted tool call's `action` that hold what the model wrote for it.
_ACTION_TEXTS = {"web_search_call": ("query", "pattern"), "computer_call": ("text",)}


def _name(call: Any) -> Iterator[tuple[Any, Any, Where, bool]]:
    """A tool call's name (a function's, a custom tool's, a legacy `function_call`'s): a text the model wrote, checked
    as its arguments are (a stream's: `stream.ChatChunks._name`)."""
    if isinstance(call, dict) and isinstance(call.get("name"), str) and call["name"]:
        yield call, "name", TOOL, False


def answer_refs(holder: dict[str, Any], key: str, chat: bool) -> Iterator[tuple[Any, Any, Where, bool]]:
    """Every text of a chat answer's message (or a completion's choice: `key` "text"), as a place it can be written
    back to, and whether it is a JSON string (tool arguments): the content (a list of parts made its text), the
    texts beside it, each tool call's name and arguments (a custom tool's input, as plain text), a legacy
    `function_call`'s, and an audio answer's transcript."""
    if chat and isinstance(holder.get(key), list):
        spread_parts(holder, key)
    if isinstance(holder.get(key), str):
        yield holder, key, ANSWER, False
    if not chat:
        return
    for field in BESIDE_CONTENT:
        if isinstance(holder.get(field), str):
            yield holder, field, BESIDE_CONTENT[field], False
    calls = holder.get("tool_calls")
    for call in calls if isinstance(calls, list) else ():
        if not isinstance(call, dict):
            continue
        function, custom = call.get("function"), call.get("custom")
        yield from _name(function)
        yield from _name(custom)
        if isinstance(function, dict) and text_arguments(function):
            yield function, "arguments", TOOL, True
        if isinstance(custom, dict) and isinstance(custom.get("input"), str):
            yield custom, "input", TOOL, False
    legacy = holder.get("function_call")
    yield from _name(legacy)
    if isinstance(legacy, dict) and text_arguments(legacy):
        yield legacy, "arguments", TOOL, True
    audio = holder.get("audio")
    if isinstance(audio, dict) and isinstance(audio.get("transcript"), str):
        yield audio, "transcript", ANSWER, False
