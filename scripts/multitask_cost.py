"""What a second task costs on a multi-task folder, and how the number of task-routed layers moves it.

For each choice of `task_routed_layers` (0 .. every MoE layer), the folder's model is rebuilt with that many top
MoE layers routed by task (a shared router where there was a task router: task 0's rows; a task router where there
was a shared one: the shared router copied to every task), and the same texts are timed asked for one task and for
every task (torch fp32, `run_model`, batches of --batch texts, median of --repeats passes of each, the two kinds
interleaved). The trained folder's own choice is marked; the rebuilt ones keep its experts, so their routing (and
so their cost) is realistic, not their accuracy. Also: the resident memory of one multi-task model against its
single-task folders, each loaded alone in a fresh process.

Usage: python scripts/multitask_cost.py --model models/topic-sentiment-minilm-moe \
           [--single models/bbc-news-minilm-moe ...] [--json docs/models/multitask_cost.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from service.backends.torch_backend import run_model
from service.modeling.artifacts import load_model
from service.modeling.classifier import MoEClassifier
from service.training.multitask import load_task_splits
from service.training.recipe import Recipe


def rebuilt(model: MoEClassifier, routed: int) -> MoEClassifier:
    """The model with `routed` top MoE layers routed by task, its experts and heads kept."""
    cfg = dataclasses.replace(model.config, task_routed_layers=routed)
    new = MoEClassifier(cfg).eval()
    state = model.state_dict()
    tasks, e = len(cfg.task_names), cfg.num_experts
    for name, param in new.state_dict().items():
        old = state[name]
        if old.shape == param.shape:
            param.copy_(old)
        elif name.endswith("router.weight"):  # per task <-> shared: task 0's rows, or the shared rows per task
            param.copy_(old[:e] if param.shape[0] == e else old.repeat(tasks, 1))
        else:
            raise ValueError(f"{name}: {tuple(old.shape)} -> {tuple(param.shape)}")
    return new


def timed(
    model: MoEClassifier, seqs: list[list[int]], every: list[int], batch: int, repeats: int
) -> tuple[float, float]:
    """Median seconds of one pass over every text asked for task 0 alone, and for `every` task: the two kinds of
    pass interleaved, so that drift in the machine's speed moves both alike."""

    def one_pass(tasks: list[int]) -> float:
        t0 = time.perf_counter()
        for i in range(0, len(seqs), batch):
            chunk = seqs[i : i + batch]
            run_model(model, chunk, 0, "cpu", False, [tasks] * len(chunk))
        return time.perf_counter() - t0

    one_pass([0]), one_pass(every)  # warm-up
    pairs = [(one_pass([0]), one_pass(every)) for _ in range(repeats)]
    return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)


def rss_mb(folder: str) -> float:
    """Resident MB of a fresh process that loaded the folder and ran a few batches (interpreter and torch
    included): VmRSS after the warm-up, not the peak, which the loading's transient copies decide."""
    code = (
        "import sys\nfrom pathlib import Path\nfrom service.backends.torch_backend import TorchBackend\n"
        "b = TorchBackend(sys.argv[1], 'cpu')\nb.warmup()\n"
        "print([int(x.split()[1]) for x in Path('/proc/self/status').read_text().splitlines()"
        " if x.startswith('VmRSS')][0] / 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code, folder], check=True, capture_output=True, text=True)
    return round(float(out.stdout.split()[-1]), 1)


def texts(model_dir: str, per_task: int) -> list[str]:
    """Test texts of every task, `per_task` of each (articles and reviews, as served)."""
    _, splits = load_task_splits(Recipe.from_file(Path(model_dir) / "recipe.json").data)
    return [e.text for task in splits.values() for e in task["test"][:per_task]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a multi-task folder")
    p.add_argument("--single", action="append", default=[], help="a single-task folder to compare memory with")
    p.add_argument("--per-task", type=int, default=128)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args()
    loaded = load_model(args.model)
    cfg = loaded.model.config
    seqs = [e.ids for e in loaded.tokenizer.encode_batch(texts(args.model, args.per_task), cfg.max_length)]
    every = list(range(len(cfg.task_names)))
    moe = sum(cfg.moe_layers())
    trained = moe if cfg.task_routed_layers is None else cfg.task_routed_layers
    rows: list[dict[str, Any]] = []
    for routed in range(moe + 1):
        model = rebuilt(loaded.model, routed)
        one, all_tasks = timed(model, seqs, every, args.batch, args.repeats)
        rows.append({"task_routed_layers": routed, "trained": routed == trained,
                     "one_task_s": round(one, 3), "every_task_s": round(all_tasks, 3),
                     "ratio": round(all_tasks / one, 2)})  # fmt: skip
        print(rows[-1], flush=True)
    memory = {"multi-task": rss_mb(args.model), **{Path(s).name: rss_mb(s) for s in args.single}}
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    result = {"model": args.model, "machine": machine, "texts": len(seqs), "batch": args.batch,
              "tasks": cfg.task_names, "rows": rows, "rss_mb_after_warmup": memory}  # fmt: skip
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
