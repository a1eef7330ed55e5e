"""`moe-serve train`: recipe -> tokenizer + MoE classifier -> model folder with eval report and routing profile."""

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
from pydantic import BaseModel, ConfigDict, Field

from service.modeling.artifacts import ModelBundle, save_model
from service.modeling.classifier import ModelConfig, MoEClassifier, pad_batch
from service.modeling.tokenizer import TextTokenizer
from service.training.data import DEFAULT_SEED, Dataset, cap_examples, load_dataset
from service.training.evaluate import (
    encode_examples,
    evaluate_examples,
    expert_stats,
    predict_ids,
    routing_profile,
    write_report,
    write_routing_profile,
)

log = logging.getLogger(__name__)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in a recipe is an error, not a silently ignored key


class DataRecipe(_Strict):
    source: str = "bbc-news"  # built-in name or path to .csv/.jsonl (relative to the recipe file)
    text_column: str = "text"
    label_column: str = "label"
    split_seed: int = DEFAULT_SEED
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
    max_examples_per_split: int | None = None  # deterministic stratified cap, for quick runs


class ModelRecipe(_Strict):
    vocab_size: int = 8000
    max_length: int = 256
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 256
    num_experts: int = 8
    top_k: int = 2
    moe_every: int = 1
    attention: bool | list[bool] = True
    activation: str = "gelu"
    dropout: float = 0.1


class TrainingRecipe(_Strict):
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    grad_clip: float = 1.0
    patience: int = 3  # epochs without validation macro-F1 improvement before stopping
    aux_loss_coef: float = 0.01  # Switch load-balancing loss
    z_loss_coef: float = 0.001  # ST-MoE router z-loss
    seed: int = 0
    threads: int | None = None
    # Augmentation (training only): texts longer than max_length are read through a random window of it half of
    # the time (the first window otherwise, as at inference), and each token is dropped with this probability.
    random_window: bool = True
    token_dropout: float = 0.1
    label_smoothing: float = 0.1
    # Validation, early stopping and the saved model use an exponential moving average of the weights: on a
    # small dataset it is far steadier from epoch to epoch than the raw weights. None turns it off.
    ema_decay: float | None = 0.99


class Recipe(_Strict):
    name: str = "model"
    data: DataRecipe = Field(default_factory=DataRecipe)
    model: ModelRecipe = Field(default_factory=ModelRecipe)
    training: TrainingRecipe = Field(default_factory=TrainingRecipe)

    @classmethod
    def from_file(cls, path: str | Path) -> Recipe:
        path = Path(path)
        text = path.read_text()
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
        recipe = cls.model_validate(raw or {})
        # A relative data path is read relative to the recipe file, like an include.
        beside = path.parent / recipe.data.source
        if not Path(recipe.data.source).is_absolute() and beside.is_file():
            recipe.data.source = str(beside.resolve())
        return recipe


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


def _augment(seq: list[int], max_length: int, tr: TrainingRecipe, rng: random.Random) -> list[int]:
    if tr.random_window and len(seq) > max_length and rng.random() < 0.5:
        start = rng.randrange(len(seq) - max_length + 1)
        seq = seq[start : start + max_length]
    else:
        seq = seq[:max_length]
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


