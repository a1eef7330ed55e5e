"""`moe-serve train`: recipe -> tokenizer + MoE classifier -> model folder with eval report and routing profile."""

from __future__ import annotations

import copy
import dataclasses
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

from service.modeling.artifacts import STORAGE_DTYPES, LoadedModel, load_model, save_model
from service.modeling.classifier import ClassifierOutput, ModelConfig, MoEClassifier, pad_batch
from service.modeling.tokenizer import TextTokenizer
from service.modeling.windows import encode_windows
from service.training.calibration import fit_temperature
from service.training.data import Dataset, Example, cap_examples, load_dataset
from service.training.evaluate import evaluate_examples, headline, write_report, write_routing_profile
from service.training.metrics import expert_stats, routing_profile
from service.training.predict import encode_texts, model_forward, pool_predictions, predict
from service.training.recipe import DataRecipe, Recipe, TrainingRecipe

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffle, then sort by length inside windows of 50 batches: little padding, still random batches."""
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    window = batch_size * 50
    batches = []
    for w in range(0, len(idx), window):
        chunk = sorted(idx[w : w + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


@dataclasses.dataclass
class TrainText:
    """One training text as the augmenter sees it: its own token ids (no special tokens) and its first line's."""

    inner: list[int]
    title: list[int] | None  # None when the text has a single line
    label: int


def _augment(text: TrainText, room: int, tr: TrainingRecipe, rng: random.Random) -> list[int]:
    """A training view of a text's own ids, at most `room` long (special tokens are added after)."""
    seq = text.inner
    if tr.short_text_prob and rng.random() < tr.short_text_prob:
        if text.title and rng.random() < 0.5:
            return text.title[:room]
        n = min(rng.randint(4, 24), room)
        start = rng.randrange(max(len(seq) - n, 0) + 1)
        return seq[start : start + n]
    if tr.random_window and len(seq) > room and rng.random() < 0.5:
        start = rng.randrange(len(seq) - room + 1)
        seq = seq[start : start + room]
    else:
        seq = seq[:room]
    if tr.token_dropout > 0:
        kept = [t for t in seq if rng.random() >= tr.token_dropout]
        seq = kept or seq[:1]
    return seq


def _lr_lambda(total: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))  # linear decay to 0

    return f


def _macro_f1(y: np.ndarray, pred: np.ndarray, n: int) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(y, pred, labels=list(range(n)), average="macro", zero_division=0))


def build_model(
    recipe: Recipe, train_texts: list[str], labels: list[str]
) -> tuple[MoEClassifier, TextTokenizer, set[str], dict[str, Any]]:
    """The model to train, its tokenizer, the names of parameters that start untrained, and what to record about
    its origin: a converted pretrained encoder (recipe.base) or a fresh one with a tokenizer trained on the data."""
    if recipe.base is not None:
        from service.modeling.bert import base_license, load_dense
        from service.modeling.convert import convert_to_moe

        b = recipe.base
        dense, tokenizer, folder = load_dense(b.model, len(labels), b.max_length, b.dropout, recipe.training.seed)
        model = convert_to_moe(dense, b.method, b.num_experts, b.top_k, b.moe_every, recipe.training.seed)
        new = {n for n, _ in model.named_parameters() if n.startswith("head.") or ".router." in n}
        origin = {"base": b.model, "base_license": base_license(folder), "conversion": b.method}
        return model, tokenizer, new, origin
    mr = recipe.model
    tokenizer = TextTokenizer.train(train_texts, mr.vocab_size)
    cfg = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        num_labels=len(labels),
        pad_token_id=tokenizer.pad_id,
        **mr.model_dump(exclude={"vocab_size"}),
    )
    model = MoEClassifier(cfg)
    return model, tokenizer, {n for n, _ in model.named_parameters()}, {}


def _optimizer(model: MoEClassifier, tr: TrainingRecipe, new: set[str]) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norms and embeddings (standard for transformers); parameters that start
    untrained may take a larger learning rate than a pretrained body."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        decays = param.ndim >= 2 and "emb" not in name
        groups.setdefault((decays, name in new), []).append(param)
    head_lr = tr.head_lr or tr.lr
    return torch.optim.AdamW(
        [
            {"params": ps, "weight_decay": tr.weight_decay if decays else 0.0, "lr": head_lr if is_new else tr.lr}
            for (decays, is_new), ps in groups.items()
        ]
    )


