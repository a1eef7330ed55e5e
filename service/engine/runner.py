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
from service.engine.tasks import temperatures
from service.errors import ErrorKind, ServiceError
from service.metrics import ModelMetrics

log = logging.getLogger(__name__)
RATE_SMOOTHING = 0.2  # weight of the newest batch in the moving average of texts/s


class BatchRunner:
    def __init__(
        self,
        backend: Backend,
        stats: RoutingStats,
        metrics: ModelMetrics,
        task_stats: list[RoutingStats] | None = None,
    ) -> None:
        self.backend, self.stats, self.m = backend, stats, metrics
        self.task_stats = task_stats or []  # multi-task: each task's own statistics, by task id
        self.name = backend.info.name
        # Per row, divided by its task's temperature (a single-task model's rows all have task 0 here).
        self.temperatures = np.asarray(temperatures(backend.info), dtype=np.float32)
        self.multitask = bool(backend.info.tasks)
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
        self.backend.forward([[1, 1]], tasks=[[0]] if self.multitask else None)
        return time.perf_counter() - t0

    def _execute(self, batch: list[WorkItem]) -> None:
        self._note_queue_wait(batch, time.monotonic())
        seqs = [it.ids for it in batch]
        # Multi-task: each text with its request's tasks; texts of every task and request share the one forward.
        tasks = [it.request.tasks or [] for it in batch] if self.multitask else None
        t0 = time.perf_counter()
        out = self.backend.forward(seqs, return_routing=any(it.request.return_routing for it in batch), tasks=tasks)
        infer_s = time.perf_counter() - t0
        self._record(seqs, out, infer_s, tasks)
        self._distribute(batch, out, infer_s, tasks)

    def _note_queue_wait(self, batch: list[WorkItem], start: float) -> None:
        for it in batch:
            it.request.queue_s = max(it.request.queue_s, start - it.enqueued)
            self.m.queue_wait.observe(start - it.enqueued)

    def _record(self, seqs: list[list[int]], out: BatchOutput, infer_s: float, tasks: list[list[int]] | None) -> None:
        self.batches_run += 1
        n, tokens = len(seqs), sum(len(s) for s in seqs)
        self.m.inference.observe(infer_s)
        self.m.batch_texts.observe(n)
        self.m.batch_tokens.observe(tokens)
        self.m.padding.observe(1 - tokens / (n * max(len(s) for s in seqs)))
        self.stats.add(out.expert_counts, n)
        if out.task_expert_counts is not None and tasks is not None:
            texts = np.bincount([t for ts in tasks for t in ts], minlength=len(self.task_stats))
            for stats, counts, n_task in zip(self.task_stats, out.task_expert_counts, texts, strict=False):
                if n_task:
                    stats.add(counts, int(n_task))
        rate = n / max(infer_s, 1e-6)
        old = self.texts_per_s
        self.texts_per_s = rate if not old else (1 - RATE_SMOOTHING) * old + RATE_SMOOTHING * rate

    def _distribute(
        self, batch: list[WorkItem], out: BatchOutput, infer_s: float, tasks: list[list[int]] | None
    ) -> None:
        """Each text its logits (a row, or with tasks its rows, one per task asked) and its tokens' routing. With
        tasks the routing is over the rows' tokens: a text asked for k tasks gets k runs of its tokens, task after
        task (a shared layer's routing repeated in each)."""
        row_task = np.concatenate([np.asarray(ts, dtype=np.int64) for ts in tasks]) if tasks else None
        logits = self._scale(out.logits, row_task)
        rows = np.cumsum([0] + [len(ts) for ts in tasks]) if tasks else np.arange(len(batch) + 1)
        offsets = np.cumsum([0] + [len(it.ids) * (rows[i + 1] - rows[i]) for i, it in enumerate(batch)])
        seen: set[int] = set()
        for row, it in enumerate(batch):
            req = it.request
            if req.failed:
                continue
            routing = None
            if req.return_routing and out.routing is not None:
                a, b = offsets[row], offsets[row + 1]
                routing = [LayerRouting(r.expert_ids[a:b], r.gates[a:b]) for r in out.routing]
            text_logits = logits[rows[row] : rows[row + 1]] if tasks else logits[row]
            req.results[it.index] = TextResult(text_logits, len(it.ids), it.truncated, routing)
            req.remaining -= 1
            if id(req) not in seen:
                seen.add(id(req))
                req.inference_s += infer_s
            if req.remaining == 0:
                req.finish(req.results)

    def _scale(self, logits: np.ndarray, row_task: np.ndarray | None) -> np.ndarray:
        """Temperature scaling, once here for every backend: results carry logits / T, so softmax gives calibrated
        probabilities and raw scores are the scaled logits. Multi-task: each row by its own task's T."""
        if row_task is not None:
            t = self.temperatures[row_task][:, None]
            return (logits / t).astype(logits.dtype, copy=False)
        t = self.backend.info.temperature
        return logits if t == 1.0 else (logits / np.float32(t)).astype(logits.dtype, copy=False)
