"""`moe-serve extract --task T`: a single-task folder with only what task T of a multi-task folder uses: its head,
its router and, in every MoE layer, the experts it sends at least `min_share` of its tokens to (measured on the
task's validation split); the other experts are dropped. Written as an ordinary single-task folder, so everything
that serves or evaluates one takes it; reported with its accuracy and size against the full model's task.

A folder has one expert count for all its layers, so every layer keeps as many experts as the layer that needs the
most (at least top_k): the layer's most used ones. A token that the full model sent to a dropped expert is routed
among the kept ones instead (softmax and top-k over the kept experts' router rows).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.modeling.artifacts import LoadedModel, load_model, save_model
from service.modeling.classifier import MoEClassifier
from service.modeling.layout import CONFIG_FILE, WEIGHTS_FILE
from service.modeling.task_view import task_view
from service.training.evaluate import evaluate_examples, model_examples
from service.training.predict import predict_texts


def kept_experts(shares: list[np.ndarray], min_share: float, top_k: int) -> list[list[int]]:
    """Per layer, the expert ids kept (ascending): every layer keeps the same number, the most any layer has at or
    above `min_share`, at least top_k; each layer keeps its most used ones."""
    n = max(top_k, *(int((s >= min_share).sum()) for s in shares))
    return [sorted(np.argsort(-s, kind="stable")[:n].tolist()) for s in shares]


def task_shares(view: LoadedModel) -> list[np.ndarray]:
    """Per MoE layer, the share of the task's validation tokens' (token, slot) assignments each expert takes."""
    examples, _ = model_examples(view.folder, None, "validation")
    preds, _ = predict_texts(view, [e.text for e in examples])
    totals = [c.sum(0).astype(np.float64) for c in preds.expert_counts]
    return [t / max(t.sum(), 1.0) for t in totals]


def task_state(model: MoEClassifier, task_id: int, task: str, keep: list[list[int]]) -> dict[str, torch.Tensor]:
    """The multi-task state dict cut to one task: its head as `head`, its router rows and the kept experts."""
    state, out = model.state_dict(), {}
    layer_of = {id(layer): i for i, layer in enumerate(model.moe_layers)}
    prefixes = {f"blocks.{b}.ffn.": layer_of[id(block.ffn)] for b, block in enumerate(model.blocks) if block.is_moe}
    e = model.config.num_experts
    for name, value in state.items():
        if name.startswith("heads."):
            if name.startswith(f"heads.{task}."):
                out["head." + name.rsplit(".", 1)[1]] = value
            continue
        prefix = next((p for p in prefixes if name.startswith(p)), None)
        if prefix is None:
            out[name] = value
            continue
        idx = torch.tensor(keep[prefixes[prefix]])
        if name.endswith("router.weight"):
            own = task_id if value.shape[0] > e else 0  # a task-routed layer's rows t*E.., or the one shared router
            out[name] = value[own * e : (own + 1) * e].index_select(0, idx)
        else:
            out[name] = value.index_select(0, idx)
    return out


def extract_task(model_dir: str | Path, task: str, output: str | Path, min_share: float = 0.01) -> dict[str, Any]:
    """Write task `task` of the multi-task folder as its own folder; returns what was kept and how it compares."""
    loaded = load_model(model_dir)
    view = task_view(loaded, task)  # refuses a task the folder lacks, or a single-task folder
    full = loaded.model
    task_id = [t.name for t in loaded.folder.tasks].index(task)
    keep = kept_experts(task_shares(view), min_share, full.config.top_k)
    cfg = dataclasses.replace(
        full.config, tasks=None, task_routed_layers=None, num_labels=len(view.folder.labels), num_experts=len(keep[0])
    )
    small = MoEClassifier(cfg)
    small.load_state_dict(task_state(full, task_id, task, keep))
    raw = json.loads((loaded.folder.path / CONFIG_FILE).read_text())
    training = {**view.folder.training, "extracted_from": loaded.folder.name, "task": task, "kept_experts": keep}
    training.pop("tasks", None)
    save_model(
        output,
        small,
        loaded.tokenizer,
        list(view.folder.labels),
        training,
        view.folder.temperature,
        raw.get("weights_dtype", "float32"),
    )
    return {"task": task, "min_share": min_share, "kept_experts": keep, **compare(view, load_model(output))}


def compare(view: LoadedModel, extracted: LoadedModel) -> dict[str, Any]:
    """Test-split accuracy and macro-F1 of the full model's task and of the extracted folder, and their sizes."""
    examples, dataset = model_examples(view.folder, None, "test")
    rows = {}
    for name, model in (("full", view), ("extracted", extracted)):
        report, _, _ = evaluate_examples(model, examples, "test", dataset)
        size = (model.folder.path / WEIGHTS_FILE).stat().st_size
        rows[name] = {"accuracy": report["accuracy"], "macro_f1": report["macro_f1"], "weights_bytes": size}
        if "headline" in report:
            rows[name]["headline_macro_f1"] = report["headline"]["macro_f1"]
    rows["size_ratio"] = round(rows["extracted"]["weights_bytes"] / rows["full"]["weights_bytes"], 4)
    return rows
