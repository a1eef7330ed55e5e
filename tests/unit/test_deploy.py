"""Deployment files, checked without a Docker engine: compose schema, Prometheus config, Grafana dashboard."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT


def test_compose_file_matches_the_compose_spec() -> None:
    exe = Path(sys.executable).parent / "check-jsonschema"
    if not exe.exists():
        pytest.fail("check-jsonschema missing: pip install 'moe-serve[dev]'")
    r = subprocess.run(
        [str(exe), "--builtin-schema", "vendor.compose-spec", str(ROOT / "docker-compose.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert {"moe-serve", "prometheus", "grafana"} <= set(compose["services"])
    for svc in compose["services"].values():
        for volume in svc.get("volumes", []):
            assert (ROOT / volume.split(":")[0]).exists(), volume


def test_prometheus_config_is_valid() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: run `make tools`"
    r = subprocess.run(
        [promtool, "check", "config", str(ROOT / "deploy" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_dashboard_queries_use_existing_metrics() -> None:
    from prometheus_client import generate_latest

    from service.metrics import Metrics

    exposed = generate_latest(Metrics().registry).decode()
    names = set(re.findall(r"^# TYPE (\w+)", exposed, re.M))
    families = names | {n + s for n in names for s in ("_total", "_bucket", "_sum", "_count")}
    families |= {
        "moe_expert_tokens_total",
        "moe_expert_imbalance_ratio",
        "moe_expert_load_cv",
        "moe_router_entropy_ratio",
        "moe_routing_drift_kl",
    }  # from the routing collector, scrape-time
    dash = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "moe-serve.json").read_text())
    for panel in dash["panels"]:
        for target in panel["targets"]:
            for metric in re.findall(r"\bmoe_\w+", target["expr"]):
                assert metric in families, (panel["title"], metric)


def test_dockerfile_serves_the_model_repository() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert 'CMD ["moe-serve", "serve"]' in text and "EXPOSE 8000" in text and "MOE_HOST=0.0.0.0" in text
    assert "constraints.txt" in text and "USER moe" in text
