"""ONNX Runtime backend: the exported graph (model.onnx or model.int8.onnx) on CPU, no torch imported.

The graph reads padded ids and mask and returns logits plus, per MoE layer, the packed tokens' experts and gates
(service/modeling/onnx_export.py), so routing statistics and `return_routing` work as with the torch backend. A
multi-task folder's graph also reads the batch's (text, task) rows and returns a row's logits per (text, task).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.backends.base import Backend, BatchOutput, LayerRouting, check_tasks, expert_counts, model_info, task_rows
from service.backends.variants import graphs
from service.modeling.folder import ModelFolder, ModelFolderError, read_folder
from service.modeling.layout import TOKENIZER_FILE
from service.modeling.tokenizer import TextTokenizer, pad_ids

GRAPHS = graphs("onnx")  # precision -> graph file, from the variant table
FORCE_SPINNING_STOP = "session.force_spinning_stop"  # ORT session config key


class OnnxBackend(Backend):
    kind = "onnx"

    def __init__(
        self, model_dir: str | Path | ModelFolder, precision: str = "fp32", threads: int | None = None
    ) -> None:
        import onnxruntime as ort

        if precision not in GRAPHS:
            raise ValueError(f"the onnx backend runs {', '.join(GRAPHS)}, not {precision!r}")
        folder = read_folder(model_dir)
        graph = folder.file(GRAPHS[precision])  # a missing graph says: run `moe-serve export` first
        self.device, self.precision = "cpu", precision
        self.tokenizer = TextTokenizer.from_file(folder.path / TOKENIZER_FILE)
        self.pad_id = self.tokenizer.pad_id
        self.info = model_info(folder, precision)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        # ORT's pool threads spin after a run by default; in the model process that takes the cores the API process
        # needs (MiniLM, 2 cores: headlines p50 5.2 -> 3.2 ms at 1 connection, 1168 -> 1541 req/s at 64; idle
        # 0.9 -> 0.06 of a core). Spinning within a run stays on. The cost: a lone request after a pause wakes the
        # threads (README, "Served: threads that spin").
        opts.add_session_config_entry(FORCE_SPINNING_STOP, "1")
        self.session = ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
        outputs = [o.name for o in self.session.get_outputs()]
        if len(outputs) != 1 + 2 * self.info.moe_layers:
            raise ModelFolderError(f"{graph}: {len(outputs)} outputs, expected logits + 2 per MoE layer")
        inputs = [i.name for i in self.session.get_inputs()]
        if ("row_task" in inputs) != bool(self.info.tasks):  # a graph exported before the folder became multi-task
            raise ModelFolderError(f"{graph}: inputs {inputs} do not fit this folder's tasks: run `moe-serve export`")

    def forward(
        self, sequences: list[list[int]], return_routing: bool = False, tasks: list[list[int]] | None = None
    ) -> BatchOutput:
        check_tasks(tasks, len(sequences), list(self.info.tasks))
        ids, mask = pad_ids(sequences, self.pad_id)
        feed = {"input_ids": ids, "attention_mask": mask}
        token_task = None
        if tasks is not None:
            row_text, row_task = (np.array(r, dtype=np.int64) for r in task_rows(tasks))
            feed |= {"row_text": row_text, "row_task": row_task}
            token_task = np.repeat(row_task, mask.sum(1)[row_text])  # each row token's task, rows in order
        logits, *routes = self.session.run(None, feed)
        experts, gates = routes[0::2], routes[1::2]
        counts, by_task = expert_counts(experts, self.info.num_experts, token_task, len(self.info.tasks))
        routing = None
        if return_routing:
            routing = [LayerRouting(x, g.astype(np.float32, copy=False)) for x, g in zip(experts, gates, strict=True)]
        return BatchOutput(logits.astype(np.float32, copy=False), counts, routing, by_task)
