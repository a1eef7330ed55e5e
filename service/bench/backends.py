"""Every way to run one model folder on the CPU, side by side: the CPU rows of the variant table
(service/backends/variants.py: torch fp32 / bf16, ONNX Runtime fp32 / int8).

`measure_variants` times each at batch 1, at a saturated batch and on served-like batches of random sizes and
lengths, on the same texts (medians of several passes, the variants taking turns within each), and
checks its answers against the reference (torch fp32) on a labelled split. `choose` picks the fastest variant
(geometric mean of the three regimes) that answers as the reference does: fp32 with probabilities within 1e-4, the
same labels and routing 99.9% the same; bf16 / int8 with macro-F1 within 0.5 points. `write_choice` records it in
config.json "serving", which `--backend auto` then follows, with the token budget measured on it by draining a full
queue of the timing texts (`measure_budgets`, `best_budget`), which the server's batcher then uses on the CPU.

A multi-task folder is timed on texts of every task, each asked for every task (a row per text and task), and
judged per task: its macro-F1 is the tasks' mean, its parity the worst task's.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from service.backends import load_backend
from service.backends.base import Backend
from service.backends.variants import REFERENCE, Variant, on_device
from service.bench.timing import SETTLE_S, K, interleaved_medians
from service.engine.request_queue import drain_batches
from service.modeling.folder import update_config

if TYPE_CHECKING:
    from service.modeling.artifacts import LoadedModel

FP32_MAX_DIFF, ROUTING_MIN, F1_MAX_DROP = 1e-4, 0.999, 0.005
SATURATED = 64
# Token budgets `--choose` tries for the chosen variant (MOE_MAX_BATCH_TOKENS): a batch of long texts that fits the
# caches runs faster per text than one that does not (MiniLM's articles: 83-87 texts/s in batches of 4-8, 72-77 in
# batches of 64), while short texts want big batches. Measured per folder and machine rather than guessed.
BUDGETS = (512, 1024, 2048, 4096, 8192, 16384)
# Drained rates this close to the fastest are not told apart (best_budget): the larger budget is kept.
BUDGET_TOLERANCE = 0.1


def available(model_dir: Path) -> list[Variant]:
    """The CPU variants whose file the folder has (ONNX graphs only after `moe-serve export`)."""
    return [v for v in on_device("cpu") if (model_dir / v.file).is_file()]


def is_reference(backend: str, precision: str) -> bool:
    return (backend, precision) == (REFERENCE.backend, REFERENCE.precision)


def _percentiles(times: list[float]) -> dict[str, float]:
    ms = np.array(times) * 1e3
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def length_sorted_batches(seqs: list[list[int]], batch_size: int) -> list[list[list[int]]]:
    """Sorted by length, as the server's length-aware batcher would group them."""
    ordered = sorted(seqs, key=len)
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


def served_like_batches(seqs: list[list[int]], seed: int = 0) -> list[list[list[int]]]:
    """Batches as a server meets them: sizes from 1 to SATURATED, texts of every length drawn at random, so most
    batches bring a shape not seen before (what per-shape kernel compilation, e.g. oneDNN bf16, pays for)."""
    rng = np.random.default_rng(seed)
    out, i = [], 0
    order = rng.permutation(len(seqs))
    while i < len(seqs):
        n = int(rng.integers(1, SATURATED + 1))
        out.append([seqs[j] for j in order[i : i + n]])
        i += n
    return out


def run_all_tasks(backend: Backend, batch: list[list[int]]) -> None:
    """One batch, each text asked for every task of a multi-task folder (for a single-task one, as it is)."""
    every = list(range(len(backend.info.tasks)))
    backend.forward(batch, tasks=[every] * len(batch) if every else None)


def time_backends(backends: dict[K, Backend], seqs: list[list[int]], repeats: int) -> dict[K, dict[str, Any]]:
    """Per backend: batch 1 over every text, batches of SATURATED (sorted by length, as the batcher cuts them) and
    served-like batches (random sizes and lengths, a new draw each pass); texts/s is the median over `repeats`
    passes, p50/p99 are per call over all passes. Each pass runs every backend in turn (a slow spell of the machine
    hits them alike: service/bench/timing.py). A multi-task folder's texts each ask for every task."""
    batches = length_sorted_batches(seqs, SATURATED)
    for backend in backends.values():
        run_all_tasks(backend, batches[0])  # warm-up: lazy initialisation, caches
    regimes = (
        ("batch_1", lambda _: [[s] for s in seqs]),
        (f"batch_{SATURATED}", lambda _: batches),
        ("served_mix", lambda i: served_like_batches(seqs, seed=i)),
    )
    out: dict[K, dict[str, Any]] = {name: {} for name in backends}
    for regime, calls_of in regimes:
        per_call: dict[K, list[float]] = {name: [] for name in backends}
        per_pass: dict[K, list[float]] = {name: [] for name in backends}
        for i in range(repeats):
            calls = calls_of(i)
            for name, backend in backends.items():
                time.sleep(SETTLE_S)
                t_pass = time.perf_counter()
                for call in calls:
                    t0 = time.perf_counter()
                    run_all_tasks(backend, call)
                    per_call[name].append(time.perf_counter() - t0)
                per_pass[name].append(time.perf_counter() - t_pass)
        for name in backends:
            rate = round(len(seqs) / statistics.median(per_pass[name]), 1)
            out[name][regime] = {"texts_per_s": rate, **_percentiles(per_call[name])}
    return out


