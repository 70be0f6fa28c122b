"""The upstream error sanitizer: what goes, what survives, and that it stays cheap."""

from __future__ import annotations

import json
import time
from urllib.parse import quote

import pytest

from gateway.sanitize import sanitize_upstream_message as sanitize

# Each shape in several positions: alone, start, middle, end, quoted, in
# parentheses, followed by punctuation.
POSITIONS = (
    "{}",
    "{} refused the connection",
    "upstream {} refused",
    "could not reach {}",
    "could not reach '{}'",
    'could not reach "{}"',
    "could not reach ({})",
    "could not reach {}.",
    "could not reach {}, retrying",
    "could not reach {}; giving up",
)


def _in_every_position(shapes: list[str]) -> list[tuple[str, str]]:
    return [(template.format(shape), shape) for shape in shapes for template in POSITIONS]


HOSTS = [
    "vllm-0.vllm-headless:8000",
    "vllm-gpu-7:8000",
    "gpu-worker-17.prod.example.com",
    "vllm-0.vllm-headless.svc",
    "inference.svc.cluster.local:9000",
    "localhost:8080",
    "localhost:80",
    "vllm:8000",
    "ollama:11434",
    "db.prod.acme",
    "gpu-worker-17.prod.example.com:443",
    "ip-10-0-0-5.ec2.internal",
    "example.com",
]
ADDRESSES = [
    "10.1.2.3",
    "192.168.0.7:443",
    "fd00::1:8000",
    "2001:db8::5",
    "::1",
    "fe80::1%eth0",
    "[fe80::1]:8080",
    "[2001:db8::5]",
    "::ffff:10.0.0.1",
    "2001:0db8:0000:0000:0000:0000:0000:0001",
    "fd00::1:11434",
]
URLS = [
    "http://10.1.2.3:8000/v1/chat",
    "https://gpu-worker-17.prod.example.com/v1?key=abc",
    "http://[fd00::1]:8000/v1",
    "redis://:hunter2@cache:6379/0",
    "https://api.openai.com/v1/chat/completions",
]
CREDENTIALS = [
    "sk-proj-abcdefghijklmnop1234",
    "sk-xxxxxxxxxxxx",
    "gw-Zm9vYmFyYmF6cXV4",
    "Bearer abc.def.ghi",
    "Basic dXNlcjpwYXNzd29yZA==",
    "a1" * 20,
    "api_key_12345678",
]


@pytest.mark.parametrize(("message", "shape"), _in_every_position(HOSTS))
def test_host_names_and_host_ports_become_host(message: str, shape: str) -> None:
    cleaned = sanitize(message)
    assert shape not in cleaned
    assert "[host]" in cleaned
    assert cleaned == message.replace(shape, "[host]")


@pytest.mark.parametrize(("message", "shape"), _in_every_position(ADDRESSES))
def test_ip_addresses_become_address(message: str, shape: str) -> None:
    cleaned = sanitize(message)
    assert cleaned == message.replace(shape, "[address]")


GLUED_ADDRESSES = [  # an address glued to a name: the name stays, the address goes
    ("backend_10.0.0.5:8080", "backend_[address]"),
    ("upstream_pool_192.168.1.20", "upstream_pool_[address]"),
    ("10.0.0.5_eth0", "[address]_eth0"),
    ("host10.0.0.5", "host[address]"),
    ("gpu172.16.4.2", "gpu[address]"),
    ("lo127.0.0.1:11434", "lo[address]"),
    ("node7.1.2.3:8080", "node[address]"),  # a public address glued to a letter: with its port
    ("svc_8.8.8.8", "svc_[address]"),
]


@pytest.mark.parametrize(("message", "shape", "scrubbed"),
                         [(message, shape, scrubbed) for shape, scrubbed in GLUED_ADDRESSES
                          for message, _ in _in_every_position([shape])])
def test_addresses_glued_to_names_are_scrubbed(message: str, shape: str, scrubbed: str) -> None:
    assert sanitize(message) == message.replace(shape, scrubbed)


@pytest.mark.parametrize("message", [
    "requires v1.2.3.4 or later", "build V10.0.0.1 failed", "python3.11.4.1 is not supported",
    "codec x264.1.2.3", "pod010.0.0.5", "release_v2.0.1 notes", "see 1.2.3.4.5 and 1.2.3.4a",
])
def test_versions_glued_to_letters_survive(message: str) -> None:
    assert sanitize(message) == message


