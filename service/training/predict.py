"""Batched offline prediction, the one loop that training, evaluation, calibration and the benchmarks run: any
backend, or a bare torch model (training's, before it has a folder), over token id lists."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

from service.backends.base import Backend, BatchOutput
from service.modeling.artifacts import LoadedModel
from service.modeling.classifier import MoEClassifier
from service.modeling.probabilities import softmax
from service.modeling.tokenizer import TextTokenizer
from service.modeling.windows import LongTextPolicy, Windowed, encode_windows, pool_logits

# One batch of token id lists -> its logits and, per MoE layer, the packed tokens' routing (text after text).
Forward = Callable[[list[list[int]]], BatchOutput]


@dataclass
class Predictions:
    logits: np.ndarray  # [N, C] float32, the model's own
    probs: np.ndarray  # [N, C] softmax(logits / temperature)
    # Per MoE layer: [N, E] count of (token, slot) assignments of each text to each expert.
    expert_counts: list[np.ndarray]
    num_tokens: np.ndarray  # [N]
    # Per MoE layer, per text (input order): its tokens' expert ids [tokens, k], to compare two backends' routing.
    experts: list[list[np.ndarray]]


def backend_forward(backend: Backend) -> Forward:
    return partial(backend.forward, return_routing=True)


def model_forward(model: MoEClassifier, pad_id: int) -> Forward:
    """A bare model run as the torch backend runs it (eval mode, on the model's own device)."""
    from service.backends.torch_backend import run_model

    model.eval()
    device = next(model.parameters()).device
    return partial(run_model, model, pad_id=pad_id, device=device, return_routing=True)


def loaded_forward(loaded: LoadedModel) -> Forward:
    return model_forward(loaded.model, loaded.tokenizer.pad_id)


def predict(
    forward: Forward, sequences: list[list[int]], temperature: float = 1.0, batch_size: int = 64
) -> Predictions:
    """Batched shortest first to keep padding small; results in input order."""
    n = len(sequences)
    lengths = np.array([len(s) for s in sequences])
    order = np.argsort(lengths, kind="stable")
    logits: np.ndarray | None = None
    counts: list[np.ndarray] = []
    experts: list[list[np.ndarray]] = []
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        out = forward([sequences[i] for i in idx])
        if logits is None:  # the first batch tells the number of labels and of MoE layers
            logits = np.zeros((n, out.logits.shape[1]), dtype=np.float32)
            counts = [np.zeros((n, len(c)), dtype=np.int64) for c in out.expert_counts]
            experts = [[np.empty(0)] * n for _ in out.expert_counts]
        logits[idx] = out.logits
        _per_text_routing(out, lengths[idx], idx, counts, experts)
    if logits is None:
        raise ValueError("nothing to predict: no sequences")
    probs = softmax(logits, temperature).astype(np.float32)
    return Predictions(logits, probs, counts, lengths, experts)


def _per_text_routing(
    out: BatchOutput, lengths: np.ndarray, idx: np.ndarray, counts: list[np.ndarray], experts: list[list[np.ndarray]]
) -> None:
    """Split a batch's packed routing back into its texts: expert ids per text, and per-text expert counts."""
    e = counts[0].shape[1] if counts else 0
    text_of_token = np.repeat(np.arange(len(idx)), lengths)
    cuts = np.cumsum(lengths)[:-1]
    for layer, r in enumerate(out.routing or []):
        k = r.expert_ids.shape[1]
        flat = np.repeat(text_of_token, k) * e + r.expert_ids.reshape(-1)
        counts[layer][idx] = np.bincount(flat, minlength=len(idx) * e).reshape(len(idx), e)
        for i, ids in zip(idx, np.split(r.expert_ids, cuts), strict=True):
            experts[layer][i] = ids


def encode_texts(tokenizer: TextTokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    return [enc.ids for enc in tokenizer.encode_batch(texts, max_length)]


def predict_texts(
    loaded: LoadedModel,
    texts: list[str],
    backend: Backend | None = None,
    policy: LongTextPolicy | None = None,
    max_length: int | None = None,
) -> tuple[Predictions, list[Windowed]]:
    """The loaded model (or `backend`, another way to run the same folder) on raw texts, long ones read as `policy`
    says (default: as served by default); probabilities carry the folder's temperature, as served. max_length: a
    window shorter than the model's (to measure what reading less costs)."""
    policy = policy or LongTextPolicy()
    encoded = encode_windows(loaded.tokenizer, texts, max_length or loaded.folder.config.max_length, policy)
    forward = backend_forward(backend) if backend is not None else loaded_forward(loaded)
    windows = [w for enc in encoded for w in enc.windows]
    per_window = predict(forward, windows, loaded.folder.temperature)
    return pool_predictions(per_window, encoded, loaded.folder.temperature), encoded


def pool_predictions(per_window: Predictions, encoded: list[Windowed], temperature: float) -> Predictions:
    """Each text's predictions from its windows': pooled logits, summed expert counts and tokens, routing joined."""
    if all(len(enc.windows) == 1 for enc in encoded):
        return per_window
    bounds = np.cumsum([0] + [len(enc.windows) for enc in encoded])
    spans = [slice(a, b) for a, b in itertools.pairwise(bounds)]
    logits = np.stack([pool_logits(per_window.logits[s], per_window.num_tokens[s]) for s in spans])
    counts = [np.stack([c[s].sum(axis=0) for s in spans]) for c in per_window.expert_counts]
    experts = [[np.concatenate(layer[s]) for s in spans] for layer in per_window.experts]
    num_tokens = np.array([per_window.num_tokens[s].sum() for s in spans])
    probs = softmax(logits, temperature).astype(np.float32)
    return Predictions(logits, probs, counts, num_tokens, experts)
