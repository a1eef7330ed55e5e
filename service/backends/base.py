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
    logits: np.ndarray  # [B, num_labels] float32, the model's own: the engine applies info.temperature, not the backend
    expert_counts: np.ndarray  # [moe_layers, num_experts] (token, slot) assignments in this batch, for statistics
    routing: list[LayerRouting] | None = None  # per MoE layer; only when asked for


class Backend(ABC):
    """Loads one model folder onto one device and runs packed batches of token ids."""

    info: ModelInfo
    tokenizer: TextTokenizer
    device: str
    kind: str  # "torch", "onnx", ...

    @abstractmethod
    def forward(self, sequences: list[list[int]], return_routing: bool = False) -> BatchOutput:
        """Token id lists (no padding, each at most info.max_length long) -> logits and routing."""

    def warmup(self) -> None:
        """Run a few batches so the first real request does not pay for lazy initialisation."""
        for n, length in ((1, 8), (4, 32), (16, min(128, self.info.max_length))):
            self.forward([[1] * length] * n)
