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


def test_servers_take_turns_and_keep_their_median_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """served.in_turns: per point, each server's load once in turn, `runs` times over; a row per server and point
    (server order), the median-throughput run with every run's rate."""
    from service.bench import served

    monkeypatch.setattr(served, "SETTLE_S", 0)
    calls: list[tuple[str, str, int]] = []
    rates = {"a": iter([5.0, 1.0, 3.0, 7.0, 9.0, 8.0]), "b": iter([2.0] * 6)}

    def load(server: str, texts: str, c: int) -> served.LoadResult:
        calls.append((server, texts, c))
        return served.LoadResult(server, texts, c, None, 10, 0, 1.0, next(rates[server]), 1.0, 1.0, 1.0)

    loads = {s: (lambda t, c, s=s: load(s, t, c)) for s in ("a", "b")}
    rows = served.in_turns(loads, [("short", 1), ("long", 4)], runs=3)
    assert calls == [(s, "short", 1) for s in "ab"] * 3 + [(s, "long", 4) for s in "ab"] * 3
    assert [(r["server"], r["texts"], r["concurrency"]) for r in rows] == [
        ("a", "short", 1),
        ("a", "long", 4),
        ("b", "short", 1),
        ("b", "long", 4),
    ]
    assert rows[0]["rps"] == 3.0 and rows[0]["rps_all_runs"] == [5.0, 1.0, 3.0]
    assert rows[1]["rps"] == 8.0 and rows[1]["runs"] == 3
