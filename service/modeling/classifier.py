"""MoE encoder classifier: embeddings -> blocks (attention + MoE feed-forward) -> masked mean pooling -> head.

Hidden states are kept *packed* ([T, d], padding removed) between layers. Only self-attention needs the padded
[B, L, d] view (with a key-padding mask); everything else (MoE layers, norms, pooling) runs on real tokens only,
so a batch of short and long texts spends no expert FLOPs on padding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from service.modeling.moe import (
    MoEFeedForward,
    RouterOutput,
    activation_fn,
    load_balancing_loss,
    router_z_loss,
)


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

    def attention_layers(self) -> list[bool]:
        if isinstance(self.attention, bool):
            return [self.attention] * self.n_layers
        if len(self.attention) != self.n_layers:
            raise ValueError(f"attention has {len(self.attention)} entries for {self.n_layers} layers")
        return list(self.attention)

    def moe_layers(self) -> list[bool]:
        # With moe_every=2 the *last* block of each pair is MoE (blocks 1, 3, ...), as in GShard/Switch.
        return [(i + 1) % self.moe_every == 0 for i in range(self.n_layers)]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class PackedBatch:
    """Indices that move between the padded [B, L] layout and the packed [T] layout."""

    flat_index: torch.Tensor  # [T] positions of real tokens in the flattened [B*L] grid
    seq_ids: torch.Tensor  # [T] which sequence each packed token belongs to
    lengths: torch.Tensor  # [B]
    batch: int
    seq_len: int

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor) -> PackedBatch:
        b, length = attention_mask.shape
        flat = attention_mask.reshape(-1).bool()
        flat_index = flat.nonzero().squeeze(1)
        return cls(flat_index, flat_index // length, attention_mask.sum(1), b, length)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(self.batch * self.seq_len, -1).index_select(0, self.flat_index)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        out = packed.new_zeros(self.batch * self.seq_len, packed.shape[-1])
        return out.index_copy(0, self.flat_index, packed).view(self.batch, self.seq_len, -1)


@dataclass
class ClassifierOutput:
    logits: torch.Tensor  # [B, num_labels]
    aux_loss: torch.Tensor  # summed load-balancing loss over MoE layers
    z_loss: torch.Tensor  # summed router z-loss over MoE layers
    routing: list[RouterOutput] = field(default_factory=list)  # one per MoE layer, over the packed tokens
    packed: PackedBatch | None = None


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        # Boolean mask [B, 1, 1, L]: padded keys get no weight, so padding never changes a real token's output.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=key_mask[:, None, None, :], dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(y.transpose(1, 2).reshape(b, length, d))


class DenseFeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, activation: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.act = activation_fn(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block. Input and output are packed tokens [T, d]."""

    def __init__(self, cfg: ModelConfig, attention: bool, moe: bool) -> None:
        super().__init__()
        self.attn = SelfAttention(cfg.d_model, cfg.n_heads, cfg.dropout) if attention else None
        self.norm1 = nn.LayerNorm(cfg.d_model) if attention else None
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.is_moe = moe
        self.ffn: nn.Module
        if moe:
            self.ffn = MoEFeedForward(cfg.d_model, cfg.d_ff, cfg.num_experts, cfg.top_k, cfg.activation)
        else:
            self.ffn = DenseFeedForward(cfg.d_model, cfg.d_ff, cfg.activation)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self, h: torch.Tensor, packed: PackedBatch, key_mask: torch.Tensor, per_sequence: bool = False
    ) -> tuple[torch.Tensor, RouterOutput | None]:
        if self.attn is not None:
            a = self.attn(packed.unpack(self.norm1(h)), key_mask)
            h = h + self.drop(packed.pack(a))
        if self.is_moe and per_sequence:
            return h + self._moe_per_sequence(self.norm2(h), packed), None
        if self.is_moe:
            y, r = self.ffn(self.norm2(h))
            return h + self.drop(y), r
        return h + self.drop(self.ffn(self.norm2(h))), None

    def _moe_per_sequence(self, x: torch.Tensor, packed: PackedBatch) -> torch.Tensor:
        """Baseline for benchmarks only: the padded [B, L] layout with the experts run once per sequence, as a
        server without expert grouping would. Same maths for real tokens; padding rows are computed and dropped."""
        padded = packed.unpack(x)
        out = torch.stack([self.ffn(padded[b])[0] for b in range(padded.shape[0])])
        return packed.pack(out)


class MoEClassifier(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_length, cfg.d_model)
        self.emb_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(cfg, a, m) for a, m in zip(cfg.attention_layers(), cfg.moe_layers(), strict=True)
        )
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.num_labels)
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)

    @property
    def moe_layers(self) -> list[MoEFeedForward]:
        return [b.ffn for b in self.blocks if b.is_moe]  # type: ignore[misc]

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, per_sequence_experts: bool = False
    ) -> ClassifierOutput:
        """input_ids, attention_mask: [B, L]; every row must have at least one real token.

        per_sequence_experts switches the MoE layers to the padded, one-sequence-at-a-time baseline (benchmarks);
        no routing is reported then."""
        if input_ids.shape[1] > self.config.max_length:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds max_length {self.config.max_length}")
        packed = PackedBatch.from_mask(attention_mask)
        key_mask = attention_mask.bool()
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        h = packed.pack(self.tok_emb(input_ids) + self.pos_emb(positions))
        h = self.emb_drop(h)
        routing: list[RouterOutput] = []
        for block in self.blocks:
            h, r = block(h, packed, key_mask, per_sequence_experts)
            if r is not None:
                routing.append(r)
        h = self.norm(h)
        # Masked mean pooling as a segment sum over packed tokens.
        pooled = h.new_zeros(packed.batch, h.shape[-1]).index_add_(0, packed.seq_ids, h)
        pooled = pooled / packed.lengths.clamp(min=1).to(h.dtype)[:, None]
        logits = self.head(pooled)
        zero = logits.new_zeros(())
        aux = sum((load_balancing_loss(r, self.config.num_experts) for r in routing), zero)
        z = sum((router_z_loss(r) for r in routing), zero)
        return ClassifierOutput(logits=logits, aux_loss=aux, z_loss=z, routing=routing, packed=packed)


def pad_batch(sequences: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists to the longest one: (input_ids, attention_mask), both int64 [B, L]."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask
