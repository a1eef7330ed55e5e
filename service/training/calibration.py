"""Temperature scaling (Guo et al., ICML 2017) and expected calibration error. numpy only.

One scalar T > 0 divides the logits before the softmax: it changes how confident the probabilities are, never which
label wins. T is fitted by minimising the mean negative log-likelihood on held-out data (the validation split).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

T_BRACKET = (0.05, 20.0)
ECE_BINS = 15
_GOLDEN = (math.sqrt(5) - 1) / 2


def _check(scores: np.ndarray, y: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    scores, y = np.asarray(scores), np.asarray(y)
    if scores.ndim != 2 or scores.shape[0] == 0:
        raise ValueError(f"{what} must be a non-empty [N, C] array, got shape {scores.shape}")
    if scores.shape[1] < 2:
        raise ValueError(f"{what} has {scores.shape[1]} class(es); calibration needs at least 2")
    if y.shape != (scores.shape[0],):
        raise ValueError(f"labels must have shape ({scores.shape[0]},), got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= scores.shape[1]:
        raise ValueError(f"labels must be integers in 0..{scores.shape[1] - 1}")
    if not np.isfinite(scores).all():
        raise ValueError(f"{what} contain NaN or infinite values")
    return scores, y


def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true labels under softmax(logits / temperature)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    m = z.max(axis=1)
    log_norm = m + np.log(np.exp(z - m[:, None]).sum(axis=1))
    return float(np.mean(log_norm - z[np.arange(len(y)), y]))


def fit_temperature(logits: np.ndarray, y: np.ndarray, bracket: tuple[float, float] = T_BRACKET) -> float:
    """The T in `bracket` minimising nll(logits, y, T); rounded to 4 decimals.

    Golden-section search on log T: the NLL is convex in 1/T, hence unimodal in log T, and the search is
    deterministic (no random start, no tolerance that depends on the data's scale). The optimum is flat, so 4
    decimals lose nothing and keep config.json stable across machines.
    """
    logits, y = _check(logits, y, "logits")
    if np.ptp(logits, axis=1).max() == 0:  # every row uniform: the NLL does not depend on T
        return 1.0
    lo, hi = math.log(bracket[0]), math.log(bracket[1])
    a, b = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
    fa, fb = nll(logits, y, math.exp(a)), nll(logits, y, math.exp(b))
    while hi - lo > 1e-6:
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - _GOLDEN * (hi - lo)
            fa = nll(logits, y, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + _GOLDEN * (hi - lo)
            fb = nll(logits, y, math.exp(b))
    return round(math.exp((lo + hi) / 2), 4)


@dataclass
class Reliability:
    """Top-1 confidence against accuracy in equal-width bins over [0, 1]; empty bins hold 0."""

    edges: np.ndarray  # [bins + 1]
    confidence: np.ndarray  # [bins] mean top-1 probability of the bin's examples
    accuracy: np.ndarray  # [bins] share of them whose top-1 label is right
    count: np.ndarray  # [bins]

    @property
    def ece(self) -> float:
        """Expected calibration error: the count-weighted mean |accuracy - confidence| over the bins."""
        return float((self.count * np.abs(self.accuracy - self.confidence)).sum() / self.count.sum())


def reliability_bins(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> Reliability:
    probs, y = _check(probs, y, "probabilities")
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(np.float64)
    # Bin i holds confidences in (i/bins, (i+1)/bins], as in Guo et al.; a confidence of exactly 0 joins bin 0.
    idx = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    count = np.bincount(idx, minlength=bins)
    safe = np.maximum(count, 1)
    return Reliability(
        edges=np.linspace(0.0, 1.0, bins + 1),
        confidence=np.bincount(idx, weights=conf, minlength=bins) / safe,
        accuracy=np.bincount(idx, weights=correct, minlength=bins) / safe,
        count=count,
    )


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    return reliability_bins(probs, y, bins).ece
