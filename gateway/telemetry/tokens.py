"""Token counting with tiktoken, for what an upstream does not report (and the demo model).

tiktoken reads its encodings from a cache folder (`TIKTOKEN_CACHE_DIR`, else
`DATA_GYM_CACHE_DIR`, else `<tmp>/data-gym-cache`) and downloads what is missing,
with no timeout: on a machine whose firewall drops packets that would hang the
gateway's start-up. So an encoding is loaded in a thread, and waited for only a
short, bounded time when its file is not already in the cache folder; if it does
not arrive, counting falls back to an estimate (about four characters a token)
and the log says once how to point the gateway at local encodings. Nothing is
ever loaded on the request path: `count` uses what `load` made available.

Encodings follow the model family (o200k_base for gpt-4o, gpt-4.1, gpt-5 and the
o-series; cl100k_base for gpt-4, gpt-3.5 and the embeddings), each loaded once
per process and shared.

Counting never fails a request. tiktoken's Rust core panics on some texts (a run of
about a million spaces or tabs: its pre-tokenizing regex runs out of backtracking
stack), and a panic reaches Python as `pyo3_runtime.PanicException`, a
`BaseException` that passes every `except Exception`. So a long run of white
space (other than line breaks) in a long text is counted apart, exactly (see
`_long_text_tokens`), and any panic left gives that text an estimate, logged once.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_ENCODING", "TokenCounter", "cached_encoding_file", "encoding_for_model", "message_text",
           "responses_messages"]

log = logging.getLogger("gateway.tokens")

DEFAULT_ENCODING = "o200k_base"
DOWNLOAD_TIMEOUT_S = 3.0  # the longest start-up waits for an encoding that is not in the cache folder
LOCAL_LOAD_TIMEOUT_S = 60.0  # reading and parsing a cached file (a few MB) on a slow machine
TOKENS_PER_MESSAGE = 3  # chat format overhead, as in OpenAI's cookbook (gpt-3.5-turbo-0613 and later)
TOKENS_PER_NAME = 1
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
REPLY_PRIMING = 3  # every reply is primed with <|start|>assistant<|message|>

_BLOB = "https://openaipublic.blob.core.windows.net/encodings/"
_ENCODING_FILES = {  # where tiktoken fetches each encoding from; its cache file is named by the URL's sha1
    "o200k_base": _BLOB + "o200k_base.tiktoken",
    "o200k_harmony": _BLOB + "o200k_base.tiktoken",
    "cl100k_base": _BLOB + "cl100k_base.tiktoken",
    "p50k_base": _BLOB + "p50k_base.tiktoken",
    "p50k_edit": _BLOB + "p50k_base.tiktoken",
    "r50k_base": _BLOB + "r50k_base.tiktoken",
}
_O200K_FAMILIES = ("gpt-4o", "chatgpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "gpt-oss", "codex-")
_CL100K_FAMILIES = ("gpt-4", "gpt-3.5", "gpt-35", "text-embedding-")
_O_SERIES = re.compile(r"o\d+(?:$|-)")

# One load attempt per encoding per process, shared by every counter: {encoding name: its future}.
_attempts: dict[str, Future[Any]] = {}
_attempts_lock = threading.Lock()
_hint_given = False
_panic_logged = False

# Long runs of white space. tiktoken splits a text into pieces with a regex, then encodes each piece.
# In the o200k and cl100k patterns, a run of white space without a line break, followed by another
# character, is one piece less its last character (`\s+(?!\S)`; the last one starts the next piece,
# " word"); a piece never reaches into the run from before it, and the pieces from its last character on
# are those of that rest of the text alone. So such a run is encoded as the one piece it is
# (`_encode_single_piece`, no regex), and each side alone: the same tokens (tests/test_tokens.py checks
# it against tiktoken). Given to the regex, the run costs a step of backtracking stack per character,
# and past 999,999 of them tiktoken panics.
_LONG_TEXT = 64 * 1024  # a shorter text cannot hold a run anywhere near that: it goes to tiktoken whole
_RUN = 4096  # runs at least this long are cut out
_STRIDE = 256  # a run of _RUN characters holds _RUN // _STRIDE characters in a row of `text[::_STRIDE]`
_HSPACE = r"\t\x0b\x0c \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"  # White_Space, not \r \n
_SAMPLED_RUN = re.compile(rf"[{_HSPACE}]{{{_RUN // _STRIDE}}}")  # the cheap test: rarely true of other text
_LONG_RUN = re.compile(rf"(?<![{_HSPACE}])[{_HSPACE}]{{{_RUN},}}+(?![\r\n])")
_CUTTABLE = frozenset({"o200k_base", "o200k_harmony", "cl100k_base"})  # patterns for which the cut is exact


@functools.lru_cache(maxsize=256)  # asked per counted text; the model names are few (bounded all the same)
def encoding_for_model(model: str) -> str:
    """The tiktoken encoding of an upstream model name (o200k_base for unknown ones)."""
    name = model.strip().lower().removeprefix("ft:").rsplit("/", 1)[-1]  # "ft:gpt-4o:org::id", "openai/gpt-4o"
    if name.startswith(_O200K_FAMILIES) or _O_SERIES.match(name):
        return "o200k_base"
    if name.startswith(_CL100K_FAMILIES):
        return "cl100k_base"
    return DEFAULT_ENCODING


def _cache_dir() -> str:
    """tiktoken's cache folder, by its own rules (tiktoken.load.read_file_cached)."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return os.environ["TIKTOKEN_CACHE_DIR"]
    if "DATA_GYM_CACHE_DIR" in os.environ:
        return os.environ["DATA_GYM_CACHE_DIR"]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def cached_encoding_file(encoding: str) -> Path | None:
    """The cache file tiktoken would read for `encoding`, if it is there."""
    url, folder = _ENCODING_FILES.get(encoding), _cache_dir()
    if url is None or not folder:
        return None
    path = Path(folder) / hashlib.sha1(url.encode()).hexdigest()  # noqa: S324 -- tiktoken's file naming, not security
    return path if path.is_file() else None


