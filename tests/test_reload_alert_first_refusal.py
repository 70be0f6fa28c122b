"""`GatewayPolicyReloadFailed` fires on the first refused reload after a start.

`increase()` needs a sample before a change: a `result="invalid"` series that first appeared already at 1 (the
reload counter had no children until the first reload) never showed an increase, so the first bad ConfigMap edit
or file change after a start went unalerted. The counter's results are now exported at 0 from the start. The alert
rule is run by promtool's rule tests on the series as a gateway exports it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_prometheus import ALERTS

ALERT = "GatewayPolicyReloadFailed"


def test_a_fresh_gateway_exports_every_reload_result_at_zero(make_gateway: Any) -> None:
    metrics = make_gateway().metrics()
    for result in ("ok", "invalid", "failed", "unchanged"):
        assert f'gateway_policy_reload_total{{result="{result}"}} 0.0' in metrics, result


def _rule_test(before: str) -> dict[str, Any]:
    """One promtool rule test: the refused-reload series `before` for 3 minutes, then 1 for 15."""
    summary = "A policy reload was refused; the last good policy is still serving"
    firing = [{"exp_labels": {"severity": "warn"},
               "exp_annotations": {"runbook": "docs/operations.md#gatewaypolicyreloadfailed", "summary": summary}}]
    return {"interval": "15s",
            "input_series": [{"series": 'gateway_policy_reload_total{instance="a",result="invalid"}',
                              "values": f"{before}x12 1x60"}],
            "alert_rule_test": [{"eval_time": "2m", "alertname": ALERT, "exp_alerts": []},
                                {"eval_time": "5m", "alertname": ALERT, "exp_alerts": firing}]}


@pytest.mark.parametrize(("before", "fires"), [("0", True), ("_", False)], ids=["exported-at-zero", "born-at-one"])
def test_the_alert_fires_on_the_first_refusal_of_a_series_exported_at_zero(tmp_path: Path, before: str,
                                                                           fires: bool) -> None:
    """The series as the gateway exports it now (0, then 1) fires the alert; one born at 1 (as before) does not:
    the second case shows the rule test can fail."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("`promtool` is not installed (tests/run.sh installs it when it can)")
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    (tmp_path / "test.yml").write_text(yaml.safe_dump(
        {"rule_files": ["alerts.yml"], "evaluation_interval": "15s", "tests": [_rule_test(before)]}))
    done = subprocess.run([promtool, "test", "rules", "test.yml"], cwd=tmp_path, capture_output=True, timeout=60)
    assert (done.returncode == 0) is fires, done.stdout.decode() + done.stderr.decode()
