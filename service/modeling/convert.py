"""Dense encoder -> token-routed MoE encoder, by one of two published methods.

- MoEfication (Zhang et al., Findings of ACL 2022): each FFN's d_ff intermediate neurons are split into E equal
  groups by balanced k-means over their input-weight rows; group e becomes expert e (d_ff / E wide), and the
  router starts from the group centroids, so a token is sent to the groups whose neurons its input excites most.
  Experts are slices of one FFN whose outputs add up, so the chosen experts are summed (combine="sum") and the
  FFN's output bias is shared out as b2 / k. Same parameters as the dense model; top-k of E computes k/E of it.
- Sparse upcycling (Komatsuzaki et al., ICLR 2023): every expert starts as a copy of the dense FFN and a new
  router (small random weights) picks top-k, fused by the renormalised gates. E times the FFN parameters and k
  times its compute.

Both reproduce the dense model exactly at conversion when every expert is active (MoEfication with top_k = E;
upcycling at any top_k, the copies being identical); tests check it.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from service.modeling.classifier import DenseFeedForward, MoEClassifier
from service.modeling.moe import MoEFeedForward

METHODS = ("moefication", "upcycling")


def balanced_kmeans(points: torch.Tensor, groups: int, iters: int = 30, seed: int = 0) -> torch.Tensor:
    """Assign each row of `points` [N, d] to one of `groups` clusters of exactly N / groups rows.

    Lloyd's iterations with a capacity-bounded assignment: (row, cluster) pairs are taken nearest first and a row
    joins the nearest cluster that still has room. Deterministic for a given seed. Returns [N] cluster ids.
    """
    n = points.shape[0]
    if n % groups:
        raise ValueError(f"{n} neurons cannot be split into {groups} equal experts")
    size = n // groups
    gen = torch.Generator().manual_seed(seed)
    centroids = points[torch.randperm(n, generator=gen)[:groups]].clone()
    assign = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iters):
        new = _capacity_assign(torch.cdist(points, centroids), size)
        if torch.equal(new, assign):
            break
        assign = new
        centroids = torch.stack([points[assign == g].mean(0) for g in range(groups)])
    return assign


def _capacity_assign(dist: torch.Tensor, size: int) -> torch.Tensor:
    n, groups = dist.shape
    order = torch.argsort(dist.reshape(-1), stable=True).tolist()
    assign = [-1] * n
    room = [size] * groups
    left = n
    for flat in order:
        row, g = divmod(flat, groups)
        if assign[row] < 0 and room[g]:
            assign[row], room[g] = g, room[g] - 1
            left -= 1
            if not left:
                break
    return torch.tensor(assign)


@torch.no_grad()
def _moefy_layer(dense: DenseFeedForward, moe: MoEFeedForward, seed: int) -> None:
    w1, b1 = dense.fc1.weight, dense.fc1.bias  # [F, d], [F]
    w2, b2 = dense.fc2.weight, dense.fc2.bias  # [d, F], [d]
    groups = balanced_kmeans(w1, moe.num_experts, seed=seed)
    for e in range(moe.num_experts):
        idx = (groups == e).nonzero().squeeze(1)
        moe.w1[e].copy_(w1[idx].T)
        moe.b1[e].copy_(b1[idx])
        moe.w2[e].copy_(w2[:, idx].T)
        moe.b2[e].copy_(b2 / moe.top_k)  # exactly k experts are summed per token
        for t in range(moe.num_tasks):  # every task's router starts from the same centroids
            moe.router.weight[t * moe.num_experts + e].copy_(w1[idx].mean(0))


@torch.no_grad()
def _upcycle_layer(dense: DenseFeedForward, moe: MoEFeedForward, seed: int) -> None:
    for e in range(moe.num_experts):
        moe.w1[e].copy_(dense.fc1.weight.T)
        moe.b1[e].copy_(dense.fc1.bias)
        moe.w2[e].copy_(dense.fc2.weight.T)
        moe.b2[e].copy_(dense.fc2.bias)
    gen = torch.Generator().manual_seed(seed)
    moe.router.weight.copy_(torch.randn(moe.router.weight.shape, generator=gen) * 0.02)


def convert_to_moe(
    dense: MoEClassifier, method: str, num_experts: int, top_k: int, moe_every: int = 1, seed: int = 0
) -> MoEClassifier:
    """A new MoEClassifier whose FFNs (every `moe_every`-th block) are experts made from `dense`'s FFNs; every
    other weight (embeddings, attention, norms, head) is copied unchanged."""
    if method not in METHODS:
        raise ValueError(f"unknown conversion method {method!r} (use {', '.join(METHODS)})")
    base = dense.config
    if base.moe_every != 0:
        raise ValueError("convert_to_moe takes a dense model (moe_every=0)")
    if method == "moefication" and base.d_ff % num_experts:
        raise ValueError(f"d_ff {base.d_ff} is not divisible into {num_experts} experts")
    cfg = replace(
        base,
        num_experts=num_experts,
        top_k=top_k,
        moe_every=moe_every,
        expert_d_ff=base.d_ff // num_experts if method == "moefication" else base.d_ff,
        combine="sum" if method == "moefication" else "weighted",
    )
    moe = MoEClassifier(cfg)
    moe_block = cfg.moe_layers()
    kept = {k: v for k, v in dense.state_dict().items() if not (k.startswith("blocks.") and _is_moe_ffn(k, moe_block))}
    missing, unexpected = moe.load_state_dict(kept, strict=False)
    assert not unexpected and all(_is_moe_ffn(k, moe_block) for k in missing), (missing, unexpected)
    fill = _moefy_layer if method == "moefication" else _upcycle_layer
    for i, block in enumerate(moe.blocks):
        if moe_block[i]:
            fill(dense.blocks[i].ffn, block.ffn, seed + i)
    return moe.train(dense.training)


def _is_moe_ffn(key: str, moe_block: list[bool]) -> bool:
    parts = key.split(".")
    return parts[0] == "blocks" and parts[2] == "ffn" and moe_block[int(parts[1])]