def _construct(encoding: str) -> Any:
    """Blocking: build the encoding (reading tiktoken's cache folder, downloading what is missing)."""
    import tiktoken

    try:  # not through tiktoken.get_encoding: it holds a global lock while downloading
        from tiktoken_ext.openai_public import ENCODING_CONSTRUCTORS  # type: ignore[import-untyped]
    except ImportError:
        return tiktoken.get_encoding(encoding)
    constructor = ENCODING_CONSTRUCTORS.get(encoding)
    return tiktoken.Encoding(**constructor()) if constructor is not None else tiktoken.get_encoding(encoding)


def _run(encoding: str, future: Future[Any]) -> None:
    try:
        result = _construct(encoding)
    except BaseException as exc:  # noqa: BLE001 -- handed to whoever waits
        future.set_exception(exc)
    else:
        future.set_result(result)


def _attempt(encoding: str) -> Future[Any]:
    """The process's load of `encoding`: the one running or done, or a new one if the last failed."""
    with _attempts_lock:
        future = _attempts.get(encoding)
        if future is None or (future.done() and future.exception() is not None):
            future = Future()
            _attempts[encoding] = future
            thread = threading.Thread(target=_run, args=(encoding, future), name=f"tiktoken-{encoding}", daemon=True)
            thread.start()
        return future


class TokenCounter:
    """Counts tokens. Load the encodings once (off the event loop) with `load()`; counting never loads.

    `encoding` is the default, used by `count(text)` and for models whose encoding is not loaded.
    """

    def __init__(self, encoding: str = DEFAULT_ENCODING, *, download_timeout_s: float = DOWNLOAD_TIMEOUT_S) -> None:
        self.encoding_name = encoding
        self.download_timeout_s = download_timeout_s
        self._loaded: dict[str, Any] = {}
        self._tried: set[str] = set()
        self._lock = threading.Lock()
        self._roles: dict[tuple[int, str], int] = {}  # (id of the encoding, role) -> tokens, for the usual roles

    def load(self, models: Iterable[str] = ()) -> bool:
        """Blocking, bounded: load the default encoding and those of `models`. True when the default is exact.

        An encoding in the cache folder is read from it; one that is not may be downloaded, but the
        wait is at most `download_timeout_s`. Each encoding is tried once per counter.
        """
        names = dict.fromkeys([self.encoding_name, *(encoding_for_model(m) for m in models)])
        with self._lock:
            wanted = [name for name in names if name not in self._tried]
            self._tried.update(wanted)
            plans = [(name, cached_encoding_file(name), _attempt(name)) for name in wanted]
            for name, cached, future in plans:
                bound = LOCAL_LOAD_TIMEOUT_S if cached is not None else self.download_timeout_s
                started = time.monotonic()
                try:
                    self._loaded[name] = future.result(timeout=bound)
                except TimeoutError:
                    self._unavailable(name, cached, f"not loaded within {bound:g} s")
                except Exception as exc:  # noqa: BLE001 -- any failure only degrades counts to estimates
                    self._unavailable(name, cached, f"{type(exc).__name__}: {exc}"[:200])
                else:
                    log.debug("tiktoken encoding %s loaded in %.2f s", name, time.monotonic() - started)
        return self.exact

    def _unavailable(self, name: str, cached: Path | None, reason: str) -> None:
        global _hint_given
        where = _cache_dir() or "(caching disabled)"
        log.warning("tiktoken encoding %s unavailable (%s; %s); token counts for it are estimates",
                    name, reason, f"cache file {cached}" if cached else f"not in the cache folder {where}")
        if not _hint_given:
            _hint_given = True
            log.warning("for exact token counts offline, set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's "
                        "encoding files (copy them from the cache folder of a machine that has downloaded them)")

    @property
    def exact(self) -> bool:
        """Whether `count(text)` (the default encoding) is exact."""
        return self.encoding_name in self._loaded

    def exact_for(self, model: str) -> bool:
        return encoding_for_model(model) in self._loaded

    def _encoding(self, model: str | None) -> Any:
        if model is not None:
            encoding = self._loaded.get(encoding_for_model(model))
            if encoding is not None:
                return encoding
        return self._loaded.get(self.encoding_name)  # a near miss for another family beats an estimate

    def count(self, text: str, model: str | None = None) -> int:
        """Tokens of `text` in `model`'s encoding (the default encoding without a model). Never blocks on I/O,
        never raises for a text (a text tiktoken fails on gets an estimate)."""
        encoding = self._encoding(model)
        if encoding is not None:
            try:
                if len(text) < _LONG_TEXT:
                    return len(encoding.encode_ordinary(text))
                return _long_text_tokens(encoding, text)
            except BaseException as exc:  # a Rust panic is a BaseException; any other goes on
                if type(exc).__name__ != "PanicException":
                    raise
                return _after_panic(text)
        return _estimate(text)

    def count_messages(self, messages: object, model: str | None = None) -> int:
        """Prompt tokens of chat `messages`, with the chat format's overhead (OpenAI's cookbook method).

        Every message costs 3 tokens plus its role, content text parts and name (1 more for a name);
        tool calls count their function name and arguments; the reply's priming adds 3.
        Image and audio parts are not counted.
        """
        if not isinstance(messages, list):
            return 0
        encoding = self._encoding(model)  # looked up once, not per text

        def count(text: str) -> int:
            if encoding is not None:
                try:
                    if len(text) < _LONG_TEXT:
                        return len(encoding.encode_ordinary(text))
                    return _long_text_tokens(encoding, text)
                except BaseException as exc:  # as in `TokenCounter.count`
                    if type(exc).__name__ != "PanicException":
                        raise
                    return _after_panic(text)
            return _estimate(text)

        total = REPLY_PRIMING
        for message in messages:
            total += TOKENS_PER_MESSAGE
            if not isinstance(message, dict):
                continue
            role = message.get("role")
            if isinstance(role, str):
                cached = self._roles.get((id(encoding), role))
                if cached is None:
                    cached = count(role)
                    if role in _ROLES:  # a closed set: the cache stays small whatever clients send
                        self._roles[(id(encoding), role)] = cached
                total += cached
            name = message.get("name")
            if isinstance(name, str):
                total += count(name) + TOKENS_PER_NAME
            content = message.get("content")
            if isinstance(content, str):
                total += count(content)
            elif isinstance(content, list):
                total += sum(count(part["text"]) for part in content
                             if isinstance(part, dict) and isinstance(part.get("text"), str))
            calls = message.get("tool_calls")
            for call in calls if isinstance(calls, list) else ():
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict):
                    total += sum(count(function[k]) for k in ("name", "arguments")
                                 if isinstance(function.get(k), str))
        return total


