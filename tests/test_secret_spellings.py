"""An upstream that echoes the gateway's provider credential in an error, in any spelling an encoder leaves it in,
never carries it to a client: percent-encoded with some characters kept (Python's `quote` keeps `/`, Go's
`PathEscape` keeps `+` and `=`), JSON `\\uXXXX` escapes, HTML character references. The credential is base64-style
(`/`, `+`), as AWS-style secrets and `Basic` credentials are, and shaped like no known key, so only its removal
by value can take it out.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Awaitable, Callable, Iterator
from typing import Any
from urllib.parse import quote

import openai
import pytest
from aiohttp import web

from gateway.auth.keys import hash_key
from gateway.sanitize import remove_secrets, sanitize_upstream_message
from tests.conftest import FULL_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream

SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
SPELLINGS: dict[str, Callable[[str], str]] = {
    "python-quote": quote,  # wJalrXUtnFEMI/K7MDENG%2BbPxRfiCYEXAMPLEKEY
    "go-pathescape": lambda key: key.replace("/", "%2F"),  # + and = kept
    "lower-hex": lambda key: key.replace("/", "%2f").replace("+", "%2b"),
    "json-u-escape": lambda key: key.replace("/", "\\u002f").replace("+", "\\u002B"),
    "html-decimal": lambda key: key.replace("+", "&#43;"),
    "html-hex": lambda key: key.replace("/", "&#x2F;").replace("+", "&#x2b;"),
    "all-json-u": lambda key: "".join(f"\\u{ord(c):04x}" for c in key),
    "all-html-decimal": lambda key: "".join(f"&#{ord(c)};" for c in key),
}


def leaked(text: str) -> bool:
    """Whether a recognisable piece of the secret is in `text` (any 12 characters of it in a row)."""
    return any(SECRET[i:i + 12] in text for i in range(len(SECRET) - 11))


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_each_spelling_of_the_secret_is_removed(spelling: str) -> None:
    echo = SPELLINGS[spelling](SECRET)
    message = f"Invalid credential {echo} for model m"
    cleaned = sanitize_upstream_message(message, secrets=(SECRET,))
    assert not leaked(cleaned) and "%2" not in cleaned and "&#" not in cleaned, cleaned
    assert cleaned == "Invalid credential [redacted] for model m"
    assert remove_secrets(message, (f"Bearer {SECRET}",)) == "Invalid credential [redacted] for model m"


def test_a_spelling_of_another_text_stays() -> None:
    """Only the secret's own characters go: a different letter (case included) is another text."""
    near = SECRET[:-1] + "y"
    assert remove_secrets(quote(near), (SECRET,)) == quote(near)
    assert remove_secrets(SECRET.lower(), (SECRET,)) == SECRET.lower()
    assert remove_secrets("a&amp;b&lt;cdef!", ("a&b<cdef",)) == "[redacted]!"


class EchoingUpstream(MockUpstream):
    """The mock OpenAI upstream; a model named `echo-<spelling>` fails with a 400 whose message echoes the
    credential the gateway sent, in that spelling."""

    def _route(self, build: Any) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        handle = super()._route(build)

        async def route(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            model = body.get("model") if isinstance(body, dict) else None
            if not isinstance(model, str) or not model.startswith("echo-"):
                return await handle(request)
            key = request.headers.get("Authorization", "").removeprefix("Bearer ")
            message = f"Invalid credential {SPELLINGS[model.removeprefix('echo-')](key)} for model {model}"
            return web.Response(status=400, content_type="application/json", text=json.dumps({"error": {
                "message": message, "type": "invalid_request_error", "code": None, "param": None}}))

        return route


@pytest.fixture(scope="module")
def gateway() -> Iterator[RunningGateway]:
    with EchoingUpstream(api_key=SECRET) as upstream:
        policy = textwrap.dedent(f"""\
            version: 1
            auth: keys
            keys: [{{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}]
            providers:
              echoing: {{kind: openai, base_url: {upstream.base_url}, api_key_env: B8_ECHOED_KEY}}
            models:
            """) + "".join(f"  echo-{name}: {{provider: echoing, model: echo-{name}}}\n" for name in SPELLINGS)
        running = RunningGateway(policy, {"B8_ECHOED_KEY": SECRET}).start()
        try:
            yield running
        finally:
            running.stop()


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_an_echo_in_an_upstream_error_reaches_no_client(gateway: RunningGateway, spelling: str) -> None:
    with openai.OpenAI(base_url=gateway.base_url, api_key=FULL_KEY, max_retries=0, timeout=15) as client:
        with pytest.raises(openai.BadRequestError) as failure:
            client.chat.completions.create(model=f"echo-{spelling}", messages=[{"role": "user", "content": "hi"}])
    text = failure.value.response.text
    message = failure.value.response.json()["error"]["message"]
    assert not leaked(text) and not leaked(json.loads(text)["error"]["message"]), text
    assert "Invalid credential [redacted] for model" in message, message
