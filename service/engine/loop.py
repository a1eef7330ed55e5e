"""The in-process loop: one inference thread per model, following scheduler.next_step and waiting on the queue's
condition. (A model process runs its models from its socket loop instead: service/engine/model_server.py.)"""

from __future__ import annotations

import logging
import threading

from service.engine.local_model import LocalModel
from service.engine.scheduler import Stop, Tick, Wait

log = logging.getLogger(__name__)


class InferenceThread:
    def __init__(self, model: LocalModel) -> None:
        self.model = model
        self.thread = threading.Thread(target=self._run, name=f"infer-{model.name}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def _run(self) -> None:
        while True:
            try:
                if not self._step():
                    return
            except Exception:
                # Whatever went wrong outside the model call (metrics, a closed event loop, ...), the thread must
                # live on: a dead inference thread would turn every later request into a 504.
                log.exception("model %s: inference loop error", self.model.name)

    def _step(self) -> bool:
        """One decision and its action. Returns False once the model is stopping."""
        m = self.model
        with m.queue.cond:  # decide and wait under one lock: a text admitted in between wakes the wait
            step = m.decide()
            if isinstance(step, Wait):
                m.queue.cond.wait(step.seconds)
                return True
        if isinstance(step, Stop):
            return False
        if isinstance(step, Tick):
            m.tick()
        else:
            m.run_batch()
        return True
