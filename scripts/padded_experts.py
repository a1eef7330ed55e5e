"""Does one batched GEMM pair per MoE layer beat the per-expert loop? Capacity-padded experts, measured.

The served graph runs each MoE layer as a static loop over the 8 experts (NonZero, gather, two GEMMs each:
`MoEFeedForward.graph_forward`). The route tried here puts each (token, slot) assignment at row (expert, its rank
among that expert's assignments) of an [E, C, d] buffer, C the busiest expert's count, runs every expert in one
batched GEMM pair, and gathers the rows back: ~15 nodes per layer instead of ~100, at the price of the padding rows'
FLOPs (C x E against the assignments). Both graphs are exported from the same weights and run in ONNX Runtime fp32
and OpenVINO (bf16 where the CPU has it, and NNCF static int8 as scripts/static_int8.py builds it); texts/s at
batch 1 and 64 for headlines and articles, interleaved rounds. ONNX Runtime's dynamic int8 cannot run the padded
graph (its DynamicQuantizeMatMul takes no per-channel scales on a 3-D weight), so it has no row.

    .venv/bin/python -m scripts.padded_experts --model models/bbc-news-minilm-moe --json docs/bench/padded-experts.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scripts.static_int8 import ort_forward, ov_forward, ov_nncf, texts_per_s
from service.bench.backends import length_sorted_batches
from service.bench.dense_vs_moe import text_sets
from service.modeling import onnx_export
from service.modeling.artifacts import load_model
from service.modeling.moe import MoEFeedForward, RouterOutput, combine_weights

TOLERANCE = 1e-4  # padded against the served graph, fp32 logits


def padded_forward(layer: MoEFeedForward, x: torch.Tensor, r: RouterOutput) -> torch.Tensor:
    """graph_forward's maths with every expert in one batched GEMM pair over a capacity-padded [E, C, d] buffer."""
    t, k = r.expert_ids.shape
    experts = layer.num_experts
    flat_e = r.expert_ids.reshape(-1)
    onehot = (flat_e.unsqueeze(1) == torch.arange(experts).unsqueeze(0)).to(torch.int64)  # [A, E]
    rank = (onehot.cumsum(0) * onehot).sum(1) - 1  # earlier assignments to the same expert
    cap = onehot.sum(0).max()
    slot = flat_e * cap + rank  # each assignment's row in the [E * C] buffer
    rows = x.index_select(0, torch.arange(t * k) // k)
    buf = x.new_zeros(experts * cap, x.shape[1]).index_copy(0, slot, rows).view(experts, cap, -1)
    h = layer._act(torch.baddbmm(layer.b1.unsqueeze(1), buf, layer.w1))
    y = torch.baddbmm(layer.b2.unsqueeze(1), h, layer.w2).view(experts * cap, -1).index_select(0, slot)
    y = y.view(t, k, -1)
    if layer._unit_weights():
        return y.sum(1)
    return (y * combine_weights(r, layer.combine).to(y.dtype).unsqueeze(-1)).sum(1)


class _PaddedGraphModel(onnx_export._GraphModel):
    def __init__(self, model: Any) -> None:
        super().__init__(model)
        for layer in self.model.moe_layers:
            layer.graph_forward = lambda x, r, layer=layer: padded_forward(layer, x, r)


def ov_float() -> str:
    """What OpenVINO computes an unquantised graph in here: bf16 where the CPU has it (OpenVINOGraph's rule)."""
    import openvino as ov

    return "bf16" if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES") else "f32"


def run(folder: Path, threads: int, n_texts: int) -> dict[str, Any]:
    loaded = load_model(folder)
    pad = loaded.tokenizer.pad_id
    sets = text_sets(loaded, n_texts)
    forwards = {}
    with tempfile.TemporaryDirectory(prefix="padded-experts-") as tmp:
        for name, graph_model in (("loop", onnx_export._GraphModel), ("padded", _PaddedGraphModel)):
            work = Path(tmp) / name
            work.mkdir()
            raw = onnx_export.export_graph(loaded.model, work / "raw.onnx", graph_model)
            fp32 = onnx_export.optimise(raw, work / "fp32.onnx")
            forwards[f"{name}, onnxruntime fp32"] = ort_forward(fp32, pad, threads)
            forwards[f"{name}, openvino {ov_float()}"] = ov_forward(raw, pad, threads)
            forwards[f"{name}, openvino nncf int8"] = ov_forward(ov_nncf(raw, loaded, work / "ov.xml"), pad, threads)
        check = length_sorted_batches(sets["article"], 16)[0]
        padded, loop = (forwards[f"{n}, onnxruntime fp32"](check) for n in ("padded", "loop"))
        diff = float(np.abs(padded - loop).max())
        if diff > TOLERANCE:
            raise SystemExit(f"padded graph differs from the served graph by {diff:.2e} > {TOLERANCE}")
        speed = {}
        for kind, seqs in sets.items():
            speed[f"{kind}_b1"] = texts_per_s(forwards, [[s] for s in seqs[:64]])
            speed[f"{kind}_b64"] = texts_per_s(forwards, length_sorted_batches(seqs, 64))
    from service.bench.run import machine

    return {"machine": {**machine(), "threads": threads}, "fp32_max_logit_diff": diff, "texts_per_s": speed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/bbc-news-minilm-moe")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--texts", type=int, default=128)
    p.add_argument("--json")
    args = p.parse_args()
    r = run(Path(args.model), args.threads, args.texts)
    regimes = list(r["texts_per_s"])
    print("| graph | " + " | ".join(regimes) + " |\n|---|" + "---|" * len(regimes))
    for name in r["texts_per_s"][regimes[0]]:
        print(f"| {name} | " + " | ".join(str(r["texts_per_s"][k][name]) for k in regimes) + " |")
    print(f"fp32 logits, padded against the loop: max difference {r['fp32_max_logit_diff']:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1) + "\n")


if __name__ == "__main__":
    main()
