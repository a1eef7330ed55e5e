"""The bench's verdicts from its rows: the best MoE against the fastest dense yardstick of any runtime (named, per
regime), and moe-serve against each dense server (req/s at the most connections, p50 alone)."""

from __future__ import annotations

from service.bench.dense_vs_moe import REGIMES, markdown, ratios, served_markdown, served_ratios


def _row(model: str, backend: str, precision: str, *speeds: float) -> dict:
    return {"model": model, "backend": backend, "precision": precision, **dict(zip(REGIMES, speeds, strict=True))}


def test_best_moe_is_judged_against_the_fastest_dense_row_of_any_runtime() -> None:
    rows = [
        _row("moe", "onnx", "int8", 300, 1600, 40, 70),
        _row("moe", "torch", "bf16", 80, 1000, 45, 60),
        _row("all-experts", "onnx", "int8", 150, 1000, 30, 40),
        _row("dense-ort", "onnx", "int8", 750, 1400, 41, 50),
        _row("dense-ov", "openvino", "int8", 600, 2000, 80, 85),
    ]
    r = ratios(rows)
    best = r["best_moe_vs_best_dense"]
    assert best["headline_b1"] == {"ratio": 0.4, "moe": "onnx int8", "dense": "dense-ort int8"}
    assert best["headline_b64"] == {"ratio": 0.8, "moe": "onnx int8", "dense": "dense-ov int8"}
    assert best["article_b1"] == {"ratio": 0.56, "moe": "torch bf16", "dense": "dense-ov int8"}
    assert r["moe_vs_all_experts"] == {
        "onnx int8": {"headline_b1": 2.0, "headline_b64": 1.6, "article_b1": 1.33, "article_b64": 1.75}
    }
    md = "\n".join(markdown({"mean_tokens": {"headline": 22, "article": 247}, "rows": rows, "ratios": r}))
    assert "| best MoE / best dense | 0.4x (onnx int8 / dense-ort int8) | 0.8x (onnx int8 / dense-ov int8) |" in md


def test_no_dense_rows_no_verdict() -> None:
    assert ratios([_row("moe", "onnx", "int8", 1, 2, 3, 4)])["best_moe_vs_best_dense"] == {}


def _served(server: str, texts: str, c: int, rps: float, p50: float) -> dict:
    return {
        "server": server,
        "texts": texts,
        "concurrency": c,
        "rps": rps,
        "p50_ms": p50,
        "p99_ms": p50 * 2,
        "errors": 0,
        "rps_all_runs": [rps],
    }


def test_served_ratios_against_each_dense_server() -> None:
    rows = [_served("moe-serve", t, c, 100 * c, 10 + c) for t in ("headline", "article") for c in (1, 64)]
    rows += [_served("dense-ov int8", "headline", 1, 120, 9.0), _served("dense-ov int8", "headline", 64, 3200, 60)]
    rows += [_served("dense-ort int8", "article", 64, 8000, 80)]
    got = served_ratios(rows)
    assert got == {
        "dense-ov int8": {"headline_c1_p50": 0.82, "headline_c64_rps": 2.0},
        "dense-ort int8": {"article_c64_rps": 0.8},
    }
    md = served_markdown(rows)
    assert "| dense-ov int8 | 0.82x | 2.0x |  |" in md and "| dense-ort int8 |  |  | 0.8x |" in md
    assert (
        md[-4].startswith("| moe-serve / dense server")
        and "headline_c1_p50 | headline_c64_rps | article_c64_rps |" in md[-4]
    )
