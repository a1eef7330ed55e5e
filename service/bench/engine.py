"""Offline engine benchmarks: matmul peak, the three execution modes, and the MoE layer's time split."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from service.bench.backends import length_sorted_batches
from service.bench.timing import median_time
from service.modeling.artifacts import LoadedModel
from service.modeling.classifier import ModelConfig, MoEClassifier, PackedBatch, pad_batch
from service.modeling.moe import MoEFeedForward


@torch.inference_mode()
def matmul_peak(n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of a square n x n x n matmul in fp32 and bf16: the machine's practical limit for this work."""
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(n, n, dtype=dtype)
        b = torch.randn(n, n, dtype=dtype)
        t = median_time(lambda a=a, b=b: torch.mm(a, b), repeats)
        out[name] = round(2 * n**3 / t / 1e9, 1)
    return out


def text_flops(cfg: ModelConfig, n: int) -> float:
    """Useful FLOPs of one text of n tokens (multiply-add = 2 FLOPs); padding and unused experts excluded."""
    d, ff, ff_expert = cfg.d_model, cfg.d_ff, cfg.expert_d_ff or cfg.d_ff
    total = 0.0
    for attn, moe in zip(cfg.attention_layers(), cfg.moe_layers(), strict=True):
        if attn:
            total += 2 * n * d * 4 * d + 2 * 2 * n * n * d  # q, k, v, out projections; scores and weighted sum
        if moe:
            total += 2 * n * d * cfg.num_experts + cfg.top_k * 2 * 2 * n * d * ff_expert  # router; k experts
        else:
            total += 2 * 2 * n * d * ff
    return total + 2 * d * cfg.num_labels


@dataclass
class EngineRow:
    mode: str  # per_request | padded | grouped
    texts: str  # short | long | mix
    n_texts: int
    tokens: int
    seconds: float
    seq_per_s: float
    tokens_per_s: float
    gflops: float


class PerSequenceExperts(nn.Module):
    """Benchmark baseline standing in for a MoE layer: the padded [B, L] layout with the experts run once per
    sequence, as a server without expert grouping would. Same maths for real tokens; padding rows are computed
    and dropped. The packing of the batch is set before each forward (the layer itself only sees packed rows)."""

    def __init__(self, moe: MoEFeedForward) -> None:
        super().__init__()
        self.moe = moe
        self.packed: PackedBatch | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        assert self.packed is not None
        padded = self.packed.unpack(x)
        # grouped_forward named, not the layer's own choice: the baseline stays expert-per-sequence at any size
        rows = [self.moe.grouped_forward(p, self.moe.route(p)) for p in padded]
        return self.packed.pack(torch.stack(rows)), None


@contextlib.contextmanager
def experts_per_sequence(model: MoEClassifier) -> Iterator[Callable[[torch.Tensor, torch.Tensor], Any]]:
    """Within: a forward(ids, mask) whose MoE layers run per sequence (PerSequenceExperts); the model is restored
    afterwards."""
    blocks = [b for b in model.blocks if b.is_moe]
    originals = [b.ffn for b in blocks]
    wrappers = [PerSequenceExperts(f) for f in originals]  # type: ignore[arg-type]

    def forward(ids: torch.Tensor, mask: torch.Tensor) -> Any:
        packed = PackedBatch.from_mask(mask)
        for w in wrappers:
            w.packed = packed
        return model(ids, mask)

    for b, w in zip(blocks, wrappers, strict=True):
        b.ffn = w
    try:
        yield forward
    finally:
        for b, f in zip(blocks, originals, strict=True):
            b.ffn = f


@torch.inference_mode()
def engine_modes(
    model: MoEClassifier, sets: dict[str, list[list[int]]], batch_size: int, repeats: int
) -> list[EngineRow]:
    model.eval()
    rows = []
    for name, seqs in sets.items():
        tokens = sum(len(s) for s in seqs)
        flops = sum(text_flops(model.config, len(s)) for s in seqs)
        batches = length_sorted_batches(seqs, batch_size)
        padded = [pad_batch(b) for b in batches]
        singles = [pad_batch([s]) for s in seqs]
        runs = {
            "per_request": lambda singles=singles: [model(ids, mask) for ids, mask in singles],
            "padded": lambda padded=padded: _per_sequence(model, padded),
            "grouped": lambda padded=padded: [model(ids, mask) for ids, mask in padded],
        }
        for mode, fn in runs.items():
            t = median_time(fn, repeats)
            rows.append(
                EngineRow(
                    mode,
                    name,
                    len(seqs),
                    tokens,
                    round(t, 4),
                    round(len(seqs) / t, 1),
                    round(tokens / t, 1),
                    round(flops / t / 1e9, 2),
                )
            )
    return rows


def _per_sequence(model: MoEClassifier, padded: list[tuple[torch.Tensor, torch.Tensor]]) -> list[Any]:
    with experts_per_sequence(model) as forward:
        return [forward(ids, mask) for ids, mask in padded]


@torch.inference_mode()
def moe_layer_split(layer: MoEFeedForward, tokens: int, repeats: int) -> dict[str, Any]:
    """Time of one MoE layer on `tokens` packed tokens, split into routing / permute / experts / combine.

    The input is unit-variance noise (the layer's input is layer-normed); routing on it is near uniform.
    """
    x = torch.randn(tokens, layer.d_model)
    samples: list[dict[str, float]] = []
    for i in range(repeats + 1):
        # The phases of grouped_forward, each timed on its own (CPU: kernels run as they are called).
        t0 = time.perf_counter()
        r = layer.route(x)
        t1 = time.perf_counter()
        rows, order, counts = layer.permute(x, r)
        t2 = time.perf_counter()
        y_sorted = layer.run_experts(rows, counts)
        t3 = time.perf_counter()
        layer.fuse(y_sorted, order, r)
        t4 = time.perf_counter()
        if i:  # first run is warm-up
            samples.append({"routing": t1 - t0, "permute": t2 - t1, "experts": t3 - t2, "combine": t4 - t3})
    split = {k: statistics.median(s[k] for s in samples) for k in samples[0]}
    total = sum(split.values())
    flops = 2 * tokens * layer.d_model * layer.num_experts + layer.top_k * 4 * tokens * layer.d_model * layer.d_ff
    return {
        "tokens": tokens,
        "seconds": round(total, 6),
        "split_seconds": {k: round(v, 6) for k, v in split.items()},
        "gflops": round(flops / total / 1e9, 1),
        "expert_gflops": round(layer.top_k * 4 * tokens * layer.d_model * layer.d_ff / split["experts"] / 1e9, 1),
    }


def texts_for_bench(loaded: LoadedModel, n_short: int, n_long: int, n_mix: int) -> dict[str, list[list[int]]]:
    """Token ids cut from the bbc-news test split: short ~32 tokens, long ~256 tokens, mix = articles as served."""
    from service.training.data import load_dataset
    from service.training.predict import encode_texts

    test = load_dataset("bbc-news")["test"]
    max_length = loaded.folder.config.max_length
    full = encode_texts(loaded.tokenizer, [e.text for e in test], max_length)
    long_len = min(256, max_length)
    longs = [s[:long_len] for s in full if len(s) >= long_len]
    return {
        "short": [full[i % len(full)][:32] for i in range(n_short)],
        "long": [longs[i % len(longs)] for i in range(n_long)],
        "mix": [full[i % len(full)] for i in range(n_mix)],
    }
