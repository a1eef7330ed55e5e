"""Multi-task training: one MoE encoder, a head and (in the task-routed layers) a router per task, trained on
mixed-task batches. What differs from single-task training (train.py) lives here: the data of several tasks, the
epoch's task mix, the per-task weighted loss, validation per task (early stopping on the mean of the tasks'
macro-F1) and a temperature per task. The rest (augmentation, optimiser, selected weights, storage) is train.py's.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from service.modeling.classifier import ClassifierOutput, MoEClassifier
from service.modeling.task_view import TaskModel, task_view
from service.training.calibration import fit_temperature
from service.training.data import Example, cap_examples
from service.training.evaluate import evaluate_examples, write_report, write_routing_profile
from service.training.metrics import routing_profile
from service.training.model_card import write_task_model_card
from service.training.predict import Predictions, encode_texts, model_forward, predict
from service.training.recipe import DataRecipe, Recipe
from service.training.task_data import TaskDatasets, TaskSource, load_task_file, load_tasks
from service.training.task_eval import task_summary, write_summary
from service.training.train import (
    EarlyStopping,
    Selected,
    Trainer,
    _lr_lambda,
    _macro_f1,
    _optimizer,
    _train_texts,
    _validation_examples,
    compare_models,
    fit,
    save_checked,
    seed_everything,
)

log = logging.getLogger(__name__)
Splits = dict[str, dict[str, list[Example]]]  # task -> split -> examples


def load_task_splits(dr: DataRecipe) -> tuple[TaskDatasets, Splits]:
    """Every task's dataset and its three splits, each capped as the recipe says; an empty split is an error."""
    if dr.tasks is not None:
        sources = {t: TaskSource(s.source, s.text_column, s.label_column) for t, s in dr.tasks.items()}
        data = load_tasks(sources, dr.split_seed, dr.split_fractions)
    else:
        assert dr.task_column is not None
        data = load_task_file(
            dr.source, dr.text_column, dr.label_column, dr.task_column, dr.split_seed, dr.split_fractions
        )
    splits: Splits = {}
    for task, ds in data.tasks.items():
        splits[task] = {s: cap_examples(ds[s], dr.max_examples_per_split, dr.split_seed) for s in ds.splits}
        for s, part in splits[task].items():
            if not part:
                raise ValueError(f"split {s!r} of task {task!r} is empty")
    return data, splits


def task_quotas(sizes: list[int], temperature: float) -> list[int]:
    """Texts of each task in one epoch (as many as all tasks hold): in proportion to size ** (1 / temperature)."""
    weights = [n ** (1.0 / temperature) for n in sizes]
    total = sum(sizes)
    return [round(total * w / sum(weights)) for w in weights]


def epoch_rows(task_rows: list[list[int]], quotas: list[int], rng: random.Random) -> list[int]:
    """Each task's quota of its rows: its rows shuffled, repeated (reshuffled) while the quota needs more."""
    out: list[int] = []
    for rows, quota in zip(task_rows, quotas, strict=True):
        pool: list[int] = []
        while len(pool) < quota:
            chunk = list(rows)
            rng.shuffle(chunk)
            pool += chunk
        out += pool[:quota]
    return out


