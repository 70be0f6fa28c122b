"""Two different credentials in one request (Authorization, api-key, x-api-key, repeated or mixed) are refused with
400 `ambiguous_credentials` before any key look-up: resolving them (the last Authorization, the first api-key, Bearer
over x-api-key) let a front proxy that adds its own header decide which tenant the request bills to. The same
value repeated is one credential. The admin and metrics token checks read the same parser."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from tests.conftest import FULL_KEY, LIMITED_KEY, RunningGateway

ADMIN = "admin-token-for-ambiguity-0123456789"
METRICS = "metrics-token-for-ambiguity-0123456789"
EMBED = {"model": "embed", "input": "hi"}  # FULL may use `embed`, LIMITED may not


def _bearer(key: str) -> tuple[str, str]:
    return ("Authorization", f"Bearer {key}")


def _refused(answer: httpx.Response) -> None:
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "ambiguous_credentials", error
    assert FULL_KEY not in answer.text and LIMITED_KEY not in answer.text


@pytest.mark.parametrize("headers", [
    [_bearer(LIMITED_KEY), _bearer(FULL_KEY)],  # was served as FULL (the last Authorization)
    [_bearer(FULL_KEY), _bearer(LIMITED_KEY)],
    [_bearer(LIMITED_KEY), ("x-api-key", FULL_KEY)],  # was LIMITED (Bearer beat x-api-key)
    [("api-key", FULL_KEY), ("x-api-key", LIMITED_KEY)],  # was FULL (the first)
    [("x-api-key", LIMITED_KEY), ("x-api-key", FULL_KEY)],
], ids=["bearer-bearer", "bearer-bearer-reversed", "bearer-x-api-key", "api-key-x-api-key", "x-api-key-twice"])
def test_two_different_credentials_are_refused(gateway: RunningGateway, headers: list[tuple[str, str]]) -> None:
    _refused(httpx.post(gateway.base_url + "/embeddings", json=EMBED, headers=headers))


def test_the_same_credential_twice_is_one_credential(gateway: RunningGateway) -> None:
    for headers in ([_bearer(FULL_KEY), _bearer(FULL_KEY)], [_bearer(FULL_KEY), ("x-api-key", FULL_KEY)]):
        answer = httpx.post(gateway.base_url + "/embeddings", json=EMBED, headers=headers)
        assert answer.status_code == 200, answer.text


def test_every_route_that_reads_a_key_refuses_two(gateway: RunningGateway) -> None:
    two = [_bearer(FULL_KEY), ("x-api-key", LIMITED_KEY)]
    _refused(httpx.get(gateway.base_url + "/models", headers=two))
    messages = {"model": "chat", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    for path in ("/messages", "/messages/count_tokens"):  # Anthropic's envelope there
        answer = httpx.post(gateway.base_url + path, json=messages, headers=two)
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["type"] == "invalid_request_error", answer.text
        assert "two different credentials" in answer.json()["error"]["message"]


def test_admin_and_metrics_tokens_beside_another_credential_are_refused(
    make_gateway: Callable[..., RunningGateway],
) -> None:
    running = make_gateway(env={"GW_ADMIN": ADMIN, "GW_METRICS": METRICS},
                           admin_token_env="GW_ADMIN", metrics_token_env="GW_METRICS")
    _refused(httpx.post(running.url + "/admin/reload", headers=[_bearer(FULL_KEY), _bearer(ADMIN)]))
    _refused(httpx.get(running.url + "/metrics", headers=[_bearer(FULL_KEY), _bearer(METRICS)]))
    assert httpx.get(running.url + "/metrics", headers=[_bearer(METRICS), _bearer(METRICS)]).status_code == 200


def _requests_400(gateway: RunningGateway) -> float:
    """`gateway_requests_total` of embeddings requests answered 400 (no key: its alias label is `unknown`)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(gateway.url + "/metrics").text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "gateway_requests_total" and sample.labels.get("status") == "400"
               and sample.labels.get("endpoint") == "embeddings")


def test_a_proxied_request_with_two_credentials_is_recorded_as_every_answer_is(gateway: RunningGateway) -> None:
    """Refused inside the pipeline (`Authenticate`), not before it: the refusal is counted (and logged) like any 400."""
    before = _requests_400(gateway)
    two = [_bearer(FULL_KEY), _bearer(LIMITED_KEY)]
    _refused(httpx.post(gateway.base_url + "/embeddings", json=EMBED, headers=two))
    assert _requests_400(gateway) == before + 1
