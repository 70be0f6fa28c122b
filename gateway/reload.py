"""Reloading a served policy: what it must suit, and a cheap poll of its files' metadata.

A reload cannot move the listening socket nor change the worker count, so a new policy must
suit the ones `gateway serve` started with: `serving_refusals` holds the rules, and both the
start (`gateway serve`, every worker) and every reload (file, SIGHUP, admin API) ask it, so
that they cannot drift apart. A policy it refuses is refused like an invalid one.

Every file a policy is made of is watched (its `include:`s, and the shadow policy's), and
the folder of every include glob, so that a file added to `tenants/` is noticed too. After a
refused reload, so are the files the refused version read or looked for (`PolicyError.watch`),
until a version loads: the include whose absence or error refused it may be one that only the
refused version names, and its arrival or fix must reload.

Polling (one `stat` every `server.watch_interval_s`) rather than inotify: it works
the same on every filesystem, in containers and for Kubernetes ConfigMaps (which
swap a symlink rather than write the file), and costs nothing measurable. A change
of metadata only triggers a reload; the reload itself compares the content's hash
with the policy being served, so a touch without a change is a no-op.

With several workers, the last policy the workers accepted is kept in a snapshot (`keep_snapshot`): a worker
restarted after a crash while the file on disk is refused serves it (`load_snapshot`), as its siblings do, rather
than dying at start and being restarted again and again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import msgspec

from .policy import Policy, PolicyError, PolicyIssue, load_policy
from .policy.accounting_check import has_limits
from .policy.compile import open_to_network
from .policy.includes import MAX_POLICY_BYTES, copied_under, read_capped, read_tree
from .policy.provider_schema import AzureSpec

__all__ = [
    "Fingerprints", "Listener", "fingerprints", "fingerprints_as_read", "keep_snapshot", "load_snapshot",
    "serving_refusals", "watch_policy_file", "watch_policy_files",
]

Fingerprints = tuple[tuple[Path, tuple[int, int, int] | None], ...]
# After a change, the files must keep their metadata this long before they are read: an editor or `cp`
# writing a policy in several steps is not caught half-way (and reported as an invalid policy).
SETTLE_S = 0.05

log = logging.getLogger("gateway.reload")


@dataclass(frozen=True, slots=True)
class Listener:
    """How `gateway serve` serves, fixed for the life of the process: a policy is checked against it
    at start and again on every reload, since a reload changes neither the socket nor the workers."""

    host: str
    """The address actually listened on (`--host`, else the policy's `server.host` at start)."""
    allow_open: bool = False
    """`--allow-open`: the operator accepted `auth: none` on a network address in front of real providers."""
    workers: int = 1


def serving_refusals(policy: Policy, listener: Listener) -> list[str]:
    """Why `policy` must not be served on `listener` (empty: it may be). One list for the start and
    for reloads: a rule added here holds for both."""
    refusals = []
    if policy.state.backend == "memory" and listener.workers > 1:
        per_worker = _per_worker(policy)
        if per_worker:
            refusals.append(
                f"{' and '.join(per_worker)} with the memory store and {listener.workers} workers (--workers > 1): "
                "each worker would keep its own, so that limits and budgets would apply once per worker and a "
                "worker would not know the others' keys or requests. Use `state: {backend: redis}` or one worker.")
    if open_to_network(policy, listener.host) and not listener.allow_open:
        refusals.append(
            f"refusing to serve {listener.host} with `auth: none`: anyone who reaches it could use your "
            "providers' credentials. Use `auth: keys`, listen on 127.0.0.1, or pass --allow-open "
            "to `gateway serve`.")
    return refusals


def _per_worker(policy: Policy) -> list[str]:
    """What the memory store would get wrong with several workers, each keeping its own: keys made at run time
    (known to one worker), limits and budgets (counted per worker: N times over), feedback (kept by the worker
    that served the request; most ratings would reach another and be refused). A cache, breakers and the usage
    report per worker are only less effective or partial (docs/operations.md), and allowed."""
    spec = policy.spec
    found = []
    if policy.dynamic_keys.enabled:
        found.append("dynamic_keys")
    if spec is not None and has_limits(spec):
        found.append("limits or budgets")
    if policy.telemetry.feedback.enabled:
        found.append("telemetry.feedback")
    return found


def _fingerprint(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)  # follows symlinks: a ConfigMap's swap shows as a new inode
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


async def watch_policy_file(
    path: Path, interval_s: Callable[[], float], on_change: Callable[[], Awaitable[object]],
) -> None:
    """Run until cancelled: call `on_change` after the file's metadata changed."""
    await watch_policy_files(lambda: (path,), interval_s, on_change)


def fingerprints(paths: Sequence[Path]) -> Fingerprints | None:
    """The metadata of `paths`, to compare with a later reading; None while the root file is missing."""
    found = tuple((path, _fingerprint(path)) for path in paths)
    return None if found and found[0][1] is None else found  # the root file missing: mid-swap, wait


def fingerprints_as_read(
    before: Fingerprints | None, paths: Sequence[Path], missing: Collection[Path],
) -> Fingerprints | None:
    """The metadata of `paths` as the last load read them, whose files are known only once it has read them (a new
    include; what a refused load looked for): those in `before` (taken before it read) as taken then, those it found
    `missing` as missing (one that has appeared since is still a change), any other as it is now. None while the
    root file is missing, or when `before` is (nothing known: the watcher then reloads on any change)."""
    if before is None:
        return None
    taken = dict(before)
    found = tuple((path, taken[path] if path in taken else None if path in missing else _fingerprint(path))
                  for path in paths)
    return None if found and found[0][1] is None else found


async def watch_policy_files(
    paths: Callable[[], Sequence[Path]], interval_s: Callable[[], float], on_change: Callable[[], Awaitable[object]],
    loaded: Callable[[], Fingerprints | None] = lambda: None,
) -> None:
    """Run until cancelled: call `on_change` after the metadata of any of `paths` (read per tick) changed.

    `loaded` gives the files' metadata as the last reload read them, whatever started it: a change that a
    reload by signal or by the admin API has already read is not read again (and an invalid file is not
    reported twice).
    """
    last = loaded() or fingerprints(paths())  # (as the policy in force read them, when known)
    while True:
        await asyncio.sleep(interval_s())
        current = fingerprints(paths())
        if current == last or current is None:
            continue
        await asyncio.sleep(SETTLE_S)
        settled = fingerprints(paths())
        if settled != current:
            continue  # still being written: look again on the next tick
        last = current
        if current == loaded():
            continue
        try:
            await on_change()
        except Exception:
            log.exception("policy reload failed")
        # The reload may have changed which files are watched: those it read, as it read them (a change during the
        # reload is a change still to read, a file a refused one found missing is missing), the others as they are.
        last = fingerprints_as_read(loaded(), paths(), ()) or fingerprints(paths())


_SNAPSHOT = "current"  # the snapshot folder's link to the copy of the last policy accepted


def keep_snapshot(policy: Policy, folder: Path) -> bool:
    """Keep the files `policy` is made of (its includes, prices file and shadow policy's) in `folder`, the process
    group's own, as the last policy accepted; False if they changed since they were read (it is not kept).

    A copy of the texts, not of the compiled policy: it holds what the files hold (credentials stay in the
    environment), and compiling it again gives the same version, its names relative to the root file being the
    same (a name given by absolute path too: the copy is read `copied_under` its folder, where that file's copy is
    found). Each copy is checked against the version it stands for, so that a file written while it was copied is
    not kept under the version of the file before. Workers all keep the policies they load: the first to copy a
    version keeps it, the others find it there."""
    name = f"v-{policy.version}" + (f"-{policy.shadow.version}" if policy.shadow is not None else "")
    link = folder / _SNAPSHOT
    try:
        if os.readlink(link) == name:
            return True
    except OSError:
        pass
    kept = folder / name
    if not kept.is_dir():
        staging = Path(tempfile.mkdtemp(prefix=".copy-", dir=folder))
        try:
            if not _copied(policy, staging):
                log.warning("policy %s changed while it was kept for restarted workers: not kept", policy.version)
                return False
            try:
                os.rename(staging, kept)
            except OSError:  # another worker kept it first
                pass
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    pointer = folder / f".link-{os.getpid()}"
    pointer.unlink(missing_ok=True)
    os.symlink(name, pointer)
    os.replace(pointer, link)  # (atomic: a worker starting reads one snapshot or the other, whole)
    for old in folder.iterdir():
        if old.name.startswith("v-") and old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return True


def _copied(policy: Policy, staging: Path) -> bool:
    """Whether the files of `policy` (those it read; the folders of its globs hold only those) copied under
    `staging` make the same version; an Entra token file the policy names is linked, not copied (a secret, and one
    refreshed in place): a compile of the copy checks it where the original is."""
    for file in policy.watch:
        if not os.path.isfile(file):
            continue  # a glob's folder, or a file looked for and missing
        text = read_capped(file, MAX_POLICY_BYTES)
        if text is None:
            return False
        copy = _mirrored(staging, file)
        copy.parent.mkdir(parents=True, exist_ok=True)
        with open(copy, "w", encoding="utf-8", newline="") as stream:
            stream.write(text)
    for compiled in (policy, policy.shadow):
        if compiled is None:
            continue
        for token_file in _token_files(compiled):
            linked = _mirrored(staging, token_file)
            linked.parent.mkdir(parents=True, exist_ok=True)
            linked.unlink(missing_ok=True)
            os.symlink(token_file, linked)
        try:
            with copied_under(staging):
                if read_tree(_mirrored(staging, compiled.source)).version != compiled.version:
                    return False
        except PolicyError:
            return False
    return True


def load_snapshot(folder: Path, source: Path) -> Policy | None:
    """The last policy kept in `folder` (`keep_snapshot`), compiled again as if read from `source` (its file names,
    and what is watched, are those of `source`'s files); None if none is kept. Raises `PolicyError`."""
    try:
        name = os.readlink(folder / _SNAPSHOT)
    except OSError:
        return None
    base = str(folder / name)
    try:
        with copied_under(base):  # (a file named by absolute path too is read from the copy)
            policy = load_policy(_mirrored(Path(base), str(source)))
    except PolicyError as exc:  # (named as the originals: the copy's names mean nothing to the operator)
        raise PolicyError([PolicyIssue(_original(issue.file, base), issue.line, issue.path,
                                       issue.message.replace(base + os.sep, os.sep)) for issue in exc.issues]) from None
    return _unmirrored(policy, base)


def _original(name: str, base: str) -> str:
    """The original's name of the copy `name` under `base` (other names as they are)."""
    return name[len(base):] if name.startswith(base + os.sep) else name


def _mirrored(base: Path, file: str) -> Path:
    """Where `file` is kept under `base`: at its absolute path, so that every name relative to the root file (the
    includes, the prices file, the shadow policy, the version's hash) is the same there, and a name given by absolute
    path is found there by a read `copied_under` `base`."""
    return base / os.path.abspath(file).lstrip(os.sep)


def _unmirrored(policy: Policy, base: str) -> Policy:
    """`policy` compiled from the copy under `base`, with the names of the copy made those of the originals: the
    file watcher watches the originals, the Entra token refresher reads the original token file."""
    def original(name: str) -> str:
        return _original(name, base)

    providers = {}
    for name, config in policy.providers.items():
        if isinstance(config.options, AzureSpec) and config.options.entra_token_file is not None:
            options = msgspec.structs.replace(config.options,
                                              entra_token_file=original(config.options.entra_token_file))
            config = dataclasses.replace(config, options=options)
        providers[name] = config
    return dataclasses.replace(
        policy, source=original(policy.source), files=tuple(map(original, policy.files)),
        watch=tuple(map(original, policy.watch)), providers=MappingProxyType(providers),
        warnings=tuple(warning.replace(base + os.sep, os.sep) for warning in policy.warnings),
        shadow=_unmirrored(policy.shadow, base) if policy.shadow is not None else None)


def _token_files(policy: Policy) -> list[str]:
    """The Entra token files `policy` names (absolute: the compile made them so)."""
    return [config.options.entra_token_file for config in policy.providers.values()
            if isinstance(config.options, AzureSpec) and config.options.entra_token_file is not None]
