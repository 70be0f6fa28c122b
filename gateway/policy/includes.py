"""Policies split across files: `include:` lists, merged into one document before it is checked.

A policy file may name other files with `include: [providers.yaml, tenants/*.yaml]`, relative to the
including file; included files may include more. Globs expand in sorted order, so the result never
depends on the file system's listing order. The files are merged into one document, which is then
checked exactly like a single file, every error still naming the file and line it came from.

Precedence, the one rule: nothing is overridden. The entries of a named section (`providers`,
`models`, `tenants`, `prices`, and the guards of each scope) are merged by name, and a name defined
in two files is an error naming both places. `keys` and `rules` are concatenated: the including
file's own first, then each included file's in `include` order, depth first (rule order matters:
the first match wins). Every other section (`server`, `state`, `auth`, `routing`, `guards.pool`, ...)
may be written in one file only. `version` may be repeated (each file's is checked).

A file named in a file (an include, the `prices_file`, `server.shadow_policy`) is relative to the file that names
it, wherever that file is included from (`beside`).

The policy's version is a content hash over every file (its path relative to the root file and its
text), the `prices_file` included, so a change to any of them is a new version (and the file watcher
watches them all); a single file with no prices file keeps the hash of its text.

A policy is at most `MAX_POLICY_BYTES`, its files together (the prices file counted), checked as each file is
read and before it is parsed: a file of any size is refused at once, in bounded memory.

A copy of a policy's files kept under a folder at their absolute paths (the last policy the workers accepted,
`reload.keep_snapshot`) is read `copied_under` that folder: a name outside it (an include, prices file or shadow
policy named by absolute path) is read at its place in the copy, so that the copy reads only copied files and its
names relative to the root file, hence its version, are the original's.
"""

from __future__ import annotations

import glob
import hashlib
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .loader import PolicyError, PolicyIssue, _check, _Located, _Path, _show, format_path, parse_file

__all__ = ["MAX_POLICY_BYTES", "PolicyTree", "beside", "copied_under", "read_capped", "read_tree"]

_NAMED = frozenset({"providers", "models", "tenants", "prices"})
_LISTED = {"keys": "name", "rules": "name"}  # concatenated; the field whose value must be unique
_FROM_PATH = object()  # `_Merger._single`'s key when it is the path's last part
_GUARD_NAMED = frozenset({"global"})  # guards.global.<guard>
_GUARD_NESTED = frozenset({"models", "tenants"})  # guards.models.<alias>.<guard>
_MAX_FILES = 1_000
# The most a policy may be, all its files together. Parsed and checked, a file takes ~200 times its size in memory
# and ~2 s a MB (a reload does it beside the traffic): 2 MiB is ~10,000 keys written in the policy, several times
# the largest real one (a deployment with more keys creates them at run time: `dynamic_keys`).
MAX_POLICY_BYTES = 2 * 1024 * 1024
# The folder holding the copy being read (`copied_under`), set only while a copy is compiled; None: the files are read
# where they are.
_COPY: ContextVar[str | None] = ContextVar("policy_copy", default=None)


@dataclass(frozen=True, slots=True)
class PolicyTree:
    """The merged document of a policy and every file it is made of."""

    doc: _Located
    version: str
    files: tuple[str, ...]  # in load order, the root first
    watch: tuple[str, ...]  # files, and the folders of globs (a new file there changes the policy)


@contextmanager
def copied_under(folder: str | Path) -> Iterator[None]:
    """Within it, policies are read from a copy of their files kept under `folder` at their absolute paths: a name
    outside `folder` is read at its place in the copy (`_in_copy`)."""
    token = _COPY.set(os.path.abspath(folder))
    try:
        yield
    finally:
        _COPY.reset(token)


def _in_copy(file: str | Path) -> str:
    """Where `file` is read: where it is, or (`copied_under` a folder) at its place in the copy if it is outside."""
    copy = _COPY.get()
    if copy is None:
        return str(file)
    absolute = os.path.abspath(file)
    if absolute == copy or absolute.startswith(copy + os.sep):
        return str(file)
    return os.path.join(copy, absolute.lstrip(os.sep))


