"""The benches' interleaved timing: every run once per round, in turn, and each run's median over the rounds."""

from __future__ import annotations

import pytest

from service.bench import timing


def test_runs_take_turns_after_the_warmup_rounds() -> None:
    order: list[str] = []
    runs = {k: (lambda k=k: order.append(k)) for k in "abc"}
    timing.interleaved_medians(runs, repeats=3, warmup=2, settle_s=0)
    assert order == list("abc") * 5


def test_each_run_gets_the_median_of_its_own_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake clock that each run advances by its own durations: a's are 3, 1, 2 (median 2), b's 10, 50, 20."""
    clock = {"t": 0.0}
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock["t"])
    durations = {"a": iter([3.0, 1.0, 2.0]), "b": iter([10.0, 50.0, 20.0])}

    def advance(key: str) -> None:
        clock["t"] += next(durations[key])

    runs = {k: (lambda k=k: advance(k)) for k in durations}
    assert timing.interleaved_medians(runs, repeats=3, warmup=0, settle_s=0) == {"a": 2.0, "b": 20.0}
