"""PNG plots for evaluation reports (matplotlib, headless Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from service.training.calibration import Reliability


def _save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def confusion_matrix(cm: np.ndarray, labels: Sequence[str], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2, 1.1 * len(labels) + 1.5))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(
                j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > cm.max() / 2 else "black"
            )
    ax.set_title("Confusion matrix")
    _save(fig, path)


def roc_curves(probs: np.ndarray, y: np.ndarray, labels: Sequence[str], path: Path) -> None:
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(6, 5))
    for i, lab in enumerate(labels):
        yt = (y == i).astype(int)
        if 0 < yt.sum() < len(yt):
            fpr, tpr, _ = roc_curve(yt, probs[:, i])
            ax.plot(fpr, tpr, label=f"{lab} (AUC {roc_auc_score(yt, probs[:, i]):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC, one vs rest")
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)


def expert_by_class(layers: list[dict[str, Any]], labels: Sequence[str], path: Path) -> None:
    fig, axes = plt.subplots(1, len(layers), figsize=(4.5 * len(layers) + 1, 0.6 * len(labels) + 2), squeeze=False)
    for ax, layer in zip(axes[0], layers, strict=True):
        m = np.array([layer["share"][lab] for lab in labels])
        im = ax.imshow(m, cmap="viridis", vmin=0, aspect="auto")
        ax.set_xticks(range(m.shape[1]))
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("expert")
        ax.set_title(f"MoE layer {layer['layer']}: share of class tokens")
        fig.colorbar(im, ax=ax, fraction=0.046)
    _save(fig, path)


def reliability_diagram(before: Reliability, after: Reliability, temperature: float, path: Path) -> None:
    """Accuracy per confidence bin before (T = 1) and after temperature scaling; calibrated bins meet the diagonal.

    Each bar is labelled with its number of texts: a bin of three texts says little, and most texts sit in the top
    bins of a good classifier."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5), sharey=True)
    for ax, rel, title in ((axes[0], before, "T = 1"), (axes[1], after, f"T = {temperature:.4g}")):
        used = rel.count > 0
        lower, width = rel.edges[:-1][used], np.diff(rel.edges)[used]
        ax.bar(lower, rel.accuracy[used], width, align="edge", edgecolor="black", lw=0.5, label="accuracy")
        ax.plot(lower + width / 2, rel.confidence[used], "o", color="tab:red", ms=4, label="mean confidence")
        for x, n in zip(lower + width / 2, rel.count[used], strict=True):
            ax.text(x, 1.01, str(n), ha="center", va="bottom", fontsize=7)
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.08)
        ax.set_xlabel("top-1 confidence (numbers: texts per bin)")
        ax.set_title(f"{title}: ECE {rel.ece:.4f}")
        ax.legend(loc="upper left", fontsize=8)
    axes[0].set_ylabel("accuracy")
    _save(fig, path)


def task_expert_shares(
    shares: list[dict[str, list[float]]], specialization: list[dict[str, float]], path: Path
) -> None:
    """One panel per MoE layer: the share of each task's tokens each expert takes, titled with the layer's mutual
    information between task and expert."""
    tasks = list(shares[0])
    fig, axes = plt.subplots(1, len(shares), figsize=(3.6 * len(shares) + 1, 0.5 * len(tasks) + 2), squeeze=False)
    for ax, row, spec in zip(axes[0], shares, specialization, strict=True):
        m = np.array([row[t] for t in tasks])
        im = ax.imshow(m, cmap="viridis", vmin=0, aspect="auto")
        ax.set_xticks(range(m.shape[1]))
        ax.set_yticks(range(len(tasks)), tasks)
        ax.set_xlabel("expert")
        ax.set_title(f"layer {spec['layer']}: I(task; expert) {spec['mutual_information_bits']:.3f} bits", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    _save(fig, path)
