"""Multi-task data: one Dataset per task, each split on its own (data.py's rules), from built-in sources named per
task in a recipe, or from one user CSV/JSONL whose `task` column says which task each row is for.

A task's labels are its own (label ids index its sorted labels); the same text may appear under two tasks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from service.training.data import (
    DEFAULT_FRACTIONS,
    DEFAULT_SEED,
    SPLITS,
    DataError,
    Dataset,
    Example,
    deduplicate,
    load_dataset,
    load_file_examples,
    stratified_split,
)


@dataclass(frozen=True)
class TaskSource:
    """Where one task's examples come from (a built-in name or a file) and which columns to read."""

    source: str
    text_column: str = "text"
    label_column: str = "label"


@dataclass
class TaskDatasets:
    """The tasks of a multi-task model, in a fixed order (the model's task ids index it)."""

    tasks: dict[str, Dataset]

    @property
    def names(self) -> list[str]:
        return list(self.tasks)

    def labels(self) -> dict[str, list[str]]:
        return {t: ds.labels for t, ds in self.tasks.items()}


def load_tasks(
    sources: Mapping[str, TaskSource],
    seed: int = DEFAULT_SEED,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
) -> TaskDatasets:
    """One dataset per named task (order kept), each loaded and split as a single-task dataset would be."""
    if len(sources) < 1:
        raise DataError("a multi-task recipe needs at least one task")
    out = {}
    for task, src in sources.items():
        out[task] = load_dataset(src.source, src.text_column, src.label_column, seed, fractions)
        _check_labels(task, out[task], src.source)
    return TaskDatasets(out)


def load_task_file(
    path: str | Path,
    text_column: str = "text",
    label_column: str = "label",
    task_column: str = "task",
    seed: int = DEFAULT_SEED,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
) -> TaskDatasets:
    """A user's file with a task column: the rows of each task (tasks in sorted order) split on their own, by the
    file's `split` column where it has one, else stratified by label; duplicates are dropped within a task."""
    examples, split_of = load_file_examples(path, text_column, label_column, task_column)
    by_task: dict[str, list[Example]] = {}
    for e in examples:
        by_task.setdefault(e.task, []).append(e)
    out = {}
    for task in sorted(by_task):
        rows = by_task[task]
        if split_of:
            splits: dict[str, list[Example]] = {s: [] for s in SPLITS}
            for e in rows:
                splits[split_of[e.uid]].append(e)
        else:
            splits = stratified_split(deduplicate(rows, f"{path} (task {task!r})"), seed, fractions)
        out[task] = Dataset(task, splits)
        _check_labels(task, out[task], str(path))
    return TaskDatasets(out)


def _check_labels(task: str, ds: Dataset, source: str) -> None:
    if len(ds.labels) < 2:
        raise DataError(f"{source}: task {task!r} needs at least 2 distinct labels, has {ds.labels}")
