"""Offline evaluation of a model folder on a split of its data: the report (metrics.py computes its figures) of the
loaded model, or of another backend or precision for the same folder with its parity against torch fp32."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from service.backends.base import Backend
from service.modeling.artifacts import LoadedModel
from service.modeling.folder import ModelFolder
from service.modeling.layout import ROUTING_PROFILE_FILE
from service.modeling.probabilities import softmax
from service.modeling.windows import LongTextPolicy
from service.training.calibration import fit_temperature, reliability_bins
from service.training.data import DataError, Example, cap_examples, load_dataset
from service.training.metrics import (
    calibration_section,
    classification_report,
    expert_by_class,
    parity,
    routing_profile,
)
from service.training.predict import Predictions, predict_texts


def label_ids(folder: ModelFolder, examples: list[Example]) -> np.ndarray:
    label2id = {lab: i for i, lab in enumerate(folder.labels)}
    unknown = sorted({e.label for e in examples} - set(label2id))
    if unknown:
        raise DataError(f"labels not known to model {folder.name}: {', '.join(unknown)}")
    return np.array([label2id[e.label] for e in examples], dtype=np.int64)


def calibrate(loaded: LoadedModel, examples: list[Example]) -> tuple[float, dict[str, Any]]:
    """Temperature fitted on `examples` (the validation split; never the test split, which reports the result),
    and the calibration section on them (ECE before, T = 1, and after), from one prediction."""
    preds, _ = predict_texts(loaded, [e.text for e in examples])  # preds.logits: the model's own, whatever T is
    y = label_ids(loaded.folder, examples)
    temperature = fit_temperature(preds.logits, y)
    return temperature, calibration_section(preds.logits, y, temperature)


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.split("\n") if line.strip()]


def headline(text: str) -> str:
    """The first line of a text (a bbc-news article's title); the first non-empty one if the text opens blank."""
    lines = _lines(text)
    return lines[0] if lines else text.strip()


def headline_section(
    loaded: LoadedModel,
    examples: list[Example],
    y: np.ndarray,
    backend: Backend | None = None,
    policy: LongTextPolicy | None = None,
) -> dict[str, Any] | None:
    """The same metrics on each text's first line: how the model does on the short texts a service mostly gets.

    None when no text has a second non-empty line (headline and text would be the same thing)."""
    if not any(len(_lines(e.text)) > 1 for e in examples):
        return None
    folder = loaded.folder
    preds, _ = predict_texts(loaded, [headline(e.text) for e in examples], backend, policy)
    report = classification_report(preds.probs, y, folder.labels)
    del report["labels"]  # already at the top of the report
    # A temperature fitted on whole texts need not suit their first lines: report how calibrated those are too.
    report["calibration"] = calibration_section(preds.logits, y, folder.temperature)
    return {"examples": len(examples), "mean_tokens": round(float(preds.num_tokens.mean()), 2), **report}


def evaluate_examples(
    loaded: LoadedModel,
    examples: list[Example],
    split: str,
    dataset: str,
    backend: Backend | None = None,
    policy: LongTextPolicy | None = None,
) -> tuple[dict[str, Any], Predictions, np.ndarray]:
    """The report of the loaded model, or of `backend` (another backend or precision for the same folder), long
    texts read as `policy` says (default: as served by default)."""
    folder = loaded.folder
    y = label_ids(folder, examples)
    policy = policy or LongTextPolicy()
    preds, encoded = predict_texts(loaded, [e.text for e in examples], backend, policy)
    report = classification_report(preds.probs, y, folder.labels)
    report.update(
        {
            "model": folder.name,
            "dataset": dataset,
            "split": split,
            "examples": len(examples),
            "truncated_share": round(float(np.mean([enc.truncated for enc in encoded])), 4),
            "long_text": {
                **asdict(policy),
                "mean_windows": round(float(np.mean([len(enc.windows) for enc in encoded])), 3),
                "mean_tokens": round(float(preds.num_tokens.mean()), 1),  # what the model read, overlaps included
            },
            "calibration": calibration_section(preds.logits, y, folder.temperature),
            "expert_utilisation": routing_profile(preds, split, dataset)["layers"],
            "expert_by_class": expert_by_class(preds, y, folder.labels),
        }
    )
    head = headline_section(loaded, examples, y, backend, policy)
    if head is not None:
        report["headline"] = head
    return report, preds, y


def model_examples(
    folder: ModelFolder,
    data: str | None,
    split: str,
    text_column: str | None = None,
    label_column: str | None = None,
) -> tuple[list[Example], str]:
    """A split of `data` (default: the dataset the model was trained on, with its recorded split settings)."""
    t = folder.training
    source = data or t.get("dataset")
    if not source:
        raise DataError(f"model {folder.name} does not record its training data; pass --data")
    if not data and t.get("task_column"):  # one task of a multi-task file (a task view's record)
        from service.training.task_data import load_task_file

        tasks = load_task_file(
            source,
            t.get("text_column", "text"),
            t.get("label_column", "label"),
            t["task_column"],
            t.get("split_seed", 13),
            tuple(t.get("split_fractions", (0.7, 0.1, 0.2))),
        )
        examples = cap_examples(tasks.tasks[t["task"]][split], t.get("max_examples_per_split"), t.get("split_seed", 13))
        return examples, t["task"]
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
    loaded: LoadedModel,
    data: str | None,
    split: str,
    output_dir: str | Path | None,
    text_column: str | None = None,
    label_column: str | None = None,
    backend: Backend | None = None,
    policy: LongTextPolicy | None = None,
) -> dict[str, Any]:
    """Evaluate on `data` (default: the dataset the model was trained on, with its recorded split settings).

    With `backend` (e.g. ONNX int8), the report is that backend's, plus `parity` against torch fp32: the loaded
    model itself, so each split is predicted once by each of the two."""
    examples, dataset = model_examples(loaded.folder, data, split, text_column, label_column)
    report, preds, y = evaluate_examples(loaded, examples, split, dataset, backend, policy)
    if backend is not None:
        report = with_parity(report, loaded, examples, backend, preds, policy)
    if output_dir is not None:
        write_report(report, preds, y, loaded.folder.labels, Path(output_dir))
    return report


def with_parity(
    report: dict[str, Any],
    loaded: LoadedModel,
    examples: list[Example],
    backend: Backend,
    preds: Predictions,
    policy: LongTextPolicy | None = None,
) -> dict[str, Any]:
    """`backend`'s report on `examples` (its predictions `preds`) with the engine it names and its parity against
    torch fp32, the loaded model itself, on the same texts (and on their headlines)."""
    reference, _ = predict_texts(loaded, [e.text for e in examples], policy=policy)
    engine = {"backend": backend.kind, "precision": backend.info.precision}  # ("precision" is a metric here)
    report = {"engine": engine, **report, "parity": parity(reference, preds)}
    if "headline" in report:  # short texts are where a precision's rounding flips labels first
        report["headline"]["parity"] = _headline_parity(loaded, examples, backend)
    return report


def _headline_parity(loaded: LoadedModel, examples: list[Example], backend: Backend) -> dict[str, Any]:
    texts = [headline(e.text) for e in examples]
    return parity(predict_texts(loaded, texts)[0], predict_texts(loaded, texts, backend)[0])


def write_report(
    report: dict[str, Any],
    preds: Predictions,
    y: np.ndarray,
    labels: Sequence[str],
    out: Path,
    filename: str = "eval.json",
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
