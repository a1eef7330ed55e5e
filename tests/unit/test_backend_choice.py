"""`moe-serve evaluate --choose`'s rule: of the backend variants that answer like torch fp32, the fastest."""

from __future__ import annotations


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
