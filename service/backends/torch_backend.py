"""PyTorch backend: the MoE classifier with packed tokens and expert-grouped dispatch, on CPU or CUDA."""

from __future__ import annotations

from pathlib import Path

import torch

from service.backends.base import Backend, BatchOutput, LayerRouting, check_tasks, expert_counts, model_info, task_rows
from service.modeling.artifacts import load_model
from service.modeling.classifier import MoEClassifier, pad_batch
from service.modeling.folder import ModelFolder


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available")
    return device


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Batches up to this many tokens run on one CPU thread. Measured on the dev machine (2 cores, bbc-news-moe): a lone
# short text takes 0.8 ms on 1 or 2 warm threads, but 7.9 ms on 2 threads after 20 ms idle (the sleeping OpenMP
# worker must be woken) against 1.5 ms on 1; at 64 tokens 1 thread is within 11% of 2.
SINGLE_THREAD_TOKENS = 64
# Batches of up to this many tokens run each MoE layer as one masked dense GEMM pair (MoEFeedForward.masked_forward).
# Measured per layer on the dev machine (AMD EPYC, 2 cores; d 384, 8 experts of 192, top-2; threads as above),
# masked / grouped time: bf16 0.40-0.86 from 8 to 192 tokens, 1.00 at 256, 1.24 at 384 (oneDNN's bf16 calls are
# dear, so fewer calls win); fp32 0.96 at 8 tokens but 1.30 at 22 and 1.6-3.2 above (its small GEMMs are cheap,
# so the E/k times the FLOPs lose): off.
MASKED_DENSE_TOKENS = {"fp32": 0, "bf16": 192}


class TorchBackend(Backend):
    kind = "torch"

    def __init__(self, model_dir: str | Path | ModelFolder, device: str = "auto", precision: str = "fp32") -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"the torch backend runs {', '.join(PRECISIONS)}, not {precision!r}")
        self.device = resolve_device(device)
        bundle = load_model(model_dir, self.device)
        # bf16 runs every weight and activation in bfloat16 (AVX512_BF16 / AMX on CPU, tensor cores on GPU); routing
        # softmax and pooling sums stay fp32 inside the model.
        self.model = bundle.model.to(PRECISIONS[precision])
        if self.device == "cpu" and precision == "bf16":
            # bf16 GEMMs are compiled per shape by oneDNN; measured: random served batches 296 -> 634 texts/s on
            # bbc-news-minilm-moe. fp32 gains nothing (its kernels are not compiled per shape) and pays the padding.
            self.model.use_row_buckets()
        if self.device == "cpu":
            self.model.use_masked_dense(MASKED_DENSE_TOKENS[precision])
        self.tokenizer = bundle.tokenizer
        self.pad_id = bundle.tokenizer.pad_id
        self.info = model_info(bundle.folder, precision)
        self.threads = torch.get_num_threads()

    def _use_threads(self, tokens: int) -> None:
        """One thread for small batches on CPU (see SINGLE_THREAD_TOKENS), all of them otherwise."""
        want = 1 if tokens <= SINGLE_THREAD_TOKENS and self.device == "cpu" else self.threads
        if torch.get_num_threads() != want:
            torch.set_num_threads(want)

    def forward(
        self, sequences: list[list[int]], return_routing: bool = False, tasks: list[list[int]] | None = None
    ) -> BatchOutput:
        self._use_threads(sum(map(len, sequences)))
        return run_model(self.model, sequences, self.pad_id, self.device, return_routing, tasks)


@torch.inference_mode()
def run_model(
    model: MoEClassifier,
    sequences: list[list[int]],
    pad_id: int,
    device: str | torch.device,
    return_routing: bool,
    tasks: list[list[int]] | None = None,
) -> BatchOutput:
    """One batch of token id lists through a torch model, answered as every backend answers (numpy, no tensors):
    the torch backend and the offline predictions (training, evaluation) run a model through here."""
    check_tasks(tasks, len(sequences), model.config.task_names)
    ids, mask = (t.to(device, non_blocking=True) for t in pad_batch(sequences, pad_id))
    if tasks is None:
        out = model(ids, mask)
    else:
        row_text, row_task = (torch.tensor(r, dtype=torch.long, device=device) for r in task_rows(tasks))
        out = model.forward_rows(ids, mask, row_text, row_task)
    routing = None
    if return_routing:
        routing = [LayerRouting(r.expert_ids.cpu().numpy(), r.gates.float().cpu().numpy()) for r in out.routing]
    expert_ids = [r.expert_ids.cpu().numpy() for r in out.routing]
    token_task = None if out.token_task is None else out.token_task.cpu().numpy()
    counts, by_task = expert_counts(expert_ids, model.config.num_experts, token_task, len(model.config.task_names))
    return BatchOutput(out.logits.float().cpu().numpy(), counts, routing, by_task)


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