def _estimate(text: str) -> int:
    return max(1, (len(text) + 3) // 4) if text else 0


def _long_text_tokens(encoding: Any, text: str) -> int:
    """`len(encoding.encode_ordinary(text))` for a long text, with its long runs of white space cut out."""
    if encoding.name not in _CUTTABLE or _SAMPLED_RUN.search(text[::_STRIDE]) is None:
        return len(encoding.encode_ordinary(text))
    total = start = 0
    for run in _LONG_RUN.finditer(text):
        first, last = run.span()
        if last < len(text):
            last -= 1  # the run's last character goes with what follows it
        total += len(encoding.encode_ordinary(text[start:first])) + len(encoding._encode_single_piece(text[first:last]))
        start = last
    return total + len(encoding.encode_ordinary(text[start:]))


def _after_panic(text: str) -> int:
    """tiktoken panicked on `text`: its estimate. Logged once per process, with the text's length only."""
    global _panic_logged
    if not _panic_logged:
        _panic_logged = True
        log.warning("tiktoken failed on a text of %d characters (a panic in its Rust core); such texts are "
                    "counted as estimates (logged once)", len(text))
    return _estimate(text)


def message_text(messages: object) -> list[str]:
    """The text parts of chat messages (string contents and `text` content parts)."""
    texts: list[str] = []
    if not isinstance(messages, list):
        return texts
    for message in messages:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(part["text"] for part in content
                         if isinstance(part, dict) and isinstance(part.get("text"), str))
    return texts


def responses_messages(value: Any, instructions: Any) -> list[Any]:
    """A Responses request's `instructions` and `input` as the chat messages the model reads: the instructions
    a system message; a string input one user message; input items as they are (a message item has a role and
    a string or parts with `text`: `input_text`, `output_text`), except a tool call (its name and arguments)
    and a tool's output, written as the chat messages that carry them."""
    messages: list[Any] = []
    if isinstance(instructions, str) and instructions:
        messages.append({"role": "system", "content": instructions})
    if isinstance(value, str):
        messages.append({"role": "user", "content": value})
        return messages
    for item in value if isinstance(value, list) else ():
        kind = item.get("type") if isinstance(item, dict) and "role" not in item else None
        if kind == "function_call":
            call = {"name": item.get("name"), "arguments": item.get("arguments")}
            messages.append({"role": "assistant", "tool_calls": [{"function": call}]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "content": output if isinstance(output, (str, list)) else None})
        else:
            messages.append(item)
    return messages
