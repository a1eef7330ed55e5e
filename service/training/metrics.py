"""The figures of an evaluation report, from predictions and true labels: classification metrics, calibration,
expert utilisation and expert-by-class routing, and the parity of two ways to run one model. No model runs here."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from service.modeling.probabilities import softmax
from service.training.calibration import ECE_BINS, expected_calibration_error

if TYPE_CHECKING:
    from service.training.predict import Predictions


def expert_stats(shares: np.ndarray) -> dict[str, Any]:
    """Balance figures for one layer's expert shares (summing to 1)."""
    e = len(shares)
    mean = 1.0 / e
    nz = shares[shares > 0]
    entropy = float(-(nz * np.log(nz)).sum())
    return {
        "share": [round(float(s), 6) for s in shares],
        "imbalance_max_over_mean": round(float(shares.max() / mean), 4),
        "cv": round(float(shares.std() / mean), 4),
        "entropy": round(entropy, 4),
        "normalized_entropy": round(entropy / math.log(e), 4) if e > 1 else 1.0,
        "unused_experts": [int(i) for i in np.flatnonzero(shares == 0)],
    }


def routing_profile(preds: Predictions, split: str, dataset: str) -> dict[str, Any]:
    """Per-layer expert distribution: the reference that live traffic is compared with when serving."""
    layers = []
    for i, c in enumerate(preds.expert_counts):
        total = c.sum(0)
        shares = total / max(total.sum(), 1)
        layers.append({"layer": i, "assignments": int(total.sum()), **expert_stats(shares)})
    return {
        "dataset": dataset,
        "split": split,
        "texts": len(preds.probs),
        "tokens": int(preds.num_tokens.sum()),
        "layers": layers,
    }


def _roc_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y_true, score))


def classification_report(probs: np.ndarray, y: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    pred = probs.argmax(1)
    ids = list(range(len(labels)))
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=ids, zero_division=0)
    per_class = {
        lab: {
            "precision": round(float(p[i]), 4),
            "recall": round(float(r[i]), 4),
            "f1": round(float(f[i]), 4),
            "support": int(s[i]),
        }
        for i, lab in enumerate(labels)
    }
    aucs = {}
    for i, lab in enumerate(labels):
        yt = (y == i).astype(int)
        if 0 < yt.sum() < len(yt):  # AUC is undefined when a class is absent or alone
            aucs[lab] = _roc_auc(yt, probs[:, i])
            per_class[lab]["roc_auc"] = round(aucs[lab], 4)
    return {
        "accuracy": round(float(accuracy_score(y, pred)), 4),
        "macro_f1": round(float(f.mean()), 4),
        "precision": round(float(p.mean()), 4),
        "recall": round(float(r.mean()), 4),
        "roc_auc": round(float(np.mean(list(aucs.values()))), 4) if aucs else None,
        "per_class": per_class,
        "labels": list(labels),
        "confusion_matrix": confusion_matrix(y, pred, labels=ids).tolist(),
    }


def expert_by_class(preds: Predictions, y: np.ndarray, labels: Sequence[str]) -> list[dict[str, Any]]:
    """Per layer: for each true class, the share of its token assignments that went to each expert."""
    out = []
    for i, c in enumerate(preds.expert_counts):
        rows = {}
        for ci, lab in enumerate(labels):
            tot = c[y == ci].sum(0)
            rows[lab] = [round(float(v), 4) for v in tot / max(tot.sum(), 1)]
        out.append({"layer": i, "share": rows})
    return out


def parity(ref: Predictions, got: Predictions) -> dict[str, Any]:
    """How far another backend or precision is from the reference on the same texts: largest probability
    difference, share of identical predictions, share of tokens routed to the same top-k set (over all MoE layers,
    and per layer: where a precision's rounding starts to move routing)."""
    per_layer = []
    for ref_layer, got_layer in zip(ref.experts, got.experts, strict=True):
        same = total = 0
        for a, b in zip(ref_layer, got_layer, strict=True):
            same += int((np.sort(a, axis=1) == np.sort(b, axis=1)).all(axis=1).sum())
            total += len(a)
        per_layer.append((same, total))
    same, total = sum(s for s, _ in per_layer), sum(t for _, t in per_layer)
    return {
        "reference": "torch fp32",
        "max_abs_diff": float(np.abs(ref.probs - got.probs).max()),
        "argmax_agreement": round(float(np.mean(ref.probs.argmax(1) == got.probs.argmax(1))), 6),
        "routing_agreement": round(same / max(total, 1), 6),
        "routing_agreement_per_layer": [round(s / max(t, 1), 4) for s, t in per_layer],
        "texts": len(ref.probs),
    }


def calibration_section(logits: np.ndarray, y: np.ndarray, temperature: float) -> dict[str, Any]:
    return {
        "temperature": temperature,
        "ece_before": round(expected_calibration_error(softmax(logits), y, ECE_BINS), 4),
        "ece": round(expected_calibration_error(softmax(logits, temperature), y, ECE_BINS), 4),
        "bins": ECE_BINS,
    }


def task_expert_shares(counts: dict[str, list[np.ndarray]]) -> list[dict[str, list[float]]]:
    """Per MoE layer, per task: the share of the task's (token, slot) assignments each expert takes. `counts` is
    each task's Predictions.expert_counts (per layer, [texts, E])."""
    layers = len(next(iter(counts.values())))
    out = []
    for layer in range(layers):
        row = {}
        for task, per_layer in counts.items():
            total = per_layer[layer].sum(0).astype(np.float64)
            row[task] = [round(float(s), 6) for s in total / max(total.sum(), 1.0)]
        out.append(row)
    return out


def task_specialization(shares: list[dict[str, list[float]]]) -> list[dict[str, float]]:
    """Per layer, the mutual information between task and expert, with tasks weighted equally (so a task with
    long texts does not count more): I = sum_t 1/n sum_e p(e|t) log2(p(e|t) / p(e)), p(e) the tasks' mean share.
    0 bits: every task uses the experts alike; log2(n) bits: each task has experts of its own. Reported also as a
    share of that ceiling."""
    out = []
    for layer, row in enumerate(shares):
        p = np.array(list(row.values()))  # [tasks, E], rows sum to 1
        marginal = p.mean(0)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(p > 0, p * np.log2(p / marginal), 0.0)
        mi = float(terms.sum() / len(p))
        ceiling = math.log2(len(p)) if len(p) > 1 else 1.0
        out.append({"layer": layer, "mutual_information_bits": round(mi, 4), "share_of_max": round(mi / ceiling, 4)})
    return out
