"""Shared fixtures: a tiny model trained by the project's own code (seconds), reused across the session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "bbc-news-moe"

# Two cores: keep torch from oversubscribing when the server and the tests run side by side.
torch.set_num_threads(int(os.environ.get("MOE_TEST_THREADS", "2")))

# A test's tier is its folder (speed, not subject): the marker comes from there, so none can be forgotten.
TIERS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        tier = next((t for t in TIERS if (ROOT / "tests" / t) in item.path.parents), None)
        if tier is not None:
            item.add_marker(tier)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from service.training.recipe import Recipe
    from service.training.train import train

    out = tmp_path_factory.mktemp("models") / "tiny"
    recipe = Recipe.from_file(ROOT / "recipes" / "tiny.yaml")
    train(recipe, out, progress=False)
    return out


def write_topic_csv(path: Path, rows_per_class: int = 40) -> Path:
    """A small three-topic CSV in the tiny BERT's vocabulary; each text is a title line and a body."""
    import csv
    import random

    topics = {
        "business": "stocks shares market bank profit fell rose sharply",
        "sport": "match team goal player season win",
        "tech": "phone software computer internet game chip mobile users",
    }
    filler = ["the", "a", "of", "to", "and", "in", "on", "for", "is", "was", "new", "year", "said"]
    rng = random.Random(0)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for label, words in topics.items():
            vocab = words.split()
            for _ in range(rows_per_class):
                title = " ".join(rng.choice(vocab) for _ in range(3))
                body = " ".join(rng.choice(vocab + filler) for _ in range(rng.randint(8, 40)))
                w.writerow([f"{title}\n{body}", label])
    return path


@pytest.fixture(scope="session")
def tiny_bert_moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT-format encoder (built here) converted by MoEfication and fine-tuned by `moe-serve train`."""
    from service.training.recipe import Recipe
    from service.training.train import train
    from tests.bert_fixture import write_tiny_bert

    work = tmp_path_factory.mktemp("pretrained")
    base = write_tiny_bert(work / "tiny-bert")
    recipe = Recipe.model_validate(
        {
            "name": "tiny-bert-moe",
            "base": {"model": str(base), "num_experts": 4, "top_k": 2, "max_length": 48, "dropout": 0.0},
            "data": {"source": str(write_topic_csv(work / "topics.csv"))},
            "training": {
                "epochs": 3,
                "batch_size": 16,
                "lr": 0.003,
                "head_lr": 0.01,
                "ema_decay": None,
                "short_text_prob": 0.3,
                "train_max_length": 24,
                "patience": 3,
                "weights_dtype": "float16",
                "validate_headlines": True,
            },
        }
    )
    out = work / "tiny-bert-moe"
    train(recipe, out, progress=False)
    return out


@pytest.fixture(scope="session")
def onnx_models_dir(tiny_model_dir: Path, tiny_bert_moe_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both tiny architectures (pre-norm from scratch; BERT post-norm converted by MoEfication), each exported to
    ONNX fp32 and int8 by `moe-serve export`'s code."""
    import shutil

    from service.modeling.onnx_export import export_model

    repo = tmp_path_factory.mktemp("onnx-repo")
    for src in (tiny_model_dir, tiny_bert_moe_dir):
        shutil.copytree(src, repo / src.name)
        export_model(repo / src.name, int8=True)
    return repo


def write_task_jsonl(path: Path, rows_per_class: int = 30) -> Path:
    """A small two-task JSONL (a `task` column): topic (three classes, titled texts) and mood (two classes)."""
    import json
    import random

    rng = random.Random(0)
    words = {
        ("topic", "business"): "stocks shares market bank profit",
        ("topic", "sport"): "match team goal player season",
        ("topic", "tech"): "phone software computer internet chip",
        ("mood", "fresh"): "great superb moving delightful fine",
        ("mood", "rotten"): "dull awful boring tedious weak",
    }
    filler = ["the", "a", "of", "film", "and", "in", "was", "new", "year", "said"]
    with path.open("w") as fh:
        for (task, label), vocab in words.items():
            for _ in range(rows_per_class):
                body = " ".join(rng.choice(vocab.split() + filler) for _ in range(rng.randint(6, 20)))
                text = f"{' '.join(rng.choice(vocab.split()) for _ in range(3))}\n{body}" if task == "topic" else body
                fh.write(json.dumps({"text": text, "label": label, "task": task}) + "\n")
    return path


def tiny_multitask_recipe(source: Path, **training: object) -> object:
    from service.training.recipe import Recipe

    return Recipe.model_validate(
        {
            "name": "tiny-multitask",
            "data": {"source": str(source), "task_column": "task"},
            "model": {
                "vocab_size": 300,
                "max_length": 48,
                "d_model": 32,
                "n_layers": 2,
                "n_heads": 2,
                "d_ff": 64,
                "num_experts": 4,
                "top_k": 2,
                "dropout": 0.0,
            },
            "training": {
                "epochs": 3,
                "batch_size": 16,
                "lr": 0.003,
                "patience": 3,
                "ema_decay": None,
                "validate_headlines": True,
                "weights_dtype": "float16",  # the stored weights are the selected ones, rounded (checked per task)
                "task_weights": {"mood": 1.0, "topic": 2.0},
                **training,
            },
        }
    )


@pytest.fixture(scope="session")
def tiny_multitask_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny two-task model (topic, mood) trained from scratch by `moe-serve train` on a file with a task column."""
    from service.training.train import train

    work = tmp_path_factory.mktemp("multitask")
    recipe = tiny_multitask_recipe(write_task_jsonl(work / "tasks.jsonl"))
    out = work / "tiny-multitask"
    train(recipe, out, progress=False)  # type: ignore[arg-type]
    return out
