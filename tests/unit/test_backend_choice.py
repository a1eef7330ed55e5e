"""`moe-serve evaluate --choose`'s rule: of the backend variants that answer like torch fp32, the fastest."""

from __future__ import annotations

import numpy as np


def test_choice_is_the_fastest_variant_that_answers_alike() -> None:
    from service.bench.backends import choose

    def row(kind: str, precision: str, one: float, sat: float, f1: float, parity: dict | None, mix: float = 0) -> dict:
        # served-like batches: by default as fast as the two regimes' geometric mean, so it moves nothing
        mix = mix or (one * sat) ** 0.5
        speeds = {"batch_1": {"texts_per_s": one}, "batch_64": {"texts_per_s": sat}, "served_mix": {"texts_per_s": mix}}
        return {"backend": kind, "precision": precision, "macro_f1": f1, "parity": parity, **speeds}

    exact = {"max_abs_diff": 1e-7, "argmax_agreement": 1.0, "routing_agreement": 1.0}
    rows = [
        row("torch", "fp32", 100, 100, 0.95, None),
        row("onnx", "fp32", 150, 90, 0.95, exact),  # sqrt(150 * 90) = 116
        row("torch", "bf16", 50, 400, 0.95, {**exact, "max_abs_diff": 0.02}),  # 141: fastest overall
        row("onnx", "int8", 300, 300, 0.94, {**exact, "max_abs_diff": 0.1}),  # fastest, but 1 point of F1 lost
    ]
    assert choose(rows) == {"backend": "torch", "precision": "bf16"}
    rows[2]["macro_f1"] = 0.9  # bf16 now loses accuracy too
    assert choose(rows) == {"backend": "onnx", "precision": "fp32"}
    rows[1]["parity"] = {**exact, "routing_agreement": 0.99}  # an fp32 graph that routes differently is broken
    assert choose(rows) == {"backend": "torch", "precision": "fp32"}


def test_choice_pays_for_served_like_batches() -> None:
    """A variant fast on the two fixed shapes but slow on batches of new shapes (per-shape kernel compilation) loses
    to one that is steady on all three."""
    from service.bench.backends import choose

    def row(kind: str, precision: str, speeds: tuple[float, float, float], f1: float = 0.95) -> dict:
        regimes = dict(zip(("batch_1", "batch_64", "served_mix"), speeds, strict=True))
        parity = None if (kind, precision) == ("torch", "fp32") else {"max_abs_diff": 0.01}
        return {
            "backend": kind,
            "precision": precision,
            "macro_f1": f1,
            "parity": parity,
            **{k: {"texts_per_s": v} for k, v in regimes.items()},
        }

    rows = [
        row("torch", "fp32", (100, 100, 100)),
        row("torch", "bf16", (120, 400, 30)),
        row("onnx", "int8", (150, 200, 180)),
    ]
    assert choose(rows) == {"backend": "onnx", "precision": "int8"}
    rows[1]["served_mix"]["texts_per_s"] = 400
    assert choose(rows) == {"backend": "torch", "precision": "bf16"}


def test_budget_plans_cut_each_backlog_as_the_server_would() -> None:
    """Short half, long half and all texts, each drained at every budget by the server's own batcher: every text
    once per plan, every batch within its budget (or one text alone)."""
    from service.bench.backends import BACKLOGS, BUDGETS, budget_plans

    rng = np.random.default_rng(0)
    seqs = [[1] * int(n) for n in rng.integers(5, 40, 50)] + [[2] * int(n) for n in rng.integers(150, 257, 50)]
    plans = budget_plans(seqs, max_texts=128)
    assert set(plans) == {(n, b) for n in BACKLOGS for b in BUDGETS}
    for (name, budget), batches in plans.items():
        texts = [s for batch in batches for s in batch]
        assert len(texts) == {"short": 50, "long": 50, "mixed": 100}[name]
        assert all(len(b) == 1 or len(b) * max(map(len, b)) <= budget for b in batches)
    assert all(max(map(len, b)) < 40 for b in plans["short", 512])
    assert len(plans["long", 512]) > len(plans["long", 16384]) == 1


def test_budget_choice_is_the_largest_within_a_tenth_of_the_fastest() -> None:
    from service.bench.backends import BUDGETS, best_budget, measure_budgets
    from tests.fakes import FakeBackend

    rows = measure_budgets(FakeBackend(), [[1] * 10, [1] * 60, [1] * 30, [1] * 5], max_texts=128, repeats=1)
    assert [r["max_batch_tokens"] for r in rows] == list(BUDGETS)
    assert all(r["texts_per_s"] > 0 and {"short", "long", "mixed"} <= set(r) for r in rows)
    rates = {512: 90.0, 1024: 109.0, 2048: 120.0, 4096: 125.0, 8192: 111.0, 16384: 100.0}
    rows = [{"max_batch_tokens": b, "texts_per_s": r} for b, r in rates.items()]
    assert best_budget(rows) == 4096  # 8192 is 11.2% below the fastest
    rows[4]["texts_per_s"] = 113.0
    assert best_budget(rows) == 8192  # 9.6% below: not told apart, and larger
    rows[0]["texts_per_s"] = 200.0
    assert best_budget(rows) == 512  # far ahead of every other