def _train_texts(tokenizer: TextTokenizer, examples: list[Example], label2id: dict[str, int], keep: int) -> list:
    inner = tokenizer.encode_inner([e.text for e in examples])
    titled = [i for i, e in enumerate(examples) if "\n" in e.text.strip()]  # a first line with more below
    titles = dict(zip(titled, tokenizer.encode_inner([headline(examples[i].text) for i in titled]), strict=True))
    return [
        TrainText(ids[:keep], titles.get(i), label2id[e.label])
        for i, (ids, e) in enumerate(zip(inner, examples, strict=True))
    ]


class _EpochStats:
    def __init__(self, n_layers: int, num_experts: int) -> None:
        self.sums = {"loss": 0.0, "ce": 0.0, "aux": 0.0, "z": 0.0}
        self.correct = self.seen = 0
        self.load = np.zeros((n_layers, num_experts))

    def add(self, out: ClassifierOutput, y: torch.Tensor, loss: torch.Tensor, ce: torch.Tensor) -> None:
        n = len(y)
        for key, v in (("loss", loss), ("ce", ce), ("aux", out.aux_loss), ("z", out.z_loss)):
            self.sums[key] += v.item() * n
        self.correct += int((out.logits.argmax(1) == y).sum())
        self.seen += n
        for li, r in enumerate(out.routing):
            self.load[li] += torch.bincount(r.expert_ids.reshape(-1), minlength=self.load.shape[1]).numpy()

    def row(self) -> dict[str, Any]:
        return {
            **{f"train_{k}": round(v / self.seen, 4) for k, v in self.sums.items()},
            "train_accuracy": round(self.correct / self.seen, 4),
            "expert_imbalance": [expert_stats(lay / lay.sum())["imbalance_max_over_mean"] for lay in self.load],
            "expert_cv": [expert_stats(lay / lay.sum())["cv"] for lay in self.load],
        }


def load_splits(dr: DataRecipe) -> tuple[Dataset, dict[str, list[Example]]]:
    """The dataset and its three splits, each capped as the recipe says; an empty split is an error."""
    ds = load_dataset(dr.source, dr.text_column, dr.label_column, dr.split_seed, dr.split_fractions)
    splits = {s: cap_examples(ds[s], dr.max_examples_per_split, dr.split_seed) for s in ("train", "validation", "test")}
    for s, part in splits.items():
        if not part:
            raise ValueError(f"split {s!r} of {dr.source} is empty")
    return ds, splits


