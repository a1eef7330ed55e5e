"""MoE layer maths: routing, losses, grouped dispatch against the every-expert reference."""

from __future__ import annotations

import math

import pytest
import torch

from service.modeling.moe import MoEFeedForward, load_balancing_loss, route, router_z_loss

TOL = 1e-5  # fp32 tolerance for the grouped fast path vs the plain reference


def _layer(
    seed: int = 0, d: int = 32, ff: int = 64, e: int = 8, k: int = 2, combine: str = "weighted"
) -> MoEFeedForward:
    torch.manual_seed(seed)
    layer = MoEFeedForward(d, ff, e, k, combine=combine)
    with torch.no_grad():  # non-zero biases so a missed bias shows up
        layer.b1.normal_()
        layer.b2.normal_()
    return layer.eval()


def test_route_topk_and_renormalisation() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 3.0, 1.0]])
    r = route(logits, top_k=2)
    assert r.expert_ids.tolist() == [[0, 1], [2, 3]]
    p = logits.softmax(-1)
    expected0 = p[0, :2] / p[0, :2].sum()
    torch.testing.assert_close(r.gates[0], expected0)
    torch.testing.assert_close(r.gates.sum(-1), torch.ones(2))
    # Renormalised top-2 of softmax equals softmax over the two chosen logits.
    torch.testing.assert_close(r.gates[1], torch.tensor([3.0, 1.0]).softmax(-1))


def test_top1_gate_is_one() -> None:
    r = route(torch.randn(10, 8), top_k=1)
    torch.testing.assert_close(r.gates, torch.ones(10, 1))


def test_load_balancing_loss_values() -> None:
    e = 4
    # Uniform probabilities and perfectly balanced assignments: loss is exactly 1.
    logits = torch.zeros(8, e)
    r = route(logits, top_k=1)
    r.expert_ids = torch.arange(8).remainder(e).view(8, 1)
    assert load_balancing_loss(r, e).item() == pytest.approx(1.0)
    # All tokens sent to expert 0 with probability ~1: loss ~ E.
    r2 = route(torch.tensor([[20.0, 0, 0, 0]] * 8), top_k=1)
    assert load_balancing_loss(r2, e).item() == pytest.approx(e, rel=1e-3)


def test_z_loss_value() -> None:
    logits = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    r = route(logits, top_k=1)
    expected = (math.log(2) ** 2 + (1 + math.log(2)) ** 2) / 2
    assert router_z_loss(r).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("combine", ["weighted", "sum"])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("t", [1, 7, 300])
def test_grouped_matches_reference(k: int, t: int, combine: str) -> None:
    layer = _layer(k=k, combine=combine)
    x = torch.randn(t, 32)
    with torch.no_grad():
        r = layer.route(x)
        fast = layer.grouped_forward(x, r)
        ref = layer.reference_forward(x, r)
    torch.testing.assert_close(fast, ref, atol=TOL, rtol=TOL)


def test_grouped_with_idle_experts_matches_reference() -> None:
    layer = _layer()
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[3, 0] = 50.0  # every token with x[0] > 0 prefers expert 3
    x = torch.randn(64, 32).abs()
    with torch.no_grad():
        r = layer.route(x)
        assert len(r.expert_ids.unique()) < 8
        torch.testing.assert_close(layer.grouped_forward(x, r), layer.reference_forward(x, r), atol=TOL, rtol=TOL)


