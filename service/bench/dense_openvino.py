"""The dense yardstick through OpenVINO: the same raw HF export as the ONNX Runtime yardstick, quantised to static
int8 by NNCF post-training quantization (int8 weights and activations, so the GEMMs run int8 x int8 on VNNI),
calibrated on padded batches of validation texts, and run by OpenVINO's CPU plugin in bf16 elsewhere where the CPU
has it. The issue that asked for it measured this the fastest dense runtime on the project's machine.

Bench only: the service never imports openvino (the `openvino` extra: `pip install moe-serve[openvino]`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.modeling.tokenizer import pad_ids

CALIBRATION_BATCH = 8  # texts per calibration item: padded as a served batch is, so padding is in the statistics


def quantize_int8(
    raw: Path, calibration: list[list[int]], pad_id: int, out: Path, keep_float: tuple[str, ...] = ()
) -> Path:
    """The raw export quantised with NNCF (one pass over every calibration batch), saved as IR at out (.xml/.bin).
    keep_float: node-name patterns NNCF leaves unquantised (scripts/static_int8.py keeps the MoE's routers fp32)."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(raw))
    items = []
    for i in range(0, len(calibration), CALIBRATION_BATCH):
        ids, mask = pad_ids(calibration[i : i + CALIBRATION_BATCH], pad_id)
        items.append({"input_ids": ids, "attention_mask": mask})
    quantized = nncf.quantize(
        model,
        nncf.Dataset(items),
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(items),
        # validate: a pattern that matches no node fails here rather than quantising what it meant to keep
        ignored_scope=nncf.IgnoredScope(patterns=list(keep_float), validate=bool(keep_float)),
    )
    # Float constants kept fp32 in the file: the runtime's precision hint alone decides what runs in bf16.
    ov.save_model(quantized, str(out), compress_to_fp16=False)
    return out


class OpenVINOGraph:
    """An OpenVINO model (IR or ONNX file) behind the backends' forward(sequences) call, as DenseGraph is for ORT.

    bf16=None follows the CPU: bf16 where OpenVINO reports it (AVX512_BF16 or AMX), f32 elsewhere; tests pass
    False to compare an unquantised graph with the fp32 reference."""

    def __init__(
        self, graph: Path, pad_id: int = 0, threads: int | None = None, bf16: bool | None = None, profile: bool = False
    ) -> None:
        import openvino as ov

        core = ov.Core()
        if bf16 is None:
            bf16 = "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        config: dict[str, str | int] = {"INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32"}
        config["PERFORMANCE_HINT"] = "LATENCY"  # one request at a time, every thread on it (as the bench calls)
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        if profile:
            config["PERF_COUNT"] = True  # per-node times for op_times()
        self.request = core.compile_model(core.read_model(str(graph)), "CPU", config).create_infer_request()
        self.pad_id = pad_id

    def forward(self, sequences: list[list[int]], return_routing: bool = False) -> np.ndarray:
        ids, mask = pad_ids(sequences, self.pad_id)
        self.request.infer({"input_ids": ids, "attention_mask": mask})
        return self.request.get_output_tensor(0).data.copy()  # the request reuses its output buffer

    def op_times(self) -> dict[tuple[str, str], tuple[int, float]]:
        """After a forward (compiled with profile=True): (op, kernel) -> (nodes run, ms), OpenVINO's own counters."""
        out: dict[tuple[str, str], tuple[int, float]] = {}
        for p in self.request.get_profiling_info():
            if p.status == p.Status.EXECUTED:
                n, ms = out.get((p.node_type, p.exec_type), (0, 0.0))
                out[(p.node_type, p.exec_type)] = (n + 1, ms + p.real_time.total_seconds() * 1e3)
        return out
