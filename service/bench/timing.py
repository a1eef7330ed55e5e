"""Timing helpers shared by the benches: a median of repeated runs, and medians of several runs interleaved."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

K = TypeVar("K", bound=Hashable)

# Pause before each timed run when several are interleaved: the runtime that just ran may still spin its pool threads
# (ONNX Runtime's default spins for some milliseconds after a run, OpenMP's too), which would slow the next one.
SETTLE_S = 0.05


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_medians(
    runs: dict[K, Callable[[], Any]], repeats: int, warmup: int = 1, settle_s: float = SETTLE_S
) -> dict[K, float]:
    """Median seconds of each run over `repeats` rounds, every round timing each run once in turn (after `warmup`
    untimed rounds). This machine flips between two speeds for seconds at a time (README: the spread paragraph under
    the MoE against its dense original); timed one after another, a run can land wholly in a slow spell and its
    ratios to the others with it. Interleaved, a slow spell hits them all alike."""
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    times: dict[K, list[float]] = {key: [] for key in runs}
    for _ in range(repeats):
        for key, fn in runs.items():
            if settle_s:
                time.sleep(settle_s)
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    return {key: statistics.median(t) for key, t in times.items()}