@pytest.mark.parametrize("combine", ["weighted", "sum"])
def test_grouped_gradients_match_reference(combine: str) -> None:
    layer = _layer(combine=combine)
    x = torch.randn(50, 32, requires_grad=True)
    params = [x, layer.w1, layer.b2, layer.router.weight]
    r = layer.route(x)
    g_fast = torch.autograd.grad(layer.grouped_forward(x, r).square().sum(), params)
    r = layer.route(x)
    g_ref = torch.autograd.grad(layer.reference_forward(x, r).square().sum(), params)
    for a, b in zip(g_fast, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_sum_combine_adds_the_chosen_experts() -> None:
    """MoEfication's combine: a token's output is the plain sum of its k experts' outputs."""
    layer = _layer(combine="sum")
    x = torch.randn(9, 32)
    with torch.no_grad():
        y, r = layer(x)
        expected = torch.stack(
            [sum(layer.expert_mlp(int(e), x[t : t + 1])[0] for e in r.expert_ids[t]) for t in range(9)]
        )
    torch.testing.assert_close(y, expected, atol=TOL, rtol=TOL)


def test_empty_input() -> None:
    layer = _layer()
    y, r = layer(torch.zeros(0, 32))
    assert y.shape == (0, 32) and r.expert_ids.shape == (0, 2)


def test_one_matmul_per_active_expert() -> None:
    """The fast path calls each active expert exactly once, whatever the number of tokens."""
    layer = _layer()
    calls: list[int] = []
    original = layer.expert_mlp

    def counting(e: int, rows: torch.Tensor) -> torch.Tensor:
        calls.append(e)
        return original(e, rows)

    layer.expert_mlp = counting  # type: ignore[method-assign]
    x = torch.randn(500, 32)
    with torch.no_grad():
        _, r = layer(x)
    active = sorted(r.expert_ids.unique().tolist())
    assert calls == active


@pytest.mark.parametrize("combine", ["weighted", "sum"])
def test_graph_dispatch_matches_grouped(combine: str) -> None:
    """The export path (static expert loop, graph ops only) computes what the eager grouped path does, idle
    experts included."""
    layer = _layer(combine=combine)
    with torch.no_grad():
        layer.router.weight[5:] = -10.0  # experts 5-7 get no tokens
        for t in (1, 13, 200):
            x = torch.randn(t, 32)
            r = layer.route(x)
            torch.testing.assert_close(layer.graph_forward(x, r), layer.grouped_forward(x, r), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("combine", ["weighted", "sum"])
@pytest.mark.parametrize("k", [1, 2, 8])
@pytest.mark.parametrize("t", [0, 1, 7, 300])
def test_masked_dense_matches_reference(k: int, t: int, combine: str) -> None:
    """The small-batch route (one masked GEMM pair over every expert) is the grouped maths up to summation order."""
    layer = _layer(k=k, combine=combine)
    x = torch.randn(t, 32)
    with torch.no_grad():
        r = layer.route(x)
        torch.testing.assert_close(layer.masked_forward(x, r), layer.reference_forward(x, r), atol=TOL, rtol=TOL)
        torch.testing.assert_close(layer.masked_forward(x, r), layer.grouped_forward(x, r), atol=TOL, rtol=TOL)


@pytest.mark.parametrize("combine", ["weighted", "sum"])
def test_masked_dense_gradients_match_reference(combine: str) -> None:
    layer = _layer(combine=combine)
    x = torch.randn(20, 32, requires_grad=True)
    params = [x, layer.w1, layer.b1, layer.w2, layer.b2, layer.router.weight]
    g_masked = torch.autograd.grad(layer.masked_forward(x, layer.route(x)).square().sum(), params)
    g_ref = torch.autograd.grad(layer.reference_forward(x, layer.route(x)).square().sum(), params)
    for a, b in zip(g_masked, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_forward_takes_the_masked_route_up_to_the_threshold_only() -> None:
    """At or below masked_dense_tokens no expert is called on its own; above it, each active expert once; both
    answer the reference."""
    layer = _layer()
    layer.masked_dense_tokens = 16
    calls: list[int] = []
    original = layer.expert_mlp
    layer.expert_mlp = lambda e, rows: calls.append(e) or original(e, rows)  # type: ignore[method-assign]
    with torch.no_grad():
        for t, grouped in ((1, False), (16, False), (17, True)):
            calls.clear()
            x = torch.randn(t, 32)
            y, r = layer(x)
            assert bool(calls) == grouped
            torch.testing.assert_close(y, layer.reference_forward(x, r), atol=TOL, rtol=TOL)


def test_masked_dense_sees_new_weights() -> None:
    """The side-by-side copy of w1 is rebuilt when the weights change (in place, as a state dict load does, or
    by a dtype change)."""
    layer = _layer()
    x = torch.randn(5, 32)
    with torch.no_grad():
        r = layer.route(x)
        layer.masked_forward(x, r)
        layer.w1.mul_(2.0)
        torch.testing.assert_close(layer.masked_forward(x, r), layer.reference_forward(x, r), atol=TOL, rtol=TOL)
        layer.double()
        y = layer.masked_forward(x.double(), r)
    assert y.dtype == torch.float64


def test_masked_dense_with_row_buckets_in_bf16() -> None:
    """bf16 with GEMM rows padded to buckets (as the torch backend serves on CPU): padding rows are cut off and
    the real rows agree with the grouped route within bf16 rounding."""
    layer = _layer().to(torch.bfloat16)
    layer.row_buckets = True
    x = torch.randn(21, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        r = layer.route(x)
        y = layer.masked_forward(x, r)
        assert y.shape == (21, 32)
        torch.testing.assert_close(y.float(), layer.grouped_forward(x, r).float(), atol=0.1, rtol=0.05)