def rounded(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating tensors rounded to `dtype` and back: the values a file of that dtype holds."""
    return {k: v.to(dtype).to(v.dtype) if v.is_floating_point() else v for k, v in state.items()}


class Selected:
    """The weights that are validated and kept: an exponential moving average of the trained ones (or those
    themselves), rounded to the storage dtype in a copy, so that training goes on from the unrounded values."""

    def __init__(self, model: MoEClassifier, tr: TrainingRecipe) -> None:
        self.ema: torch.optim.swa_utils.AveragedModel | None = None
        if tr.ema_decay is not None:
            avg = torch.optim.swa_utils.get_ema_multi_avg_fn(tr.ema_decay)
            self.ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=avg)
        self.source: MoEClassifier = self.ema.module if self.ema is not None else model  # type: ignore[assignment]
        self.dtype = STORAGE_DTYPES[tr.weights_dtype]
        self.net = self.source if tr.weights_dtype == "float32" else copy.deepcopy(self.source)

    def update(self, model: MoEClassifier) -> None:
        if self.ema is not None:
            self.ema.update_parameters(model)

    def as_stored(self) -> MoEClassifier:
        """The selected weights as a file of the storage dtype holds them."""
        if self.net is not self.source:
            self.net.load_state_dict(rounded(self.source.state_dict(), self.dtype))
        return self.net

    def snapshot(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """Copies of the weights as stored and, where rounding changed them, as trained."""
        unrounded = copy.deepcopy(self.source.state_dict()) if self.net is not self.source else None
        return copy.deepcopy(self.net.state_dict()), unrounded


@dataclasses.dataclass
class EarlyStopping:
    """The best epoch by validation macro-F1 and its weights; stops after `patience` epochs without a gain."""

    patience: int
    f1: float = -1.0
    epoch: int = 0
    stale: int = 0
    state: dict[str, torch.Tensor] | None = None
    unrounded: dict[str, torch.Tensor] | None = None

    def keep_going(self, epoch: int, f1: float, selected: Selected) -> bool:
        if f1 > self.f1:
            self.f1, self.epoch, self.stale = f1, epoch, 0
            self.state, self.unrounded = selected.snapshot()
            return True
        self.stale += 1
        if self.stale >= self.patience:
            log.info("early stopping: no validation macro-F1 gain for %d epochs", self.patience)
            return False
        return True


class Trainer:
    """One training run: the model being trained, its tokenizer and inputs, the optimiser, the selected weights."""

    def __init__(self, recipe: Recipe, splits: dict[str, list[Example]], labels: list[str]) -> None:
        tr = self.tr = recipe.training
        label2id = {lab: i for i, lab in enumerate(labels)}
        self.num_labels = len(labels)
        self.model, self.tokenizer, new_params, self.origin = build_model(
            recipe, [e.text for e in splits["train"]], labels
        )
        cfg = self.model.config
        self.train_length = min(tr.train_max_length or cfg.max_length, cfg.max_length)
        self.room = max(self.train_length - len(self.tokenizer.prefix) - len(self.tokenizer.suffix), 1)
        # Up to 4x the window is kept so random windows can read past the start of long texts.
        self.texts = _train_texts(self.tokenizer, splits["train"], label2id, 4 * self.room)
        val_examples = _validation_examples(splits["validation"], tr.validate_headlines)
        self.val_ids = encode_texts(self.tokenizer, [e.text for e in val_examples], cfg.max_length)
        self.y_val = np.array([label2id[e.label] for e in val_examples])
        self.opt = _optimizer(self.model, tr, new_params)
        total = math.ceil(len(self.texts) / tr.batch_size) * tr.epochs
        warmup = max(1, int(tr.warmup_ratio * total))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _lr_lambda(total, warmup))
        self.rng = random.Random(tr.seed)
        self.selected = Selected(self.model, tr)

    def train_epoch(self, epoch: int, progress: bool) -> dict[str, Any]:
        """One pass over the shuffled training texts; the epoch's training figures."""
        from tqdm.auto import tqdm

        self.model.train()
        stats = _EpochStats(len(self.model.moe_layers), self.model.config.num_experts)
        rows = self.epoch_rows()
        batches = _batches([min(len(self.texts[i].inner), self.room) for i in rows], self.tr.batch_size, self.rng)
        bar = tqdm(batches, desc=f"epoch {epoch}/{self.tr.epochs}", disable=not progress, leave=False)
        for batch in bar:
            out, y, loss, ce = self._step([rows[i] for i in batch])
            stats.add(out, y, loss, ce)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        return stats.row()

    def epoch_rows(self) -> list[int]:
        """The training texts an epoch reads (here every one; a multi-task trainer draws them per task)."""
        return list(range(len(self.texts)))

    def _step(self, batch: list[int]) -> tuple[ClassifierOutput, torch.Tensor, torch.Tensor, torch.Tensor]:
        tr, tok = self.tr, self.tokenizer
        seqs = [tok.frame(_augment(self.texts[i], self.room, tr, self.rng), self.train_length) for i in batch]
        ids, mask = pad_batch(seqs, tok.pad_id)
        y = torch.tensor([self.texts[i].label for i in batch])
        out, ce = self._forward(ids, mask, y, batch)
        loss = ce + tr.aux_loss_coef * out.aux_loss + tr.z_loss_coef * out.z_loss
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), tr.grad_clip)
        self.opt.step()
        self.sched.step()
        self.selected.update(self.model)
        return out, y, loss, ce

    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor, y: torch.Tensor, batch: list[int]
    ) -> tuple[ClassifierOutput, torch.Tensor]:
        """The model on a batch and its task loss (cross-entropy)."""
        out = self.model(ids, mask)
        return out, F.cross_entropy(out.logits, y, label_smoothing=self.tr.label_smoothing)

    def validate(self) -> tuple[float, float]:
        """Accuracy and macro-F1 of the selected weights, as stored, on the validation texts."""
        net = self.selected.as_stored()
        pred = predict(model_forward(net, self.tokenizer.pad_id), self.val_ids).probs.argmax(1)
        return float(np.mean(pred == self.y_val)), _macro_f1(self.y_val, pred, self.num_labels)

    def validation_detail(self) -> dict[str, Any]:
        """Validation figures beside the one early stopping uses (multi-task: each task's macro-F1)."""
        return {}

    def keep_best(self, best: EarlyStopping, texts: list[str]) -> dict[str, Any]:
        """The model set to the best epoch's weights as stored; returns the storage record (what rounding to the
        storage dtype moved on `texts`, against the unrounded weights)."""
        assert best.state is not None
        storage: dict[str, Any] = {"weights_dtype": self.tr.weights_dtype}
        if best.unrounded is not None:
            self.model.load_state_dict(best.unrounded)
            storage["rounding_vs_unrounded"] = compare_weights(self.model, best.state, self.tokenizer, texts)
        self.model.load_state_dict(best.state)
        self.model.eval()
        return storage


