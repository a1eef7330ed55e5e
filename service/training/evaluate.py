"""Offline evaluation of a model folder: classification metrics (whole texts and their first lines), calibration,
expert utilisation and expert-by-class routing."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.backends.base import Backend
from service.modeling.artifacts import ModelBundle
from service.modeling.classifier import MoEClassifier, pad_batch
from service.modeling.layout import ROUTING_PROFILE_FILE
from service.modeling.tokenizer import Encoded, TextTokenizer
from service.training.calibration import (
    ECE_BINS,
    expected_calibration_error,
    fit_temperature,
    reliability_bins,
    softmax,
)
from service.training.data import DataError, Example, cap_examples, load_dataset


@dataclass
class Predictions:
    logits: np.ndarray  # [N, C] float32, the model's own
    probs: np.ndarray  # [N, C] softmax(logits / temperature)
    # Per MoE layer: [N, E] count of (token, slot) assignments of each text to each expert.
    expert_counts: list[np.ndarray]
    num_tokens: np.ndarray  # [N]


@torch.inference_mode()
def predict_ids(
    model: MoEClassifier, sequences: list[list[int]], batch_size: int = 64, pad_id: int = 0, temperature: float = 1.0
) -> Predictions:
    """Batched forward over token id lists, shortest first to keep padding small; results in input order."""
    model.eval()
    n, e = len(sequences), model.config.num_experts
    n_layers = len(model.moe_layers)
    logits = np.zeros((n, model.config.num_labels), dtype=np.float32)
    counts = [np.zeros((n, e), dtype=np.int64) for _ in range(n_layers)]
    order = sorted(range(n), key=lambda i: len(sequences[i]))
    device = next(model.parameters()).device
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        ids, mask = pad_batch([sequences[i] for i in idx], pad_id)
        out = model(ids.to(device), mask.to(device))
        logits[idx] = out.logits.float().cpu().numpy()
        seq = out.packed.seq_ids.cpu()
        for layer, r in enumerate(out.routing):
            k = r.expert_ids.shape[1]
            flat = seq.repeat_interleave(k) * e + r.expert_ids.reshape(-1).cpu()
            counts[layer][idx] = torch.bincount(flat, minlength=len(idx) * e).view(len(idx), e).numpy()
    probs = softmax(logits, temperature).astype(np.float32)
    return Predictions(logits, probs, counts, np.array([len(s) for s in sequences]))


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


def label_ids(bundle: ModelBundle, examples: list[Example]) -> np.ndarray:
    label2id = {lab: i for i, lab in bundle.id2label.items()}
    unknown = sorted({e.label for e in examples} - set(label2id))
    if unknown:
        raise DataError(f"labels not known to model {bundle.name}: {', '.join(unknown)}")
    return np.array([label2id[e.label] for e in examples], dtype=np.int64)


def predict_texts(
    bundle: ModelBundle, texts: list[str], backend: Backend | None = None
) -> tuple[Predictions, list[Encoded]]:
    """The bundle's model (or `backend`, another way to run the same folder) on raw texts; probabilities carry the
    bundle's temperature, as served."""
    encoded = bundle.tokenizer.encode_batch(texts, bundle.config.max_length)
    seqs = [enc.ids for enc in encoded]
    if backend is not None:
        return predict_backend(backend, seqs, temperature=bundle.temperature)[0], encoded
    return predict_ids(bundle.model, seqs, pad_id=bundle.tokenizer.pad_id, temperature=bundle.temperature), encoded


def predict_backend(
    backend: Backend, sequences: list[list[int]], batch_size: int = 64, temperature: float = 1.0
) -> tuple[Predictions, list[list[np.ndarray]]]:
    """Any backend, batched shortest first; also each MoE layer's expert ids per text ([tokens, k] arrays, input
    order), so two backends' routing can be compared token by token."""
    n, e = len(sequences), backend.info.num_experts
    logits = np.zeros((n, len(backend.info.labels)), dtype=np.float32)
    counts = [np.zeros((n, e), dtype=np.int64) for _ in range(backend.info.moe_layers)]
    experts: list[list[np.ndarray]] = [[np.empty(0)] * n for _ in range(backend.info.moe_layers)]
    order = sorted(range(n), key=lambda i: len(sequences[i]))
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        out = backend.forward([sequences[i] for i in idx], return_routing=True)
        logits[idx] = out.logits
        offsets = np.cumsum([0] + [len(sequences[i]) for i in idx])
        for layer, r in enumerate(out.routing or []):
            for row, i in enumerate(idx):
                ids = r.expert_ids[offsets[row] : offsets[row + 1]]
                experts[layer][i] = ids
                counts[layer][i] = np.bincount(ids.reshape(-1), minlength=e)
    probs = softmax(logits, temperature).astype(np.float32)
    return Predictions(logits, probs, counts, np.array([len(s) for s in sequences])), experts


