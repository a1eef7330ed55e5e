"""The multi-task table of README.md: each task of a multi-task folder against its single-task model of the same
architecture (trained alone on the same split) and a TF-IDF + linear SVM, on the task's test split.

Usage: python scripts/compare_tasks.py --model models/topic-sentiment-minilm-moe \
           --single topic=models/bbc-news-minilm-moe --single sentiment=models/rotten-tomatoes-minilm-moe \
           --json docs/models/multitask.json
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import Any

import torch
from compare_models import tfidf_svm

from service.modeling.artifacts import load_model
from service.training.evaluate import evaluate_model
from service.training.multitask import load_task_splits
from service.training.recipe import Recipe
from service.training.task_eval import evaluate_tasks


def figures(report: dict[str, Any]) -> dict[str, Any]:
    """Macro-F1 (and the headlines' where the task has them) of an evaluate report or a task summary."""
    out = {"macro_f1": report["macro_f1"], "accuracy": report["accuracy"]}
    if "headline" in report:
        out["headline_macro_f1"] = report["headline"]["macro_f1"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the multi-task folder")
    p.add_argument("--single", action="append", default=[], metavar="TASK=FOLDER", help="a task's single-task model")
    p.add_argument("--json")
    args = p.parse_args()
    singles = dict(s.split("=", 1) for s in args.single)
    _, splits = load_task_splits(Recipe.from_file(Path(args.model) / "recipe.json").data)
    summary = evaluate_tasks(load_model(args.model), "test", None)
    rows = []
    for task, split in splits.items():
        labels = sorted({e.label for e in split["train"]})
        svm = tfidf_svm(split["train"], split["test"], labels)
        row = {"task": task, "test_texts": len(split["test"]), "multi_task": figures(summary["tasks"][task]),
               "tfidf_svm": {"macro_f1": svm["article_macro_f1"]}}  # fmt: skip
        if task in singles:
            row["single_task"] = {"model": singles[task], **figures(evaluate_model(load_model(singles[task]), None,
                                                                                    "test", None))}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"model": args.model, "machine": f"{platform.machine()}, torch {torch.__version__}", "rows": rows,
              "specialization": summary["specialization"]}  # fmt: skip
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