BACKLOGS = ("short", "long", "mixed")


def budget_plans(seqs: list[list[int]], max_texts: int, seed: int = 0) -> dict[tuple[str, int], list[list[list[int]]]]:
    """Per backlog and budget, the batches the server's batcher cuts from a full queue: of the shorter half of the
    texts, of the longer half, and of all of them, in a random arrival order (the same for every budget)."""
    order = np.random.default_rng(seed).permutation(len(seqs))
    arrived = [_Queued(seqs[i]) for i in order]
    middle = sorted(len(s) for s in seqs)[len(seqs) // 2]
    backlogs = {
        "short": [q for q in arrived if len(q.ids) < middle],
        "long": [q for q in arrived if len(q.ids) >= middle],
        "mixed": arrived,
    }
    return {
        (name, b): [[q.ids for q in batch] for batch in drain_batches(queued, max_texts, b)]
        for name, queued in backlogs.items()
        for b in BUDGETS
    }


@dataclass
class _Queued:
    ids: list[int]


def measure_budgets(backend: Backend, seqs: list[list[int]], max_texts: int, repeats: int = 5) -> list[dict[str, Any]]:
    """Per token budget, texts/s of a full queue drained at that budget, for each backlog of `budget_plans` and
    their geometric mean (`texts_per_s`: a server meets all three, and none may be given up for another); medians
    of `repeats` passes, the budgets interleaved within each pass so that a slow spell of the machine hits them
    alike."""
    plans = budget_plans(seqs, max_texts)
    run_all_tasks(backend, plans["mixed", BUDGETS[-1]][0])  # warm-up
    runs = {key: functools.partial(_drain, backend, calls) for key, calls in plans.items()}
    seconds = interleaved_medians(runs, repeats, warmup=0, settle_s=0)  # one backend: nothing to settle
    rows = []
    for b in BUDGETS:
        rates = {n: sum(len(c) for c in plans[n, b]) / seconds[n, b] for n in BACKLOGS}
        mean = math.prod(rates.values()) ** (1 / len(rates))
        per_backlog = {n: round(r, 1) for n, r in rates.items()}
        rows.append({"max_batch_tokens": b, **per_backlog, "texts_per_s": round(mean, 1)})
    return rows


def _drain(backend: Backend, calls: list[list[list[int]]]) -> None:
    for call in calls:
        run_all_tasks(backend, call)


def best_budget(rows: list[dict[str, Any]]) -> int:
    """The largest budget whose drained rate (geometric mean of the three backlogs) is within BUDGET_TOLERANCE of the
    fastest. Why not simply the fastest: the drain sees no per-batch serving cost (IPC to the model process, the
    answers' fan-out), and its ranking moves with the machine's speed state (README: How it works). On MiniLM, one
    `--choose` run drained 512 fastest (325.2 texts/s, 8192: 306.5), yet served side by side 512 was the slowest on
    articles (50.6-52.7 req/s against 59.9-67.9 at 8192: docs/bench/budgets-512.json); earlier 8192 had been within
    3% of the best served budget, 16384 27% below it (docs/bench/budgets.json)."""
    fastest = max(r["texts_per_s"] for r in rows)
    return max(r["max_batch_tokens"] for r in rows if r["texts_per_s"] >= (1 - BUDGET_TOLERANCE) * fastest)


def measure_variants(
    model_dir: Path, timing_texts: list[list[int]], eval_split: str | None, repeats: int = 3, threads: int | None = None
) -> list[dict[str, Any]]:
    """One row per available variant: speed, size on disk, and (when eval_split is given) accuracy and parity."""
    from service.modeling.artifacts import load_model

    bundle = load_model(model_dir) if eval_split else None
    variants = available(model_dir)
    backends = {v: load_backend(model_dir, "cpu", v.backend, threads, v.precision) for v in variants}
    speeds = time_backends(backends, timing_texts, repeats)
    rows = []
    for variant in variants:
        row: dict[str, Any] = {"backend": variant.backend, "precision": variant.precision}
        row["size_mb"] = round((model_dir / variant.file).stat().st_size / 1e6, 1)
        row |= speeds[variant]
        if bundle is not None and eval_split is not None:
            other = None if variant == REFERENCE else backends[variant]
            row |= {"split": eval_split, **accuracy(bundle, eval_split, other)}
        rows.append(row)
    return rows


def accuracy(bundle: LoadedModel, split: str, backend: Backend | None) -> dict[str, Any]:
    """macro_f1 and parity (None for the reference) of `backend` on the split; a multi-task folder's per task (under
    "tasks"), with the tasks' mean macro-F1 and the worst task's parity."""
    from service.modeling.task_view import TaskBackend, task_names, task_view
    from service.training.evaluate import evaluate_model

    if not bundle.folder.tasks:
        report = evaluate_model(bundle, None, split, None, backend=backend)
        return {"macro_f1": report["macro_f1"], "parity": report.get("parity")}
    tasks = {}
    for task in task_names(bundle):
        other = None if backend is None else TaskBackend(backend, task)
        report = evaluate_model(task_view(bundle, task), None, split, None, backend=other)
        tasks[task] = {"macro_f1": report["macro_f1"], "parity": report.get("parity")}
    parities = [t["parity"] for t in tasks.values()]
    mean_f1 = round(float(np.mean([t["macro_f1"] for t in tasks.values()])), 4)
    return {"macro_f1": mean_f1, "parity": None if backend is None else worst_parity(parities), "tasks": tasks}


def worst_parity(parities: list[dict[str, Any]]) -> dict[str, Any]:
    """The tasks' parity figures as one: the largest difference, the lowest agreements (per layer too)."""
    return {
        "reference": parities[0]["reference"],
        "max_abs_diff": max(p["max_abs_diff"] for p in parities),
        "argmax_agreement": min(p["argmax_agreement"] for p in parities),
        "routing_agreement": min(p["routing_agreement"] for p in parities),
        "routing_agreement_per_layer": np.min([p["routing_agreement_per_layer"] for p in parities], 0).tolist(),
        "texts": sum(p["texts"] for p in parities),
    }


def choice_texts(loaded: LoadedModel, split: str = "validation", per_source: int = 64) -> list[list[int]]:
    """What `--choose` times: up to `per_source` texts of the split and their first lines (served traffic brings
    both short and long texts); a multi-task folder's drawn from each task's data in turn."""
    from service.modeling.task_view import task_names, task_view
    from service.training.evaluate import headline, model_examples
    from service.training.predict import encode_texts

    views = [task_view(loaded, t) for t in task_names(loaded)] or [loaded]
    raw: list[str] = []
    for view in views:
        examples, _ = model_examples(view.folder, None, split)
        texts = [e.text for e in examples[: max(per_source // len(views), 1)]]
        raw += texts + [headline(t) for t in texts]
    return encode_texts(loaded.tokenizer, raw, loaded.folder.config.max_length)


def passes(row: dict[str, Any], reference_f1: float) -> bool:
    p = row.get("parity")
    if p is None:  # the reference itself
        return True
    if row["precision"] == "fp32":
        same_routing = p["routing_agreement"] >= ROUTING_MIN
        return p["max_abs_diff"] <= FP32_MAX_DIFF and p["argmax_agreement"] == 1.0 and same_routing
    return reference_f1 - row["macro_f1"] <= F1_MAX_DROP


REGIMES = ("batch_1", f"batch_{SATURATED}", "served_mix")


def speed(row: dict[str, Any]) -> float:
    """Geometric mean of texts/s at batch 1, at a saturated batch and on served-like batches: a server lives in
    all three (a quiet one runs texts alone, a busy one full batches of whatever arrives), and none may be given up
    for another."""
    return math.prod(row[k]["texts_per_s"] for k in REGIMES) ** (1 / len(REGIMES))


def choose(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest variant that answers as the reference (torch fp32) does."""
    ref = next(r for r in rows if is_reference(r["backend"], r["precision"]))
    best = max((r for r in rows if passes(r, ref["macro_f1"])), key=speed)
    return {"backend": best["backend"], "precision": best["precision"]}


def write_choice(
    model_dir: Path, variant: dict[str, Any], rows: list[dict[str, Any]], machine: str, budgets: list[dict[str, Any]]
) -> dict[str, Any]:
    """Record the chosen variant (`choose(rows)`) and the best token budget measured on it (`budgets`)."""
    choice = {**variant, "max_batch_tokens": best_budget(budgets)}
    update_config(model_dir, serving={**choice, "chosen_on": machine, "measured": rows, "budgets": budgets})
    return choice