def fit(run: Trainer, progress: bool, t0: float) -> tuple[list[dict[str, Any]], EarlyStopping]:
    """Epochs of training and validation until the last or early stopping; the history and the best epoch."""
    history: list[dict[str, Any]] = []
    best = EarlyStopping(run.tr.patience)
    for epoch in range(1, run.tr.epochs + 1):
        stats = run.train_epoch(epoch, progress)
        accuracy, f1 = run.validate()
        row = {
            "epoch": epoch,
            **stats,
            "val_accuracy": round(accuracy, 4),
            "val_macro_f1": round(f1, 4),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        row.update(run.validation_detail())
        history.append(row)
        _log_epoch(row)
        if not best.keep_going(epoch, f1, run.selected):
            break
    return history, best


def train(recipe: Recipe, output_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Train per `recipe`, write the model folder, return a summary (best epoch, validation and test metrics)."""
    if recipe.data.multi_task:
        from service.training.multitask import train_multitask

        return train_multitask(recipe, output_dir, progress)
    t0 = time.perf_counter()
    tr = recipe.training
    if tr.threads:
        torch.set_num_threads(tr.threads)
    seed_everything(tr.seed)
    ds, splits = load_splits(recipe.data)
    run = Trainer(recipe, splits, ds.labels)
    history, best = fit(run, progress, t0)
    storage = run.keep_best(best, [e.text for e in splits["validation"] + splits["test"]])
    meta = training_meta(recipe, run.origin, storage, best.epoch, history, splits, t0)
    report = write_folder(Path(output_dir), recipe, run.model, run.tokenizer, ds.labels, meta, history, splits, ds.name)
    return {
        "output": str(output_dir),
        "best_epoch": best.epoch,
        "val_macro_f1": round(best.f1, 4),
        "test_macro_f1": report["macro_f1"],
        "test_accuracy": report["accuracy"],
        "train_seconds": meta["train_seconds"],
    }


def training_meta(
    recipe: Recipe,
    origin: dict[str, Any],
    storage: dict[str, Any],
    best_epoch: int,
    history: list[dict[str, Any]],
    splits: dict[str, list[Example]],
    t0: float,
) -> dict[str, Any]:
    """config.json "training": where the data came from (so evaluate finds it again) and how the run went."""
    dr = recipe.data
    return {
        "dataset": dr.source,
        "text_column": dr.text_column,
        "label_column": dr.label_column,
        "split_seed": dr.split_seed,
        "split_fractions": list(dr.split_fractions),
        "max_examples_per_split": dr.max_examples_per_split,
        "recipe": recipe.name,
        **origin,
        "storage": storage,
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "train_seconds": round(time.perf_counter() - t0, 1),
        "split_sizes": {s: len(p) for s, p in splits.items()},
    }


def compare_weights(
    model: MoEClassifier, other: dict[str, torch.Tensor], tokenizer: TextTokenizer, texts: list[str]
) -> dict[str, Any]:
    """How far `model` and the same architecture with weights `other` answer apart on `texts` (probabilities)."""
    twin = copy.deepcopy(model)
    twin.load_state_dict(other)
    return compare_models(model, twin, tokenizer, texts)


def compare_models(a_model: Any, b_model: Any, tokenizer: TextTokenizer, texts: list[str]) -> dict[str, Any]:
    """How far two models (or one task of two multi-task models) answer apart on `texts` (probabilities)."""
    ids = encode_texts(tokenizer, texts, a_model.config.max_length)
    a = predict(model_forward(a_model, tokenizer.pad_id), ids).probs
    b = predict(model_forward(b_model, tokenizer.pad_id), ids).probs
    return {
        "texts": len(texts),
        "max_abs_prob_diff": round(float(np.abs(a - b).max()), 6),
        "argmax_agreement": round(float(np.mean(a.argmax(1) == b.argmax(1))), 6),
    }


def _validation_examples(examples: list[Example], with_headlines: bool) -> list[Example]:
    if not with_headlines:
        return examples
    titled = [e for e in examples if "\n" in e.text.strip()]
    return examples + [Example(headline(e.text), e.label, e.uid + "#headline") for e in titled]


def _log_epoch(row: dict[str, Any]) -> None:
    log.info(
        "epoch %d: loss %.4f (ce %.4f aux %.3f z %.3f) train acc %.4f | val acc %.4f macro-F1 %.4f | "
        "expert imbalance max/mean %s",
        row["epoch"],
        row["train_loss"],
        row["train_ce"],
        row["train_aux"],
        row["train_z"],
        row["train_accuracy"],
        row["val_accuracy"],
        row["val_macro_f1"],
        row["expert_imbalance"],
    )


def write_folder(
    out: Path,
    recipe: Recipe,
    model: MoEClassifier,
    tokenizer: TextTokenizer,
    labels: list[str],
    meta: dict[str, Any],
    history: list[dict[str, Any]],
    splits: dict[str, list[Example]],
    dataset: str,
) -> dict[str, Any]:
    """Model folder: weights, config (with the temperature fitted on validation), recipe, training log, routing
    profile, test report with plots, model card. Returns the test report."""
    # Once, for the temperature and the profile; long articles read as served by default (windows), so the
    # temperature is fitted on the logits the server scales.
    val_windows = encode_windows(tokenizer, [e.text for e in splits["validation"]], model.config.max_length)
    windows = [w for enc in val_windows for w in enc.windows]
    val_preds = pool_predictions(predict(model_forward(model, tokenizer.pad_id), windows), val_windows, 1.0)
    label2id = {lab: i for i, lab in enumerate(labels)}
    temperature = fit_temperature(val_preds.logits, np.array([label2id[e.label] for e in splits["validation"]]))
    loaded = save_checked(out, model, tokenizer, labels, meta, temperature, recipe.training.weights_dtype)
    # A base recipe has no model section (the base decides the architecture); recipe.json must load back as a recipe.
    dumped = recipe.model_dump(mode="json", exclude={"model"} if recipe.base else None)
    (out / "recipe.json").write_text(json.dumps(dumped, indent=2) + "\n")
    (out / "training_log.json").write_text(json.dumps(history, indent=2) + "\n")
    write_routing_profile(routing_profile(val_preds, "validation", dataset), out)
    report, test_preds, y_test = evaluate_examples(loaded, splits["test"], "test", dataset)
    write_report(report, test_preds, y_test, labels, out)
    from service.training.model_card import write_model_card

    write_model_card(out, recipe, model.config, report, meta, history)
    return report


def save_checked(
    out: Path,
    model: MoEClassifier,
    tokenizer: TextTokenizer,
    labels: list[str] | dict[str, list[str]],
    meta: dict[str, Any],
    temperature: float | dict[str, float],
    weights_dtype: str,
) -> LoadedModel:
    """Save the folder and load it back: the report is then of the folder as written."""
    save_model(out, model, tokenizer, labels, meta, temperature, weights_dtype)
    stored = load_model(out)
    # The weights were rounded to the storage grid before selection, so the file must reproduce them exactly.
    for (name, a), b in zip(model.state_dict().items(), stored.model.state_dict().values(), strict=True):
        if not torch.equal(a, b):
            raise RuntimeError(f"stored weights differ from the trained ones at {name}")
    return stored
