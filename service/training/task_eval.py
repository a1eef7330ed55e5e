"""Evaluation of a multi-task folder: each task evaluated as a single-task model (service/modeling/task_view.py),
then what the tasks share: every task's headline figures, the share of each task's tokens each expert takes per
layer, and how much the experts specialise by task (mutual information between task and expert)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from service.backends.base import Backend
from service.modeling.artifacts import LoadedModel
from service.modeling.task_view import TaskBackend, task_names, task_view
from service.training.evaluate import evaluate_examples, model_examples, with_parity, write_report
from service.training.metrics import task_expert_shares, task_specialization

HEADLINE_KEYS = ("examples", "accuracy", "macro_f1")


def evaluate_tasks(
    loaded: LoadedModel,
    split: str,
    output_dir: str | Path | None,
    tasks: list[str] | None = None,
    data: str | None = None,
    backend: Backend | None = None,
) -> dict[str, Any]:
    """Each task (all, or `tasks`) on its own data's `split` (or on `data`, for one task): its full report under
    <output_dir>/<task>/, and the summary (eval.json) over the tasks. With `backend` (e.g. ONNX int8), each task's
    report is that backend's, with its parity against torch fp32 as for a single-task folder."""
    chosen = tasks or task_names(loaded)
    if data is not None and len(chosen) != 1:
        raise ValueError("--data names one task's data: choose that task with --task")
    reports, counts = {}, {}
    for task in chosen:
        view = task_view(loaded, task)
        examples, dataset = model_examples(view.folder, data, split)
        other = None if backend is None else TaskBackend(backend, task)
        report, preds, y = evaluate_examples(view, examples, split, dataset, other)
        if other is not None:
            report = with_parity(report, view, examples, other, preds)
        report["task"] = task
        if output_dir is not None:
            write_report(report, preds, y, view.folder.labels, Path(output_dir) / task)
        reports[task], counts[task] = report, preds.expert_counts
    summary = task_summary(reports, counts, split)
    if output_dir is not None:
        write_summary(summary, Path(output_dir))
    return summary


def task_summary(
    reports: dict[str, dict[str, Any]], counts: dict[str, list[np.ndarray]], split: str = "test"
) -> dict[str, Any]:
    """Each task's headline figures (its full report is written beside, in a folder of its own), their mean
    macro-F1, per-task expert shares and the specialization per layer."""
    tasks = {}
    for t, r in reports.items():
        tasks[t] = {k: r[k] for k in HEADLINE_KEYS if k in r}
        if "headline" in r:
            tasks[t]["headline"] = {k: r["headline"][k] for k in HEADLINE_KEYS if k in r["headline"]}
        if "parity" in r:  # another backend or precision than torch fp32
            tasks[t] |= {"engine": r["engine"], "parity": r["parity"]}
    shares = task_expert_shares(counts)
    return {
        "split": split,
        "tasks": tasks,
        "mean_macro_f1": round(float(np.mean([r["macro_f1"] for r in reports.values()])), 4),
        "expert_share_by_task": shares,
        "specialization": task_specialization(shares),
    }


def write_summary(summary: dict[str, Any], out: Path) -> None:
    from service.training import plots

    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    plots.task_expert_shares(summary["expert_share_by_task"], summary["specialization"], out / "task_experts.png")
