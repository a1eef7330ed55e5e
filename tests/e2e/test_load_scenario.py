"""The Locust scenario in load_tests/ runs headless against a real server and applies its thresholds."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _locust(server: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    bin_dir = str(Path(sys.executable).parent)
    assert shutil.which("locust", path=bin_dir), "locust missing: pip install 'moe-serve[load]'"
    full_env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "HOST": server,
        "USERS": "8",
        "SPAWN_RATE": "8",
        "DURATION": "6s",
        "MOE_LOAD_MODEL": "tiny",
        **env,
    }
    return subprocess.run(
        ["bash", str(ROOT / "load_tests" / "run.sh")],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )


def test_load_scenario_passes_thresholds(server: str, tmp_path: Path) -> None:
    r = _locust(server, tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "load test passed" in out
    for name in ("/v1/classify [1]", "/v1/classify [n]", "/v2/models/[m]/infer", "/v1/classify [bad]"):
        assert name in out, name


def test_load_scenario_fails_when_threshold_is_missed(server: str, tmp_path: Path) -> None:
    r = _locust(server, tmp_path, MOE_LOAD_MAX_P99_MS="0.001", DURATION="3s")
    assert r.returncode == 1 and "load test FAILED" in r.stdout + r.stderr