def read_tree(path: str | Path, text: str | None = None) -> PolicyTree:
    """Read the policy at `path` (or `text`, named `path`) and everything it includes; raise `PolicyError`, naming
    every file read or looked for so far (`PolicyError.watch`: a reload watches them until a version loads)."""
    root = _in_copy(path)
    reader = _Reader(Path(root).parent)
    try:
        return _read_tree(reader, root, text)
    except PolicyError as exc:
        exc.watching(reader.watched(root), reader.missing)
        raise


def _read_tree(reader: _Reader, root: str, text: str | None) -> PolicyTree:
    text = reader.read(root, None) if text is None else reader.count(root, text)
    doc = parse_file(text, root)
    reader.texts.append((root, text))
    fragments = reader.expand(doc, [os.path.realpath(root)])
    if reader.issues:
        raise PolicyError(reader.issues)
    if isinstance(doc.data, dict):  # else the schema check reports it
        doc.data.pop("include", None)
        merger = _Merger(doc, doc.data)
        for fragment in fragments:
            merger.merge(fragment)
    # (the merge's issues are raised with the schema's, by `check_doc`: every error at once, as for one file)
    files = tuple(file for file, _ in reader.texts)
    hashed = reader.texts + _prices_file(doc, reader)
    return PolicyTree(doc, _version(hashed, Path(root).parent), files, reader.watched(root))


def beside(doc: _Located, field: _Path, name: str) -> Path:
    """The file `name` given at `field`, relative to the file that gives it: an included file names its files as
    they are beside it, wherever it is included from."""
    return Path(doc.locate(field)[0]).parent / name


def _prices_file(doc: _Located, reader: _Reader) -> list[tuple[str, str]]:
    """The `prices_file` (relative to the file naming it) with its text, for the version; watched even when absent (a
    version naming a missing one is refused, and its arrival must reload): a price change is a new policy version,
    which a reload then applies. Absent or unreadable: no text (its errors are reported where it is loaded,
    `accounting_check.load_prices_file`); past the size of a policy, refused."""
    name = doc.data.get("prices_file") if isinstance(doc.data, dict) else None
    if not isinstance(name, str) or not name:
        return []
    file = _in_copy(beside(doc, ("prices_file",), name))
    reader.looked.append(file)
    try:
        text = read_capped(file, reader.left)
    except (OSError, UnicodeDecodeError, ValueError):  # (ValueError: a NUL in the name)
        return []
    if text is None:
        raise PolicyError([_too_large(file, doc.locate(("prices_file",)), reader.left)])
    return [(file, text)]


