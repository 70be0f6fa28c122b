"""The deploy kit against real tools: promtool, a real Prometheus server scraping a real gateway, helm.

Prometheus (Debian's `prometheus` package; tests/run.sh installs it when it runs as
root) is started on a free port with a scrape config pointing at a gateway on
another free port, the gateway gets mixed traffic, and then every PromQL
expression of the Grafana dashboard and of the alert rules is run through
Prometheus's HTTP API and must return data. The only exceptions are the panels
on metrics of features not merged yet: `AWAITING_FEATURES` names those metrics,
and the test fails as soon as one of them appears, so that the set only shrinks.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.policy import load_policy
from tests.conftest import FULL_KEY, OTHER_TENANT_KEY, RunningGateway, free_port, policy_text
from tests.support.processes import running

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "llm-gateway.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
CHART = DEPLOY / "helm" / "llm-gateway"

# Metrics the dashboard and alerts read that other features (accounting, cache) will export.
# Shrink this set when they merge; the test fails if a metric here already has data.
AWAITING_FEATURES = frozenset({
    "gateway_cache_lookups_total",  # cache (issue 10)
    "gateway_cache_saved_usd_total",  # cache (issue 10)
})

TELEMETRY_POLICY = """\
  failover:
    targets:
      - {provider: mock-fast, model: fault-status-500}
      - {provider: mock, model: mock-model}
guards:
  global:
    words: {kind: denylist, terms: [forbidden-word], action: block}
telemetry:
  quality: {enabled: true}
  feedback: {enabled: true, labels: [helpful]}
  tracing: {enabled: true}
prices:  # accounting: the cost panels
  mock-model: {input_per_mtok: 1, output_per_mtok: 2}
tenants:  # accounting: the budget panel and alert
  acme: {budget: {usd: 1000}}
"""


def _tool(name: str) -> str:
    found = shutil.which(name) or (str(REPO / ".venv" / "bin" / name) if (REPO / ".venv/bin" / name).exists()
                                   else None)
    if found is None:
        pytest.skip(f"`{name}` is not installed (tests/run.sh installs it when it can; see docs/operations.md)")
    return found


def dashboard_queries() -> list[tuple[str, str]]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(panel["title"], target["expr"]) for panel in panels for target in panel["targets"]]


def alert_queries() -> list[tuple[str, str]]:
    """Each alert's expression with its thresholds taken off: the query must return data, firing or not."""
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    threshold = re.compile(r"\s*(?:[<>]=?|==)\s*[0-9.]+(?:\s*\*\s*[0-9.]+)?(?=\s|$)")
    return [(rule["alert"], threshold.sub("", rule["expr"])) for rule in rules]


def test_promtool_accepts_the_config_and_the_rules(tmp_path: Path) -> None:
    promtool = _tool("promtool")
    for args in (["check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")], ["check", "rules", str(ALERTS)]):
        done = subprocess.run([promtool, *args], capture_output=True, timeout=60)
        assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    assert (CHART / "files" / "alerts.yml").read_text() == ALERTS.read_text(), "the chart's copy of the rules drifted"


def test_helm_lints_and_renders_the_chart() -> None:
    helm = _tool("helm")
    extras = ["--set", "serviceMonitor.enabled=true,prometheusRule.enabled=true"]
    lint = subprocess.run([helm, "lint", str(CHART), *extras], capture_output=True, timeout=120)
    assert lint.returncode == 0, lint.stdout.decode() + lint.stderr.decode()
    rendered = subprocess.run([helm, "template", "gw", str(CHART), *extras], capture_output=True, timeout=120)
    assert rendered.returncode == 0, rendered.stderr.decode()
    documents = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    kinds = {d["kind"]: d for d in documents}
    assert set(kinds) == {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                          "ServiceMonitor", "PrometheusRule"}
    pod = kinds["Deployment"]["spec"]["template"]
    assert "checksum/policy" in pod["metadata"]["annotations"]  # a policy change rolls the pods
    container = pod["spec"]["containers"][0]
    assert {"readinessProbe", "livenessProbe", "startupProbe"} <= set(container)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True and pod["spec"]["securityContext"][
        "runAsNonRoot"] is True
    rules = kinds["PrometheusRule"]["spec"]["groups"][0]["rules"]
    assert [r["alert"] for r in rules] == [r for r, _ in alert_queries()]


def test_the_charts_policy_folder_holds_further_files(tmp_path: Path) -> None:
    """The ConfigMap is the policy's whole folder (it hides the image's files there): a policy whose `prices_file`
    names a file of `policyFiles` loads from what the chart renders, with those prices."""
    helm = _tool("helm")
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({
        "policy": "version: 1\nauth: none\nprices_file: prices.yaml\nproviders:\n  demo: {kind: demo}\n"
                  "models:\n  chat: {provider: demo, model: demo-1}\n",
        "policyFiles": {"prices.yaml": (REPO / "policies" / "prices.yaml").read_text()}}))
    rendered = subprocess.run([helm, "template", "gw", str(CHART), "-f", str(values)], capture_output=True, timeout=120)
    assert rendered.returncode == 0, rendered.stderr.decode()
    config = next(d for d in yaml.safe_load_all(rendered.stdout) if d and d["kind"] == "ConfigMap")
    assert set(config["data"]) == {"gateway.yaml", "prices.yaml"}
    folder = tmp_path / "policies"
    folder.mkdir()
    for name, text in config["data"].items():
        (folder / name).write_text(text)
    prices = load_policy(folder / "gateway.yaml").prices
    assert prices.price("openai", "gpt-4o-mini") is not None and len(prices) > 10, sorted(prices.entries())


