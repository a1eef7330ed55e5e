"""`load_tests/overload.py` at CI size: 10x the measured saturation for a few seconds against a real server. The
same script runs the 60-second overload and the 10-minute soak quoted in README."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e


def test_ten_times_saturation_is_refused_early_and_nothing_is_lost(tmp_path: Path) -> None:
    out = tmp_path / "overload.json"
    cmd = [sys.executable, str(ROOT / "load_tests" / "overload.py"), "--factor", "10", "--seconds", "4",
           "--json", str(out), "--max-rss-growth", "0.2"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["failures"] == []
    assert report["statuses"].get("200", 0) > 0 and report["statuses"].get("429", 0) > 0, report["statuses"]
