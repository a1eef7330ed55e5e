"""`moe-serve bench --quick` end to end (a smoke test: it checks the output's shape, never timings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_bench_quick_smoke(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.cli",
            "bench",
            "--quick",
            "--model",
            str(tiny_model_dir),
            "--output-dir",
            str(out),
            "--json",
            str(tmp_path / "b.json"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "b.json").read_text())
    assert set(res["peak_gflops"]) == {"fp32", "bf16"} and res["peak_gflops"]["fp32"] > 0
    modes = {(e["mode"], e["texts"]) for e in res["engine"]}
    assert {(m, t) for m in ("per_request", "padded", "grouped") for t in ("short", "long", "mix")} <= modes
    for e in res["engine"]:
        assert e["seq_per_s"] > 0 and e["tokens_per_s"] > 0 and e["gflops"] > 0
    served = {(s["server"], s["texts"], s["concurrency"]) for s in res["served"]}
    assert {
        ("moe-serve", "short", 1),
        ("moe-serve", "short", 64),
        ("naive", "short", 1),
        ("naive", "short", 64),
        ("moe-serve gRPC", "short", 1),  # the same texts and concurrency over gRPC
        ("moe-serve gRPC", "short", 64),
    } <= served
    for s in res["served"]:
        assert s["errors"] == 0 and s["rps"] > 0 and s["p50_ms"] <= s["p99_ms"]
    for name in ("bench.md", "throughput_vs_concurrency.png", "latency_percentiles.png", "moe_layer_split.png"):
        assert (out / name).stat().st_size > 0
    dvm = res["dense_vs_moe"]  # a model trained from scratch: no dense base, so no dense rows
    assert {(r["model"], r["backend"], r["precision"]) for r in dvm["rows"]} >= {
        ("moe", "onnx", "int8"),
        ("all-experts", "onnx", "int8"),
        ("moe", "torch", "fp32"),
        ("all-experts", "torch", "fp32"),
    }
    assert not [r for r in dvm["rows"] if r["model"].startswith("dense-")]
    assert not dvm["ratios"]["best_moe_vs_best_dense"]
    assert {(r["server"], r["texts"], r["concurrency"]) for r in dvm["served"]} == {
        ("moe-serve", t, c) for t in ("headline", "article", "mixed") for c in (1, 64)
    }
    md = (out / "bench.md").read_text()
    assert "## The MoE against its dense original" in md and "| MoE / all experts, onnx int8 |" in md
    for e in res["engine"]:  # each engine figure in its table row, the grouped mode's included
        assert f"| {e['texts']} | {e['mode']} | {e['seq_per_s']} | {e['tokens_per_s']} |" in md, e
