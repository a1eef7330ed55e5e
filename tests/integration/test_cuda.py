"""CUDA checks on trained models: run where a GPU exists, skipped elsewhere (CI has none). Every CUDA variant
against the CPU fp32 reference: fp32 to 1e-4 on the tiny models (1e-3 on the 6-layer MiniLM MoE: only summation order
differs, over more layers), bf16 judged on label agreement and probabilities; expert counts identical in fp32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from service.backends import load_backend

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
]
ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = ROOT / "models" / "bbc-news-minilm-moe"


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_backend_on_cuda_matches_cpu(tiny_model_dir: Path) -> None:
    cpu = load_backend(tiny_model_dir, "cpu")
    gpu = load_backend(tiny_model_dir, "auto")
    assert gpu.device == "cuda"
    seqs = [[5, 6, 7], list(range(2, 40))]
    g, c = gpu.forward(seqs), cpu.forward(seqs)
    np.testing.assert_allclose(g.logits, c.logits, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(g.expert_counts, c.expert_counts)


def test_multitask_on_cuda_matches_cpu(tiny_multitask_dir: Path) -> None:
    """Rows of both tasks in one packed batch on the GPU: the same logits and per-task expert counts as the CPU."""
    cpu = load_backend(tiny_multitask_dir, "cpu", "torch")
    gpu = load_backend(tiny_multitask_dir, "cuda", "torch")
    seqs = [[5, 6, 7], list(range(2, 40)), list(range(9, 20))]
    tasks = [[0, 1], [1], [1, 0]]
    g, c = gpu.forward(seqs, tasks=tasks), cpu.forward(seqs, tasks=tasks)
    np.testing.assert_allclose(g.logits, c.logits, atol=1e-4, rtol=1e-4)
    assert g.task_expert_counts is not None and c.task_expert_counts is not None
    np.testing.assert_array_equal(g.task_expert_counts, c.task_expert_counts)


@pytest.mark.skipif(not DEFAULT_MODEL.is_dir(), reason="the committed default model is not in this checkout")
def test_default_model_on_cuda_fp32_and_bf16() -> None:
    """The committed MiniLM MoE on real test texts: CUDA fp32 to 1e-3 of the CPU, CUDA bf16 on 98% of its labels."""
    from service.training.data import load_dataset
    from service.training.evaluate import headline

    cpu = load_backend(DEFAULT_MODEL, "cpu", "torch", precision="fp32")
    test = load_dataset("bbc-news")["test"][:64]
    texts = [e.text for e in test] + [headline(e.text) for e in test]
    seqs = [e.ids for e in cpu.tokenizer.encode_batch(texts, cpu.info.max_length)]
    ref = cpu.forward(seqs).logits
    fp32 = load_backend(DEFAULT_MODEL, "cuda", "torch", precision="fp32").forward(seqs).logits
    np.testing.assert_allclose(fp32, ref, atol=1e-3, rtol=1e-3)
    bf16 = _softmax(load_backend(DEFAULT_MODEL, "cuda", "torch", precision="bf16").forward(seqs).logits)
    p = _softmax(ref)
    assert (bf16.argmax(1) == p.argmax(1)).mean() >= 0.98
    assert np.abs(bf16 - p).max() < 0.1, np.abs(bf16 - p).max()
