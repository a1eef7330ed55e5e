"""Live routing statistics for one model: expert load since start and over a recent window, and drift.

Drift is KL(live || reference) per MoE layer, where the reference is the expert distribution the model showed on
its validation split (routing_profile.json). A small epsilon keeps the divergence finite when an expert is unused.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from typing import Any

import numpy as np

EPS = 1e-6


def kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    p = (p + EPS) / (p + EPS).sum()
    q = (q + EPS) / (q + EPS).sum()
    return float(np.sum(p * np.log(p / q)))


def layer_stats(counts: np.ndarray, reference: np.ndarray | None) -> dict[str, Any]:
    """Balance figures for one layer from its per-expert assignment counts."""
    total = int(counts.sum())
    e = len(counts)
    share = counts / total if total else np.zeros(e)
    out: dict[str, Any] = {
        "tokens_per_expert": [int(c) for c in counts],
        "share": [round(float(s), 6) for s in share],
        "assignments": total,
        "unused_experts": [int(i) for i in np.flatnonzero(counts == 0)],
    }
    if total:
        nz = share[share > 0]
        entropy = float(-(nz * np.log(nz)).sum())
        out.update(
            imbalance_max_over_mean=round(float(share.max() * e), 4),
            cv=round(float(share.std() * e), 4),
            entropy=round(entropy, 4),
            normalized_entropy=round(entropy / math.log(e), 4) if e > 1 else 1.0,
            drift_kl=round(kl_divergence(share, reference), 6) if reference is not None else None,
        )
    else:
        out.update(imbalance_max_over_mean=None, cv=None, entropy=None, normalized_entropy=None, drift_kl=None)
    return out


class RoutingStats:
    """Thread-safe: the inference thread adds batch counts, the API and /metrics read snapshots."""

    def __init__(self, moe_layers: int, num_experts: int, window_s: float, profile: dict[str, Any] | None) -> None:
        self.window_s = window_s
        self.started = time.time()
        self.total = np.zeros((moe_layers, num_experts), dtype=np.int64)
        self.texts = 0
        self._recent: deque[tuple[float, np.ndarray]] = deque()
        self._lock = threading.Lock()
        self.reference: list[np.ndarray] | None = None
        if profile and len(profile.get("layers", [])) == moe_layers:
            self.reference = [np.asarray(layer["share"], dtype=np.float64) for layer in profile["layers"]]

    def add(self, counts: np.ndarray, texts: int, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._lock:
            self.total += counts
            self.texts += texts
            self._recent.append((now, counts))
            self._prune(now)

    def _prune(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - self.window_s:
            self._recent.popleft()

    def window_counts(self, now: float | None = None) -> np.ndarray:
        now = time.time() if now is None else now
        with self._lock:
            self._prune(now)
            out = np.zeros_like(self.total)
            for _, c in self._recent:
                out += c
            return out

    def snapshot(self) -> dict[str, Any]:
        window = self.window_counts()
        with self._lock:
            total = self.total.copy()
            texts = self.texts
        ref = self.reference or [None] * len(total)
        return {
            "since_start": {
                "started_at": self.started,
                "texts": texts,
                "layers": [{"layer": i, **layer_stats(c, r)} for i, (c, r) in enumerate(zip(total, ref, strict=True))],
            },
            "window": {
                "seconds": self.window_s,
                "layers": [{"layer": i, **layer_stats(c, r)} for i, (c, r) in enumerate(zip(window, ref, strict=True))],
            },
            "reference": None if self.reference is None else "routing_profile.json (validation split)",
        }