def train(recipe: Recipe, output_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Train per `recipe`, write the model folder, return a summary (best epoch, validation and test metrics)."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    tr, mr, dr = recipe.training, recipe.model, recipe.data
    if tr.threads:
        torch.set_num_threads(tr.threads)
    seed_everything(tr.seed)
    ds: Dataset = load_dataset(dr.source, dr.text_column, dr.label_column, dr.split_seed, dr.split_fractions)
    splits = {s: cap_examples(ds[s], dr.max_examples_per_split, dr.split_seed) for s in ("train", "validation", "test")}
    labels = ds.labels
    label2id = {lab: i for i, lab in enumerate(labels)}
    for s, part in splits.items():
        if not part:
            raise ValueError(f"split {s!r} of {dr.source} is empty")

    tokenizer = TextTokenizer.train((e.text for e in splits["train"]), mr.vocab_size)
    cfg = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        num_labels=len(labels),
        pad_token_id=tokenizer.pad_id,
        **mr.model_dump(exclude={"vocab_size"}),
    )
    model = MoEClassifier(cfg)
    # Training keeps up to 4x max_length tokens so random windows can read past the start of long texts.
    train_full = encode_examples(tokenizer, splits["train"], 4 * cfg.max_length)
    train_ids = [s[: cfg.max_length] for s in train_full]
    val_ids = encode_examples(tokenizer, splits["validation"], cfg.max_length)
    y_train = [label2id[e.label] for e in splits["train"]]
    y_val = np.array([label2id[e.label] for e in splits["validation"]])

    # No weight decay on biases, norms and embeddings: standard for transformers.
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "emb" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "emb" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tr.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=tr.lr
    )
    steps_per_epoch = math.ceil(len(train_ids) / tr.batch_size)
    total = steps_per_epoch * tr.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, max(1, int(tr.warmup_ratio * total))))
    rng = random.Random(tr.seed)
    ema = None
    if tr.ema_decay is not None:
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(tr.ema_decay)
        )
    eval_net: MoEClassifier = ema.module if ema is not None else model  # type: ignore[assignment]

    history: list[dict[str, Any]] = []
    best_f1, best_state, best_epoch, stale = -1.0, None, 0, 0
    for epoch in range(1, tr.epochs + 1):
        model.train()
        sums = {"loss": 0.0, "ce": 0.0, "aux": 0.0, "z": 0.0}
        correct = 0
        load = np.zeros((len(model.moe_layers), cfg.num_experts))
        batches = _batches([len(s) for s in train_ids], tr.batch_size, rng)
        bar = tqdm(batches, desc=f"epoch {epoch}/{tr.epochs}", disable=not progress, leave=False)
        for b in bar:
            ids, mask = pad_batch([_augment(train_full[i], cfg.max_length, tr, rng) for i in b], tokenizer.pad_id)
            y = torch.tensor([y_train[i] for i in b])
            out = model(ids, mask)
            ce = F.cross_entropy(out.logits, y, label_smoothing=tr.label_smoothing)
            loss = ce + tr.aux_loss_coef * out.aux_loss + tr.z_loss_coef * out.z_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tr.grad_clip)
            opt.step()
            sched.step()
            if ema is not None:
                ema.update_parameters(model)
            n = len(b)
            sums["loss"] += loss.item() * n
            sums["ce"] += ce.item() * n
            sums["aux"] += out.aux_loss.item() * n
            sums["z"] += out.z_loss.item() * n
            correct += int((out.logits.argmax(1) == y).sum())
            for li, r in enumerate(out.routing):
                load[li] += torch.bincount(r.expert_ids.reshape(-1), minlength=cfg.num_experts).numpy()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        preds = predict_ids(eval_net, val_ids, pad_id=tokenizer.pad_id)
        val_pred = preds.probs.argmax(1)
        val_f1 = _macro_f1(y_val, val_pred, len(labels))
        row = {
            "epoch": epoch,
            **{f"train_{k}": round(v / len(train_ids), 4) for k, v in sums.items()},
            "train_accuracy": round(correct / len(train_ids), 4),
            "val_accuracy": round(float(np.mean(val_pred == y_val)), 4),
            "val_macro_f1": round(val_f1, 4),
            "expert_imbalance": [expert_stats(lay / lay.sum())["imbalance_max_over_mean"] for lay in load],
            "expert_cv": [expert_stats(lay / lay.sum())["cv"] for lay in load],
            "seconds": round(time.perf_counter() - t0, 1),
        }
        history.append(row)
        log.info(
            "epoch %d: loss %.4f (ce %.4f aux %.3f z %.3f) train acc %.4f | val acc %.4f macro-F1 %.4f | "
            "expert imbalance max/mean %s",
            epoch,
            row["train_loss"],
            row["train_ce"],
            row["train_aux"],
            row["train_z"],
            row["train_accuracy"],
            row["val_accuracy"],
            row["val_macro_f1"],
            row["expert_imbalance"],
        )
        if val_f1 > best_f1:
            best_f1, best_epoch, stale = val_f1, epoch, 0
            best_state = copy.deepcopy(eval_net.state_dict())
        else:
            stale += 1
            if stale >= tr.patience:
                log.info("early stopping: no validation macro-F1 gain for %d epochs", tr.patience)
                break
    assert best_state is not None
    model.load_state_dict(best_state)
    model.eval()

    out = Path(output_dir)
    training_meta = {
        "dataset": dr.source,
        "text_column": dr.text_column,
        "label_column": dr.label_column,
        "split_seed": dr.split_seed,
        "split_fractions": list(dr.split_fractions),
        "max_examples_per_split": dr.max_examples_per_split,
        "recipe": recipe.name,
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "train_seconds": round(time.perf_counter() - t0, 1),
        "split_sizes": {s: len(p) for s, p in splits.items()},
    }
    save_model(out, model, tokenizer, labels, training_meta)
    (out / "recipe.json").write_text(json.dumps(recipe.model_dump(mode="json"), indent=2) + "\n")
    (out / "training_log.json").write_text(json.dumps(history, indent=2) + "\n")
    val_profile = routing_profile(predict_ids(model, val_ids, pad_id=tokenizer.pad_id), "validation", ds.name)
    write_routing_profile(val_profile, out)

    bundle = ModelBundle(out.name, out, model, tokenizer, cfg, dict(enumerate(labels)), training_meta)
    report, test_preds, y_test = evaluate_examples(bundle, splits["test"], "test", ds.name)
    write_report(report, test_preds, y_test, labels, out)
    from service.training.model_card import write_model_card

    write_model_card(out, recipe, report, training_meta, history)
    return {
        "output": str(out),
        "best_epoch": best_epoch,
        "val_macro_f1": round(best_f1, 4),
        "test_macro_f1": report["macro_f1"],
        "test_accuracy": report["accuracy"],
        "train_seconds": training_meta["train_seconds"],
    }