class MultiTaskTrainer(Trainer):
    """Trainer for several tasks: texts carry a task id; validation and selection by the mean of the tasks'
    macro-F1."""

    def __init__(self, recipe: Recipe, splits: Splits, labels: dict[str, list[str]]) -> None:
        tr = self.tr = recipe.training
        self.tasks = list(labels)
        unknown = sorted(set(tr.task_weights) - set(self.tasks))
        if unknown:
            raise ValueError(f"task_weights names unknown task(s) {unknown} (tasks: {', '.join(self.tasks)})")
        self.labels = labels
        self.weights = torch.tensor([tr.task_weights.get(t, 1.0) for t in self.tasks])
        train_texts = [e.text for t in self.tasks for e in splits[t]["train"]]
        self.model, self.tokenizer, new_params, self.origin = build_multitask_model(recipe, train_texts, labels)
        cfg = self.model.config
        self.train_length = min(tr.train_max_length or cfg.max_length, cfg.max_length)
        self.room = max(self.train_length - len(self.tokenizer.prefix) - len(self.tokenizer.suffix), 1)
        self.texts, self.task_of, task_rows = [], [], []
        for t, task in enumerate(self.tasks):
            label2id = {lab: i for i, lab in enumerate(labels[task])}
            texts = _train_texts(self.tokenizer, splits[task]["train"], label2id, 4 * self.room)
            task_rows.append(list(range(len(self.texts), len(self.texts) + len(texts))))
            self.texts += texts
            self.task_of += [t] * len(texts)
        self.task_rows = task_rows
        self.quotas = task_quotas([len(r) for r in task_rows], tr.task_sampling_temperature)
        self.val: list[tuple[list[list[int]], np.ndarray]] = []
        for task in self.tasks:
            label2id = {lab: i for i, lab in enumerate(labels[task])}
            examples = _validation_examples(splits[task]["validation"], tr.validate_headlines)
            ids = encode_texts(self.tokenizer, [e.text for e in examples], cfg.max_length)
            self.val.append((ids, np.array([label2id[e.label] for e in examples])))
        self.opt = _optimizer(self.model, tr, new_params)
        total = math.ceil(sum(self.quotas) / tr.batch_size) * tr.epochs
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, _lr_lambda(total, max(1, int(tr.warmup_ratio * total)))
        )
        self.rng = random.Random(tr.seed)
        self.selected = Selected(self.model, tr)
        self.by_task: dict[str, Any] = {}

    def epoch_rows(self) -> list[int]:
        """Each task's quota of its texts, drawn afresh every epoch (tasks sampled by size ** 1/T)."""
        return epoch_rows(self.task_rows, self.quotas, self.rng)

    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor, y: torch.Tensor, batch: list[int]
    ) -> tuple[ClassifierOutput, torch.Tensor]:
        """Each text routed and classified by its own task; cross-entropy over its task's labels."""
        tasks = torch.tensor([self.task_of[i] for i in batch])
        out = self.model(ids, mask, tasks)
        return out, self.task_loss(out.logits, y, tasks)

    def task_loss(self, logits: torch.Tensor, y: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of each text over its own task's labels, weighted by its task's weight, mean over the batch.
        (The -inf padding of a narrower task's logits takes no probability and no gradient.)"""
        per_text = logits.new_zeros(len(y))
        for t, width in enumerate((self.model.config.tasks or {}).values()):
            rows = (tasks == t).nonzero().squeeze(1)
            if rows.numel():
                ce = F.cross_entropy(
                    logits[rows, :width], y[rows], label_smoothing=self.tr.label_smoothing, reduction="none"
                )
                per_text = per_text.index_copy(0, rows, ce)
        w = self.weights[tasks]
        return (w * per_text).sum() / w.sum()

    def validate(self) -> tuple[float, float]:
        """Mean over the tasks of validation accuracy and macro-F1 (the selected weights, as stored)."""
        net = self.selected.as_stored()
        accs, f1s = [], []
        for t, (task, (ids, y)) in enumerate(zip(self.tasks, self.val, strict=True)):
            pred = predict(model_forward(TaskModel(net, t), self.tokenizer.pad_id), ids).probs.argmax(1)
            accs.append(float(np.mean(pred == y)))
            f1s.append(_macro_f1(y, pred, len(self.labels[task])))
        self.by_task = {f"val_macro_f1_{task}": round(f, 4) for task, f in zip(self.tasks, f1s, strict=True)}
        return float(np.mean(accs)), float(np.mean(f1s))

    def validation_detail(self) -> dict[str, Any]:
        return self.by_task

    def keep_best(self, best: EarlyStopping, texts: dict[str, list[str]]) -> dict[str, Any]:  # type: ignore[override]
        """As Trainer.keep_best; what rounding to the storage dtype moved is measured per task on its `texts`."""
        assert best.state is not None
        storage: dict[str, Any] = {"weights_dtype": self.tr.weights_dtype}
        if best.unrounded is not None:
            self.model.load_state_dict(best.unrounded)
            twin = copy.deepcopy(self.model)
            twin.load_state_dict(best.state)
            storage["rounding_vs_unrounded"] = {
                task: compare_models(TaskModel(self.model, t), TaskModel(twin, t), self.tokenizer, texts[task])
                for t, task in enumerate(self.tasks)
            }
        self.model.load_state_dict(best.state)
        self.model.eval()
        return storage


def build_multitask_model(recipe: Recipe, train_texts: list[str], labels: dict[str, list[str]]):
    """As train.build_model, with a head per task and a router per task in the task-routed layers."""
    import dataclasses

    from service.modeling.classifier import ModelConfig
    from service.modeling.tokenizer import TextTokenizer

    tasks = {t: len(labs) for t, labs in labels.items()}
    widest = max(tasks.values())
    if recipe.base is not None:
        from service.modeling.bert import base_license, load_dense
        from service.modeling.convert import convert_to_moe

        b, seed = recipe.base, recipe.training.seed
        dense, tokenizer, folder = load_dense(b.model, widest, b.max_length, b.dropout, seed, tasks)
        dense.config = dataclasses.replace(dense.config, task_routed_layers=b.task_routed_layers)
        model = convert_to_moe(dense, b.method, b.num_experts, b.top_k, b.moe_every, seed)
        new = {n for n, _ in model.named_parameters() if n.startswith("heads.") or ".router." in n}
        return model, tokenizer, new, {"base": b.model, "base_license": base_license(folder), "conversion": b.method}
    mr = recipe.model
    tokenizer = TextTokenizer.train(train_texts, mr.vocab_size)
    cfg = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        num_labels=widest,
        pad_token_id=tokenizer.pad_id,
        tasks=tasks,
        **mr.model_dump(exclude={"vocab_size"}),
    )
    model = MoEClassifier(cfg)
    return model, tokenizer, {n for n, _ in model.named_parameters()}, {}


def train_multitask(recipe: Recipe, output_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Train a multi-task recipe, write the folder, return a summary (best epoch, per-task test figures)."""
    t0 = time.perf_counter()
    tr = recipe.training
    if tr.threads:
        torch.set_num_threads(tr.threads)
    seed_everything(tr.seed)
    data, splits = load_task_splits(recipe.data)
    run = MultiTaskTrainer(recipe, splits, data.labels())
    history, best = fit(run, progress, t0)
    storage = run.keep_best(best, {t: [e.text for e in splits[t]["validation"] + splits[t]["test"]] for t in run.tasks})
    run_meta = {**run.origin, "storage": storage, "best_epoch": best.epoch, "epochs_run": len(history)}
    meta = task_meta(recipe, data, splits, run_meta)
    meta["train_seconds"] = round(time.perf_counter() - t0, 1)
    report = write_task_folder(Path(output_dir), recipe, run, data.labels(), meta, history, splits)
    return {
        "output": str(output_dir),
        "best_epoch": best.epoch,
        "val_mean_macro_f1": round(best.f1, 4),
        "test_macro_f1": {t: r["macro_f1"] for t, r in report["tasks"].items()},
        "train_seconds": meta["train_seconds"],
    }


def task_meta(recipe: Recipe, data: TaskDatasets, splits: Splits, run: dict[str, Any]) -> dict[str, Any]:
    """config.json "training": the shared split settings and, per task, where its data is (so evaluate finds it)."""
    dr = recipe.data
    per_task = {}
    for task in data.names:
        if dr.tasks is not None:
            src = dr.tasks[task]
            record = {"dataset": src.source, "text_column": src.text_column, "label_column": src.label_column}
        else:
            record = {"dataset": dr.source, "text_column": dr.text_column, "label_column": dr.label_column}
            record |= {"task_column": dr.task_column, "task": task}
        per_task[task] = record | {"split_sizes": {s: len(p) for s, p in splits[task].items()}}
    return {
        "split_seed": dr.split_seed,
        "split_fractions": list(dr.split_fractions),
        "max_examples_per_split": dr.max_examples_per_split,
        "recipe": recipe.name,
        "tasks": per_task,
        **run,
    }


def task_routing_profile(preds: dict[str, Predictions], split: str, datasets: dict[str, str]) -> dict[str, Any]:
    """A multi-task folder's routing_profile.json: the single-task format over every task's tokens (the model-wide
    drift reference), and under "tasks" each task's own profile, the reference its live routing is compared with."""
    merged = Predictions(
        logits=np.concatenate([p.logits[:, :1] for p in preds.values()]),
        probs=np.concatenate([p.probs[:, :1] for p in preds.values()]),
        expert_counts=[np.concatenate(layer) for layer in zip(*(p.expert_counts for p in preds.values()), strict=True)],
        num_tokens=np.concatenate([p.num_tokens for p in preds.values()]),
        experts=[],
    )
    profile = routing_profile(merged, split, ", ".join(dict.fromkeys(datasets.values())))
    profile["tasks"] = {t: routing_profile(p, split, datasets[t]) for t, p in preds.items()}
    return profile


def write_task_folder(
    out: Path,
    recipe: Recipe,
    run: MultiTaskTrainer,
    labels: dict[str, list[str]],
    meta: dict[str, Any],
    history: list[dict[str, Any]],
    splits: Splits,
) -> dict[str, Any]:
    """The folder (weights, config with a temperature per task fitted on its validation split, recipe, training
    log), each task's test report and plots under eval/<task>/, and eval.json: every task's headline figures, the
    share of each task's tokens each expert takes per layer, and how much the experts specialise by task."""
    model, tok = run.model, run.tokenizer
    temperatures, validation = {}, {}
    for t, task in enumerate(run.tasks):
        examples = splits[task]["validation"]
        ids = encode_texts(tok, [e.text for e in examples], model.config.max_length)
        validation[task] = predict(model_forward(TaskModel(model, t), tok.pad_id), ids)
        label2id = {lab: i for i, lab in enumerate(labels[task])}
        temperatures[task] = fit_temperature(validation[task].logits, np.array([label2id[e.label] for e in examples]))
    loaded = save_checked(out, model, tok, labels, meta, temperatures, recipe.training.weights_dtype)
    datasets = {task: meta["tasks"][task]["dataset"] for task in run.tasks}
    write_routing_profile(task_routing_profile(validation, "validation", datasets), out)
    dumped = recipe.model_dump(mode="json", exclude={"model"} if recipe.base else None)
    (out / "recipe.json").write_text(json.dumps(dumped, indent=2) + "\n")
    (out / "training_log.json").write_text(json.dumps(history, indent=2) + "\n")
    reports, counts = {}, {}
    for task in run.tasks:
        view = task_view(loaded, task)
        report, preds, y = evaluate_examples(view, splits[task]["test"], "test", meta["tasks"][task]["dataset"])
        report["task"] = task
        write_report(report, preds, y, labels[task], out / "eval" / task)
        reports[task] = report
        counts[task] = preds.expert_counts
    summary = task_summary(reports, counts)
    write_summary(summary, out)
    write_task_model_card(out, model.config, meta, history)
    return summary
