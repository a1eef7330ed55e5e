"""Runs one batch on a backend: the forward, the results handed to each request (logits / temperature, its own
slice of the routing), the batch metrics, the routing statistics and the measured rate behind Retry-After."""

from __future__ import annotations

import logging
import time
import uuid

import numpy as np

from service.backends.base import Backend, BatchOutput, LayerRouting
from service.engine.request_queue import WorkItem
from service.engine.results import TextResult
from service.engine.routing_stats import RoutingStats
from service.errors import ErrorKind, ServiceError
from service.metrics import ModelMetrics

log = logging.getLogger(__name__)
RATE_SMOOTHING = 0.2  # weight of the newest batch in the moving average of texts/s


class BatchRunner:
    def __init__(self, backend: Backend, stats: RoutingStats, metrics: ModelMetrics) -> None:
        self.backend, self.stats, self.m = backend, stats, metrics
        self.name = backend.info.name
        self.texts_per_s = 0.0  # moving average of engine throughput, for Retry-After
        self.batches_run = 0
        self.busy_since: float | None = None  # monotonic start of the batch running now, for the watchdog

    def run(self, batch: list[WorkItem]) -> None:
        """Run one batch; each request is finished once all its texts have run. A failing batch fails its requests
        with a 500 whose id ties them to one log line; the response carries no trace."""
        if not batch:
            return
        self.busy_since = time.monotonic()
        try:
            self._execute(batch)
        except Exception:
            error_id = uuid.uuid4().hex[:12]
            log.exception("model %s: batch of %d texts failed (error id %s)", self.name, len(batch), error_id)
            message = f"model {self.name!r} failed on this batch (error id {error_id})"
            err = ServiceError(ErrorKind.INTERNAL, message, headers={"x-error-id": error_id})
            for it in batch:
                it.request.fail(err)
        finally:
            self.busy_since = None

    def tick(self) -> float:
        """A two-token forward that keeps caches and threads warm; returns what it cost (seconds)."""
        t0 = time.perf_counter()
        self.backend.forward([[1, 1]])
        return time.perf_counter() - t0

    def _execute(self, batch: list[WorkItem]) -> None:
        self._note_queue_wait(batch, time.monotonic())
        seqs = [it.ids for it in batch]
        t0 = time.perf_counter()
        out = self.backend.forward(seqs, return_routing=any(it.request.return_routing for it in batch))
        infer_s = time.perf_counter() - t0
        self._record(seqs, out, infer_s)
        self._distribute(batch, out, infer_s)

    def _note_queue_wait(self, batch: list[WorkItem], start: float) -> None:
        for it in batch:
            it.request.queue_s = max(it.request.queue_s, start - it.enqueued)
            self.m.queue_wait.observe(start - it.enqueued)

    def _record(self, seqs: list[list[int]], out: BatchOutput, infer_s: float) -> None:
        self.batches_run += 1
        n, tokens = len(seqs), sum(len(s) for s in seqs)
        self.m.inference.observe(infer_s)
        self.m.batch_texts.observe(n)
        self.m.batch_tokens.observe(tokens)
        self.m.padding.observe(1 - tokens / (n * max(len(s) for s in seqs)))
        self.stats.add(out.expert_counts, n)
        rate = n / max(infer_s, 1e-6)
        old = self.texts_per_s
        self.texts_per_s = rate if not old else (1 - RATE_SMOOTHING) * old + RATE_SMOOTHING * rate

    def _distribute(self, batch: list[WorkItem], out: BatchOutput, infer_s: float) -> None:
        logits = self._scale(out.logits)
        offsets = np.cumsum([0] + [len(it.ids) for it in batch])
        seen: set[int] = set()
        for row, it in enumerate(batch):
            req = it.request
            if req.failed:
                continue
            routing = None
            if req.return_routing and out.routing is not None:
                a, b = offsets[row], offsets[row + 1]
                routing = [LayerRouting(r.expert_ids[a:b], r.gates[a:b]) for r in out.routing]
            req.results[it.index] = TextResult(logits[row], len(it.ids), it.truncated, routing)
            req.remaining -= 1
            if id(req) not in seen:
                seen.add(id(req))
                req.inference_s += infer_s
            if req.remaining == 0:
                req.finish(req.results)

    def _scale(self, logits: np.ndarray) -> np.ndarray:
        """Temperature scaling, once here for every backend: results carry logits / T, so softmax gives calibrated
        probabilities and raw scores are the scaled logits."""
        t = self.backend.info.temperature
        return logits if t == 1.0 else (logits / np.float32(t)).astype(logits.dtype, copy=False)
