"""`moe-serve serve` on a GPU, end to end: a real server with MOE_DEVICE=cuda answers as the same server on the CPU
(labels equal, scores within 1e-4), under concurrent requests the batcher packs together. Skipped without CUDA."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from tests.e2e.conftest import run_server

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
]
TEXTS = [f"stocks market bank profit {'rose ' * i}\nthe match team goal player {i}" for i in range(24)]


def _classify_concurrently(url: str) -> list[dict]:
    def one(text: str) -> dict:
        return httpx.post(f"{url}/v1/classify", json={"inputs": text}, timeout=30).json()["predictions"][0]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, TEXTS))


def test_server_on_cuda_answers_as_on_cpu(models_dir: Path, tmp_path: Path) -> None:
    answers = {}
    for device in ("cpu", "cuda"):
        with run_server(
            models_dir, tmp_path / f"{device}.log", default_model="tiny", device=device, backend="torch"
        ) as url:
            assert httpx.get(f"{url}/v1/models/tiny").json()["device"].startswith(device)
            answers[device] = _classify_concurrently(url)
    assert [p["label"] for p in answers["cuda"]] == [p["label"] for p in answers["cpu"]]
    for g, c in zip(answers["cuda"], answers["cpu"], strict=True):
        np.testing.assert_allclose([s["score"] for s in g["scores"]], [s["score"] for s in c["scores"]], atol=1e-4)
