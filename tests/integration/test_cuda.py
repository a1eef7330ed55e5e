"""CUDA checks on a trained model: run where a GPU exists, skipped elsewhere (CI has none)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
]


def test_backend_on_cuda_matches_cpu(tiny_model_dir: Path) -> None:
    from service.backends import load_backend

    cpu = load_backend(tiny_model_dir, "cpu")
    gpu = load_backend(tiny_model_dir, "auto")
    assert gpu.device == "cuda"
    seqs = [[5, 6, 7], list(range(2, 40))]
    torch.testing.assert_close(
        torch.from_numpy(gpu.forward(seqs).logits), torch.from_numpy(cpu.forward(seqs).logits), atol=1e-4, rtol=1e-4
    )