def parity(
    ref: Predictions, ref_experts: list[list[np.ndarray]], got: Predictions, got_experts: list[list[np.ndarray]]
) -> dict[str, Any]:
    """How far another backend or precision is from the reference on the same texts: largest probability
    difference, share of identical predictions, share of tokens (over all MoE layers) routed to the same top-k set."""
    same = total = 0
    for ref_layer, got_layer in zip(ref_experts, got_experts, strict=True):
        for a, b in zip(ref_layer, got_layer, strict=True):
            same += int((np.sort(a, axis=1) == np.sort(b, axis=1)).all(axis=1).sum())
            total += len(a)
    return {
        "reference": "torch fp32",
        "max_abs_diff": float(np.abs(ref.probs - got.probs).max()),
        "argmax_agreement": round(float(np.mean(ref.probs.argmax(1) == got.probs.argmax(1))), 6),
        "routing_agreement": round(same / max(total, 1), 6),
        "texts": len(ref.probs),
    }


def calibrate(bundle: ModelBundle, examples: list[Example]) -> float:
    """Temperature fitted on `examples` (the validation split; never the test split, which reports the result)."""
    preds, _ = predict_texts(bundle, [e.text for e in examples])
    return fit_temperature(preds.logits, label_ids(bundle, examples))


def calibration_section(logits: np.ndarray, y: np.ndarray, temperature: float) -> dict[str, Any]:
    return {
        "temperature": temperature,
        "ece_before": round(expected_calibration_error(softmax(logits), y, ECE_BINS), 4),
        "ece": round(expected_calibration_error(softmax(logits, temperature), y, ECE_BINS), 4),
        "bins": ECE_BINS,
    }


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.split("\n") if line.strip()]


def headline(text: str) -> str:
    """The first line of a text (a bbc-news article's title); the first non-empty one if the text opens blank."""
    lines = _lines(text)
    return lines[0] if lines else text.strip()


def headline_section(
    bundle: ModelBundle, examples: list[Example], y: np.ndarray, backend: Backend | None = None
) -> dict[str, Any] | None:
    """The same metrics on each text's first line: how the model does on the short texts a service mostly gets.

    None when no text has a second non-empty line (headline and text would be the same thing)."""
    if not any(len(_lines(e.text)) > 1 for e in examples):
        return None
    preds, _ = predict_texts(bundle, [headline(e.text) for e in examples], backend)
    report = classification_report(preds.probs, y, bundle.labels)
    del report["labels"]  # already at the top of the report
    # A temperature fitted on whole texts need not suit their first lines: report how calibrated those are too.
    report["calibration"] = calibration_section(preds.logits, y, bundle.temperature)
    return {"examples": len(examples), "mean_tokens": round(float(preds.num_tokens.mean()), 2), **report}


def evaluate_examples(
    bundle: ModelBundle, examples: list[Example], split: str, dataset: str, backend: Backend | None = None
) -> tuple[dict[str, Any], Predictions, np.ndarray]:
    """The report of the bundle's model, or of `backend` (another backend or precision for the same folder)."""
    y = label_ids(bundle, examples)
    preds, encoded = predict_texts(bundle, [e.text for e in examples], backend)
    report = classification_report(preds.probs, y, bundle.labels)
    profile = routing_profile(preds, split, dataset)
    report.update(
        {
            "model": bundle.name,
            "dataset": dataset,
            "split": split,
            "examples": len(examples),
            "truncated_share": round(float(np.mean([enc.truncated for enc in encoded])), 4),
            "calibration": calibration_section(preds.logits, y, bundle.temperature),
            "expert_utilisation": profile["layers"],
            "expert_by_class": expert_by_class(preds, y, bundle.labels),
        }
    )
    head = headline_section(bundle, examples, y, backend)
    if head is not None:
        report["headline"] = head
    return report, preds, y


def model_examples(
    bundle: ModelBundle,
    data: str | None,
    split: str,
    text_column: str | None = None,
    label_column: str | None = None,
) -> tuple[list[Example], str]:
    """A split of `data` (default: the dataset the model was trained on, with its recorded split settings)."""
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
    return examples, ds.name


def evaluate_model(
    bundle: ModelBundle,
    data: str | None,
    split: str,
    output_dir: str | Path | None,
    text_column: str | None = None,
    label_column: str | None = None,
    backend: Backend | None = None,
) -> dict[str, Any]:
    """Evaluate on `data` (default: the dataset the model was trained on, with its recorded split settings).

    With `backend` (e.g. ONNX int8), the report is that backend's, plus `parity` against torch fp32."""
    examples, dataset = model_examples(bundle, data, split, text_column, label_column)
    report, preds, y = evaluate_examples(bundle, examples, split, dataset, backend)
    if backend is not None:
        from service.backends.torch_backend import TorchBackend

        seqs = encode_examples(bundle.tokenizer, examples, bundle.config.max_length)
        got = predict_backend(backend, seqs, temperature=bundle.temperature)
        ref = predict_backend(TorchBackend(str(bundle.path), "cpu"), seqs, temperature=bundle.temperature)
        engine = {"backend": backend.kind, "precision": backend.info.precision}  # ("precision" is a metric here)
        report = {"engine": engine, **report, "parity": parity(*ref, *got)}
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
    before, after = reliability_bins(softmax(preds.logits), y), reliability_bins(preds.probs, y)
    plots.reliability_diagram(before, after, report["calibration"]["temperature"], out / "reliability_diagram.png")


def write_routing_profile(profile: dict[str, Any], model_dir: Path) -> None:
    (model_dir / ROUTING_PROFILE_FILE).write_text(json.dumps(profile, indent=2) + "\n")
