"""Offline evaluation: classification metrics, expert utilisation and expert-by-class routing for a model folder."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.modeling.artifacts import ModelBundle
from service.modeling.classifier import MoEClassifier, pad_batch
from service.modeling.layout import ROUTING_PROFILE_FILE
from service.modeling.tokenizer import TextTokenizer
from service.training.data import DataError, Example, cap_examples, load_dataset


@dataclass
class Predictions:
    probs: np.ndarray  # [N, C]
    # Per MoE layer: [N, E] count of (token, slot) assignments of each text to each expert.
    expert_counts: list[np.ndarray]
    num_tokens: np.ndarray  # [N]


@torch.inference_mode()
def predict_ids(model: MoEClassifier, sequences: list[list[int]], batch_size: int = 64, pad_id: int = 0) -> Predictions:
    """Batched forward over token id lists, shortest first to keep padding small; results in input order."""
    model.eval()
    n, e = len(sequences), model.config.num_experts
    n_layers = len(model.moe_layers)
    probs = np.zeros((n, model.config.num_labels), dtype=np.float32)
    counts = [np.zeros((n, e), dtype=np.int64) for _ in range(n_layers)]
    order = sorted(range(n), key=lambda i: len(sequences[i]))
    device = next(model.parameters()).device
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        ids, mask = pad_batch([sequences[i] for i in idx], pad_id)
        out = model(ids.to(device), mask.to(device))
        probs[idx] = out.logits.float().softmax(-1).cpu().numpy()
        seq = out.packed.seq_ids.cpu()
        for layer, r in enumerate(out.routing):
            k = r.expert_ids.shape[1]
            flat = seq.repeat_interleave(k) * e + r.expert_ids.reshape(-1).cpu()
            counts[layer][idx] = torch.bincount(flat, minlength=len(idx) * e).view(len(idx), e).numpy()
    return Predictions(probs, counts, np.array([len(s) for s in sequences]))


def encode_examples(tokenizer: TextTokenizer, examples: list[Example], max_length: int) -> list[list[int]]:
    return [enc.ids for enc in tokenizer.encode_batch([e.text for e in examples], max_length)]


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


def classification_report(probs: np.ndarray, y: np.ndarray, labels: list[str]) -> dict[str, Any]:
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
        "labels": labels,
        "confusion_matrix": confusion_matrix(y, pred, labels=ids).tolist(),
    }


def expert_by_class(preds: Predictions, y: np.ndarray, labels: list[str]) -> list[dict[str, Any]]:
    """Per layer: for each true class, the share of its token assignments that went to each expert."""
    out = []
    for i, c in enumerate(preds.expert_counts):
        rows = {}
        for ci, lab in enumerate(labels):
            tot = c[y == ci].sum(0)
            rows[lab] = [round(float(v), 4) for v in tot / max(tot.sum(), 1)]
        out.append({"layer": i, "share": rows})
    return out


def evaluate_examples(
    bundle: ModelBundle, examples: list[Example], split: str, dataset: str
) -> tuple[dict[str, Any], Predictions, np.ndarray]:
    label2id = {lab: i for i, lab in bundle.id2label.items()}
    unknown = sorted({e.label for e in examples} - set(label2id))
    if unknown:
        raise DataError(f"labels not known to model {bundle.name}: {', '.join(unknown)}")
    y = np.array([label2id[e.label] for e in examples])
    encoded = bundle.tokenizer.encode_batch([e.text for e in examples], bundle.config.max_length)
    seqs = [enc.ids for enc in encoded]
    preds = predict_ids(bundle.model, seqs, pad_id=bundle.tokenizer.pad_id)
    report = classification_report(preds.probs, y, bundle.labels)
    profile = routing_profile(preds, split, dataset)
    report.update(
        {
            "model": bundle.name,
            "dataset": dataset,
            "split": split,
            "examples": len(examples),
            "truncated_share": round(float(np.mean([enc.truncated for enc in encoded])), 4),
            "expert_utilisation": profile["layers"],
            "expert_by_class": expert_by_class(preds, y, bundle.labels),
        }
    )
    return report, preds, y


def evaluate_model(
    bundle: ModelBundle,
    data: str | None,
    split: str,
    output_dir: str | Path | None,
    text_column: str | None = None,
    label_column: str | None = None,
) -> dict[str, Any]:
    """Evaluate on `data` (default: the dataset the model was trained on, with its recorded split settings)."""
    t = bundle.training
    source = data or t.get("dataset")
    if not source:
        raise DataError(f"model {bundle.name} does not record its training data; pass --data")
    ds = load_dataset(
        source,
        text_column=text_column or t.get("text_column", "text"),
        label_column=label_column or t.get("label_column", "label"),
        seed=t.get("split_seed", 13),
        fractions=tuple(t.get("split_fractions", (0.7, 0.1, 0.2))),
    )
    examples = ds[split]
    if not data:  # the model's own dataset: the same capped subset it was trained and tested on
        examples = cap_examples(examples, t.get("max_examples_per_split"), t.get("split_seed", 13))
    report, preds, y = evaluate_examples(bundle, examples, split, ds.name)
    if output_dir is not None:
        write_report(report, preds, y, bundle.labels, Path(output_dir))
    return report


def write_report(
    report: dict[str, Any], preds: Predictions, y: np.ndarray, labels: list[str], out: Path, filename: str = "eval.json"
) -> None:
    from service.training import plots

    out.mkdir(parents=True, exist_ok=True)
    (out / filename).write_text(json.dumps(report, indent=2) + "\n")
    plots.confusion_matrix(np.array(report["confusion_matrix"]), labels, out / "confusion_matrix.png")
    plots.roc_curves(preds.probs, y, labels, out / "roc_curves.png")
    plots.expert_by_class(report["expert_by_class"], labels, out / "expert_by_class.png")


def write_routing_profile(profile: dict[str, Any], model_dir: Path) -> None:
    (model_dir / ROUTING_PROFILE_FILE).write_text(json.dumps(profile, indent=2) + "\n")
