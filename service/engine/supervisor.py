"""When a dead or hung model process is restarted, and when it is given up: exponential backoff between restarts,
and `failed` once a model has crashed max_restarts times within restart_window_s. Pure (the caller passes the
clock), so the schedule is tested without waiting."""

from __future__ import annotations

from dataclasses import dataclass, field

from service.config import Settings


@dataclass(frozen=True)
class RestartPolicy:
    base_s: float  # the delay after a first crash
    max_s: float  # the delay never grows past this
    max_crashes: int  # this many crashes within window_s: give up
    window_s: float

    @classmethod
    def from_settings(cls, s: Settings) -> RestartPolicy:
        return cls(s.restart_backoff_s, s.restart_backoff_max_s, s.max_restarts, s.restart_window_s)

    def delay(self, recent_crashes: int) -> float | None:
        """Seconds to wait before the next start, given the crashes in the window (this one included); None when
        the model is to be marked failed instead."""
        if recent_crashes >= self.max_crashes:
            return None
        return min(self.max_s, self.base_s * 2 ** max(0, recent_crashes - 1))


@dataclass
class CrashLog:
    """One model's crash times, kept only while they are inside the policy's window."""

    policy: RestartPolicy
    times: list[float] = field(default_factory=list)

    def crashed(self, now: float) -> float | None:
        """Record a crash at `now`: the delay before the restart, or None (give up)."""
        self.times = [t for t in self.times if now - t < self.policy.window_s] + [now]
        return self.policy.delay(len(self.times))

    def clear(self) -> None:
        self.times.clear()
