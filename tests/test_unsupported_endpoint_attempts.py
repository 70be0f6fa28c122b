"""A target whose API has no such endpoint (Azure's for `/v1/responses`) is refused before anything is sent: it is no
attempt (`x-gateway-attempts` counts requests sent, or being sent, to an upstream), as a full local pool or a field
the target lacks is not one (tests/test_attempts_header_busy.py). The access log and the metrics list it as those:
an attempt with the outcome `unsupported`, a fallback by that reason, never a retry. The client's answer stays the
400 `unsupported_endpoint` it was.

End to end through the official openai SDK, against the mock upstream (which must receive nothing).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import openai
import pytest

from tests.conftest import FULL_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream
from tests.test_attempts_header_busy import _access_line
from tests.test_routing import routing_policy

Make = Callable[..., RunningGateway]


def _policy(upstream: MockUpstream, upstream_b: MockUpstream) -> str:
    azure = (f'  az: {{kind: azure, base_url: "http://127.0.0.1:{upstream.port}", api_key_env: MOCK_UPSTREAM_KEY}}\n'
             f'  az2: {{kind: azure, base_url: "http://127.0.0.1:{upstream.port}", api_key_env: MOCK_UPSTREAM_KEY}}\n')
    return routing_policy(upstream, upstream_b, """\
        one: {provider: az, model: gpt-4o}
        two:
          targets: [{provider: az, model: gpt-4o}, {provider: az2, model: gpt-4o}]
        """, providers=azure)


@pytest.fixture
def upstream_b() -> Iterator[MockUpstream]:
    with MockUpstream() as mock:
        yield mock


def _refused(running: RunningGateway, alias: str) -> openai.BadRequestError:
    client = openai.OpenAI(base_url=running.base_url, api_key=FULL_KEY, max_retries=0, timeout=15)
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=alias, input="hi")
    return caught.value


def test_a_target_without_the_endpoint_is_no_attempt(make_gateway: Make, upstream: MockUpstream,
                                                     upstream_b: MockUpstream,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    running = make_gateway(_policy(upstream, upstream_b))
    refused = _refused(running, "one")
    assert refused.code == "unsupported_endpoint" and refused.param == "model"
    assert "cannot serve /v1/responses" in refused.message
    assert not upstream.requests
    headers = refused.response.headers
    assert headers["x-gateway-attempts"] == "0"  # nothing was sent
    assert headers["x-should-retry"] == "false"  # the same request would be refused again
    logged = _access_line(caplog, headers["x-request-id"])
    assert [(a["target"], a["outcome"]) for a in logged["attempts"]] == [("az/gpt-4o", "unsupported")]


def test_an_alias_none_of_whose_targets_has_the_endpoint(make_gateway: Make, upstream: MockUpstream,
                                                         upstream_b: MockUpstream) -> None:
    running = make_gateway(_policy(upstream, upstream_b))
    refused = _refused(running, "two")
    assert refused.code == "unsupported_endpoint"  # the code its targets gave, not `unsupported_parameter`
    assert "cannot serve /v1/responses" in refused.message
    assert not upstream.requests
    assert refused.response.headers["x-gateway-attempts"] == "0"
    assert refused.response.headers["x-gateway-fallback-reason"] == "unsupported"
    metrics = running.metrics()
    assert 'gateway_fallbacks_total{model="two",reason="unsupported"} 1.0' in metrics
    assert 'gateway_upstream_attempts_total{outcome="unsupported",target="az/gpt-4o"} 1.0' in metrics
    assert "gateway_upstream_retries_total{" not in metrics  # a refusal before sending is never retried
