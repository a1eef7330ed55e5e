"""Dataset loading: the built-in split is fixed; user CSV/JSONL files are validated row by row."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from service.training.data import DataError, load_dataset


def test_bbc_news_split_is_fixed_and_stratified() -> None:
    ds = load_dataset("bbc-news")
    sizes = {s: len(p) for s, p in ds.splits.items()}
    # 2,225 files, 2,125 distinct texts: duplicates are dropped before splitting so none spans two splits.
    assert sizes == {"train": 1487, "validation": 212, "test": 426}
    assert ds.labels == ["business", "entertainment", "politics", "sports", "tech"]
    # Stratified: each class's share of the test split is within a point of its share overall.
    overall = Counter(e.label for p in ds.splits.values() for e in p)
    test = Counter(e.label for e in ds["test"])
    for lab in overall:
        assert abs(test[lab] / 426 - overall[lab] / 2125) < 0.01
    # Disjoint, and the same on a second load (the split depends on nothing but the seed).
    uids = [e.uid for p in ds.splits.values() for e in p]
    assert len(set(uids)) == 2125
    texts = {s: {" ".join(e.text.split()) for e in p} for s, p in ds.splits.items()}
    assert not (texts["train"] & texts["test"]) and not (texts["train"] & texts["validation"])
    again = load_dataset("bbc-news")
    assert [e.uid for e in again["test"]] == [e.uid for e in ds["test"]]
    assert [e.uid for e in load_dataset("bbc-news", seed=14)["test"]] != [e.uid for e in ds["test"]]


def test_csv_with_custom_columns(tmp_path: Path) -> None:
    f = tmp_path / "d.csv"
    rows = ["body,topic"] + [f'"text number {i}, with a comma",{"ab"[i % 2]}' for i in range(40)]
    f.write_text("\n".join(rows) + "\n")
    ds = load_dataset(str(f), text_column="body", label_column="topic")
    assert ds.labels == ["a", "b"]
    assert sum(len(p) for p in ds.splits.values()) == 40
    assert ds["train"][0].text.startswith("text number")


def test_jsonl_with_split_column(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    lines = [
        json.dumps({"text": f"t{i}", "label": i % 3, "split": ["train", "validation", "test"][i % 3]}) for i in range(9)
    ]
    f.write_text("\n".join(lines) + "\n")
    ds = load_dataset(str(f))
    assert {s: len(p) for s, p in ds.splits.items()} == {"train": 3, "validation": 3, "test": 3}
    assert ds.labels == ["0", "1", "2"]


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        (
            "text,label\nhello,a\n,b\nworld,\n",
            ".csv",
            r"2 bad row\(s\) rejected: line 3: empty or missing 'text'; "
            r"line 4: empty or missing 'label'",
        ),
        ("words,label\nhello,a\n", ".csv", "missing column 'text'"),
        ('{"text": "a", "label": "x"}\n{"text": "b"\n', ".jsonl", r":2: not valid JSON"),
        ('["a", "x"]\n', ".jsonl", "must be a JSON object"),
        ('{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n', ".jsonl", "at least 2 distinct labels"),
        ('{"text": "a", "label": "x", "split": "dev"}\n', ".jsonl", "split 'dev' is not one of"),
        ("text\tlabel\n", ".tsv", "unsupported file type"),
        ("text,label\nsame words,a\nother,b\nsame  words,b\n", ".csv", r"line 2 \('a'\) and line 4 \('b'\)"),
    ],
)
def test_bad_files_rejected_with_clear_message(tmp_path: Path, content: str, suffix: str, message: str) -> None:
    f = tmp_path / f"bad{suffix}"
    f.write_text(content)
    with pytest.raises(DataError, match=message):
        load_dataset(str(f))


def test_missing_file() -> None:
    with pytest.raises(DataError, match="no such file"):
        load_dataset("does/not/exist.csv")


def test_rotten_tomatoes_split_by_movie() -> None:
    """The reviews only (plot synopses dropped), deduplicated, split so that no movie is in two splits; fixed."""
    ds = load_dataset("rotten-tomatoes")
    assert ds.labels == ["fresh", "rotten"]
    sizes = {s: len(p) for s, p in ds.splits.items()}
    total = sum(sizes.values())
    assert 12_700 < total <= 12_808  # a few dozen texts are the same review listed under two movies
    assert abs(sizes["train"] / total - 0.7) < 0.02 and abs(sizes["test"] / total - 0.2) < 0.02
    movies = {s: {e.group for e in p} for s, p in ds.splits.items()}
    assert not (movies["train"] & movies["test"]) and not (movies["train"] & movies["validation"])
    assert not (movies["validation"] & movies["test"])
    texts = [" ".join(e.text.split()) for p in ds.splits.values() for e in p]
    assert len(set(texts)) == len(texts)
    again = load_dataset("rotten-tomatoes")
    assert [e.uid for e in again["test"]] == [e.uid for e in ds["test"]]


def test_task_column_splits_each_task(tmp_path: Path) -> None:
    from service.training.task_data import load_task_file

    f = tmp_path / "tasks.jsonl"
    rows = [{"text": f"news {i}", "label": "abc"[i % 3], "task": "topic"} for i in range(30)]
    rows += [{"text": f"review {i}", "label": ["pos", "neg"][i % 2], "task": "mood"} for i in range(20)]
    rows.append({"text": "news 0", "label": "pos", "task": "mood"})  # the same text under another task is fine
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    tasks = load_task_file(f)
    assert tasks.names == ["mood", "topic"]
    assert tasks.labels() == {"mood": ["neg", "pos"], "topic": ["a", "b", "c"]}
    assert sum(len(p) for p in tasks.tasks["topic"].splits.values()) == 30
    assert sum(len(p) for p in tasks.tasks["mood"].splits.values()) == 21


def test_task_column_missing_or_empty(tmp_path: Path) -> None:
    from service.training.task_data import load_task_file

    f = tmp_path / "t.csv"
    f.write_text("text,label\na,x\nb,y\n")
    with pytest.raises(DataError, match="missing column 'task'"):
        load_task_file(f)
    f.write_text("text,label,task\na,x,t\nb,y,\n")
    with pytest.raises(DataError, match="line 3: empty or missing 'task'"):
        load_task_file(f)
    f.write_text("text,label,task\na,x,t\nb,x,t\nc,y,u\nd,z,u\n")
    with pytest.raises(DataError, match="task 't' needs at least 2 distinct labels"):
        load_task_file(f)
