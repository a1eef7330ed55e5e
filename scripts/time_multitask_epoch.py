"""Time a multi-task recipe's epoch without running it: a few training batches of each task (after one warm-up
batch), and one full validation pass; the epoch is extrapolated from the task mix the recipe draws.

    nice -n 19 .venv/bin/python scripts/time_multitask_epoch.py --recipe recipes/topic-sentiment-minilm-moe.yaml
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from service.training.multitask import MultiTaskTrainer, load_task_splits
from service.training.recipe import Recipe
from service.training.train import _batches, seed_everything


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", required=True)
    p.add_argument("--batches", type=int, default=4, help="timed training batches per task")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    recipe = Recipe.from_file(args.recipe)
    seed_everything(recipe.training.seed)
    data, splits = load_task_splits(recipe.data)
    run = MultiTaskTrainer(recipe, splits, data.labels())
    run.model.train()
    per_text = {}
    for t, task in enumerate(run.tasks):
        rows = run.task_rows[t]
        lengths = [min(len(run.texts[i].inner), run.room) for i in rows]
        batches = _batches(lengths, recipe.training.batch_size, run.rng)[: args.batches + 1]
        run._step([rows[i] for i in batches[0]])  # warm-up: the first batch pays for allocations
        start, n = time.perf_counter(), 0
        for b in batches[1:]:
            run._step([rows[i] for i in b])
            n += len(b)
        per_text[task] = (time.perf_counter() - start) / n
    start = time.perf_counter()
    run.validate()
    validation_s = time.perf_counter() - start
    steps = {task: q * per_text[task] for task, q in zip(run.tasks, run.quotas, strict=True)}
    epoch = sum(steps.values()) + validation_s
    print(
        json.dumps(
            {
                "draws_per_epoch": dict(zip(run.tasks, run.quotas, strict=True)),
                "train_s_per_text": {t: round(s, 4) for t, s in per_text.items()},
                "train_s_per_epoch": {t: round(s) for t, s in steps.items()},
                "validation_s": round(validation_s, 1),
                "epoch_s": round(epoch),
                "epochs": recipe.training.epochs,
                "all_epochs_min": round(epoch * recipe.training.epochs / 60, 1),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
