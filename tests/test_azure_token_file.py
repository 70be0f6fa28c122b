"""An Azure provider's Entra ID token from a file (`azure.entra_token_file`), kept fresh without a reload.

Through a real gateway in front of the mock upstream (which records the headers it receives): the
file's token is sent as `Authorization: Bearer`; a rewritten file, or a Kubernetes-style swap of
its `..data` symlink, is picked up by a later request without a reload; a file deleted, emptied or
made unusable keeps the last token and logs one warning per change (never the token); an upstream
error echoing the token reaches the client scrubbed; the refresher's task ends with the gateway
and with a reload's old policy. The policy side: one credential of three, a file that holds no
token (an error for `serve`, a warning for `check`), the refresh interval's range, all located.
"""

from __future__ import annotations

import asyncio
import logging
import os
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from gateway import cli
from gateway.policy import PolicyError, compile_text, load_policy
from gateway.policy.token_file import EMPTY, MISSING, TokenRead, read_token_file
from gateway.providers import token_refresh
from gateway.providers.azure import AzureProvider
from gateway.providers.token_refresh import TokenFileRefresher
from tests.conftest import RunningGateway
from tests.support.mock_upstream import MockUpstream

# JWT-shaped, of different lengths: a rewrite in place within the file system's timestamp tick still
# shows as another size (the change is noticed by inode, mtime and size).
TOKEN_1 = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.first-token.c2lnbmF0dXJlLW9uZQ"
TOKEN_2 = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.second-token-rotated.c2lnbmF0dXJlLXR3bw"
TOKEN_3 = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.third-token-after-the-gap.c2lnbmF0dXJlLXRocmVl"
TOKENS = (TOKEN_1, TOKEN_2, TOKEN_3)
REFRESH_S = 0.1  # the smallest interval the policy accepts: a change shows within a few ticks
LOGGER = "gateway.providers.token_refresh"


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll `condition` (bounded): the refresher's ticks are not synchronised with the test."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def azure_policy(upstream: MockUpstream, token_file: Path | str, *, refresh_s: float = REFRESH_S,
                 comment: str = "") -> str:
    return textwrap.dedent(f"""\
        version: 1
        server: {{watch_policy: false}}  # reloads only when a test asks
        auth: none
        providers:
          az:
            kind: azure
            base_url: {upstream.base_url.removesuffix("/v1")}
            timeouts: {{connect_s: 1, first_byte_s: 5, idle_s: 5, total_s: 20}}
            azure:
              entra_token_file: {token_file}
              entra_token_refresh_s: {refresh_s}
        models:
          chat: {{provider: az, model: mock-model}}
          echo-secrets: {{provider: az, model: fault-echo-secrets}}
          echo-secrets-stream: {{provider: az, model: fault-echo-secrets-midstream}}
        """) + comment


@pytest.fixture(scope="module")
def open_upstream() -> Iterator[MockUpstream]:
    """A mock upstream that accepts any credential and records the ones it receives."""
    with MockUpstream(api_key=None) as mock:
        yield mock


@pytest.fixture
def start(open_upstream: MockUpstream) -> Iterator[Callable[..., RunningGateway]]:
    started: list[RunningGateway] = []

    def make(token_file: Path, *, source: Path | None = None, **options: float) -> RunningGateway:
        open_upstream.clear()
        running = RunningGateway(azure_policy(open_upstream, token_file, **options), {}, source=source).start()
        started.append(running)
        return running

    yield make
    for running in started:
        running.stop()


