"""Deployment files, checked in process without a tool: the Dockerfile's and compose file's settings, the alert
rules' and dashboard's metrics (against what the service exports), Grafana provisioning and the Kubernetes manifests
fitting together. The tools themselves (hadolint, docker-compose, promtool, kubernetes-validate) run in
tests/integration/test_deploy.py; a real Prometheus scraping a real server is in tests/e2e."""

from __future__ import annotations

import json

import numpy as np
import yaml

from tests.conftest import ROOT
from tests.promql import (
    ALERT_TESTS,
    alert_rules,
    dashboard_queries,
    declared_metrics,
    metric_names,
    unknown_metrics,
)

K8S = ROOT / "deploy" / "kubernetes"


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


# --- image ----------------------------------------------------------------------------------------------------------


def test_dockerfile_serves_the_model_repository_as_a_non_root_user() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim" in text and "FROM ${BASE_IMAGE} AS build" in text
    assert 'CMD ["moe-serve", "serve"]' in text and "EXPOSE 8000" in text and "MOE_HOST=0.0.0.0" in text
    assert "constraints.txt" in text and "USER 10001" in text and "/v2/health/ready" in text
    assert "TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text


def test_compose_services_have_healthchecks_and_start_in_order() -> None:
    services = _compose()["services"]
    assert {"moe-serve", "prometheus", "grafana"} <= set(services)
    for name, svc in services.items():
        assert svc["healthcheck"]["test"][0] == "CMD", name
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            assert not source.startswith(".") or (ROOT / source).exists(), volume
    assert services["prometheus"]["depends_on"]["moe-serve"]["condition"] == "service_healthy"
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    assert "/v2/health/ready" in " ".join(services["moe-serve"]["healthcheck"]["test"])


# --- Prometheus -----------------------------------------------------------------------------------------------------


def test_every_alert_has_a_unit_test_where_it_fires() -> None:
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    fired = {c["alertname"] for t in tests for c in t["alert_rule_test"] if c["exp_alerts"]}
    assert fired == set(alert_rules())
    expected = {
        "MoeServeHighLatencyP99",
        "MoeServeQueueNearFull",
        "MoeServeHighErrorRate",
        "MoeServeRejectingLoad",
        "MoeServeExpertImbalance",
        "MoeServeRoutingDrift",
        "MoeServeDown",
        "MoeServeModelNotReady",
        "MoeServeModelRestartLoop",
    }
    assert set(alert_rules()) == expected


# --- which metrics the queries read ---------------------------------------------------------------------------------


def _service_metric_names() -> set[str]:
    """What the service's metrics module declares, the scrape-time routing figures included."""
    from service.engine.routing_stats import RoutingStats
    from service.metrics import Metrics

    metrics = Metrics()
    stats = RoutingStats(1, 4, 60.0, {"layers": [{"share": [0.25] * 4}]})
    stats.add(np.array([[3, 1, 0, 2]]), texts=1)
    metrics.watch_routing(lambda: [("m", stats)])
    metrics.watch_models(lambda: [("m", True)])
    return declared_metrics(metrics.exposition().decode())


def test_metric_names_are_read_from_promql() -> None:
    expr = 'sum by (le) (rate(moe_x_bucket{route=~"/v2/models/.+/infer", model="$model"}[5m])) / ignoring(a) up > 1e3'
    assert metric_names(expr) == {"moe_x_bucket", "up"}
    assert metric_names("histogram_quantile(0.99, sum(rate(a_b[1m]))) and on (m) c") == {"a_b", "c"}


def test_alerts_read_only_metrics_the_service_exports() -> None:
    exported = _service_metric_names()
    assert {"moe_expert_tokens_total", "moe_routing_drift_kl", "moe_request_duration_seconds_bucket"} <= exported
    assert unknown_metrics(alert_rules(), exported) == {}


def test_dashboard_queries_read_only_metrics_the_service_exports() -> None:
    queries = dashboard_queries()
    assert unknown_metrics(queries, _service_metric_names()) == {}
    assert all(metric_names(q) for q in queries.values()), "a query without a metric"
    # The panels the deployment promises: throughput, latency percentiles, queue, batch sizes, expert load, drift.
    dash = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "moe-serve.json").read_text())
    text = json.dumps(dash)
    for metric in [
        "moe_requests_total",
        "moe_request_duration_seconds_bucket",
        "moe_queue_texts",
        "moe_batch_size_texts_bucket",
        "moe_expert_tokens_total",
        "moe_routing_drift_kl",
    ]:
        assert metric in text, metric
    assert any(p["type"] == "heatmap" and "moe_expert_tokens_total" in json.dumps(p) for p in dash["panels"])
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_grafana_provisioning_points_at_the_dashboard_and_prometheus() -> None:
    prov = ROOT / "deploy" / "grafana" / "provisioning"
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    dash = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "moe-serve.json").read_text())
    assert ds["url"] == "http://prometheus:9090"
    uids = {t["datasource"]["uid"] for p in dash["panels"] for t in p["targets"]}
    assert uids == {ds["uid"]}
    provider = yaml.safe_load((prov / "dashboards" / "moe-serve.yml").read_text())["providers"][0]
    mounts = dict(v.split(":")[:2][::-1] for v in _compose()["services"]["grafana"]["volumes"])
    assert mounts[provider["options"]["path"]] == "./deploy/grafana/dashboards"


# --- Kubernetes -----------------------------------------------------------------------------------------------------


def _k8s(name: str) -> dict:
    return yaml.safe_load((K8S / name).read_text())


def test_deployment_probes_resources_and_scaling_fit_together() -> None:
    deploy, service, hpa, pdb = (_k8s(f) for f in ["deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml"])
    pod = deploy["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert "startupProbe" in container and container["resources"]["requests"]["cpu"]
    assert pod["spec"]["securityContext"]["runAsUser"] == 10001
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    labels = pod["metadata"]["labels"]
    for selector in (service["spec"]["selector"], pdb["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    assert metrics["Pods"]["pods"]["metric"]["name"] == "moe_queue_texts"
    assert "moe_queue_texts" in _k8s("prometheus-adapter.yaml")["data"]["config.yaml"]
    monitor = _k8s("servicemonitor.yaml")  # a CRD: no schema offline, so checked by hand
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
