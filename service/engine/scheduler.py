"""When to run a batch, wait, or keep the engine warm: one pure decision, `next_step`, that both loops follow (the
in-process inference thread, service/engine/loop.py, and the model process's socket loop,
service/engine/model_server.py). They differ only in what "wait" means: a condition variable or a socket poll.

The rules:
- An idle engine never waits to fill a batch: a lone request runs at once.
- A busy engine (texts were already waiting when its last batch ended) gives a batch that is not yet full up to
  max_wait_ms to fill, so concurrent requests share the expert-grouped GEMMs.
- For keep_warm_s after a batch, an idle engine runs a two-token forward every tick: a lone request after a short
  pause then finds the weights in cache (an earlier measurement: 2.3 ms -> 1.2 ms for a short text on bbc-news-moe
  after 50 ms idle; on MiniLM's ONNX int8, whose pool threads no longer spin between runs, the gain is within noise:
  README, "Served: threads that spin"). The tick interval grows with a tick's cost, keeping that work under 5% of a
  core (the MiniLM model process measured 6% while idle, its socket polling included).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MIN_TICK_S = 0.01  # keep-warm: at most one two-token forward per 10 ms of idle time
TICK_SHARE = 20  # a tick's interval is this many times its cost: under 5% of a core


@dataclass(frozen=True)
class Run:
    """Cut a batch from the queue and run it."""


@dataclass(frozen=True)
class Tick:
    """Run a keep-warm forward."""


@dataclass(frozen=True)
class Wait:
    """Wait for new texts, at most `seconds` (None: until some arrive)."""

    seconds: float | None


@dataclass(frozen=True)
class Stop:
    """The model is stopping: leave the loop."""


Step = Run | Tick | Wait | Stop


@dataclass(frozen=True)
class EngineState:
    queued: int  # texts waiting
    full: bool  # a whole batch is waiting
    stopping: bool
    fill_by: float | None  # busy engine: run the open batch by then at the latest; None: run at once
    tick_at: float | None  # the next keep-warm tick; None: the engine may go cold


def next_step(s: EngineState, now: float) -> Step:
    if s.stopping:
        return Stop()
    if s.queued:
        if s.full or s.fill_by is None or now >= s.fill_by:
            return Run()
        return Wait(s.fill_by - now)
    if s.tick_at is None:
        return Wait(None)
    if now >= s.tick_at:
        return Tick()
    return Wait(s.tick_at - now)


class Pacing:
    """The little timing state `next_step` needs, kept per model by whichever loop runs it."""

    def __init__(self, max_wait_s: float, keep_warm_s: float) -> None:
        self.max_wait_s, self.keep_warm_s = max_wait_s, keep_warm_s
        self.last_batch = -math.inf
        self.last_tick = -math.inf
        self.tick_s = MIN_TICK_S
        self.fill_by: float | None = None
        self._judge_busy = False  # the first look at the queue after a batch decides whether the engine is busy

    def state(self, queued: int, full: bool, stopping: bool) -> EngineState:
        if self._judge_busy:
            # Texts that arrived while the last batch ran (a socket loop reads them first) mean a busy engine.
            self._judge_busy = False
            self.fill_by = self.last_batch + self.max_wait_s if queued and self.max_wait_s > 0 else None
        return EngineState(queued, full, stopping, self.fill_by, self._tick_at())

    def _tick_at(self) -> float | None:
        if self.last_batch == -math.inf:
            return None  # never used: nothing to keep warm
        due = max(self.last_batch, self.last_tick) + self.tick_s
        return due if due <= self.last_batch + self.keep_warm_s else None

    def after_batch(self, now: float) -> None:
        self.last_batch = now
        self._judge_busy = True

    def after_tick(self, now: float, cost_s: float) -> None:
        self.last_tick = now
        self.tick_s = max(MIN_TICK_S, TICK_SHARE * cost_s)
