"""MoE encoder classifier: embeddings -> blocks (attention + MoE feed-forward) -> masked mean pooling -> head.

Hidden states are kept *packed* ([T, d], padding removed) between layers. Only self-attention needs the padded
[B, L, d] view (with a key-padding mask); everything else (MoE layers, norms, pooling) runs on real tokens only,
so a batch of short and long texts spends no expert FLOPs on padding.

One class covers two families through ModelConfig: the from-scratch pre-norm encoder (the defaults), and the BERT
block (post-LayerNorm, embedding LayerNorm, token-type embedding, every block attending) that pretrained encoders
are converted from (service/modeling/bert.py, service/modeling/convert.py).

A multi-task model (ModelConfig.tasks) shares everything but its heads and, in its task-routed MoE layers, its
routers: each text carries a task id, its tokens are routed by that task's router and its pooled state goes to that
task's head. Its logits are padded to the widest task with -inf (a task's probabilities are softmax over its first
C_t columns; the padding takes none).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from service.modeling.config import ModelConfig
from service.modeling.moe import (
    MoEFeedForward,
    RouterOutput,
    activation_fn,
    load_balancing_loss,
    router_z_loss,
)
from service.modeling.row_buckets import rows_bucketed
from service.modeling.tokenizer import pad_ids


@dataclass
class PackedBatch:
    """Indices that move between the padded [B, L] layout and the packed [T] layout."""

    flat_index: torch.Tensor  # [T] positions of real tokens in the flattened [B*L] grid
    seq_ids: torch.Tensor  # [T] which sequence each packed token belongs to
    lengths: torch.Tensor  # [B]
    batch: int
    seq_len: int
    # [B*L] for each grid position, its packed row, or T (a zero row appended when unpacking) for padding
    unpack_index: torch.Tensor

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor) -> PackedBatch:
        b, length = attention_mask.shape
        flat = attention_mask.reshape(-1).bool()
        flat_index = flat.nonzero().squeeze(1)
        unpack_index = torch.where(flat, flat.long().cumsum(0) - 1, flat.long().sum())
        return cls(flat_index, flat_index // length, attention_mask.sum(1), b, length, unpack_index)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(self.batch * self.seq_len, -1).index_select(0, self.flat_index)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        # A gather from the packed rows plus one zero row: no scatter, which graph runtimes execute slowly.
        rows = torch.cat([packed, packed.new_zeros(1, packed.shape[-1])])
        return rows.index_select(0, self.unpack_index).view(self.batch, self.seq_len, -1)


@dataclass
class ClassifierOutput:
    logits: torch.Tensor  # [B, num_labels] (multi-task: padded to the widest task with -inf)
    aux_loss: torch.Tensor  # summed load-balancing loss over MoE layers (0 outside training)
    z_loss: torch.Tensor  # summed router z-loss over MoE layers (0 outside training)
    routing: list[RouterOutput] = field(default_factory=list)  # one per MoE layer, over the packed tokens
    packed: PackedBatch | None = None
    token_task: torch.Tensor | None = None  # [T] each packed token's task id (multi-task models)


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = dropout

    row_buckets: bool = False  # serving on CPU: GEMM rows padded to a few sizes (service/modeling/row_buckets.py)

    def _linear(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if not self.row_buckets:
            return layer(x)
        return rows_bucketed(layer, x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], layer.out_features)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape
        qkv = self._linear(self.qkv, x)
        q, k, v = qkv.view(b, length, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        # Boolean mask [B, 1, 1, L]: padded keys get no weight, so padding never changes a real token's output. (Graph
        # exports replace this module with ONNX Runtime's fused Attention: service/modeling/onnx_export.py.)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=key_mask[:, None, None, :], dropout_p=self.dropout if self.training else 0.0
        )
        return self._linear(self.out, y.transpose(1, 2).reshape(b, length, d))


class DenseFeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, activation: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.act = activation_fn(activation)

    row_buckets: bool = False  # see SelfAttention

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rows_bucketed(self._mlp, x) if self.row_buckets and x.dim() == 2 else self._mlp(x)


class Block(nn.Module):
    """Transformer block, pre-norm (from scratch) or post-norm (BERT). Input and output are packed tokens [T, d]."""

    def __init__(self, cfg: ModelConfig, attention: bool, moe: bool, task_routed: bool = False) -> None:
        super().__init__()
        self.attn = SelfAttention(cfg.d_model, cfg.n_heads, cfg.dropout) if attention else None
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps) if attention else None
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.post_norm = cfg.norm == "post"
        self.is_moe = moe
        self.task_routed = moe and task_routed and len(cfg.tasks or {}) > 1  # its MoE layer has a router per task
        self.ffn: nn.Module
        if moe:
            tasks = len(cfg.tasks or {}) if self.task_routed else 1
            self.ffn = MoEFeedForward(
                cfg.d_model, cfg.expert_d_ff or cfg.d_ff, cfg.num_experts, cfg.top_k, cfg.activation, cfg.combine, tasks
            )
        else:
            self.ffn = DenseFeedForward(cfg.d_model, cfg.d_ff, cfg.activation)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self, h: torch.Tensor, packed: PackedBatch, key_mask: torch.Tensor, token_task: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, RouterOutput | None]:
        if self.attn is not None:
            assert self.norm1 is not None
            x = h if self.post_norm else self.norm1(h)
            h = h + self.drop(packed.pack(self.attn(packed.unpack(x), key_mask)))
            if self.post_norm:
                h = self.norm1(h)
        x = h if self.post_norm else self.norm2(h)
        r = None
        if self.is_moe:
            y, r = self.ffn(x, token_task) if self.task_routed else self.ffn(x)
        else:
            y = self.ffn(x)
        h = h + self.drop(y)
        return (self.norm2(h) if self.post_norm else h), r


class MoEClassifier(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_length, cfg.d_model)
        self.type_emb = nn.Embedding(cfg.type_vocab_size, cfg.d_model) if cfg.type_vocab_size else None
        self.emb_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps) if cfg.embedding_norm else None
        self.emb_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(cfg, a, m, t)
            for a, m, t in zip(cfg.attention_layers(), cfg.moe_layers(), cfg.task_routed(), strict=True)
        )
        # Pre-norm leaves the residual stream unnormalised, so it ends with a LayerNorm; post-norm already has one.
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps) if cfg.norm == "pre" else None
        # One task: `head` (the single-task folders' tensor names); several: one head per task, by name.
        self.head = nn.Linear(cfg.d_model, cfg.num_labels) if cfg.tasks is None else None
        self.heads = nn.ModuleDict({t: nn.Linear(cfg.d_model, n) for t, n in (cfg.tasks or {}).items()})
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)

    def embed(self, ids: torch.Tensor, packed: PackedBatch) -> torch.Tensor:
        """Packed token ids [T] -> packed embeddings [T, d]; only real tokens are looked up."""
        positions = packed.flat_index.remainder(packed.seq_len)
        h = self.tok_emb(ids) + self.pos_emb(positions)
        if self.type_emb is not None:
            h = h + self.type_emb.weight[0]  # one text per sequence: token type 0 throughout
        if self.emb_norm is not None:
            h = self.emb_norm(h)
        return self.emb_drop(h)

    row_buckets: bool = False  # see SelfAttention; set on every module by use_row_buckets

    def use_row_buckets(self, on: bool = True) -> None:
        """Serving on CPU: pad GEMM rows to a few sizes so oneDNN compiles each kernel once. Not for export (a
        traced graph would freeze the padding) or training."""
        for m in self.modules():
            if hasattr(type(m), "row_buckets"):
                m.row_buckets = on

    def use_masked_dense(self, tokens: int) -> None:
        """Batches of up to `tokens` tokens run each MoE layer as one masked dense GEMM pair (MoEFeedForward.
        masked_forward); 0: always grouped by expert."""
        for layer in self.moe_layers:
            layer.masked_dense_tokens = tokens

    @property
    def moe_layers(self) -> list[MoEFeedForward]:
        return [b.ffn for b in self.blocks if b.is_moe]  # type: ignore[misc]

    def encode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_task: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, PackedBatch, list[RouterOutput]]:
        """The encoder alone: packed last hidden states [T, d], the packing, and routing per MoE layer.
        token_task [T]: the packed tokens' task ids (multi-task models)."""
        if input_ids.shape[1] > self.config.max_length:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds max_length {self.config.max_length}")
        packed = PackedBatch.from_mask(attention_mask)
        key_mask = attention_mask.bool()
        h = self.embed(input_ids.reshape(-1).index_select(0, packed.flat_index), packed)
        routing: list[RouterOutput] = []
        for block in self.blocks:
            h, r = block(h, packed, key_mask, token_task)
            if r is not None:
                routing.append(r)
        if self.norm is not None:
            h = self.norm(h)
        return h, packed, routing

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task_ids: torch.Tensor | None = None
    ) -> ClassifierOutput:
        """input_ids, attention_mask: [B, L]; every row must have at least one real token. task_ids [B]: each
        text's task (multi-task models; a text asked for two tasks is two rows)."""
        token_task = self._token_tasks(task_ids, input_ids.shape[0], attention_mask)
        h, packed, routing = self.encode(input_ids, attention_mask, token_task)
        pooled = self.pool(h, packed)
        logits = self._heads(pooled, task_ids)
        aux = z = logits.new_zeros(())
        if self.training:  # the routing losses are training's business: serving does not pay for them
            aux, z = self._routing_losses(routing, token_task, aux)
        return ClassifierOutput(logits, aux, z, routing, packed, token_task)

    def forward_rows(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, row_text: torch.Tensor, row_task: torch.Tensor
    ) -> ClassifierOutput:
        """Texts [B, L] asked for tasks: output row r is text row_text[r] under task row_task[r]. The blocks below
        the first task-routed one run once per text, the rest once per row: the same logits as `forward` on the
        texts repeated per row (tested), for less work where the bottom layers are shared. The routing is over the
        rows' packed tokens (a shared layer's routing of a text repeated in each of its rows), as `forward` on the
        repeated texts would give it."""
        self._check_task_ids(row_task, len(row_task))
        h, rep, routing, token_task = self.encode_rows(input_ids, attention_mask, row_text, row_task)
        logits = self._heads(self.pool(h, rep), row_task)
        zero = logits.new_zeros(())
        return ClassifierOutput(logits, zero, zero, routing, rep, token_task)

    def encode_rows(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, row_text: torch.Tensor, row_task: torch.Tensor
    ) -> tuple[torch.Tensor, PackedBatch, list[RouterOutput], torch.Tensor]:
        """`forward_rows`' encoder, ids unchecked (no host-side reads, so the ONNX export traces it): the rows'
        packed last hidden states, their packing, routing per MoE layer and each row token's task."""
        packed = PackedBatch.from_mask(attention_mask)
        h = self.embed(input_ids.reshape(-1).index_select(0, packed.flat_index), packed)
        routed = [b.task_routed for b in self.blocks]
        first = routed.index(True) if True in routed else len(self.blocks)
        shared: list[RouterOutput] = []
        for block in self.blocks[:first]:
            h, r = block(h, packed, attention_mask.bool())
            if r is not None:
                shared.append(r)
        # From here on a text is a row per task: its tokens' states copied to each of its rows.
        mask = attention_mask.index_select(0, row_text)
        rep = PackedBatch.from_mask(mask)
        grid = row_text.index_select(0, rep.seq_ids) * rep.seq_len + rep.flat_index.remainder(rep.seq_len)
        copy = packed.unpack_index.index_select(0, grid)  # each row token's packed text token
        h = h.index_select(0, copy)
        routing = [r.select(copy) for r in shared]
        token_task = row_task.index_select(0, rep.seq_ids)
        for block in self.blocks[first:]:
            h, r = block(h, rep, mask.bool(), token_task)
            if r is not None:
                routing.append(r)
        if self.norm is not None:
            h = self.norm(h)
        return h, rep, routing, token_task

    def _token_tasks(
        self, task_ids: torch.Tensor | None, batch: int, attention_mask: torch.Tensor
    ) -> torch.Tensor | None:
        if self.config.tasks is None:
            if task_ids is not None:
                raise ValueError("task ids given to a single-task model")
            return None
        self._check_task_ids(task_ids, batch)
        assert task_ids is not None
        flat = attention_mask.reshape(-1).bool()
        return task_ids.repeat_interleave(attention_mask.shape[1])[flat]

    def _check_task_ids(self, task_ids: torch.Tensor | None, batch: int) -> None:
        """One task id per text (or row), each a task of this model."""
        tasks = len(self.config.tasks or {})
        if task_ids is None or task_ids.shape != (batch,):
            raise ValueError(f"a multi-task model needs one task id per text ({batch}), got {task_ids!r}")
        if len(task_ids) and not 0 <= int(task_ids.min()) <= int(task_ids.max()) < tasks:
            raise ValueError(f"task ids must be in [0, {tasks})")

    def _linear(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return rows_bucketed(layer, x) if self.row_buckets else layer(x)

    def _heads(self, pooled: torch.Tensor, task_ids: torch.Tensor | None) -> torch.Tensor:
        """Logits [B, C]: the one head, or each text's task head, padded to the widest task with -inf."""
        if self.head is not None:
            return self._linear(self.head, pooled)
        assert task_ids is not None
        logits = pooled.new_full((pooled.shape[0], self.config.num_labels), float("-inf"))
        for t, head in enumerate(self.heads.values()):
            rows = (task_ids == t).nonzero().squeeze(1)
            if rows.numel():
                out = self._linear(head, pooled.index_select(0, rows))
                out = F.pad(out, (0, self.config.num_labels - head.out_features), value=float("-inf"))
                logits = logits.index_copy(0, rows, out)
        return logits

    def _routing_losses(
        self, routing: list[RouterOutput], token_task: torch.Tensor | None, zero: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Load-balancing and z-loss summed over MoE layers; a task-routed layer's are the mean over the tasks in
        the batch of each task router's own, on its own tokens (each router balances what it routes)."""
        aux = z = zero
        e = self.config.num_experts
        for layer, r in zip(self.moe_layers, routing, strict=True):
            if layer.num_tasks == 1 or token_task is None:
                aux, z = aux + load_balancing_loss(r, e), z + router_z_loss(r)
                continue
            present = token_task.unique()
            for t in present:
                sub = r.select((token_task == t).nonzero().squeeze(1))
                aux = aux + load_balancing_loss(sub, e) / len(present)
                z = z + router_z_loss(sub) / len(present)
        return aux, z

    @staticmethod
    def pool(h: torch.Tensor, packed: PackedBatch) -> torch.Tensor:
        """Masked mean pooling as a segment sum over packed tokens: [T, d] -> [B, d]."""
        # Summed in fp32 whatever the compute dtype: a bf16 running sum over hundreds of tokens loses digits.
        pooled = h.new_zeros(packed.batch, h.shape[-1], dtype=torch.float32).index_add(0, packed.seq_ids, h.float())
        return (pooled / packed.lengths.clamp(min=1)[:, None]).to(h.dtype)


def pad_batch(sequences: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists to the longest one: (input_ids, attention_mask), both int64 [B, L]."""
    ids, mask = pad_ids(sequences, pad_id)
    return torch.from_numpy(ids), torch.from_numpy(mask)
