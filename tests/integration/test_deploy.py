"""Deployment files checked by the tools themselves, without a Docker engine or a cluster: Dockerfile (hadolint),
the entry point (sh), compose file (compose spec, docker-compose), Prometheus config, alert rules and their unit tests
(promtool), and the Kubernetes manifests (kubernetes-validate). What needs no tool is in tests/unit/test_deploy.py."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from tests.promql import ALERT_TESTS, ALERTS
from tests.unit.test_deploy import K8S

K8S_RESOURCES = ["deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml", "prometheus-adapter.yaml"]


def _tool(name: str, hint: str) -> str:
    venv_exe = Path(sys.executable).parent / name
    exe = str(venv_exe) if venv_exe.exists() else shutil.which(name)
    if not exe:
        pytest.fail(f"{name} missing: {hint}")
    return exe


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)


# --- image ----------------------------------------------------------------------------------------------------------


def test_dockerfile_is_hadolint_clean() -> None:
    r = _run(_tool("hadolint", "pip install 'moe-serve[dev]'"), "--no-color", "Dockerfile")
    assert r.returncode == 0, r.stdout + r.stderr


def test_entrypoint_sizes_threads_from_the_cpu_limit(tmp_path: Path) -> None:
    """The entry point's CPU-limit arithmetic, run against a fake cgroup file: a 1.5-CPU quota gives 2 threads."""
    script = (ROOT / "deploy" / "docker" / "entrypoint.sh").read_text()
    fake = tmp_path / "cpu.max"
    fake.write_text("150000 100000\n")
    body = script.replace("/sys/fs/cgroup/cpu.max", str(fake)).replace('exec "$@"', 'echo "$MOE_THREADS"')
    env = {"PATH": "/usr/bin:/bin", "MOE_MODELS_DIR": "/app/models"}
    r = subprocess.run(["sh", "-c", body, "entrypoint"], capture_output=True, text=True, env=env, timeout=10)
    assert r.returncode == 0, r.stderr
    expected = min(2, int(_run("nproc").stdout))
    assert r.stdout.strip() == str(expected)
    r = subprocess.run(["sh", "-c", body], capture_output=True, text=True, env={**env, "MOE_THREADS": "3"})
    assert r.stdout.strip() == "3"  # an explicit setting wins


# --- compose --------------------------------------------------------------------------------------------------------


def test_compose_file_matches_the_compose_spec() -> None:
    r = _run(
        _tool("check-jsonschema", "pip install 'moe-serve[dev]'"),
        "--builtin-schema",
        "vendor.compose-spec",
        "docker-compose.yml",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    r = _run(_tool("docker-compose", "run `make tools`"), "-f", "docker-compose.yml", "config", "-q")
    assert r.returncode == 0, r.stdout + r.stderr


# --- Prometheus -----------------------------------------------------------------------------------------------------


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return _run(_tool("promtool", "run `make tools`"), *args)


def test_prometheus_config_and_alert_rules_are_valid() -> None:
    r = _promtool("check", "config", "deploy/prometheus/prometheus.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 rule files found" in r.stdout + r.stderr
    r = _promtool("check", "rules", str(ALERTS))
    assert r.returncode == 0, r.stdout + r.stderr


def test_alert_rules_pass_their_unit_tests() -> None:
    r = _promtool("test", "rules", str(ALERT_TESTS))
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_broken_alert_threshold_fails_its_unit_test(tmp_path: Path) -> None:
    """The unit tests can fail: the queue alert at 90% instead of 80% of the capacity misses the 1,700-text queue."""
    rules, threshold = ALERTS.read_text(), "moe_queue_capacity_texts) > 0.8"
    assert threshold in rules
    (tmp_path / "alerts.yml").write_text(rules.replace(threshold, threshold.replace("0.8", "0.9")))
    shutil.copy(ALERT_TESTS, tmp_path / "alerts_test.yml")
    r = _promtool("test", "rules", str(tmp_path / "alerts_test.yml"))
    assert r.returncode != 0 and "MoeServeQueueNearFull" in r.stdout + r.stderr


# --- Kubernetes -----------------------------------------------------------------------------------------------------


def _validate(*paths: Path) -> subprocess.CompletedProcess[str]:
    exe = _tool("kubernetes-validate", "pip install 'moe-serve[dev]'")
    return _run(exe, "--strict", "--quiet", *map(str, paths))


def test_kubernetes_manifests_match_the_api_schemas() -> None:
    r = _validate(*(K8S / f for f in K8S_RESOURCES))
    assert r.returncode == 0, r.stdout + r.stderr
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(K8S_RESOURCES)


def test_kubernetes_validation_rejects_a_misspelt_field(tmp_path: Path) -> None:
    bad = tmp_path / "deployment.yaml"
    bad.write_text((K8S / "deployment.yaml").read_text().replace("readinessProbe:", "readynessProbe:"))
    r = _validate(bad)
    assert r.returncode != 0, r.stdout + r.stderr
