"""The chart's alert rules and dashboard queries, checked by Prometheus' own `promtool`: the rule file
parses (`promtool check rules`), each alert fires on series that break its threshold and stays quiet on
series that do not (`promtool test rules`), and every dashboard query parses (checked as recording rules).

promtool comes from Debian's `prometheus` package, which `make test` installs where it runs as root with
apt (CI does); elsewhere these tests skip and say so.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from distillery_operator.monitoring import alerts, dashboard

PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not found: install Debian's `prometheus` package (make test does so where it runs as root)",
)

ALERT_LABELS = {"part_of": "distillery"}
MODEL = {"namespace": "ns", "model_name": "m"}


def series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
    body = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{body}}}", "values": values}


def latency(fast: bool) -> list[dict[str, str]]:
    # 10 requests a minute; all under 0.5 s (fast) or all between 2.5 and 5 s (slow: P99 ~5 s)
    buckets = [("0.5", "0+10x20" if fast else "0x20"), ("2.5", "0+10x20" if fast else "0x20"),
               ("5.0", "0+10x20"), ("+Inf", "0+10x20")]
    return [series("distillery_request_duration_seconds_bucket", {**MODEL, "le": le}, v) for le, v in buckets]


def requests(errors_per_min: int) -> list[dict[str, str]]:
    return [series("distillery_requests_total", {**MODEL, "endpoint": "chat", "status": "200"}, "0+99x20"),
            series("distillery_requests_total", {**MODEL, "endpoint": "chat", "status": "500"}, f"0+{errors_per_min}x20"),
            series("distillery_requests_total", {**MODEL, "endpoint": "chat", "status": "400"}, "0+50x20")]


GPU_POD = {"namespace": "ns", "pod": "m-predictor-00001-deployment-abc"}
# alert -> (eval time, series that fire it, series that must not, expected labels, expected annotations)
CASES: dict[str, tuple[str, list[dict[str, str]], list[dict[str, str]], dict[str, str], dict[str, str]]] = {
    "DistilleryHighP99Latency": (
        "15m", latency(fast=False), latency(fast=True), {"severity": "warning", **MODEL},
        {"summary": "Model m P99 latency above 2.0s", "description": "P99 request latency of ns/m is 4.975s."}),
    "DistilleryHighErrorRate": (
        "15m", requests(errors_per_min=3), requests(errors_per_min=0), {"severity": "critical", **MODEL},
        {"summary": "Model m answers 5xx", "description": "1.974% of requests to ns/m ended in a server error."}),
    "DistilleryQueueSaturated": (
        "15m", [series("distillery_queue_rejected_total", MODEL, "0+6x20")],
        [series("distillery_queue_rejected_total", MODEL, "0x20")], {"severity": "warning", **MODEL},
        {"summary": "Model m refuses requests (429)",
         "description": "Batch and queue of ns/m are full: 100m requests/s answered 429. Raise maxReplicas or maxQueue."}),
    "DistilleryKVCacheFull": (
        "15m", [series("distillery_kv_cache_usage_ratio", {**MODEL, "pod": "p1"}, "0.99x20")],
        [series("distillery_kv_cache_usage_ratio", {**MODEL, "pod": "p1"}, "0.5x20")], {"severity": "warning", **MODEL},
        {"summary": "Model m KV cache nearly full", "description": "A replica of ns/m uses 99% of its KV cache."}),
    "DistilleryGPUSaturated": (
        "20m", [series("DCGM_FI_DEV_GPU_UTIL", GPU_POD, "99x25")], [series("DCGM_FI_DEV_GPU_UTIL", GPU_POD, "60x25")],
        {"severity": "info", **GPU_POD},
        {"summary": "GPU of m-predictor-00001-deployment-abc saturated",
         "description": "ns/m-predictor-00001-deployment-abc has used its GPU above 95% for 15 minutes; "
                        "more replicas would cut latency."}),
    "DistilleryModelFailed": (
        "10m", [series("distillery_operator_models", {"phase": "Failed"}, "1x15")],
        [series("distillery_operator_models", {"phase": "Ready"}, "3x15")], {"severity": "critical"},
        {"summary": "A DistilledModel is Failed",
         "description": "1 DistilledModel(s) in phase Failed: kubectl get dm -A shows which and why."}),
    "DistilleryOperatorReconcileErrors": (
        "10m", [series("distillery_operator_reconcile_errors_total", {"trigger": "update", "kind": "error"}, "0+1x15")],
        # an invalid spec is the user's error, already reported on the model: no page
        [series("distillery_operator_reconcile_errors_total", {"trigger": "update", "kind": "invalid"}, "0+1x15")],
        {"severity": "warning"},
        {"summary": "The Distillery operator fails to reconcile",
         "description": "10 reconciles ended in an unexpected error in 15 minutes; see the operator's log."}),
    "DistilleryRolloutRolledBack": (
        # the operator creates the rolled_back series at 0 when a rollout starts, so increase() sees the step
        "10m", [series("distillery_operator_rollouts_total", {"namespace": "ns", "model": "m", "outcome": "rolled_back"},
                       "0 0 0 1x12")],
        [series("distillery_operator_rollouts_total", {"namespace": "ns", "model": "m", "outcome": "promoted"},
                "0 0 0 1x12"),
         series("distillery_operator_rollouts_total", {"namespace": "ns", "model": "m", "outcome": "rolled_back"},
                "0x15")],
        {"severity": "warning", "namespace": "ns", "model": "m"},
        {"summary": "Rollout of ns/m rolled back",
         "description": "A new model server for ns/m failed its rollout gate and the stable revision serves again: "
                        "kubectl get dm m -n ns -o jsonpath='{.status.rollout}' says which gate and the measured "
                        "numbers."}),
}


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.fixture
def rule_file(tmp_path: Path) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": alerts.rule_groups()}, sort_keys=False))
    return path


def test_every_alert_has_a_case():
    assert {rule["alert"] for rule in alerts.alert_rules()} == set(CASES)


def test_rules_pass_promtool_check(rule_file: Path):
    result = promtool("check", "rules", rule_file.name, cwd=rule_file.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(CASES)} rules found" in result.stdout


def unit_test(alert: str, fire: bool) -> dict[str, Any]:
    at, firing, quiet, labels, annotations = CASES[alert]
    expected = [{"exp_labels": {**labels, **ALERT_LABELS}, "exp_annotations": annotations}] if fire else []
    return {"interval": "1m", "input_series": firing if fire else quiet,
            "alert_rule_test": [{"eval_time": at, "alertname": alert, "exp_alerts": expected}]}


@pytest.mark.parametrize("fire", [True, False], ids=["fires", "quiet"])
@pytest.mark.parametrize("alert", sorted(CASES))
def test_alert_fires_only_when_it_should(alert: str, fire: bool, rule_file: Path):
    tests = {"rule_files": [rule_file.name], "evaluation_interval": "1m", "tests": [unit_test(alert, fire)]}
    (rule_file.parent / "tests.yaml").write_text(yaml.safe_dump(tests, sort_keys=False))
    result = promtool("test", "rules", "tests.yaml", cwd=rule_file.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_wrong_expectation_fails(rule_file: Path):
    """The harness can fail: the quiet series with the firing expectation is a promtool failure."""
    case = unit_test("DistilleryQueueSaturated", fire=True)
    case["input_series"] = CASES["DistilleryQueueSaturated"][2]
    tests = {"rule_files": [rule_file.name], "evaluation_interval": "1m", "tests": [case]}
    (rule_file.parent / "tests.yaml").write_text(yaml.safe_dump(tests, sort_keys=False))
    assert promtool("test", "rules", "tests.yaml", cwd=rule_file.parent).returncode != 0


GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$namespace": ".*", "$model": ".*"}


def test_every_dashboard_query_parses(tmp_path: Path):
    board = dashboard.dashboard()
    exprs = [target["expr"] for panel in board["panels"] for target in panel["targets"]]
    assert len(exprs) == len(dashboard.panels()) >= 10
    rules = []
    for i, expr in enumerate(exprs):
        for var, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(var, value)
        assert not re.search(r"\$\w", expr), expr  # every variable substituted
        rules.append({"record": f"dashboard:panel_{i}", "expr": expr})
    (tmp_path / "dash.yaml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", "dash.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
