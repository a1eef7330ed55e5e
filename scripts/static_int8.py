"""Does static int8 (activations quantised with calibrated scales, not per batch) make the MoE faster?

The issue's two static routes, measured against the folder's served int8 graph (ONNX Runtime, dynamic int8) on the
same texts, with the fp32 graph as the accuracy reference:

- `ort-qdq`: ONNX Runtime's `quantize_static`, QDQ format, per-channel weights, min-max scales calibrated on the
  validation split (64 headlines and 64 articles, batches of 8), routers kept fp32, as `moe-serve export` keeps them;
- `ov-nncf`: the exported fp32 graph read by OpenVINO and quantised by NNCF's post-training quantisation (transformer
  preset, the same calibration batches, routers ignored), compiled with bf16 for what stays in floating point where
  the CPU has AVX512_BF16 / AMX; and the same with more of the graph kept in floating point (STATIC_KEEPS: the
  attention, the experts, the first and last blocks), to see whether any static scheme keeps 99% of the labels;
- OpenVINO without static activations, for comparison: the fp32 graph in bf16 (`ov-bf16`), and int8 weights only
  (NNCF's weight compression, activations bf16: `ov-int8-weights`).

Prints texts/s for headlines and articles at batch 1 and 64 (median of 5 interleaved rounds), label agreement and
the largest probability difference against fp32 on the test split, and OpenVINO's own per-op profile of a lone
headline and of 64 articles, the MoE's beside the bench's dense-ov yardstick (where the sparse graph's time goes in
that runtime). Needs the `openvino` extra.

    .venv/bin/python scripts/static_int8.py --model models/bbc-news-minilm-moe --json docs/bench/static-int8.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from service.bench.backends import choice_texts, length_sorted_batches
from service.bench.dense_vs_moe import text_sets
from service.modeling import onnx_export
from service.modeling.artifacts import LoadedModel, load_model
from service.modeling.layout import ONNX_FILE, ONNX_INT8_FILE
from service.modeling.tokenizer import pad_ids

ROUNDS = 5
Forward = Callable[[list[list[int]]], np.ndarray]


def calibration(loaded: LoadedModel) -> list[dict[str, np.ndarray]]:
    """The batches NNCF calibrates on (service/bench/dense_openvino.py), for ONNX Runtime's calibration reader."""
    from service.bench.dense_openvino import CALIBRATION_BATCH as N

    seqs = choice_texts(loaded, "validation", 64)
    return [feed(seqs[i : i + N], loaded.tokenizer.pad_id) for i in range(0, len(seqs), N)]


def feed(seqs: list[list[int]], pad_id: int) -> dict[str, np.ndarray]:
    ids, mask = pad_ids(seqs, pad_id)
    return {"input_ids": ids, "attention_mask": mask}


