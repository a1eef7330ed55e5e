"""The dense yardstick: the MoE's own dense base served the fastest way a user could without this project.

The base encoder (e.g. all-MiniLM-L6-v2) with masked mean pooling and a linear head of the model's labels, run by
HF `transformers`, exported to ONNX, fused by ONNX Runtime's transformer optimizer (Attention, SkipLayerNorm,
BiasGelu, EmbedLayerNorm) and, for int8, dynamically quantised after fusion (QAttention, int8 MatMuls). This is the
graph a user replacing a dense MiniLM with the MoE would otherwise deploy; the bench times it on the same texts as
the MoE. The same export also goes through OpenVINO with static int8 (service/bench/dense_openvino.py), the fastest
dense runtime measured on the project's machine. Its head is untrained (seeded): it is a timing yardstick, and the
dense accuracy figures come from `make compare-models`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from service.modeling.bert import resolve_base
from service.modeling.tokenizer import pad_ids

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Yardstick:
    """One dense yardstick: its bench row (model, backend, precision) and its file in the build folder."""

    model: str
    backend: str
    precision: str
    file: str

    @property
    def name(self) -> str:
        """The row's and its server's name, e.g. "dense-ov int8"."""
        return f"{self.model} {self.precision}"


YARDSTICKS = (
    Yardstick("dense-ort", "onnx", "fp32", "dense.fp32.onnx"),
    Yardstick("dense-ort", "onnx", "int8", "dense.int8.onnx"),
    Yardstick("dense-ov", "openvino", "int8", "dense.ov-int8.xml"),
)
BY_NAME = {y.name: y for y in YARDSTICKS}


class _MeanPooledClassifier(nn.Module):
    def __init__(self, encoder: nn.Module, hidden: int, num_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp(min=1.0))


def _export(base: Path, num_labels: int, path: Path) -> tuple[int, int]:
    """The base + pooling + head as an ONNX graph with dynamic batch and sequence axes; (heads, hidden)."""
    from transformers import BertModel

    encoder = BertModel.from_pretrained(str(base), add_pooling_layer=False, attn_implementation="eager").eval()
    torch.manual_seed(0)
    model = _MeanPooledClassifier(encoder, encoder.config.hidden_size, num_labels).eval()
    ids = torch.ones(2, 12, dtype=torch.long)
    mask = torch.ones(2, 12, dtype=torch.long)
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}, "logits": {0: "batch"}}
    with torch.no_grad():
        torch.onnx.export(
            model,
            (ids, mask),
            str(path),
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_axes=axes,
            opset_version=17,
            do_constant_folding=True,
            dynamo=False,
        )
    return encoder.config.num_attention_heads, encoder.config.hidden_size


def build(
    base: str | Path, num_labels: int, out_dir: Path, calibration: list[list[int]] | None = None, pad_id: int = 0
) -> dict[str, Path]:
    """Yardstick name -> its graph, written into out_dir: the ORT graphs (fp32 fused, then int8 quantised after
    fusion) and, given calibration token ids, the OpenVINO static int8 IR of the same raw export."""
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / "dense.raw.onnx"
    heads, hidden = _export(resolve_base(base), num_labels, raw)
    graphs = _ort_graphs(raw, heads, hidden, out_dir)
    if calibration and openvino_installed():
        from service.bench.dense_openvino import quantize_int8

        ov_int8 = BY_NAME["dense-ov int8"]
        graphs[ov_int8.name] = quantize_int8(raw, calibration, pad_id, out_dir / ov_int8.file)
    raw.unlink(missing_ok=True)
    return graphs


def openvino_installed() -> bool:
    """openvino and nncf come with the `openvino` extra: without them the bench has no dense-ov row, and says so."""
    import importlib.util

    if all(importlib.util.find_spec(m) for m in ("openvino", "nncf")):
        return True
    log.warning("no dense-ov yardstick: openvino and nncf are not installed (pip install 'moe-serve[openvino]')")
    return False


def _ort_graphs(raw: Path, heads: int, hidden: int, out_dir: Path) -> dict[str, Path]:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    fused = optimize_model(str(raw), model_type="bert", num_heads=heads, hidden_size=hidden)
    log.info("dense yardstick fusions: %s", fused.get_fused_operator_statistics())
    fp32, int8 = BY_NAME["dense-ort fp32"], BY_NAME["dense-ort int8"]
    graphs = {fp32.name: out_dir / fp32.file, int8.name: out_dir / int8.file}
    fused.save_model_to_file(str(graphs[fp32.name]))
    # Fused contrib ops carry no inferred output types: tell the quantiser they are fp32.
    quantize_dynamic(
        str(graphs[fp32.name]),
        str(graphs[int8.name]),
        weight_type=QuantType.QInt8,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    return graphs


def built(out_dir: Path) -> dict[str, Path]:
    """The yardstick graphs `build` wrote into out_dir, by name."""
    return {y.name: out_dir / y.file for y in YARDSTICKS if (out_dir / y.file).is_file()}


def load_graph(graph: Path, pad_id: int = 0, threads: int | None = None) -> Any:
    """The runner of a yardstick file (forward(sequences) -> logits): OpenVINO for IR (.xml), ORT for .onnx."""
    if Path(graph).suffix == ".xml":
        from service.bench.dense_openvino import OpenVINOGraph

        return OpenVINOGraph(graph, pad_id, threads)
    return DenseGraph(graph, pad_id, threads)


class DenseGraph:
    """One yardstick graph behind the backends' forward(sequences) call, so the bench times it the same way."""

    def __init__(self, graph: Path, pad_id: int = 0, threads: int | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
        self.pad_id = pad_id

    def forward(self, sequences: list[list[int]], return_routing: bool = False) -> np.ndarray:
        ids, mask = pad_ids(sequences, self.pad_id)
        return self.session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
