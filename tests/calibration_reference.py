"""Calibration figures computed here, independently of service/training/calibration.py, for tests to check the
service's against: the NLL of softmax(logits / T) over a grid of T, and the 15-bin expected calibration error."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

# The fit's bracket (0.05..20), finely: a fitted T off the NLL's optimum does worse than one of these.
T_GRID = np.geomspace(0.05, 20.0, 801)


def _probs(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, y: np.ndarray, temperature: float) -> float:
    return float(-np.log(_probs(logits, temperature)[np.arange(len(y)), y]).mean())


def minimises_nll(temperature: float, logits: np.ndarray, y: np.ndarray) -> bool:
    """Whether `temperature` lies in the bracket and does at least as well as every T of T_GRID (up to the fit's
    rounding to 4 decimals)."""
    best = min(nll(logits, y, float(t)) for t in T_GRID)
    return bool(T_GRID[0] <= temperature <= T_GRID[-1]) and nll(logits, y, temperature) <= best + 1e-6


def ece(logits: np.ndarray, y: np.ndarray, temperature: float, bins: int = 15) -> float:
    """Count-weighted mean |accuracy - confidence| of the top-1 label over equal-width bins (lo, hi] of confidence."""
    probs = _probs(logits, temperature)
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == y
    edges = np.linspace(0.0, 1.0, bins + 1)
    total = 0.0
    for lo, hi in itertools.pairwise(edges):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            total += inside.sum() * abs(correct[inside].mean() - confidence[inside].mean())
    return total / len(y)


def split_logits(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Raw logits and label ids of a model folder's own split (the one `moe-serve evaluate` re-creates), in process."""
    from service.modeling.artifacts import load_model
    from service.training.evaluate import label_ids, model_examples
    from service.training.predict import predict_texts

    loaded = load_model(folder)
    examples, _ = model_examples(loaded.folder, None, split)
    return predict_texts(loaded, [e.text for e in examples])[0].logits, label_ids(loaded.folder, examples)
