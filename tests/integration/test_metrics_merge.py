"""/metrics with one model process per model: the merged view, after the API process's part, is valid for promtool."""

from __future__ import annotations

import shutil
import subprocess

from service.metrics import Metrics, merge_expositions
from tests.unit.test_metrics_merge import model_process_exposition


def test_merged_exposition_passes_promtool() -> None:
    merged = merge_expositions([model_process_exposition("a", 3), model_process_exposition("b", 5)])
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: run `make tools`"
    api = Metrics(engine=False).exposition()  # the API process's part comes first in /metrics
    r = subprocess.run([promtool, "check", "metrics"], input=api + merged, capture_output=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
