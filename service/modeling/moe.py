"""Token-choice Mixture-of-Experts feed-forward layer.

The layer works on *packed* tokens, shape [T, d]: the non-padding tokens of every text in the batch, flattened.
Each token picks its top-k experts (softmax over router logits, top-k, weights renormalised over the chosen k),
so a token's output depends only on that token: a text's result never depends on what else is in its batch.

Fast path (``grouped_forward``): sort the T*k (token, expert) assignments by expert, gather the rows once, run one
GEMM pair per expert that received tokens, then put the rows back in token order and sum the k weighted outputs.
This is the CPU strategy used by vLLM and torchtitan; every expert sees one large matmul per batch instead of
one small matmul per request. Small batches (``masked_forward``, below a backend's measured token count) run
every expert on every token as one GEMM pair and zero what a token did not choose: more FLOPs, far fewer calls.
``reference_forward`` runs every expert on every token and masks by the gates; it is
slow and exists so tests can check the fast path against plain maths.

Multi-task (``num_tasks`` > 1): one router per task over the same experts (the multi-gate idea of MMoE, applied per
token as in task-level MoE): a token of task t is routed by router t. The routers are one linear layer of
num_tasks * E outputs, so routing a mixed batch is still one GEMM; after routing, the tokens of every task share
the grouped dispatch, each expert one GEMM over all the tokens sent to it whatever their task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from service.modeling.row_buckets import bucket, rows_bucketed


@dataclass
class RouterOutput:
    """Routing of one MoE layer for the packed tokens [T]."""

    logits: torch.Tensor  # [T, E] raw router logits (fp32)
    probs: torch.Tensor  # [T, E] softmax over all experts
    expert_ids: torch.Tensor  # [T, k] chosen experts, best first
    gates: torch.Tensor  # [T, k] gate weights, renormalised to sum to 1 over the k chosen

    def select(self, rows: torch.Tensor) -> RouterOutput:
        """The routing of some of the tokens (e.g. one task's)."""
        return RouterOutput(*(t.index_select(0, rows) for t in (self.logits, self.probs, self.expert_ids, self.gates)))


def route(logits: torch.Tensor, top_k: int) -> RouterOutput:
    """Softmax -> top-k -> renormalise. Routing maths is done in fp32 whatever the compute dtype."""
    logits = logits.float()
    probs = logits.softmax(dim=-1)
    top_p, top_i = probs.topk(top_k, dim=-1)
    gates = top_p / top_p.sum(dim=-1, keepdim=True)
    return RouterOutput(logits=logits, probs=probs, expert_ids=top_i, gates=gates)


def load_balancing_loss(router: RouterOutput, num_experts: int) -> torch.Tensor:
    """Switch-Transformer auxiliary loss, generalised to top-k: E * sum_i f_i * P_i.

    f_i is the share of (token, slot) assignments that went to expert i (not differentiable), P_i the mean router
    probability of expert i (differentiable). It equals 1.0 when routing is perfectly uniform.
    """
    if router.expert_ids.numel() == 0:
        return router.logits.new_zeros(())
    counts = torch.bincount(router.expert_ids.reshape(-1), minlength=num_experts).to(router.probs.dtype)
    f = counts / counts.sum()
    p = router.probs.mean(dim=0)
    return num_experts * torch.sum(f * p)


def router_z_loss(router: RouterOutput) -> torch.Tensor:
    """ST-MoE router z-loss: mean(logsumexp(logits)^2); keeps router logits small and training stable."""
    if router.logits.numel() == 0:
        return router.logits.new_zeros(())
    return torch.logsumexp(router.logits, dim=-1).pow(2).mean()


ACTIVATIONS = {
    "gelu": F.gelu,  # exact (erf) GELU, as BERT's "gelu"
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # BERT-family "gelu_new" / "gelu_pytorch_tanh"
    "relu": F.relu,
    "silu": F.silu,
}
COMBINES = ("weighted", "sum")


def activation_fn(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r} (use {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def combine_weights(r: RouterOutput, combine: str) -> torch.Tensor:
    """[T, k] weights that fuse a token's k expert outputs.

    weighted: the renormalised gates (Switch/GShard/Mixtral); sum: each chosen expert counts once, as in MoEfication,
    where experts are slices of one dense FFN whose outputs add up. In "sum" the weight's value is exactly 1, but its
    gradient is that of the chosen expert's router probability (straight-through), so the task loss still trains
    the router.
    """
    if combine == "weighted":
        return r.gates
    chosen = r.probs.gather(1, r.expert_ids)
    return 1.0 + (chosen - chosen.detach())


class MoEFeedForward(nn.Module):
    """E expert MLPs (d -> d_ff -> d) and a linear router; top-k token-choice routing, dropless."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        top_k: int,
        activation: str = "gelu",
        combine: str = "weighted",
        num_tasks: int = 1,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if combine not in COMBINES:
            raise ValueError(f"unknown combine {combine!r} (use {', '.join(COMBINES)})")
        self.d_model, self.d_ff = d_model, d_ff
        self.num_experts, self.top_k = num_experts, top_k
        self.activation, self.combine = activation, combine
        self._act = activation_fn(activation)
        self.num_tasks = num_tasks
        # Task t's router is rows t*E .. t*E+E-1; one task keeps the single-task layout (and state dict) unchanged.
        self.router = nn.Linear(d_model, num_tasks * num_experts, bias=False)
        # Expert weights stored stacked, [E, in, out], so one expert's GEMM is x @ w1[e].
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.b1 = nn.Parameter(torch.zeros(num_experts, d_ff))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.b2 = nn.Parameter(torch.zeros(num_experts, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.router.weight, std=0.02)
        nn.init.uniform_(self.w1, -1 / math.sqrt(self.d_model), 1 / math.sqrt(self.d_model))
        nn.init.uniform_(self.w2, -1 / math.sqrt(self.d_ff), 1 / math.sqrt(self.d_ff))
        nn.init.zeros_(self.b1)
        nn.init.zeros_(self.b2)

    row_buckets: bool = False  # serving on CPU: GEMM rows padded to a few sizes (service/modeling/row_buckets.py)

    def route(self, x: torch.Tensor, token_task: torch.Tensor | None = None) -> RouterOutput:
        logits = rows_bucketed(self.router, x) if self.row_buckets else self.router(x)
        if self.num_tasks > 1:
            if token_task is None:
                raise ValueError(f"this layer routes {self.num_tasks} tasks: each token needs its task id")
            e = self.num_experts
            logits = logits.view(-1, self.num_tasks, e).gather(1, token_task.view(-1, 1, 1).expand(-1, 1, e))
            logits = logits.squeeze(1)
        return route(logits, self.top_k)

    def forward(self, x: torch.Tensor, token_task: torch.Tensor | None = None) -> tuple[torch.Tensor, RouterOutput]:
        """x: packed tokens [T, d]; token_task [T]: each token's task id (multi-task layers only). Returns (output
        [T, d], routing)."""
        r = self.route(x, token_task)
        if self.dispatch == "graph":
            return self.graph_forward(x, r), r
        if x.shape[0] <= self.masked_dense_tokens:
            return self.masked_forward(x, r), r
        return self.grouped_forward(x, r), r

    # Batches of up to this many tokens run masked_forward (one GEMM pair), larger ones grouped_forward; 0: always
    # grouped. Set by a serving backend from its measured crossover (MoEClassifier.use_masked_dense).
    masked_dense_tokens: int = 0

    # "grouped" (eager), or "graph": the same grouping in graph ops, set once on a model about to be exported
    # (service/modeling/onnx_export.py), never per call.
    dispatch: str = "grouped"

    def graph_forward(self, x: torch.Tensor, r: RouterOutput) -> torch.Tensor:
        """The grouped dispatch written with graph ops only, for export: a static loop over the E experts, each
        finding its (token, slot) assignments with nonzero. No host-side sizes (.tolist()), so a traced graph
        routes every input afresh instead of freezing the example's routing; an expert with no tokens computes on
        zero rows. As in grouped_forward, outputs are put back in token order by one gather (graph runtimes run
        scatters slowly) and a token's k terms are summed in slot order: the same maths, the same rounding."""
        t, k = r.expert_ids.shape
        flat_e = r.expert_ids.reshape(-1)
        picked = [(flat_e == e).nonzero().reshape(-1) for e in range(self.num_experts)]  # reshape: no If node
        y_sorted = torch.cat([self.expert_mlp(e, x.index_select(0, a // k)) for e, a in enumerate(picked)])
        order = torch.cat(picked)  # assignment ids grouped by expert, as y_sorted's rows
        inverse = torch.zeros_like(order).scatter(0, order, torch.arange(order.shape[0], device=order.device))
        y = y_sorted.index_select(0, inverse).view(t, k, -1)
        if self._unit_weights():
            return y.sum(1)
        return (y * combine_weights(r, self.combine).to(y.dtype).unsqueeze(-1)).sum(1)  # Einsum runs slowly in ORT

    def expert_mlp(self, e: int, rows: torch.Tensor) -> torch.Tensor:
        h = self._act(torch.addmm(self.b1[e], rows, self.w1[e]))
        return torch.addmm(self.b2[e], h, self.w2[e])

    def grouped_forward(self, x: torch.Tensor, r: RouterOutput) -> torch.Tensor:
        """One GEMM pair per active expert over all tokens routed to it: permute, experts, combine."""
        if r.expert_ids.shape[0] == 0:
            return x.new_zeros(x.shape)
        rows, order, counts = self.permute(x, r)
        return self.fuse(self.run_experts(rows, counts), order, r)

    def permute(self, x: torch.Tensor, r: RouterOutput) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """The routed rows grouped by expert (one gathered copy), their assignment order, tokens per expert."""
        k = r.expert_ids.shape[1]
        flat_e = r.expert_ids.reshape(-1)  # [T*k], assignment a = token a // k, slot a % k
        order = torch.argsort(flat_e, stable=True)  # assignments grouped by expert, token order kept
        counts = torch.bincount(flat_e, minlength=self.num_experts).tolist()
        return x.index_select(0, order // k), order, counts

    def run_experts(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        outs = []
        start = 0
        for e, c in enumerate(counts):
            if c:
                group = rows[start : start + c]
                if self.row_buckets:
                    outs.append(rows_bucketed(lambda g, e=e: self.expert_mlp(e, g), group))
                else:
                    outs.append(self.expert_mlp(e, group))
                start += c
        return torch.cat(outs, dim=0)

    def fuse(self, y_sorted: torch.Tensor, order: torch.Tensor, r: RouterOutput) -> torch.Tensor:
        """Unpermute back to [T, k, d] and fuse by the gates: the k terms of a token are always summed in slot
        order, so the result for a token is the same whatever else is in the batch."""
        t, k = r.expert_ids.shape
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        y = y_sorted.index_select(0, inverse).view(t, k, -1)
        if self._unit_weights():
            return y.sum(1)  # the same sum as the einsum with weights of exactly 1, without them
        return torch.einsum("tkd,tk->td", y, combine_weights(r, self.combine).to(y.dtype))

    def masked_forward(self, x: torch.Tensor, r: RouterOutput) -> torch.Tensor:
        """Every expert as one GEMM pair over the experts' weights side by side (w1 [d, E*f], w2 [E*f, d]: for a
        MoEfied model, its dense FFN), each token's hidden units of the experts it was not routed to zeroed (scaled
        by its combine weight otherwise), plus the gated sum of the experts' output biases. The grouped maths up to
        summation order, at E/k times its FLOPs, but 2 GEMMs instead of up to 2E and no permutation: cheaper while
        the calls' overhead outweighs the FLOPs (masked_dense_tokens)."""
        t = x.shape[0]
        gate = self.dense_gates(r, x.dtype)
        if self.row_buckets and bucket(t) != t:  # padding rows have zero gates and are cut off
            x, gate = F.pad(x, (0, 0, 0, bucket(t) - t)), F.pad(gate, (0, 0, 0, bucket(t) - t))
            return self._masked_dense(x, gate)[:t]
        return self._masked_dense(x, gate)

    def dense_gates(self, r: RouterOutput, dtype: torch.dtype) -> torch.Tensor:
        """[T, E]: each token's combine weight for its chosen experts, 0 for the others. Built by comparison, not
        scatter, so a graph runs it as a few elementwise ops."""
        chosen = r.expert_ids.unsqueeze(-1) == torch.arange(self.num_experts, device=r.expert_ids.device)  # [T, k, E]
        if self._unit_weights():
            return chosen.to(dtype).sum(1)
        return (chosen.to(dtype) * combine_weights(r, self.combine).to(dtype).unsqueeze(-1)).sum(1)

    def _masked_dense(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        e, f = self.num_experts, self.d_ff
        h = self._act(torch.addmm(self.b1.reshape(-1), x, self._w1_side_by_side()))
        h = (h.view(-1, e, f) * gate.unsqueeze(-1)).view(-1, e * f)
        return torch.addmm(gate @ self.b2, h, self.w2.reshape(e * f, self.d_model))

    def _w1_side_by_side(self) -> torch.Tensor:
        """w1 as one [d, E*f] matrix. Out of autograd it is copied once and kept while the weights stay the same
        (one more copy of w1: 2.4 MB a layer for d 384, E*f 1536, fp32)."""
        if torch.is_grad_enabled():
            return self.w1.permute(1, 0, 2).reshape(self.d_model, -1)
        key = (self.w1.data_ptr(), self.w1._version, self.w1.dtype, self.w1.device)
        if self._w1_cache is None or self._w1_cache[0] != key:
            self._w1_cache = (key, self.w1.detach().permute(1, 0, 2).reshape(self.d_model, -1).contiguous())
        return self._w1_cache[1]

    _w1_cache: tuple[tuple, torch.Tensor] | None = None

    def _unit_weights(self) -> bool:
        """The "sum" combine without gradients: every weight is exactly 1, so the combine is a plain sum (in a
        graph, five fewer nodes a layer)."""
        return self.combine == "sum" and not torch.is_grad_enabled()

    def reference_forward(
        self, x: torch.Tensor, r: RouterOutput | None = None, token_task: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Plain maths: every expert on every token, weighted by a dense [T, E] gate matrix (zero off the top-k)."""
        if r is None:
            r = self.route(x, token_task)
        dense_gates = torch.zeros(x.shape[0], self.num_experts, dtype=x.dtype, device=x.device)
        dense_gates = dense_gates.scatter(1, r.expert_ids, combine_weights(r, self.combine).to(x.dtype))
        h = self._act(torch.einsum("td,edf->etf", x, self.w1) + self.b1[:, None, :])
        out = torch.einsum("etf,efd->etd", h, self.w2) + self.b2[:, None, :]
        return torch.einsum("etd,te->td", out, dense_gates)