@pytest.mark.parametrize(("message", "shape"), _in_every_position(URLS))
def test_urls_become_url(message: str, shape: str) -> None:
    cleaned = sanitize(message)
    assert cleaned == message.replace(shape, "[url]")


@pytest.mark.parametrize(("message", "shape"), _in_every_position(CREDENTIALS))
def test_credential_shapes_become_redacted(message: str, shape: str) -> None:
    cleaned = sanitize(message)
    assert cleaned == message.replace(shape, "[redacted]")


SECRET = "localpass-9f8e7d"


@pytest.mark.parametrize("configured", [f"Bearer {SECRET}", SECRET, f"  Bearer {SECRET} ", f"basic {SECRET}"])
@pytest.mark.parametrize(
    "message",
    [
        f"Incorrect API key provided: {SECRET}",
        f"Incorrect API key provided: {SECRET}.",
        f"{SECRET} is not a valid key",
        f"the key '{SECRET}' was revoked",
        f"Authorization: Bearer {SECRET} rejected",
        f"authorization: bearer {SECRET}",
        json.dumps({"error": {"message": "bad key", "key": SECRET}}),
        f"key={quote(SECRET)}&x=1",
        f"echo:{SECRET}{SECRET}",
    ],
)
def test_configured_secret_is_removed_by_value(configured: str, message: str) -> None:
    cleaned = sanitize(message, secrets=[configured])
    assert SECRET not in cleaned
    assert "9f8e7d" not in cleaned
    assert "[redacted]" in cleaned


def test_secret_removal_keeps_the_rest_of_the_message() -> None:
    message = f"Incorrect API key provided: {SECRET}. You can find your key in the dashboard."
    assert sanitize(message, secrets=[f"Bearer {SECRET}"]) == (
        "Incorrect API key provided: [redacted]. You can find your key in the dashboard."
    )
    # The prefixed form goes as one piece.
    assert sanitize(f"sent Bearer {SECRET}", secrets=[f"Bearer {SECRET}"]) == "sent [redacted]"


def test_secret_of_any_shape_is_removed() -> None:
    odd = 'p@ss"w0rd/with\\stuff'
    for message in (f"got {odd} back", "got " + json.dumps(odd) + " back", f"got {quote(odd, safe='')} back"):
        cleaned = sanitize(message, secrets=[odd])
        assert "w0rd" not in cleaned, message


def test_secret_far_into_a_long_message_is_removed_before_the_cut() -> None:
    # The secret straddles the point where the shape rules stop reading: it must
    # not survive in part.
    # Long URLs shrink to `[url]`, so whatever is near the cut lands inside the output.
    urls = " ".join(["http://internal/" + "p" * 80] * 10)
    for offset in range(985, 1001):
        message = urls + " " * (offset - len(urls)) + SECRET + " tail"
        cleaned = sanitize(message, secrets=[SECRET])
        assert "localp" not in cleaned and "9f8e7d" not in cleaned and "-9f" not in cleaned
        assert cleaned.startswith("[url] [url]")


def test_short_secrets_are_not_removed_by_substring() -> None:
    # Under six characters a secret hits ordinary words more than it hits an echo.
    assert sanitize("the test failed", secrets=["test", "Bearer te"]) == "the test failed"


def test_masked_echoes_are_not_the_secret() -> None:
    # Removal by value does not touch a masked echo; a key-shaped one still goes by shape.
    secrets = ["Bearer sk-abcdefgh1234"]
    assert sanitize("the key ending in 1234 was rejected", secrets=secrets) == "the key ending in 1234 was rejected"
    assert sanitize("key abc...1234 was rejected", secrets=secrets) == "key abc...1234 was rejected"
    masked = sanitize("Incorrect API key provided: sk-***1234", secrets=secrets)
    assert masked == "Incorrect API key provided: [redacted]"


def test_a_bare_string_of_secrets_is_one_secret() -> None:
    # An Iterable[str] mistake (a str) must not turn into per-character secrets.
    assert sanitize(f"key {SECRET} bad", secrets=SECRET) == "key [redacted] bad"
    assert sanitize("api.openai.com: no", public_hosts="api.openai.com") == "api.openai.com: no"