def read_capped(file: str | Path, limit: int) -> str | None:
    """The text of `file` as `Path.read_text` gives it, or None if it is over `limit` bytes: no more than that is
    read, so that a file of any size is refused at once, in bounded memory.

    Only a regular file is read (else `NotRegularFile`, an `OSError`): it is opened without blocking, since a named
    pipe (FIFO) opened the usual way waits for a writer, for good if none comes, and a reload waiting on it holds
    the reload lock (every later reload, `POST /admin/reload` and `SIGHUP` wait behind it) and a thread that the
    interpreter's exit waits for (SIGTERM no longer ends the process).

    A directory is refused too, before `open` wraps the descriptor: `open` refuses it itself, but with the
    descriptor's number for a name (`[Errno 21] Is a directory: 3`) and the descriptor left open."""
    descriptor = os.open(_in_copy(file), os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(_NOT_A_DIRECTORY if stat.S_ISDIR(mode) else _NOT_REGULAR)
        stream = open(descriptor, "rb")  # (owns the descriptor from here: closed by `with`)
    except BaseException:
        os.close(descriptor)
        raise
    with stream:
        data = stream.read(limit + 1)
    if len(data) > limit:
        return None
    return data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")  # (read_text's universal newlines)


class NotRegularFile(OSError):
    """A policy's file that is a directory, a named pipe, a device or a socket: never read (`read_capped`)."""


_NOT_REGULAR = "it is not a regular file (a named pipe, a device or a socket)"
# (`gateway check policies/`: a policy is one file, which names any others in its `include`)
_NOT_A_DIRECTORY = ("it is a directory; give a policy file (a policy split across files names the others in its "
                    "`include`)")


def _too_large(file: str, at: tuple[str, int] | None, left: int) -> PolicyIssue:
    where = at or (file, 1)
    limit = f"{MAX_POLICY_BYTES // 2**20} MiB ({MAX_POLICY_BYTES:,} bytes)"
    if left >= MAX_POLICY_BYTES:
        problem = f"{file} is over {limit}, the most a policy may be"
    else:
        problem = f"{file} takes the policy's files together over {limit}, the most a policy may be"
    return PolicyIssue(where[0], where[1], "", f"{problem}; refused before it is parsed (see docs/policies.md)")


def _line_of(exc: UnicodeDecodeError) -> int:
    """The line of the first byte UTF-8 cannot decode, counted as `read_capped` reads lines (`\\r\\n`, `\\r`, `\\n`)."""
    before = bytes(exc.object[:exc.start])
    return before.replace(b"\r\n", b"\n").replace(b"\r", b"\n").count(b"\n") + 1


def _byte(exc: UnicodeDecodeError) -> str:
    return f"0x{exc.object[exc.start]:02x}" if exc.start < len(exc.object) else "at the end"


def _version(texts: list[tuple[str, str]], base: Path) -> str:
    if len(texts) == 1:
        return hashlib.sha256(texts[0][1].encode()).hexdigest()[:16]
    digest = hashlib.sha256()
    for file, text in texts:
        name = os.path.relpath(file, base).encode()
        data = text.encode()
        digest.update(b"%d:%s%d:%s" % (len(name), name, len(data), data))  # prefix-free
    return digest.hexdigest()[:16]


class _Reader:
    """Follows `include:` lists depth first, reporting missing files, cycles and files included twice."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.texts: list[tuple[str, str]] = []
        self.looked: list[str] = []  # every file (but the root) looked for, in order: read, missing or refused
        self.missing: list[str] = []  # those of them not found
        self.folders: set[str] = set()
        self.issues: list[PolicyIssue] = []
        self.seen: dict[str, tuple[str, int]] = {}  # real path -> where it was included
        self.left = MAX_POLICY_BYTES  # bytes the files not read yet may take

    def watched(self, root: str) -> tuple[str, ...]:
        """The root file, every file looked for and the folders of the globs: a new file there, a missing one that
        appears, or a change to any changes the policy (or what refused it)."""
        return tuple(dict.fromkeys((root, *self.looked, *sorted(self.folders))))

    def read(self, file: str, at: tuple[str, int] | None) -> str:
        """The text of `file` (included at `at`), counted against the policy's size; raise `PolicyError`."""
        try:
            text = read_capped(file, self.left)
        except UnicodeDecodeError as exc:  # at its own line: the byte is in this file, not in the include entry
            message = f"cannot read the policy file {file}: it is not UTF-8 text ({exc.reason}, byte {_byte(exc)})"
            raise PolicyError([PolicyIssue(file, _line_of(exc), "", message)]) from exc
        except (OSError, ValueError) as exc:  # (ValueError: a NUL in the name, a shadow policy's)
            where = at or (file, 1)
            message = f"cannot read the policy file {file}: {exc}"
            raise PolicyError([PolicyIssue(where[0], where[1], "", message)]) from exc
        return self.count(file, text, at)

    def count(self, file: str, text: str | None, at: tuple[str, int] | None = None) -> str:
        """`text` (None: the file was over the size left), counted against the policy's size; else `PolicyError`."""
        size = -1 if text is None else len(text.encode())
        if text is None or size > self.left:
            raise PolicyError([_too_large(file, at, self.left)])
        self.left -= size
        return text

    def expand(self, doc: _Located, stack: list[str]) -> list[_Located]:
        data = doc.data
        if not isinstance(data, dict) or "include" not in data:
            return []
        entries = data["include"]
        if not isinstance(entries, list) or not all(isinstance(e, str) and e for e in entries):
            doc.issue(("include",), "expected a list of file names or globs, relative to this file")
            self.issues.extend(doc.issues)
            return []
        fragments: list[_Located] = []
        folder = Path(doc.file).parent
        for index, entry in enumerate(entries):
            where = doc.locate(("include", index))
            for file in self._files(folder, entry, where):
                real = os.path.realpath(file)
                if real in stack:
                    chain = " -> ".join(os.path.relpath(p, self.base) for p in [*stack, real])
                    self._issue(where, f"include cycle: {chain}")
                    continue
                if real in self.seen:
                    first = self.seen[real]
                    self._issue(where, f"`{entry}` is already included at {first[0]}:{first[1]}")
                    continue
                self.seen[real] = where
                if len(self.texts) >= _MAX_FILES:
                    self._issue(where, f"a policy may not have more than {_MAX_FILES} files")
                    return fragments
                self.looked.append(file)
                try:
                    text = self.read(file, where)
                    fragment = parse_file(text, file)
                except PolicyError as exc:
                    self.issues.extend(exc.issues)
                    continue
                self.texts.append((file, text))
                fragments.append(fragment)
                fragments.extend(self.expand(fragment, [*stack, real]))
        return fragments

    def _files(self, folder: Path, entry: str, where: tuple[str, int]) -> list[str]:
        if "\0" in entry:  # (the file system calls raise ValueError)
            self._issue(where, "a file name cannot hold a NUL character (`\\0`)")
            return []
        path = Path(_in_copy(folder / entry))
        if glob.has_magic(entry):
            self.folders.add(str(path.parent))
            return sorted(p for p in glob.glob(str(path)) if os.path.isfile(p))  # none matching: fine
        try:
            found = path.is_file()
        except OSError as exc:  # a name too long for the file system, say
            self._issue(where, f"included file cannot be looked for: {entry} ({exc.strerror or exc})")
            return []
        if not found and path.is_dir():  # (was "not found", which it is not; a glob takes a folder's files)
            self._issue(where, f"included file is a directory: {entry}; include its files with a glob, as "
                               f"`{entry.rstrip('/')}/*.yaml`")
            self.looked.append(str(path))
            return []
        if not found:
            self._issue(where, f"included file not found: {entry} (looked for {path})")
            self.looked.append(str(path))
            self.missing.append(str(path))
            return []
        return [str(path)]

    def _issue(self, where: tuple[str, int], message: str) -> None:
        self.issues.append(PolicyIssue(where[0], where[1], "include", message))


class _Merger:
    """Merges included documents into the root one, keeping every path's file and line."""

    def __init__(self, root: _Located, data: dict[str, Any]) -> None:
        self.doc = root
        self.data = data

    def merge(self, fragment: _Located) -> None:
        data = fragment.data
        if not isinstance(data, dict):
            self.doc.issues.append(PolicyIssue(fragment.file, 1, "", "an included file must be a mapping of sections"))
            return
        for section, value in data.items():
            if section == "version" and "version" in self.data:  # repeated: checked here, in its own file
                self._version(fragment, value)
                continue
            if section == "include":
                continue
            if section in _NAMED and isinstance(value, dict):
                self._named(fragment, (section,), value)
            elif section in _LISTED and isinstance(value, list):
                self._listed(fragment, section, value)
            elif section == "guards" and isinstance(value, dict):
                self._guards(fragment, value)
            else:
                self._single(fragment, (_show(section),), self.data, value, key=section)  # (`null:`: None)

    def _version(self, fragment: _Located, value: Any) -> None:
        """An included file's own `version`, checked as the root file's is (the schema checks the merged one)."""
        issues = len(fragment.issues)
        _check(fragment, value, Literal[1], ("version",))
        self.doc.issues.extend(fragment.issues[issues:])

    def _guards(self, fragment: _Located, guards: dict[str, Any]) -> None:
        target = self._container(fragment, ("guards",), self.data)
        if target is None:
            return
        for scope, value in guards.items():
            path: _Path = ("guards", scope)
            if scope in _GUARD_NAMED and isinstance(value, dict):
                self._named(fragment, path, value)
            elif scope in _GUARD_NESTED and isinstance(value, dict):
                self._nested_guards(fragment, path, target, value)
            else:
                self._single(fragment, ("guards", _show(scope)), target, value, key=scope)

    def _nested_guards(self, fragment: _Located, path: _Path, target: dict[str, Any], value: dict[str, Any]) -> None:
        """`guards.models` or `guards.tenants` (`path`): its mapping made first if the root file has none, then each
        alias's or tenant's guards merged by name."""
        container = self._container(fragment, path, target)
        if container is None:  # the root's is not a mapping: this one is a second definition
            self._single(fragment, path, target, value)
            return
        for name, guards_of in value.items():
            if isinstance(guards_of, dict):
                self._named(fragment, (*path, name), guards_of)
            else:  # (not a mapping: merged as it is, for the checks to refuse)
                self._single(fragment, (*path, _show(name)), container, guards_of, key=name)

    def _container(self, fragment: _Located, path: _Path, parent: dict[str, Any]) -> dict[str, Any] | None:
        """The mapping at `path` in the merged data (made if absent); None if it is not a mapping."""
        key = str(path[-1])
        if key not in parent:
            parent[key] = {}
            self._copy(fragment, path, path, subtree=False)
        found = parent[key]
        return found if isinstance(found, dict) else None

    def _at(self, path: _Path) -> Any:
        node: Any = self.data
        for part in path:
            node = node[part]
        return node

    def _named(self, fragment: _Located, path: _Path, entries: dict[str, Any]) -> None:
        parent = self._at(path[:-1]) if len(path) > 1 else self.data
        target = self._container(fragment, path, parent)
        if target is None:
            self._single(fragment, path, parent, entries)
            return
        for name, value in entries.items():
            self._single(fragment, (*path, _show(name)), target, value, key=name)

    def _listed(self, fragment: _Located, section: str, items: list[Any]) -> None:
        existing = self.data.setdefault(section, [])
        if not isinstance(existing, list):
            self._conflict(fragment, (section,))
            return
        if (section,) not in self.doc.lines:
            self._copy(fragment, (section,), (section,), subtree=False)
        unique = _LISTED[section]
        names = {item.get(unique): index for index, item in enumerate(existing)
                 if isinstance(item, dict) and isinstance(item.get(unique), str) and item.get(unique)}
        for index, item in enumerate(items):
            name = item.get(unique) if isinstance(item, dict) else None
            if isinstance(name, str) and name and name in names:
                first = self.doc.where((section, names[name], unique))
                file, line = fragment.locate((section, index, unique))
                self.doc.issues.append(PolicyIssue(
                    file, line, f"{section}[{index}].{unique}", f"`{name}` is also defined at {first}"))
                continue
            if isinstance(name, str) and name:
                names[name] = len(existing)
            self._copy(fragment, (section, index), (section, len(existing)))
            existing.append(item)

    def _single(
        self, fragment: _Located, path: _Path, parent: dict[str, Any], value: Any, key: Any = _FROM_PATH,
    ) -> None:
        """Merge `value` at `path`, as `key` of `parent` (default: the path's last part; a key that is not a string,
        as `null:`, is given as it is, its path part being its name as the checks show it)."""
        key = str(path[-1]) if key is _FROM_PATH else key
        if key in parent:
            self._conflict(fragment, path)
            return
        parent[key] = value
        self._copy(fragment, path, path)

    def _conflict(self, fragment: _Located, path: _Path) -> None:
        file, line = fragment.locate(path)
        self.doc.issues.append(PolicyIssue(
            file, line, format_path(path), f"also defined at {self.doc.where(path)}; each may be defined once"))

    def _copy(self, fragment: _Located, source: _Path, dest: _Path, *, subtree: bool = True) -> None:
        """Record the lines of `source` (and, with `subtree`, everything under it) at `dest`."""
        size = len(source)
        if dest != source:
            self.doc.origins[dest] = fragment.shown(source)
        for path, line in fragment.lines.items():
            if path[:size] == source and (subtree or len(path) == size):
                moved = dest + path[size:]
                self.doc.lines[moved] = line
                self.doc.files[moved] = fragment.files.get(path, fragment.file)
