"""`moe-serve export`: a model folder -> model.onnx (fp32) and optionally model.int8.onnx, beside its weights.

The graph takes padded `input_ids` and `attention_mask` [batch, seq] (both axes dynamic) and returns the logits
[batch, labels] and, per MoE layer, the routing of the packed real tokens: `expert_ids_<i>` [tokens, k] and
`gates_<i>` [tokens, k], so a served ONNX model reports routing like the torch one.

Sparse routing stays in the graph: every MoE layer is exported through `MoEFeedForward.graph_forward`, a static
loop over the E experts whose (token, slot) pairs are found by NonZero at run time. (Tracing the eager grouped path
would freeze the example's routing, since its group sizes are Python ints.) The exported graph is then optimised
offline by onnxruntime (constant folding, LayerNorm / GELU / MatMul+Add fusions) and, for int8, dynamically
quantised: weights of every MatMul/Gemm stored as int8, activations quantised per batch at run time.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import nn

from service.modeling.artifacts import load_model
from service.modeling.classifier import MoEClassifier, pad_batch
from service.modeling.layout import ONNX_FILE, ONNX_INT8_FILE

log = logging.getLogger(__name__)
OPSET = 17


class _GraphModel(nn.Module):
    """The classifier with graph-friendly MoE dispatch and a flat tuple of outputs."""

    def __init__(self, model: MoEClassifier) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).eval().float()
        for layer in self.model.moe_layers:
            layer.graph_dispatch = True
        for block in self.model.blocks:
            if block.attn is not None:
                block.attn.explicit = True

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h, packed, routing = self.model.encode(input_ids, attention_mask)
        # Mean pooling through the padded view (padding rows are zero) rather than index_add over sequence ids:
        # the exported scatter would keep one of several updates to the same row instead of adding them.
        pooled = packed.unpack(h).sum(1) / packed.lengths.clamp(min=1).to(h.dtype)[:, None]
        logits = self.model.head(pooled)
        return (logits, *[t for r in routing for t in (r.expert_ids, r.gates)])


def output_names(moe_layers: int) -> list[str]:
    return ["logits", *[f"{n}_{i}" for i in range(moe_layers) for n in ("expert_ids", "gates")]]


def _example(model: MoEClassifier) -> tuple[torch.Tensor, torch.Tensor]:
    """Two texts of different lengths, so padding and packing are part of what is traced."""
    n = min(model.config.max_length, 12)
    return pad_batch([list(range(3, 3 + n)), list(range(5, 5 + max(n // 2, 1)))], model.config.pad_token_id)


def export_graph(model: MoEClassifier, path: Path) -> Path:
    graph = _GraphModel(model)
    names = output_names(len(model.moe_layers))
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}, "logits": {0: "batch"}}
    axes |= {n: {0: "tokens"} for n in names[1:]}
    with torch.no_grad():
        torch.onnx.export(
            graph,
            _example(model),
            str(path),
            input_names=["input_ids", "attention_mask"],
            output_names=names,
            dynamic_axes=axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,  # the TorchScript exporter: NonZero-driven, data-dependent shapes trace cleanly
        )
    return path


def optimise(src: Path, dst: Path) -> Path:
    """onnxruntime's offline graph optimisation (basic + extended fusions), saved as a plain ONNX file."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    return dst


def quantise_int8(src: Path, dst: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    return dst


def export_model(model_dir: str | Path, int8: bool = False) -> list[Path]:
    """Write model.onnx (and model.int8.onnx) into the model folder; returns the files written."""
    folder = Path(model_dir)
    bundle = load_model(folder)
    raw = folder / "model.raw.onnx"
    try:
        export_graph(bundle.model, raw)
        written = [optimise(raw, folder / ONNX_FILE)]
        if int8:
            # Quantise the exported graph, not the optimised one: fused CPU-only ops are not quantisable.
            written.append(optimise(quantise_int8(raw, folder / "model.int8.raw.onnx"), folder / ONNX_INT8_FILE))
    finally:
        for tmp in (raw, folder / "model.int8.raw.onnx"):
            tmp.unlink(missing_ok=True)
    for p in written:
        p.chmod(0o644)
        log.info("wrote %s (%.1f MB)", p, p.stat().st_size / 1e6)
    return written
