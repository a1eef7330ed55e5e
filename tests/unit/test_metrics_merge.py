"""/metrics with one model process per model: their expositions merged into one view (promtool checks that it is
valid in tests/integration/test_metrics_merge.py)."""

from __future__ import annotations

import numpy as np

from service.engine.routing_stats import RoutingStats
from service.metrics import Metrics, merge_expositions


def model_process_exposition(model: str, texts: int) -> bytes:
    m = Metrics(http=False)  # what a model process holds
    m.texts.labels(model).inc(texts)
    m.inference_duration.labels(model).observe(0.01)
    stats = RoutingStats(1, 4, 60.0, None)
    stats.add(np.array([[3, 1, 0, 2]]), 2)
    m.watch_routing(lambda: [(model, stats)])
    return m.exposition()


def test_each_family_once_with_every_process_samples() -> None:
    merged = merge_expositions([model_process_exposition("a", 3), model_process_exposition("b", 5)]).decode()
    for family in ("moe_texts_total counter", "moe_inference_duration_seconds histogram", "moe_expert_tokens_total"):
        assert merged.count(f"# TYPE {family}") == 1, family
    assert 'moe_texts_total{model="a"} 3.0' in merged and 'moe_texts_total{model="b"} 5.0' in merged
    assert 'moe_inference_duration_seconds_count{model="b"} 1.0' in merged
    assert 'moe_expert_tokens_total{expert="0",layer="0",model="a"} 3.0' in merged