def test_load_balancer_config_passes_nginx_t(tmp_path: Path) -> None:
    nginx = _tool("nginx")
    shutil.copy(DEPLOY / "nginx" / "nginx.conf", tmp_path / "nginx.conf")
    checked = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"),
                              "-g", "error_log stderr;"], capture_output=True, timeout=60)
    assert checked.returncode == 0, checked.stderr.decode()


def test_compose_file_is_well_formed() -> None:
    compose = DEPLOY / "docker-compose.yml"
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        done = subprocess.run([docker, "compose", "-f", str(compose), "config", "-q"], capture_output=True)
        assert done.returncode == 0, done.stderr.decode()
    jsonschema = pytest.importorskip("jsonschema")
    service = {"type": "object", "additionalProperties": False, "properties": {
        key: {} for key in ("build", "image", "command", "environment", "volumes", "deploy", "stop_grace_period",
                            "depends_on", "ports", "healthcheck")}}
    schema = {"type": "object", "required": ["services"], "additionalProperties": False,
              "properties": {"name": {"type": "string"}, "services": {
                  "type": "object", "additionalProperties": service,
                  "required": ["gateway", "lb", "redis", "prometheus", "grafana"]}}}
    spec = yaml.safe_load(compose.read_text())
    jsonschema.validate(spec, schema)
    services = spec["services"]
    assert services["gateway"]["deploy"]["replicas"] == 2
    for name, svc in services.items():
        for volume in svc.get("volumes", ()):
            source = volume.split(":")[0]
            assert (DEPLOY / source).exists(), f"{name} mounts {source}, which does not exist"
    grafana = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uids = {d["datasource"]["uid"] for d in json.loads(DASHBOARD.read_text())["panels"]}
    assert uids == {grafana["datasources"][0]["uid"]}


@pytest.fixture
def observed_gateway(upstream: Any, tmp_path: Path) -> Iterator[RunningGateway]:
    text = policy_text(upstream.base_url, admin_token_env="ADMIN_TOKEN") + TELEMETRY_POLICY
    running_gateway = RunningGateway(text, {"MOCK_UPSTREAM_KEY": "sk-upstream-test", "ADMIN_TOKEN": "admin-t"},
                                     source=None).start()
    try:
        yield running_gateway
    finally:
        running_gateway.stop()


def _mixed_traffic(url: str) -> None:
    chat = f"{url}/v1/chat/completions"

    def body(model: str, text: str = "hello there friend", **extra: Any) -> dict[str, Any]:
        return {"model": model, "messages": [{"role": "user", "content": text}], **extra}

    with httpx.Client(headers={"Authorization": f"Bearer {FULL_KEY}"}, timeout=30) as client:
        for stream in (False, True):
            for model in ("chat", "failover", "fault-echo"):
                assert client.post(chat, json=body(model, stream=stream)).status_code == 200
            client.post(chat, json=body("fault-echo", "I'm sorry, but I can't help with that.", stream=stream))
        client.post(chat, json=body("chat", "say forbidden-word please"))  # a guard blocks it
        client.post(chat, json=body("nope"))  # 404
        client.post(chat, json=body("fault-status-500"))  # 502 after the target fails
        client.post(chat, json=body("chat"), headers={"Authorization": "Bearer wrong"})  # 401
        client.post(f"{url}/v1/embeddings", json={"model": "embed", "input": "hi"})
        answered = client.post(chat, json=body("chat"))
        feedback = {"request_id": answered.headers["x-request-id"], "score": 1, "label": "helpful"}
        assert client.post(f"{url}/v1/feedback", json=feedback).status_code == 200
        client.post(chat, json=body("chat"), headers={"Authorization": f"Bearer {OTHER_TENANT_KEY}"})
        assert client.post(f"{url}/admin/reload", headers={"Authorization": "Bearer admin-t"}).status_code in (200, 422)


def _query(prometheus: str, expr: str) -> list[Any]:
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10)
    assert response.status_code == 200, f"{expr}: {response.text}"
    result: list[Any] = response.json()["data"]["result"]
    return result


def test_a_real_prometheus_finds_data_for_every_panel_and_alert(observed_gateway: RunningGateway,
                                                                 tmp_path: Path) -> None:
    binary = _tool("prometheus")
    port = free_port()
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["alerts.yml"],
        "scrape_configs": [{"job_name": "llm-gateway", "static_configs": [
            {"targets": [f"127.0.0.1:{observed_gateway.port}"]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    args = [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}"]
    prometheus = f"http://127.0.0.1:{port}"
    with running(args, cwd=tmp_path) as server:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{prometheus}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, server.text()[-3000:]
            time.sleep(0.2)
        _query_until(prometheus, 'up{job="llm-gateway"} == 1', deadline=time.monotonic() + 30)
        _mixed_traffic(observed_gateway.url)
        time.sleep(2)
        _mixed_traffic(observed_gateway.url)  # twice, scrapes apart: rates have two points to compare
        _query_until(prometheus, "gateway_feedback_total", deadline=time.monotonic() + 30)
        time.sleep(3)
        missing, unexpected = [], []
        for title, expr in dashboard_queries() + alert_queries():
            query = expr.replace("$__rate_interval", "1m")
            awaited = any(name in query for name in AWAITING_FEATURES)
            found = _query(prometheus, query)
            if awaited and found:
                unexpected.append(title)
            elif not awaited and not found:
                missing.append(f"{title}: {query}")
        assert not missing, "no data for:\n" + "\n".join(missing)
        assert not unexpected, f"these now have data: shrink AWAITING_FEATURES ({unexpected})"
        rules = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"][0]["rules"]
        assert all(rule["health"] == "ok" for rule in rules), rules


def _query_until(prometheus: str, expr: str, deadline: float) -> None:
    while not _query(prometheus, expr):
        assert time.monotonic() < deadline, f"Prometheus never saw {expr}"
        time.sleep(0.25)
