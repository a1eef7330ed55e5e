"""The scheduling decision as a pure function (scheduler.next_step) and the pacing state both loops keep, under
Hypothesis and with an explicit clock: no thread, no sleep, no wall clock."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from service.engine.scheduler import MIN_TICK_S, EngineState, Pacing, Run, Stop, Tick, Wait, next_step

times = st.floats(0, 100, allow_nan=False)
maybe_times = st.none() | times
states = st.builds(EngineState, st.integers(0, 50), st.booleans(), st.booleans(), maybe_times, maybe_times)


@settings(max_examples=500, deadline=None)
@given(s=states, now=times)
def test_next_step_rules(s: EngineState, now: float) -> None:
    step = next_step(s, now)
    if s.stopping:
        assert step == Stop()
        return
    if s.queued and (s.full or s.fill_by is None or now >= s.fill_by):
        assert step == Run()  # an idle engine, a full batch or a passed fill deadline never waits
    elif s.queued:
        assert step == Wait(s.fill_by - now) and step.seconds > 0  # type: ignore[operator]
    elif s.tick_at is not None and now >= s.tick_at:
        assert step == Tick()
    else:
        assert isinstance(step, Wait)
        assert step.seconds is None if s.tick_at is None else step.seconds == s.tick_at - now
    assert not (isinstance(step, Tick) and s.queued)  # ticks never delay queued texts


def _walk(p: Pacing, start: float, end: float, dt: float = 1e-3, tick_cost: float = 1e-4) -> list[float]:
    """Follow next_step on an idle queue from start to end; returns the times of the ticks it asks for."""
    ticks, now = [], start
    while now < end:
        step = next_step(p.state(0, False, False), now)
        if isinstance(step, Tick):
            ticks.append(now)
            p.after_tick(now, tick_cost)
        now += dt
    return ticks


def test_keep_warm_ticks_follow_a_batch_and_stop_after_keep_warm_s() -> None:
    p = Pacing(max_wait_s=0.0, keep_warm_s=0.3)
    assert _walk(p, 0.0, 1.0) == []  # never used: nothing to keep warm
    p.after_batch(1.0)
    ticks = _walk(p, 1.0, 2.0)
    assert ticks and ticks[0] > 1.0 and ticks[-1] <= 1.3 + 1e-9  # only within keep_warm_s of the batch
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    assert min(gaps) >= MIN_TICK_S - 1e-9 and 25 <= len(ticks) <= 30  # one per 10 ms at most


def test_a_costly_tick_spaces_the_next_ones() -> None:
    p = Pacing(max_wait_s=0.0, keep_warm_s=10.0)
    p.after_batch(0.0)
    ticks = _walk(p, 0.0, 1.0, tick_cost=0.005)  # 20 x 5 ms: one tick per 100 ms, 5% of a core
    assert 9 <= len(ticks) <= 10


@settings(deadline=None)
@given(max_wait_ms=st.floats(0.1, 50), queued_after=st.integers(0, 5))
def test_busy_engine_waits_to_fill_idle_engine_runs_at_once(max_wait_ms: float, queued_after: int) -> None:
    p = Pacing(max_wait_s=max_wait_ms / 1000, keep_warm_s=0.0)
    p.after_batch(10.0)
    first = p.state(queued_after, False, False)  # the first look after a batch judges busy or idle
    if queued_after:
        assert first.fill_by == 10.0 + max_wait_ms / 1000
        step = next_step(first, 10.0)
        assert isinstance(step, Wait) and abs(step.seconds - max_wait_ms / 1000) < 1e-9  # type: ignore[operator]
        assert next_step(p.state(queued_after, True, False), 10.0) == Run()  # full: no reason to wait
    else:
        assert first.fill_by is None
        assert next_step(p.state(1, False, False), 10.5) == Run()  # texts that find the engine idle run at once


def test_no_fill_wait_when_max_wait_is_zero() -> None:
    p = Pacing(max_wait_s=0.0, keep_warm_s=0.0)
    p.after_batch(0.0)
    assert next_step(p.state(3, False, False), 0.0) == Run()