def ort_qdq(raw: Path, items: list[dict[str, np.ndarray]], work: Path) -> Path:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(items)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    qdq = work / "qdq.raw.onnx"
    quantize_static(
        str(raw),
        str(qdq),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=onnx_export.PER_CHANNEL,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=list(onnx_export.INT8_OPS),
        nodes_to_exclude=onnx_export.router_nodes(raw),
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    return onnx_export.optimise(qdq, work / "qdq.onnx")


ROUTERS = ".*/router/.*"  # node-name pattern of the MoE's routers, kept fp32 by every int8 route here
# NNCF static int8 variants by what they keep in floating point besides the routers (patterns over node names).
STATIC_KEEPS: dict[str, tuple[str, ...]] = {
    "ov-nncf": (),
    "ov-nncf, attention float": (".*/attn/.*",),
    "ov-nncf, experts float": (".*/ffn/.*",),
    "ov-nncf, blocks 0, 4, 5 float": ("/blocks.0/.*", "/blocks.4/.*", "/blocks.5/.*"),
}


def ov_nncf(raw: Path, loaded: LoadedModel, out: Path, keep: tuple[str, ...] = ()) -> Path:
    """The raw graph quantised by NNCF as the bench's dense-ov yardstick is, the routers (and `keep`) left fp32."""
    from service.bench.dense_openvino import quantize_int8

    calibration = choice_texts(loaded, "validation", 64)
    return quantize_int8(raw, calibration, loaded.tokenizer.pad_id, out, keep_float=(ROUTERS, *keep))


def ov_weights_int8(raw: Path, out: Path) -> Path:
    """int8 weights only (NNCF weight compression, symmetric per channel, routers left fp32); activations stay
    floating point (bf16 where the CPU has it), so no calibration."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(raw))
    compressed = nncf.compress_weights(
        model, mode=nncf.CompressWeightsMode.INT8_SYM, ignored_scope=nncf.IgnoredScope(patterns=[ROUTERS])
    )
    ov.save_model(compressed, str(out), compress_to_fp16=False)
    return out


def ort_forward(graph: Path, pad_id: int, threads: int) -> Forward:
    """The graph's logits through the bench's ONNX Runtime runner (all graph optimisations, `threads` intra-op)."""
    from service.bench.dense_yardstick import DenseGraph

    return DenseGraph(graph, pad_id, threads).forward


def ov_forward(graph: Path, pad_id: int, threads: int) -> Forward:
    from service.bench.dense_openvino import OpenVINOGraph

    return OpenVINOGraph(graph, pad_id, threads).forward


def texts_per_s(forwards: dict[str, Forward], calls: list[list[list[int]]]) -> dict[str, float]:
    """Every forward over the same calls, interleaved round by round; median texts/s of ROUNDS after a warm-up."""
    times: dict[str, list[float]] = {name: [] for name in forwards}
    for i in range(ROUNDS + 1):
        for name, f in forwards.items():
            t0 = time.perf_counter()
            for c in calls:
                f(c)
            if i:
                times[name].append(time.perf_counter() - t0)
    n = sum(map(len, calls))
    return {name: round(n / statistics.median(t), 1) for name, t in times.items()}


def agreement(forwards: dict[str, Forward], sets: dict[str, list[list[int]]]) -> dict[str, dict[str, Any]]:
    """Per forward and text set: labels equal to fp32's (%) and the largest probability difference."""

    def probs(f: Forward, seqs: list[list[int]]) -> np.ndarray:
        logits = np.concatenate([f(b) for b in length_sorted_batches(seqs, 64)])
        p = np.exp(logits - logits.max(1, keepdims=True))
        return p / p.sum(1, keepdims=True)

    out: dict[str, dict[str, Any]] = {}
    for kind, seqs in sets.items():
        order = [s for b in length_sorted_batches(seqs, 64) for s in b]
        ref = probs(forwards["fp32"], order)
        for name, f in forwards.items():
            p = probs(f, order)
            out.setdefault(name, {})[kind] = {
                "labels_agree_pct": round(100 * float((p.argmax(1) == ref.argmax(1)).mean()), 2),
                "max_prob_diff": round(float(np.abs(p - ref).max()), 4),
            }
    return out


def ov_profile(graph: Path, seqs: list[list[int]], pad_id: int, threads: int, top: int = 12) -> list[dict[str, Any]]:
    """OpenVINO's per-node times for one forward of `seqs`, summed per (op, kernel)."""
    from service.bench.dense_openvino import OpenVINOGraph

    g = OpenVINOGraph(graph, pad_id, threads, profile=True)
    for _ in range(3):
        g.forward(seqs)
    times = g.op_times()
    rows = [{"op": op, "kernel": k, "calls": n, "ms": round(ms, 2)} for (op, k), (n, ms) in times.items()]
    total = {"op": "all", "kernel": "", "calls": sum(r["calls"] for r in rows), "ms": sum(r["ms"] for r in rows)}
    return [{**total, "ms": round(total["ms"], 2)}, *sorted(rows, key=lambda r: -r["ms"])[:top]]


def run(folder: Path, threads: int, n_texts: int) -> dict[str, Any]:
    loaded = load_model(folder)
    pad = loaded.tokenizer.pad_id
    items = calibration(loaded)
    with tempfile.TemporaryDirectory(prefix="static-int8-") as tmp:
        work = Path(tmp)
        raw = onnx_export.export_graph(loaded.model, work / "raw.onnx")
        statics = {
            name: ov_nncf(raw, loaded, work / f"ov-int8-{i}.xml", keep)
            for i, (name, keep) in enumerate(STATIC_KEEPS.items())
        }
        ov_model = statics["ov-nncf"]
        forwards = {
            "fp32": ort_forward(folder / ONNX_FILE, pad, threads),
            "ort-dynamic (served)": ort_forward(folder / ONNX_INT8_FILE, pad, threads),
            "ort-qdq": ort_forward(ort_qdq(raw, items, work), pad, threads),
            **{name: ov_forward(path, pad, threads) for name, path in statics.items()},
            "ov-bf16": ov_forward(raw, pad, threads),
            "ov-int8-weights": ov_forward(ov_weights_int8(raw, work / "ov-w8.xml"), pad, threads),
        }
        sets = text_sets(loaded, n_texts)
        speed = {}
        for kind, seqs in sets.items():
            speed[f"{kind}_b1"] = texts_per_s(forwards, [[s] for s in seqs[:64]])
            speed[f"{kind}_b64"] = texts_per_s(forwards, length_sorted_batches(seqs, 64))
        from service.bench.run import machine

        return {
            "machine": {**machine(), "threads": threads},
            "texts_per_s": speed,
            "agreement": agreement(forwards, text_sets(loaded, 10_000)),
            "ov_profile": profiles({"MoE": ov_model, "dense": dense_ov(loaded, work)}, sets, pad, threads),
        }


def dense_ov(loaded: LoadedModel, work: Path) -> Path:
    """The bench's dense-ov yardstick (the folder's base, NNCF int8), for its profile beside the MoE's."""
    from service.bench.dense_vs_moe import dense_graphs

    return dense_graphs(loaded, work)["dense-ov int8"]


def profiles(graphs: dict[str, Path], sets: dict[str, list[list[int]]], pad: int, threads: int) -> dict[str, Any]:
    articles = sets["article"][:64]
    cases = {"a lone headline": sets["headline"][:1], f"{len(articles)} articles": articles}
    return {
        f"{g}, {case}": ov_profile(path, seqs, pad, threads)
        for case, seqs in cases.items()
        for g, path in graphs.items()
    }


def markdown(r: dict[str, Any]) -> list[str]:
    regimes = list(r["texts_per_s"])
    names = list(r["texts_per_s"][regimes[0]])
    lines = ["| graph | " + " | ".join(regimes) + " | labels = fp32 (headlines, articles) | max prob diff |"]
    lines.append("|---|" + "---|" * (len(regimes) + 2))
    for n in names:
        a = r["agreement"][n]
        lines.append(
            f"| {n} | "
            + " | ".join(str(r["texts_per_s"][k][n]) for k in regimes)
            + f" | {a['headline']['labels_agree_pct']}%, {a['article']['labels_agree_pct']}% "
            + f"| {a['headline']['max_prob_diff']}, {a['article']['max_prob_diff']} |"
        )
    for case, ops in r["ov_profile"].items():
        lines += ["", f"OpenVINO int8 ({case}), per op:", "", "| op | kernel | calls | ms |", "|---|---|---|---|"]
        lines += [f"| {p['op']} | {p['kernel']} | {p['calls']} | {p['ms']} |" for p in ops]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/bbc-news-minilm-moe")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--texts", type=int, default=128, help="test texts timed per set")
    p.add_argument("--json")
    args = p.parse_args()
    r = run(Path(args.model), args.threads, args.texts)
    print("\n".join(markdown(r)))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1) + "\n")


if __name__ == "__main__":
    main()
