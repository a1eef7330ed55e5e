"""A tiny two-task model trained by `moe-serve train` (a file with a task column): folder, reports, evaluate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from service.modeling.artifacts import load_model
from service.modeling.classifier import pad_batch
from tests.conftest import ROOT


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_folder_holds_every_task_and_what_the_experts_do(tiny_multitask_dir: Path) -> None:
    raw = json.loads((tiny_multitask_dir / "config.json").read_text())
    assert list(raw["tasks"]) == ["mood", "topic"] and raw["architecture"]["tasks"] == {"mood": 2, "topic": 3}
    assert all(t["temperature"] > 0 for t in raw["tasks"].values())
    rounding = raw["training"]["storage"]["rounding_vs_unrounded"]  # fp16 storage: what it moved, per task
    assert set(rounding) == {"mood", "topic"} and all(r["argmax_agreement"] > 0.9 for r in rounding.values())
    log = json.loads((tiny_multitask_dir / "training_log.json").read_text())
    assert {"val_macro_f1_mood", "val_macro_f1_topic"} <= set(log[0])
    summary = json.loads((tiny_multitask_dir / "eval.json").read_text())
    assert set(summary["tasks"]) == {"mood", "topic"} and "headline" in summary["tasks"]["topic"]
    assert summary["tasks"]["topic"]["macro_f1"] > 0.6 and summary["tasks"]["mood"]["macro_f1"] > 0.6
    for layer in summary["expert_share_by_task"]:
        assert all(abs(sum(s) - 1) < 1e-3 for s in layer.values())
    assert all(0 <= s["mutual_information_bits"] <= 1 for s in summary["specialization"])
    for task in ("mood", "topic"):
        report = json.loads((tiny_multitask_dir / "eval" / task / "eval.json").read_text())
        assert report["task"] == task and report["macro_f1"] == summary["tasks"][task]["macro_f1"]
    assert (tiny_multitask_dir / "task_experts.png").stat().st_size > 0
    card = (tiny_multitask_dir / "README.md").read_text()  # the model card: every task's test figures
    for task in ("mood", "topic"):
        assert f"| {task} | " in card and f"{summary['tasks'][task]['macro_f1']:.4f}" in card
    assert "task–expert MI" in card and "eval/topic/" in card
    # Drift references: the model-wide profile over every task's tokens, and each task's own under "tasks".
    profile = json.loads((tiny_multitask_dir / "routing_profile.json").read_text())
    assert set(profile["tasks"]) == {"mood", "topic"}
    for p in [profile, *profile["tasks"].values()]:
        assert all(abs(sum(layer["share"]) - 1) < 1e-3 for layer in p["layers"])


def test_trained_model_answers_each_text_alone_in_a_mixed_batch(tiny_multitask_dir: Path) -> None:
    bundle = load_model(tiny_multitask_dir)
    texts = ["great superb film", "stocks fell at the bank\nmarket news", "dull and boring", "team goal"] * 3
    ids = [e.ids for e in bundle.tokenizer.encode_batch(texts, 48)]
    tasks = torch.tensor([0, 1, 0, 1, 1, 0] * 2)
    with torch.no_grad():
        together = bundle.model(*pad_batch(ids, bundle.tokenizer.pad_id), tasks).logits
        alone = torch.cat(
            [bundle.model(*pad_batch([s], bundle.tokenizer.pad_id), tasks[i : i + 1]).logits for i, s in enumerate(ids)]
        )
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_evaluate_cli_reports_every_task(tiny_multitask_dir: Path, tmp_path: Path) -> None:
    r = _cli("evaluate", "--model", str(tiny_multitask_dir), "--output-dir", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    stored = json.loads((tiny_multitask_dir / "eval.json").read_text())
    assert summary["tasks"] == stored["tasks"]  # the folder's own test split, found again from its record
    assert (tmp_path / "rep" / "mood" / "eval.json").is_file() and (tmp_path / "rep" / "task_experts.png").is_file()
    one = _cli("evaluate", "--model", str(tiny_multitask_dir), "--task", "mood", "--split", "validation")
    assert one.returncode == 0, one.stderr
    assert list(json.loads(one.stdout)["tasks"]) == ["mood"]
    bad = _cli("evaluate", "--model", str(tiny_multitask_dir), "--task", "spam")
    assert bad.returncode != 0 and "has no task 'spam' (tasks: mood, topic)" in bad.stderr


def test_export_cli_writes_a_multi_task_folders_graphs(tiny_multitask_dir: Path, tmp_path: Path) -> None:
    """The CLI exports a multi-task folder as any other (parity: tests/integration/test_onnx_multitask.py)."""
    import shutil

    folder = shutil.copytree(tiny_multitask_dir, tmp_path / "copy")
    r = _cli("export", "--model", str(folder))
    assert r.returncode == 0, r.stderr
    assert (folder / "model.onnx").stat().st_size > 0


def test_calibrate_cli_fits_a_temperature_per_task(tiny_multitask_dir: Path, tmp_path: Path) -> None:
    import shutil

    model = tmp_path / "m"
    shutil.copytree(tiny_multitask_dir, model)
    before = json.loads((model / "config.json").read_text())
    r = _cli("calibrate", "--model", str(model))
    assert r.returncode == 0, r.stderr
    fitted = json.loads(r.stdout)["tasks"]
    after = json.loads((model / "config.json").read_text())
    assert set(fitted) == {"mood", "topic"}
    for task in ("mood", "topic"):
        assert after["tasks"][task]["temperature"] == fitted[task]["temperature"]
        assert after["tasks"][task]["labels"] == before["tasks"][task]["labels"]
    assert {k: v for k, v in after.items() if k != "tasks"} == {k: v for k, v in before.items() if k != "tasks"}


def test_extract_keeps_one_task_and_the_experts_it_uses(tiny_multitask_dir: Path, tmp_path: Path) -> None:
    from service.modeling.task_view import task_view
    from service.training.extract import extract_task, kept_experts

    # Every expert kept: the extracted folder is the task itself, an ordinary single-task folder.
    whole = extract_task(tiny_multitask_dir, "topic", tmp_path / "all", min_share=0.0)
    assert whole["kept_experts"] == [[0, 1, 2, 3]] * 2
    small = load_model(tmp_path / "all")
    assert small.folder.tasks == () and small.folder.labels == ("business", "sport", "tech")
    full = task_view(load_model(tiny_multitask_dir), "topic")
    assert small.folder.temperature == full.folder.temperature
    ids = [e.ids for e in small.tokenizer.encode_batch(["stocks fell\nbank news", "team goal season"], 48)]
    with torch.no_grad():
        a = small.model(*pad_batch(ids, small.tokenizer.pad_id)).logits
        b = full.model(*pad_batch(ids, small.tokenizer.pad_id)).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert whole["extracted"]["macro_f1"] == whole["full"]["macro_f1"] and whole["size_ratio"] < 1  # one head less
    # A threshold above every share: top_k experts a layer, the most used; the folder still loads and answers.
    r = _cli(
        "extract",
        "--model",
        str(tiny_multitask_dir),
        "--task",
        "mood",
        "--output",
        str(tmp_path / "few"),
        "--min-share",
        "0.99",
    )
    assert r.returncode == 0, r.stderr
    few = json.loads(r.stdout)
    assert all(len(k) == 2 for k in few["kept_experts"]) and few["size_ratio"] < whole["size_ratio"]
    assert load_model(tmp_path / "few").model.config.num_experts == 2
    assert kept_experts([np.array([0.5, 0.3, 0.15, 0.05]), np.array([0.9, 0.04, 0.03, 0.03])], 0.1, 2) == [
        [0, 1, 2],
        [0, 1, 2],  # ties between equal shares: the lower id first
    ]