@pytest.mark.parametrize(
    "public",
    [["api.openai.com"], ["API.OpenAI.com"], ["https://api.openai.com/v1"], ["api.openai.com:443"]],
)
def test_public_hosts_are_kept(public: list[str]) -> None:
    message = "api.openai.com returned 500; api.openai.com:443 is busy; gpu-1.prod.example.com failed"
    assert sanitize(message, public_hosts=public) == (
        "api.openai.com returned 500; api.openai.com:443 is busy; [host] failed"
    )
    assert sanitize("api.openai.com returned 500") == "[host] returned 500"


def test_public_hosts_do_not_exempt_urls_or_addresses() -> None:
    assert sanitize("see https://api.openai.com/docs", public_hosts=["api.openai.com"]) == "see [url]"
    assert sanitize("at 10.0.0.5", public_hosts=["10.0.0.5"]) == "at [address]"


FALSE_POSITIVES = [
    "Please retry.Thanks",
    "max_tokens is too large: 99999",
    "version v1.2.3 is not supported",
    "version 1.2.3 is not supported",
    "temperature 3.14 is out of range",
    "could not parse config.yaml",
    "error in main.py:42",
    "model gpt-4o-mini does not exist",
    "model claude-3.5-sonnet does not exist",
    "model meta-llama/Llama-3.1-8B does not exist",
    "model Qwen/Qwen2.5-7B-Instruct is loading",
    "model llama3.1:8b is not pulled",
    "model text-embedding-3-large",
    "retry at 10:30 or 10:30:45 UTC",
    "timestamp 2024-01-01T10:30:00Z",
    "std::vector and a::b and Foo::bar",
    "ratio 1:2:3",
    "HTTP error:500 status:429",
    "torch.cuda.OutOfMemoryError: CUDA out of memory",
    "Field required: body.messages.0.content",
    "e.g. this, i.e. that, U.S.A. and Node.js",
    "Basic auth is not supported; send a Bearer token",
    "Missing bearer authentication in header",
    "token_limit_exceeded",
    "context_length_exceeded: 4097 > 4096",
    "Invalid 'messages[0].content': expected a string",
    "Rate limit reached for requests per min (RPM): Limit 3, Used 3",
    "finished.Next step",
]


@pytest.mark.parametrize("message", FALSE_POSITIVES)
def test_ordinary_prose_survives_unchanged(message: str) -> None:
    assert sanitize(message) == message


def test_everything_together() -> None:
    message = (
        "upstream vllm-0.vllm-headless:8000 (at 10.0.0.5, fd00::1:8000) rejected "
        "Bearer localpass-9f8e7d for model gpt-4o-mini; see http://gpu-1.internal/logs."
    )
    assert sanitize(message, secrets=["Bearer localpass-9f8e7d"]) == (
        "upstream [host] (at [address], [address]) rejected [redacted] for model gpt-4o-mini; see [url]."
    )


def test_non_strings_and_empty_give_empty() -> None:
    assert sanitize(None) == ""
    assert sanitize({"not": "a string"}) == ""
    assert sanitize(b"bytes 10.0.0.1") == ""
    assert sanitize(42) == ""
    assert sanitize("") == ""


def test_non_printables_are_squashed_and_length_is_capped() -> None:
    assert sanitize("line\nbreaks\tand\x00nul") == "line breaks and nul"
    assert sanitize("a\u200bb  c\r\n") == "a b c"
    assert len(sanitize("word " * 1000)) <= 500
    assert sanitize("word " * 1000).startswith("word word")


def test_a_word_cut_by_the_scan_window_is_dropped() -> None:
    # The window ends in the middle of an address: no half of it may remain.
    # Long URLs shrink to `[url]`, so the cut word would land well inside the output.
    urls = " ".join(["http://internal/" + "p" * 80] * 10)
    message = urls + " " * (990 - len(urls)) + "10.123.45.67:8000 trailing"
    assert message.index("10.123") < 1000 < message.index(" trailing")
    cleaned = sanitize(message)
    assert cleaned == " ".join(["[url]"] * 10)
    # White space past the window does not cost the last word.
    assert sanitize("hello world" + " " * 2000) == "hello world"


