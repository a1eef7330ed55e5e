"""Restart policy, folder settling and the repository's state machine: pure, with an explicit clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.engine.folder_watch import Settle
from service.engine.repository import MOVES, Entry, ModelState
from service.engine.supervisor import CrashLog, RestartPolicy

POLICY = RestartPolicy(base_s=0.5, max_s=4.0, max_crashes=5, window_s=60.0)


def test_backoff_doubles_up_to_the_cap_and_the_nth_crash_gives_up() -> None:
    log = CrashLog(POLICY)
    assert [log.crashed(t) for t in (0, 1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0, None]
    capped = CrashLog(RestartPolicy(base_s=1.0, max_s=3.0, max_crashes=10, window_s=60.0))
    assert [capped.crashed(t) for t in range(4)] == [1.0, 2.0, 3.0, 3.0]


def test_crashes_outside_the_window_are_forgotten() -> None:
    log = CrashLog(POLICY)
    for t in (0, 10, 20, 30):
        log.crashed(t)
    # 100 s on, the four earlier crashes are outside the 60 s window: this one is a first crash again.
    assert log.crashed(100) == 0.5 and log.times == [100]


@given(st.lists(st.floats(0, 1000, allow_nan=False), min_size=1, max_size=30))
def test_never_more_than_max_crashes_in_a_window_without_giving_up(gaps: list[float]) -> None:
    log, now = CrashLog(POLICY), 0.0
    for gap in gaps:
        now += gap
        delay = log.crashed(now)
        in_window = [t for t in log.times if now - t < POLICY.window_s]
        assert (delay is None) == (len(in_window) >= POLICY.max_crashes)
        if delay is not None:
            assert POLICY.base_s <= delay <= POLICY.max_s


def test_a_folder_settles_only_once_unchanged_for_the_delay() -> None:
    settle = Settle(settle_s=3.0)
    assert settle.observe({"m": (("config.json", 10, 1),)}, now=0.0) == {}
    # Still being copied: a file appears, then grows.
    assert settle.observe({"m": (("config.json", 10, 1), ("w", 5, 2))}, now=2.0) == {}
    assert settle.observe({"m": (("config.json", 10, 1), ("w", 9, 3))}, now=4.0) == {}
    assert settle.observe({"m": (("config.json", 10, 1), ("w", 9, 3))}, now=6.9) == {}
    assert settle.observe({"m": (("config.json", 10, 1), ("w", 9, 3))}, now=7.0) == {
        "m": (("config.json", 10, 1), ("w", 9, 3))
    }


def test_a_removed_folder_is_gone_once_it_stays_away() -> None:
    settle, sig = Settle(settle_s=2.0), (("config.json", 1, 1),)
    settle.observe({"m": sig}, now=0.0)
    assert settle.observe({}, now=5.0) == {}  # just vanished (maybe replaced by rm + copy)
    assert settle.observe({"m": sig}, now=6.0) == {}  # back: it changed twice, not settled yet
    settle.observe({}, now=7.0)
    assert settle.observe({}, now=9.0) == {"m": None}
    assert settle.observe({}, now=20.0) == {}  # reported once


def test_state_moves() -> None:
    e = Entry("m")
    for to in (
        ModelState.LOADING,
        ModelState.READY,
        ModelState.READY,
        ModelState.RESTARTING,
        ModelState.RESTARTING,
        ModelState.FAILED,
        ModelState.LOADING,
        ModelState.READY,
        ModelState.UNLOADING,
        ModelState.UNAVAILABLE,
    ):
        e.move(to, "why")
    assert e.public() == {"name": "m", "version": None, "state": "UNAVAILABLE", "reason": "why"}
    with pytest.raises(ValueError, match="no move from UNAVAILABLE to READY"):
        e.move(ModelState.READY)
    assert set(MOVES) == set(ModelState)  # every state has its row
