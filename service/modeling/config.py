"""The architecture of a model folder (config.json "architecture"). No torch here: the API and the ONNX backend
read it without importing torch."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields

TASK_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")


@dataclass
class ModelConfig:
    vocab_size: int
    num_labels: int
    max_length: int = 256
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 256
    num_experts: int = 8
    top_k: int = 2
    moe_every: int = 1  # 1: every block is MoE; 2: every other block (the others get a dense FFN)
    attention: bool | list[bool] = True  # per block, or one value for all
    activation: str = "gelu"
    dropout: float = 0.1
    pad_token_id: int = 0
    # BERT-family options; the defaults are the from-scratch architecture.
    norm: str = "pre"  # "pre": LayerNorm before each sublayer + a final one; "post": after each residual (BERT)
    embedding_norm: bool = False  # LayerNorm over the summed embeddings (BERT)
    type_vocab_size: int = 0  # >0: a token-type embedding; single texts use type 0 (BERT)
    layer_norm_eps: float = 1e-5
    expert_d_ff: int | None = None  # width of one expert (default d_ff); MoEfication slices d_ff into E experts
    combine: str = "weighted"  # how a token's k expert outputs are fused: "weighted" by gates, or "sum" (MoEfication)
    # Multi-task: task name -> its number of labels, in task-id order; None: one task (num_labels, one head). With
    # tasks, num_labels is the widest task's, the width of the padded logits.
    tasks: dict[str, int] | None = None
    # How many of the top MoE layers route each task by its own router (None: all); the MoE layers below share one
    # router, so every task's tokens are routed there alike.
    task_routed_layers: int | None = None

    def __post_init__(self) -> None:
        if self.norm not in ("pre", "post"):
            raise ValueError(f"norm must be 'pre' or 'post', got {self.norm!r}")
        if self.tasks is not None:
            if not self.tasks or any(n < 1 for n in self.tasks.values()):
                raise ValueError(f"tasks must name at least one task, each with labels, got {self.tasks!r}")
            bad = [t for t in self.tasks if not TASK_NAME.fullmatch(t)]
            if bad:
                raise ValueError(f"task names are letters, digits, _ and - (they name tensors and outputs): {bad}")
            if self.num_labels != max(self.tasks.values()):
                raise ValueError(f"num_labels must be the widest task's ({max(self.tasks.values())}) with tasks")
        if self.task_routed_layers is not None and self.task_routed_layers < 0:
            raise ValueError(f"task_routed_layers must be >= 0, got {self.task_routed_layers}")

    @property
    def task_names(self) -> list[str]:
        """The tasks in task-id order; a single-task model has none."""
        return list(self.tasks or {})

    def task_routed(self) -> list[bool]:
        """Per block: whether its MoE layer has one router per task (only MoE blocks of a multi-task model)."""
        moe = self.moe_layers()
        if len(self.tasks or {}) < 2:
            return [False] * self.n_layers
        top = sum(moe) if self.task_routed_layers is None else self.task_routed_layers
        seen, out = 0, []
        for is_moe in reversed(moe):
            out.append(is_moe and seen < top)
            seen += is_moe
        return out[::-1]

    def attention_layers(self) -> list[bool]:
        if isinstance(self.attention, bool):
            return [self.attention] * self.n_layers
        if len(self.attention) != self.n_layers:
            raise ValueError(f"attention has {len(self.attention)} entries for {self.n_layers} layers")
        return list(self.attention)

    def moe_layers(self) -> list[bool]:
        # With moe_every=2 the *last* block of each pair is MoE (blocks 1, 3, ...), as in GShard/Switch; 0: none
        # (a dense encoder, e.g. a pretrained model before conversion).
        if self.moe_every == 0:
            return [False] * self.n_layers
        return [(i + 1) % self.moe_every == 0 for i in range(self.n_layers)]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