@pytest.mark.parametrize(
    "unit",
    ["a.", "a:", "1:", "a-", "::", "1.", "http://", "http://[", "Bearer ", "sk-", "ab::", "[1:", "a.b:1", "f:", "%",
     "1.1.1.1.", "a_", "\x00", "é", "x"],
)
def test_hostile_input_is_cheap_and_bounded(unit: str) -> None:
    message = unit * (100 * 1024 // len(unit))
    started = time.perf_counter()
    cleaned = sanitize(message, secrets=["Bearer sk-" + "z" * 40], public_hosts=["api.openai.com"])
    elapsed = time.perf_counter() - started
    assert isinstance(cleaned, str) and len(cleaned) <= 500
    assert elapsed < 2  # a loose guard; typical is well under a millisecond


def test_hostile_input_output_is_still_scrubbed() -> None:
    message = "fd00::1:8000 gpu-1.prod.example.com 10.0.0.1 " * 3000
    cleaned = sanitize(message)
    assert len(cleaned) <= 500
    words = cleaned.split()
    assert words[:3] == ["[address]", "[host]", "[address]"]
    # The 500-character cap may cut the last marker, never reveal anything else.
    assert all("[address]".startswith(word) or "[host]".startswith(word) for word in words)


@pytest.mark.parametrize("gap", ["\n", "\r\n", " ", "\t", "\u200b", "\u00ad"])
def test_a_secret_broken_by_a_line_break_or_an_invisible_character_is_removed(gap: str) -> None:
    """An upstream that wraps its message (or a zero-width space) split the echoed key: the pieces were too short
    for the key-shape rules, and the whole key reached the client once the break became a space."""
    key = "AIzaSyA1b2C3d4E5f6G7h8I9j0KlMnOpQrStUv"
    for cut in (5, 10, 20):
        cleaned = sanitize(f"API key not valid: {key[:cut]}{gap}{key[cut:]}. Check it.", secrets=[key])
        assert cleaned == "API key not valid: [redacted]. Check it.", (gap, cut, cleaned)


def test_a_secret_percent_encoded_in_lower_case_or_json_escaped_with_slashes_is_removed() -> None:
    basic = "Basic dXNlcjpwYXNzd29yZA=="
    assert sanitize("auth dXNlcjpwYXNzd29yZA%3d%3d refused", secrets=[basic]) == "auth [redacted] refused"
    token = "tok/9f8e7d6c5b4a+xyz="
    assert sanitize('{"t": "tok\\/9f8e7d6c5b4a+xyz="} and tok%2f9f8e7d6c5b4a%2bxyz%3d', secrets=[token]) == (
        '{"t": "[redacted]"} and [redacted]')


def test_an_error_answer_is_scrubbed_beside_its_error_too() -> None:
    """`detail` or `incomplete_details` beside the `error` carried the key verbatim; the answer's identity stays."""

    from gateway.providers.scrub import scrubbed_error
    from gateway.sanitize import remove_secrets

    key = "sk-proj-AbCdEfGh1234567890IjKlMnOp"
    code = "import os\n\nprint(os.environ['HOME'])  # see https://docs.example.com/x\n" * 20
    answer_id = "resp_" + "0123456789abcdef" * 3
    body = json.dumps({"id": answer_id, "status": "failed", "error": {"message": f"bad key {key} at 10.0.0.5"},
                       "detail": f"Incorrect API key provided: {key}", "incomplete_details": {"reason": key},
                       "output": [{"id": "msg_" + "f" * 40, "content": [{"text": code}]}],
                       "instructions": "See https://example.com/rules"}).encode()
    cleaned = json.loads(scrubbed_error(body, lambda text: sanitize(text, secrets=[f"Bearer {key}"]),
                                        lambda text: remove_secrets(text, [f"Bearer {key}"])))
    assert key not in json.dumps(cleaned) and "10.0.0.5" not in json.dumps(cleaned)
    assert cleaned["detail"] == "Incorrect API key provided: [redacted]"
    # the rest of the answer keeps its ids, its code and its URLs (the shape rules are for the error's text only)
    assert cleaned["id"] == answer_id and cleaned["output"][0]["id"] == "msg_" + "f" * 40
    assert cleaned["output"][0]["content"][0]["text"] == code and cleaned["instructions"] == "See https://example.com/rules"
    assert list(cleaned) == ["id", "status", "error", "detail", "incomplete_details", "output", "instructions"]
