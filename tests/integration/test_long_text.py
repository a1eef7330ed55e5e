"""Long texts on real models: a chunked text's pooled answer is the same on torch and ONNX Runtime (and close on every
precision), the same alone or batched with other texts, and `moe-serve evaluate --long-text` reads it both ways."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from service.backends import load_backend
from service.config import Settings
from service.engine.local_model import LocalModel
from service.engine.loop import InferenceThread
from service.metrics import Metrics
from service.modeling.windows import LongTextPolicy

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-4  # ONNX fp32 against torch fp32, as in test_onnx.py
LONG = " ".join(["the bank said profits rose as shares fell", "the team won the match with a late goal"] * 6)
WINDOWS = {"chunk_overlap": 8, "max_windows": 32}  # LONG in a few windows of the tiny model's 48 tokens, all read


def _classify(backend: object, requests: list[list[str]], **settings: object) -> list:
    """Every request at once on a LocalModel and its inference thread (so they can share batches)."""
    settings = {"max_wait_ms": 50, "long_text": "chunk", **WINDOWS, **settings}
    model = LocalModel(backend, Settings(**settings), Metrics(), ThreadPoolExecutor(1))  # type: ignore[arg-type]
    thread = InferenceThread(model)
    model.warm_up()
    thread.start()

    async def go() -> list:
        return await asyncio.gather(*(model.classify(texts) for texts in requests))

    try:
        return asyncio.run(go())
    finally:
        model.close()
        thread.join(5)


def test_a_chunked_text_answers_alike_on_every_backend_and_alone_or_batched(onnx_models_dir: Path) -> None:
    folder = onnx_models_dir / "tiny-bert-moe"  # 48 tokens: LONG needs several windows
    torch_b = load_backend(folder, "cpu", "torch", precision="fp32")
    (alone,) = _classify(torch_b, [[LONG]])
    r = alone.results[0]
    assert r.windows > 2 and not r.truncated
    batched = _classify(torch_b, [["match goal"], [LONG, "phone chip users"], ["stocks fell"]])
    np.testing.assert_allclose(batched[1].results[0].logits, r.logits, atol=1e-5, rtol=0)
    (onnx_res,) = _classify(load_backend(folder, "cpu", "onnx", precision="fp32"), [[LONG]])
    np.testing.assert_allclose(onnx_res.results[0].logits, r.logits, atol=TOL, rtol=0)
    assert onnx_res.results[0].windows == r.windows and onnx_res.results[0].n_tokens == r.n_tokens
    ref = r.logits.argmax()
    for kind, precision in (("onnx", "int8"), ("torch", "bf16")):
        (got,) = _classify(load_backend(folder, "cpu", kind, precision=precision), [[LONG]])
        # The same windows; the pooled logits within the precision's own error (bounded loosely, as in test_onnx).
        assert got.results[0].windows == r.windows
        assert np.abs(got.results[0].logits - r.logits).max() < 0.5 and got.results[0].logits.argmax() == ref


def test_evaluate_reports_parity_on_chunked_texts(onnx_models_dir: Path) -> None:
    from service.modeling.artifacts import load_model
    from service.training.evaluate import evaluate_model

    folder = onnx_models_dir / "tiny"  # trained on bbc-news articles: most need several of its 64-token windows
    bundle = load_model(folder)
    policy = LongTextPolicy("chunk", 8, 4)
    got = evaluate_model(bundle, None, "test", None, backend=load_backend(folder, "cpu", "onnx"), policy=policy)
    assert got["long_text"]["mean_windows"] > 1
    assert got["parity"]["max_abs_diff"] <= TOL and got["parity"]["argmax_agreement"] == 1.0


def _evaluate(model: Path, out: Path, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "service.cli", "evaluate", "--model", str(model), "--output-dir", str(out), *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_evaluate_cli_reads_long_texts_as_asked(tiny_model_dir: Path, tmp_path: Path) -> None:
    chunked = _evaluate(tiny_model_dir, tmp_path / "chunk")
    cut = _evaluate(tiny_model_dir, tmp_path / "cut", "--long-text", "truncate")
    assert chunked["long_text"]["mode"] == Settings().long_text and chunked["long_text"]["mean_windows"] > 1.5
    assert cut["long_text"]["mode"] == "truncate" and cut["long_text"]["mean_windows"] == 1
    assert chunked["long_text"]["mean_tokens"] > 1.5 * cut["long_text"]["mean_tokens"]
    assert cut["truncated_share"] > chunked["truncated_share"]
    capped = _evaluate(tiny_model_dir, tmp_path / "capped", "--max-windows", "2", "--chunk-overlap", "0")
    assert 1 < capped["long_text"]["mean_windows"] <= 2 and capped["long_text"]["overlap"] == 0
