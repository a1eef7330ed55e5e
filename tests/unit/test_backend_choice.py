"""`moe-serve evaluate --choose`'s rule: of the backend variants that answer like torch fp32, the fastest."""

from __future__ import annotations


def test_choice_is_the_fastest_variant_that_answers_alike() -> None:
    from service.bench.backends import choose

    def row(kind: str, precision: str, one: float, sat: float, f1: float, parity: dict | None) -> dict:
        speeds = {"batch_1": {"texts_per_s": one}, "batch_64": {"texts_per_s": sat}}
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
