"""Routing statistics: shares, balance figures, drift, the recent window."""

from __future__ import annotations

import math

import numpy as np
import pytest

from service.engine.routing_stats import RoutingStats, kl_divergence, layer_stats


def test_layer_stats_even_and_skewed() -> None:
    even = layer_stats(np.array([10, 10, 10, 10]), np.full(4, 0.25))
    assert even["imbalance_max_over_mean"] == 1.0 and even["cv"] == 0.0
    assert even["normalized_entropy"] == 1.0 and even["drift_kl"] == pytest.approx(0.0, abs=1e-9)
    skew = layer_stats(np.array([30, 10, 0, 0]), np.full(4, 0.25))
    assert skew["imbalance_max_over_mean"] == 3.0 and skew["unused_experts"] == [2, 3]
    assert skew["entropy"] == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)), abs=1e-4)
    assert skew["drift_kl"] > 0.5
    empty = layer_stats(np.zeros(4, dtype=int), None)
    assert empty["assignments"] == 0 and empty["imbalance_max_over_mean"] is None


def test_kl_matches_definition() -> None:
    p, q = np.array([0.5, 0.5]), np.array([0.9, 0.1])
    assert kl_divergence(p, q) == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1), rel=1e-4)


def test_window_forgets_old_batches() -> None:
    profile = {"layers": [{"share": [0.5, 0.5]}]}
    s = RoutingStats(moe_layers=1, num_experts=2, window_s=10, profile=profile)
    s.add(np.array([[4, 0]]), texts=1, now=100.0)
    s.add(np.array([[0, 6]]), texts=2, now=105.0)
    assert s.window_counts(now=106.0).tolist() == [[4, 6]]
    assert s.window_counts(now=112.0).tolist() == [[0, 6]]  # the first batch is older than 10 s
    snap = s.snapshot()
    assert snap["since_start"]["texts"] == 3
    assert snap["since_start"]["layers"][0]["tokens_per_expert"] == [4, 6]


def test_profile_with_wrong_layer_count_is_ignored() -> None:
    s = RoutingStats(moe_layers=2, num_experts=2, window_s=10, profile={"layers": [{"share": [1, 0]}]})
    s.add(np.array([[1, 1], [1, 1]]), texts=1)
    assert s.snapshot()["since_start"]["layers"][0]["drift_kl"] is None
