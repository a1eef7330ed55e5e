"""The architecture of a model folder (config.json "architecture"). No torch here: the API and the ONNX backend
read it without importing torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


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

    def __post_init__(self) -> None:
        if self.norm not in ("pre", "post"):
            raise ValueError(f"norm must be 'pre' or 'post', got {self.norm!r}")

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
