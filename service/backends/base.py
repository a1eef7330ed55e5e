"""The interface every inference backend implements. The engine and the API see numpy arrays, never tensors."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.modeling.config import ModelConfig
from service.modeling.folder import ModelFolder
from service.modeling.tokenizer import TextTokenizer


@dataclass
class ModelInfo:
    """The engine's, API's and IPC's view of a loaded model: derived from its folder record by `model_info` (flat,
    so it crosses the model-process boundary as a plain dict), plus what the backend computes in."""

    name: str
    path: Path
    labels: list[str]
    max_length: int
    num_experts: int
    top_k: int
    num_layers: int
    moe_layers: int
    architecture: dict[str, Any]  # architecture_card(): what /v1/models shows
    training: dict[str, Any] = field(default_factory=dict)
    temperature: float = 1.0  # the engine divides every logit by it (config.json "temperature"; 1.0 = none)
    precision: str = "fp32"  # what the backend computes in: fp32 | bf16 | int8
    # Multi-task folders: task name -> its labels and temperature, in task-id order (labels above is then empty and
    # temperature 1.0). Single-task folders: empty.
    tasks: dict[str, TaskLabels] = field(default_factory=dict)
    # Token budget per batch: from load_backend, the folder's measured one where it holds (config.json
    # serving.max_batch_tokens: its chosen variant, on the CPU) or None; the engine then sets the one in effect.
    batch_tokens: int | None = None


@dataclass
class TaskLabels:
    labels: list[str]
    temperature: float = 1.0


def model_info(folder: ModelFolder, precision: str = "fp32") -> ModelInfo:
    """What the engine and the API know of a model, from its folder record: the same for every backend."""
    cfg = folder.config
    return ModelInfo(
        name=folder.name,
        path=folder.path,
        labels=list(folder.labels),
        max_length=cfg.max_length,
        num_experts=cfg.num_experts,
        top_k=cfg.top_k,
        num_layers=cfg.n_layers,
        moe_layers=sum(cfg.moe_layers()),
        architecture=architecture_card(cfg),
        training=folder.training,
        temperature=folder.temperature,
        precision=precision,
        tasks={t.name: TaskLabels(list(t.labels), t.temperature) for t in folder.tasks},
    )


def architecture_card(cfg: ModelConfig) -> dict[str, Any]:
    """The architecture as /v1/models shows it, read from the typed config."""
    return {
        "experts": cfg.num_experts,
        "top_k": cfg.top_k,
        "layers": cfg.n_layers,
        "moe_layers": sum(cfg.moe_layers()),
        "d_model": cfg.d_model,
        "d_ff": cfg.d_ff,
        "expert_d_ff": cfg.expert_d_ff or cfg.d_ff,
        # weighted: a token's expert outputs are fused by its gates; sum: added (experts sliced from one FFN)
        "combine": cfg.combine,
        "norm": cfg.norm,
        "n_heads": cfg.n_heads,
        "attention": cfg.attention,
        "moe_every": cfg.moe_every,
        "vocab_size": cfg.vocab_size,
    }


@dataclass
class LayerRouting:
    expert_ids: np.ndarray  # [T, k] int, over the packed tokens of the batch (text after text, in batch order)
    gates: np.ndarray  # [T, k] float


@dataclass
class BatchOutput:
    """With tasks, a "row" is a (text, task) pair: text after text, each text's tasks in the order asked; without,
    a row is a text."""

    logits: np.ndarray  # [rows, num_labels] float32, the model's own: the engine applies the temperature
    expert_counts: np.ndarray  # [moe_layers, num_experts] (token, slot) assignments over the rows' tokens
    routing: list[LayerRouting] | None = None  # per MoE layer, over the rows' packed tokens; only when asked for
    # Multi-task: [tasks, moe_layers, num_experts], expert_counts split by the task of each row
    task_expert_counts: np.ndarray | None = None


class Backend(ABC):
    """Loads one model folder onto one device and runs packed batches of token ids."""

    info: ModelInfo
    tokenizer: TextTokenizer
    device: str
    kind: str  # "torch", "onnx", ...

    @abstractmethod
    def forward(
        self, sequences: list[list[int]], return_routing: bool = False, tasks: list[list[int]] | None = None
    ) -> BatchOutput:
        """Token id lists (no padding, each at most info.max_length long) -> logits and routing. tasks: for a
        multi-task folder (required there, refused elsewhere), each text's task ids, distinct and not empty."""

    def warmup(self) -> None:
        """Run a few batches so the first real request does not pay for lazy initialisation."""
        every = [list(range(len(self.info.tasks)))] if self.info.tasks else None
        for n, length in ((1, 8), (4, 32), (16, min(128, self.info.max_length))):
            self.forward([[1] * length] * n, tasks=every * n if every else None)


def check_tasks(tasks: list[list[int]] | None, texts: int, task_names: list[str]) -> None:
    """A multi-task folder needs each text's task ids (distinct, known, at least one); a single-task one none."""
    if not task_names:
        if tasks is not None:
            raise ValueError("tasks given to a single-task model")
        return
    if tasks is None or len(tasks) != texts:
        raise ValueError(f"a multi-task model needs the task ids of each of the {texts} texts")
    for ts in tasks:
        if not ts or len(set(ts)) != len(ts) or not all(0 <= t < len(task_names) for t in ts):
            raise ValueError(f"each text's task ids must be distinct, in [0, {len(task_names)}), not {ts!r}")


def task_rows(tasks: list[list[int]]) -> tuple[list[int], list[int]]:
    """The (text, task) rows of a batch, text after text: each row's text index and task id."""
    return [i for i, ts in enumerate(tasks) for _ in ts], [t for ts in tasks for t in ts]


def expert_counts(
    expert_ids: list[np.ndarray], num_experts: int, token_task: np.ndarray | None, num_tasks: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """(token, slot) assignments per MoE layer and expert, and with token tasks the same split by task."""
    counts = np.stack([np.bincount(e.reshape(-1), minlength=num_experts) for e in expert_ids]).astype(np.int64)
    if token_task is None:
        return counts, None
    k = expert_ids[0].shape[1] if expert_ids else 1
    slot_task = np.repeat(token_task, k)
    by_task = np.stack(
        [np.bincount(slot_task * num_experts + e.reshape(-1), minlength=num_tasks * num_experts) for e in expert_ids]
    )
    return counts, by_task.reshape(len(expert_ids), num_tasks, num_experts).transpose(1, 0, 2).astype(np.int64)