def write_token(path: Path, text: str) -> None:
    """As a sidecar does: a new file moved over the old one in one step."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def sent_token(gateway: RunningGateway, upstream: MockUpstream) -> str:
    """The Authorization header of a fresh request, as the upstream received it."""
    answer = httpx.post(gateway.base_url + "/chat/completions", timeout=20,
                        json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]})
    assert answer.status_code == 200, answer.text
    headers = upstream.requests[-1].headers
    assert "api-key" not in headers
    return headers["authorization"]


def provider_of(gateway: RunningGateway) -> AzureProvider:
    provider = gateway.gateway.runtime.providers["az"]
    assert isinstance(provider, AzureProvider)
    return provider


def leaks(token: str, text: str) -> bool:
    """Whether any piece of `token` is in `text` (the scrub's shape rules alone would take only the JWT's head)."""
    return any(part in text for part in token.split("."))


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if record.name == LOGGER and record.levelno == logging.WARNING]


# -- through a gateway -----------------------------------------------------------------------------------


def test_the_files_token_is_sent_as_a_bearer(tmp_path: Path, start: Callable[..., RunningGateway],
                                              open_upstream: MockUpstream) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"  Bearer {TOKEN_1}\n\n")  # whitespace and the scheme are tolerated
    gateway = start(token_file)
    assert sent_token(gateway, open_upstream) == f"Bearer {TOKEN_1}"
    assert open_upstream.requests[-1].path == "/openai/deployments/mock-model/chat/completions"
    assert "Authorization" not in gateway.policy.providers["az"].headers  # not read into the policy


def test_a_rewritten_file_is_sent_without_a_reload(tmp_path: Path, start: Callable[..., RunningGateway],
                                                    open_upstream: MockUpstream) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN_1)
    gateway = start(token_file)
    runtime = gateway.gateway.runtime
    assert sent_token(gateway, open_upstream) == f"Bearer {TOKEN_1}"
    write_token(token_file, TOKEN_2)  # replaced (a new inode)
    wait_until(lambda: sent_token(gateway, open_upstream) == f"Bearer {TOKEN_2}", "the replaced file's token")
    token_file.write_text(TOKEN_3)  # rewritten in place (the same inode)
    wait_until(lambda: sent_token(gateway, open_upstream) == f"Bearer {TOKEN_3}", "the rewritten file's token")
    assert gateway.gateway.runtime is runtime and gateway.gateway.last_reload is None  # no reload did it


def test_a_kubernetes_volume_swap_of_its_data_symlink_is_followed(
    tmp_path: Path, start: Callable[..., RunningGateway], open_upstream: MockUpstream,
) -> None:
    # A projected or secret volume: `token` -> `..data/token`, `..data` -> a timestamped folder, and an
    # update writes a new folder, points `..data_tmp` at it and renames that over `..data`.
    volume = tmp_path / "volume"
    (volume / "..2026_12_05_21_00_00.000000001").mkdir(parents=True)
    (volume / "..2026_12_05_21_00_00.000000001" / "token").write_text(TOKEN_1)
    (volume / "..data").symlink_to("..2026_12_05_21_00_00.000000001")
    (volume / "token").symlink_to("..data/token")
    gateway = start(volume / "token")
    assert sent_token(gateway, open_upstream) == f"Bearer {TOKEN_1}"
    (volume / "..2026_12_05_22_00_00.000000002").mkdir()
    (volume / "..2026_12_05_22_00_00.000000002" / "token").write_text(TOKEN_2)
    (volume / "..data_tmp").symlink_to("..2026_12_05_22_00_00.000000002")
    os.replace(volume / "..data_tmp", volume / "..data")
    wait_until(lambda: sent_token(gateway, open_upstream) == f"Bearer {TOKEN_2}", "the swapped volume's token")
    assert provider_of(gateway).token_file is not None
    assert provider_of(gateway).token_file.path == str(volume / "token")  # the link itself, not resolved once


def test_a_file_deleted_emptied_or_unusable_keeps_the_last_token_and_warns_once_per_change(
    tmp_path: Path, start: Callable[..., RunningGateway], open_upstream: MockUpstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN_1)
    gateway = start(token_file)
    assert sent_token(gateway, open_upstream) == f"Bearer {TOKEN_1}"

    token_file.unlink()
    wait_until(lambda: any(MISSING in w for w in warnings_of(caplog)), "the warning for a missing file")
    time.sleep(REFRESH_S * 5)  # more ticks: the file is still missing, and nothing more is said
    assert sent_token(gateway, open_upstream) == f"Bearer {TOKEN_1}"
    assert len(warnings_of(caplog)) == 1

    token_file.write_text("\n")
    wait_until(lambda: any(EMPTY in w for w in warnings_of(caplog)), "the warning for an empty file")
    token_file.write_text("two words")  # another unusable state: said once more
    wait_until(lambda: any("spaces" in w for w in warnings_of(caplog)), "the warning for a file of two words")
    token_file.unlink()
    token_file.mkdir()  # not a file at all
    wait_until(lambda: any("not a regular file" in w for w in warnings_of(caplog)), "the warning for a folder")
    assert sent_token(gateway, open_upstream) == f"Bearer {TOKEN_1}"
    assert len(warnings_of(caplog)) == 4

    token_file.rmdir()
    token_file.write_text(TOKEN_3)
    wait_until(lambda: sent_token(gateway, open_upstream) == f"Bearer {TOKEN_3}", "the token after the gap")
    assert any("now holds a token" in record.getMessage() for record in caplog.records)
    logged = "\n".join(record.getMessage() for record in caplog.records) + caplog.text
    assert str(token_file) in logged and not any(token in logged for token in TOKENS)


def test_an_upstream_error_echoing_the_token_reaches_the_client_scrubbed(
    tmp_path: Path, start: Callable[..., RunningGateway], open_upstream: MockUpstream,
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN_1)
    gateway = start(token_file)
    answer = httpx.post(gateway.base_url + "/chat/completions", timeout=20,
                        json={"model": "echo-secrets", "messages": [{"role": "user", "content": "hi"}]})
    assert answer.status_code == 502
    assert TOKEN_1 in open_upstream.requests[-1].headers["authorization"]  # the upstream did get it...
    assert not leaks(TOKEN_1, answer.text) and "[redacted]" in answer.json()["error"]["message"]  # ...echoed

    write_token(token_file, TOKEN_2)
    wait_until(lambda: sent_token(gateway, open_upstream) == f"Bearer {TOKEN_2}", "the new token")
    streamed = httpx.post(gateway.base_url + "/chat/completions", timeout=20, json={
        "model": "echo-secrets-stream", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    assert "error" in streamed.text and "[redacted]" in streamed.text and not leaks(TOKEN_2, streamed.text)
    # An answer to a request sent just before the rotation may echo the token it replaced: scrubbed too.
    scrubbed = provider_of(gateway).sanitize(f"keys {TOKEN_1} and {TOKEN_2} were refused")
    assert not leaks(TOKEN_1, scrubbed) and not leaks(TOKEN_2, scrubbed)


def test_requests_never_read_the_file(tmp_path: Path, start: Callable[..., RunningGateway],
                                      open_upstream: MockUpstream) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN_1)
    gateway = start(token_file, refresh_s=300)  # no tick during the test: only the start read the file
    token_file.unlink()
    for _ in range(20):
        assert sent_token(gateway, open_upstream) == f"Bearer {TOKEN_1}"


def test_the_refresher_task_ends_with_the_gateway_and_with_a_reloads_old_policy(
    tmp_path: Path, start: Callable[..., RunningGateway], open_upstream: MockUpstream,
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN_1)
    source = tmp_path / "policy.yaml"
    gateway = start(token_file, source=source)
    old = provider_of(gateway).token_file
    assert old is not None and old.task is not None and not old.task.done()
    old_task = old.task

    # A changed policy: a new runtime whose provider reads the file again; the old one's task ends.
    source.write_text(azure_policy(open_upstream, token_file, comment="# changed\n"))
    token_file.write_text(TOKEN_2)
    loop = gateway.gateway.loop
    assert loop is not None
    result = asyncio.run_coroutine_threadsafe(gateway.gateway.reload("test"), loop).result(30)
    assert result["result"] == "ok", result
    new = provider_of(gateway).token_file
    assert new is not None and new is not old and new.task is not None
    wait_until(old_task.done, "the old policy's refresher to end")
    assert old.task is None
    assert sent_token(gateway, open_upstream) == f"Bearer {TOKEN_2}"

    new_task = new.task
    gateway.stop()
    assert new_task.done() and new.task is None
    assert not [task for task in asyncio.all_tasks(loop) if task.get_name().startswith("token-file:")]


# -- the policy ------------------------------------------------------------------------------------------


def policy_with(azure: str, provider: str = "") -> str:
    return textwrap.dedent("""\
        version: 1
        auth: none
        providers:
          az:
            kind: azure
            base_url: https://r.openai.azure.com
        """) + textwrap.indent(textwrap.dedent(provider), "    ") \
        + "    azure:\n" + textwrap.indent(textwrap.dedent(azure), "      ") \
        + "models:\n  m: {provider: az, model: gpt-4o}\n"


def issues_of(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> list[str]:
    policy = tmp_path / "p.yaml"
    policy.write_text(text)
    with pytest.raises(PolicyError) as caught:
        load_policy(policy, env or {"K": "sk-key", "T": TOKEN_1})
    return [str(issue) for issue in caught.value.issues]


@pytest.fixture
def token_path(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN_1)
    return path


@pytest.mark.parametrize(("azure", "provider", "line", "expected"), [
    ("entra_token_file: {file}\n", "api_key_env: K\n", 9,
     "providers.az.azure.entra_token_file: give api_key_env or azure.entra_token_file, not both"),
    ("entra_token_env: T\nentra_token_file: {file}\n", "", 9,
     "providers.az.azure.entra_token_file: give azure.entra_token_env or azure.entra_token_file, not both"),
    ("entra_token_env: T\nentra_token_file: {file}\n", "api_key_env: K\n", 10,
     "providers.az.azure.entra_token_file: give one of api_key_env, azure.entra_token_env or "
     "azure.entra_token_file, not all three"),
    ("entra_token_env: T\n", "api_key_env: K\n", 9,
     "providers.az.azure.entra_token_env: give api_key_env or azure.entra_token_env, not both"),
    ("entra_token_file: {file}\n", "headers_env: {authorization: T}\n", 7,
     "providers.az.headers_env.authorization: the Authorization header is set from azure.entra_token_file"),
    ("entra_token_refresh_s: 5\n", "api_key_env: K\n", 9,
     "providers.az.azure.entra_token_refresh_s: entra_token_refresh_s applies to azure.entra_token_file"),
    ("entra_token_file: {file}\nentra_token_refresh_s: 0\n", "", 9,
     "providers.az.azure.entra_token_refresh_s: expected `float` >= 0.1"),
    ("entra_token_file: {file}\nentra_token_refresh_s: 0.01\n", "", 9,
     "providers.az.azure.entra_token_refresh_s: expected `float` >= 0.1"),
    ("entra_token_file: {file}\nentra_token_refresh_s: 3600\n", "", 9,
     "providers.az.azure.entra_token_refresh_s: expected `float` <= 300"),
    ("entra_token_file: {file}\nentra_token_refresh_s: soon\n", "", 9,
     "providers.az.azure.entra_token_refresh_s: expected `float`"),
    ("entra_token_file: ''\n", "", 8, "providers.az.azure.entra_token_file: expected"),
    ("entra_token_file: [a, b]\n", "", 8, "providers.az.azure.entra_token_file: expected `str`"),
])
def test_credential_conflicts_and_bad_fields_are_located(
    tmp_path: Path, token_path: Path, azure: str, provider: str, line: int, expected: str,
) -> None:
    found = issues_of(tmp_path, policy_with(azure.format(file=token_path), provider))
    assert any(issue.startswith(f"{tmp_path / 'p.yaml'}:{line}: {expected}") for issue in found), found


@pytest.mark.parametrize(("content", "problem"), [
    (None, "is missing"),
    ("", "is empty"),
    (" \n\t\n", "is empty"),
    ("Bearer\n", "is empty"),
    ("Bearer   \n", "is empty"),
    (f"{TOKEN_1}\n{TOKEN_2}\n", "holds spaces or control characters"),
    (f"{TOKEN_1}\x00", "holds spaces or control characters"),
    ("null\n", "is shorter than 16 characters"),
    (f"tökén-{TOKEN_1}", "is not ASCII text"),
    ("x" * (64 * 1024 + 1), "is larger than 65536 bytes"),
    ("folder", "is not a regular file"),
])
def test_a_file_without_a_token_fails_serve_and_warns_check(
    tmp_path: Path, content: str | None, problem: str, capsys: pytest.CaptureFixture[str],
) -> None:
    token_file = tmp_path / "token"
    if content == "folder":
        token_file.mkdir()
    elif content is not None:
        token_file.write_bytes(content.encode())
    text = policy_with(f"entra_token_file: {token_file}\n")
    expected = f"{tmp_path / 'p.yaml'}:8: providers.az.azure.entra_token_file: the token file `{token_file}` {problem}"
    found = issues_of(tmp_path, text)  # as `gateway serve` and reloads load it
    assert any(issue.startswith(expected) for issue in found), found
    assert not any(token in issue for issue in found for token in (TOKEN_1, TOKEN_2))

    checked = load_policy(tmp_path / "p.yaml", {}, require_env=False)  # as `gateway check` does
    assert any(warning.startswith(expected) for warning in checked.warnings), checked.warnings
    assert cli.main(["check", str(tmp_path / "p.yaml")]) == 0
    assert cli.main(["check", "--strict-env", str(tmp_path / "p.yaml")]) == 1
    err = capsys.readouterr().err
    assert f"the token file `{token_file}` {problem}" in err and TOKEN_1 not in err


def test_a_relative_path_is_relative_to_the_policy_file(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "token").write_text(TOKEN_1)
    (tmp_path / "p.yaml").write_text(policy_with("entra_token_file: secrets/token\nentra_token_refresh_s: 2.5\n"))
    provider = load_policy(tmp_path / "p.yaml", {}).providers["az"]
    options = provider.options
    assert options is not None and getattr(options, "entra_token_file", None) == str(tmp_path / "secrets" / "token")
    assert getattr(options, "entra_token_refresh_s", None) == 2.5
    assert provider.headers == {} and provider.secrets == ()  # the token is the provider's to read, at its start


def test_an_unset_entra_token_env_names_its_own_field() -> None:
    with pytest.raises(PolicyError) as caught:
        compile_text(policy_with("entra_token_env: UNSET_TOKEN_VAR\n"), "p.yaml", {})
    assert [str(issue) for issue in caught.value.issues] == [
        "p.yaml:8: providers.az.azure.entra_token_env: environment variable `UNSET_TOKEN_VAR` is not set"]


def test_the_reader_follows_symlinks_and_never_reports_the_text(tmp_path: Path) -> None:
    target = tmp_path / "real"
    target.write_text(f"bearer\t{TOKEN_2}  \n")
    link = tmp_path / "link"
    link.symlink_to(target)
    read = read_token_file(str(link))
    assert read.token == TOKEN_2 and read.problem is None
    assert read.fingerprint is not None and read.fingerprint[0] == target.stat().st_ino
    assert TOKEN_2 not in repr(read)
    target.unlink()  # a dangling link: missing
    assert read_token_file(str(link)).problem == MISSING


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_an_unreadable_file_is_reported_by_its_error(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN_1)
    token_file.chmod(0)
    assert read_token_file(str(token_file)).problem == "cannot be read (PermissionError)"


def test_a_file_missing_at_start_sends_no_token_until_it_holds_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    # What a provider meets when its policy was loaded without requiring credentials, or the file went
    # between the load and the start: it starts all the same, and takes the token once it is written.
    caplog.set_level(logging.INFO, logger=LOGGER)
    token_file = tmp_path / "token"
    taken: list[str] = []

    async def scenario() -> None:
        refresher = TokenFileRefresher("az", str(token_file), REFRESH_S, taken.append)
        await refresher.start()
        await refresher.start()  # a second start starts nothing more
        assert taken == [] and refresher.secrets == ()
        token_file.write_text(TOKEN_1)
        async with asyncio.timeout(10):
            while not taken:
                await asyncio.sleep(0.02)
        assert taken == [TOKEN_1] and refresher.secrets == (TOKEN_1,)
        write_token(token_file, TOKEN_2)
        async with asyncio.timeout(10):
            while len(taken) < 2:
                await asyncio.sleep(0.02)
        assert refresher.secrets == (TOKEN_2, TOKEN_1)  # the replaced token is still scrubbed
        task = refresher.task
        await refresher.aclose()
        await refresher.aclose()
        assert task is not None and task.done() and refresher.task is None
        assert [t for t in asyncio.all_tasks() if t.get_name().startswith("token-file:")] == []

    asyncio.run(scenario())
    assert taken == [TOKEN_1, TOKEN_2]
    assert warnings_of(caplog) == [f"provider az: the token file {token_file} is missing; no token is sent until "
                                   f"it holds one, and the file is checked every {REFRESH_S:g} s"]


def test_a_refresher_closed_while_it_starts_leaves_no_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN_1)

    def slow_read(path: str) -> TokenRead:
        time.sleep(0.3)  # in the worker thread: the close comes while the first read is under way
        return read_token_file(path)

    monkeypatch.setattr(token_refresh, "read_token_file", slow_read)

    async def scenario() -> None:
        taken: list[str] = []
        refresher = TokenFileRefresher("az", str(token_file), REFRESH_S, taken.append)
        starting = asyncio.create_task(refresher.start())
        await asyncio.sleep(0.05)
        await refresher.aclose()
        await starting
        assert refresher.task is None
        assert taken == []  # no token handed to a closed provider (its session is gone)
        assert [t for t in asyncio.all_tasks() if t.get_name().startswith("token-file:")] == []

    asyncio.run(scenario())
