"""Per-model dynamic batcher: bounded queue, token-budget batch cutting, one inference thread, futures.

Request path: `ModelWorker.classify` tokenizes off the event loop, admits the texts into the queue (or refuses with
429 when it is full), and awaits a future. The inference thread cuts batches from the queue, drops texts whose
request was cancelled (client gone) or whose deadline passed, runs the backend once per batch and resolves the
futures through the event loop. Nothing here imports torch: the backend returns numpy arrays.

Batch cutting is length aware: from a window at the head of the queue it takes the oldest text plus the texts
closest to it in length, while (texts x longest text) stays within the token budget. The oldest text always goes,
so nothing starves, and a batch of similar lengths wastes little attention compute on padding.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from service.backends.base import Backend, LayerRouting
from service.config import Settings
from service.engine.routing_stats import RoutingStats
from service.errors import ErrorKind, ServiceError, deadline_exceeded, queue_full
from service.metrics import Metrics
from service.modeling.tokenizer import Encoded

log = logging.getLogger(__name__)
MIN_TICK_S = 0.01  # keep-warm: at most one two-token forward per 10 ms of idle time
INLINE_TOKENIZE_CHARS = 1024  # requests up to this many characters are tokenized on the event loop itself


@dataclass
class TextResult:
    logits: np.ndarray  # [num_labels], already divided by the model's temperature
    n_tokens: int  # how many tokens the model read
    truncated: bool
    routing: list[LayerRouting] | None = None  # this text's tokens only
    tokens: list[str] | None = None  # the token strings, with routing only


@dataclass
class ClassifyResult:
    results: list[TextResult]
    tokenization_s: float
    queue_s: float  # longest wait of any of the request's texts
    inference_s: float  # summed forward time of the batches the request's texts ran in


Finish = Callable[[object], None]  # called once with a request's results (list[TextResult]) or its ServiceError


@dataclass(eq=False)
class PendingRequest:
    finish: Finish  # from the inference side: hands the outcome to whoever waits (an event loop, the model process)
    n: int
    deadline: float  # time.monotonic()
    return_routing: bool
    results: list[TextResult | None] = field(default_factory=list)
    remaining: int = 0
    cancelled: bool = False  # set by the event loop when the client left; read by the inference thread
    failed: bool = False
    queue_s: float = 0.0
    inference_s: float = 0.0
    own_ms: int | None = None  # the request's own timeout_ms when it is the binding deadline (408, not 504)

    def __post_init__(self) -> None:
        self.results = [None] * self.n
        self.remaining = self.n


@dataclass(eq=False)
class WorkItem:
    request: PendingRequest
    index: int
    ids: list[int]
    truncated: bool
    enqueued: float  # time.monotonic()


def _settle(fut: asyncio.Future, value: object) -> None:
    if not fut.done():
        if isinstance(value, BaseException):
            fut.set_exception(value)
        else:
            fut.set_result(value)


def future_finish(loop: asyncio.AbstractEventLoop, fut: asyncio.Future) -> Finish:
    """Finish a request by settling an asyncio future on its own event loop (thread-safe)."""

    def finish(value: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            loop.call_soon_threadsafe(_settle, fut, value)

    return finish


def retry_after_ms(texts: int, texts_per_s: float) -> int:
    """How long `texts` waiting ahead take to drain at the measured rate: 1 ms to 60 s."""
    rate = texts_per_s or 100.0
    return int(min(60_000, max(1, math.ceil(1000 * texts / rate))))


def cut_batch(items: list[WorkItem], max_texts: int, max_tokens: int) -> tuple[list[WorkItem], list[WorkItem]]:
    """The batching policy, pure: from `items` (oldest first) take the oldest and the texts closest to it in
    length while (texts x longest) stays within max_tokens and texts within max_texts; the oldest always goes,
    so nothing starves. Returns (batch, rest), each in the order of `items`."""
    if not items:
        return [], []
    lengths = [len(it.ids) for it in items]
    order = sorted(range(len(items)), key=lambda i: (lengths[i], i))
    lo = hi = order.index(0)  # the oldest text
    longest = lengths[0]
    while hi - lo + 1 < max_texts:
        options = []
        if lo > 0:
            options.append(lo - 1)
        if hi < len(order) - 1:
            options.append(hi + 1)
        options.sort(key=lambda j: abs(lengths[order[j]] - lengths[0]))
        for j in options:
            new_longest = max(longest, lengths[order[j]])
            if (hi - lo + 2) * new_longest <= max_tokens:
                lo, hi, longest = min(lo, j), max(hi, j), new_longest
                break
        else:
            break
    chosen = set(order[lo : hi + 1])
    return [it for i, it in enumerate(items) if i in chosen], [it for i, it in enumerate(items) if i not in chosen]


class ModelWorker:
    def __init__(
        self,
        backend: Backend,
        settings: Settings,
        metrics: Metrics,
        tokenize_pool: ThreadPoolExecutor,
        profile: dict | None = None,
    ) -> None:
        self.backend = backend
        self.info = backend.info
        self.name = backend.info.name
        self.settings = settings
        self.metrics = metrics
        self.tokenize_pool = tokenize_pool
        # A batch must at least hold one text of maximum length.
        self.max_batch_tokens = max(settings.max_batch_tokens, self.info.max_length)
        self.stats = RoutingStats(self.info.moe_layers, self.info.num_experts, settings.routing_window_s, profile)
        self._queue: deque[WorkItem] = deque()
        self._queued_tokens = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._texts_per_s = 0.0  # moving average of engine throughput, for Retry-After
        self._last_batch = -math.inf  # monotonic end of the last batch: keep-warm ticks follow it (keep_warm_s)
        self._tick_s = MIN_TICK_S
        self._thread = threading.Thread(target=self._run, name=f"infer-{self.name}", daemon=True)
        self.batches_run = 0
        self.ready = False
        self.busy_since: float | None = None  # monotonic start of the batch running now, for the watchdog
        self.evaluation: dict | None = None  # eval.json's headline figures, read once at load (registry)
        # This model's metric children, looked up once: a labels() call per text or batch costs a lock and a dict.
        m, name = metrics, self.name
        self._m_queue = m.queue_depth.labels(name)
        m.queue_capacity.labels(name).set(settings.max_queue_texts)
        self._m_tokenization = m.tokenization_duration.labels(name)
        self._m_texts, self._m_truncated = m.texts.labels(name), m.truncated.labels(name)
        self._m_queue_wait, self._m_inference = m.queue_duration.labels(name), m.inference_duration.labels(name)
        self._m_batch_texts, self._m_batch_tokens = m.batch_texts.labels(name), m.batch_tokens.labels(name)
        self._m_padding = m.padding_ratio.labels(name)

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self, thread: bool = True) -> None:
        """Warm up, and start the inference thread unless the caller runs batches itself (run_batch)."""
        self.backend.warmup()
        if thread:
            self._thread.start()
        self.ready = True

    def stop(self, timeout: float = 5.0) -> None:
        self.ready = False
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            if self._thread.ident is None:  # no inference thread to do it (the model process runs the batches)
                self._fail_all(ServiceError(ErrorKind.MODEL_NOT_READY, f"model {self.name!r} is shutting down"))
        if self._thread.is_alive():
            self._thread.join(timeout)

    def health_problem(self, hang_s: float) -> str | None:
        """Why this worker can no longer serve, if it cannot: its inference thread died, or one batch has run for
        longer than hang_s (a hung kernel or device)."""
        if self.ready and self._thread.ident is not None and not self._thread.is_alive():
            return "inference thread died"
        started = self.busy_since
        if started is not None and time.monotonic() - started > hang_s:
            return f"one batch has run for more than {hang_s:g} s"
        return None

    @property
    def queued_texts(self) -> int:
        return len(self._queue)

    # -- what the API sees of a model (the same for a model served in another process: service/engine/remote.py)
    @property
    def kind(self) -> str:
        return self.backend.kind

    @property
    def device(self) -> str:
        return self.backend.device

    async def queued(self) -> int:
        return len(self._queue)

    async def routing(self) -> dict:
        return self.stats.snapshot()

    # -- event-loop side -----------------------------------------------------------------------------------------
    async def classify(
        self, texts: list[str], *, truncate: bool = True, return_routing: bool = False, timeout_s: float | None = None
    ) -> ClassifyResult:
        loop = asyncio.get_running_loop()
        deadline, own_ms = self._deadline(timeout_s)
        self._check_room(len(texts))  # refuse before any work: a refused request must not burn the cores
        t0 = time.perf_counter()
        if sum(map(len, texts)) <= INLINE_TOKENIZE_CHARS:
            encoded = self._encode(texts, truncate)  # tens of microseconds: cheaper than a hop to the pool and back
        else:
            encoded = await loop.run_in_executor(self.tokenize_pool, self._encode, texts, truncate)
        tokenization_s = time.perf_counter() - t0
        future = loop.create_future()
        req = self._enqueue(encoded, deadline, own_ms, return_routing, future_finish(loop, future))
        try:
            done, _ = await asyncio.wait({future}, timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.CancelledError:
            req.cancelled = True  # client went away: the inference thread skips what is still queued
            future.cancel()
            raise
        if not done:
            req.cancelled = True
            future.cancel()  # a late result or error from the inference thread then goes nowhere, quietly
            raise deadline_exceeded(self.name, own_ms)
        return self._complete(req, future.result(), encoded, tokenization_s)

    def submit(
        self,
        texts: list[str],
        *,
        truncate: bool,
        return_routing: bool,
        timeout_s: float | None,
        finish: Callable[[ClassifyResult | ServiceError], None],
    ) -> PendingRequest:
        """classify() for a caller that runs the batches itself in the same thread (the model process): admits
        the texts (tokenized here) and returns; `finish` gets the ClassifyResult or the ServiceError later, from
        run_batch(). Refusals (429, 422, ...) are raised."""
        deadline, own_ms = self._deadline(timeout_s)
        self._check_room(len(texts))
        t0 = time.perf_counter()
        encoded = self._encode(texts, truncate)
        tokenization_s = time.perf_counter() - t0

        def done(value: object) -> None:
            if isinstance(value, ServiceError):
                finish(value)
            else:
                finish(self._complete(req, value, encoded, tokenization_s))  # type: ignore[arg-type]

        req = self._enqueue(encoded, deadline, own_ms, return_routing, done)
        return req

    def _deadline(self, timeout_s: float | None) -> tuple[float, int | None]:
        cap = self.settings.request_timeout_s
        timeout_s = cap if timeout_s is None else min(timeout_s, cap)
        # Whose deadline is it: a request's own timeout_ms below the server's cap is answered 408, not 504.
        own_ms = round(timeout_s * 1000) if timeout_s < cap else None
        return time.monotonic() + timeout_s, own_ms

    def _encode(self, texts: list[str], truncate: bool) -> list[Encoded]:
        t0 = time.perf_counter()
        max_len = self.info.max_length
        encoded = self.backend.tokenizer.encode_batch(texts, max_len)
        self._m_tokenization.observe(time.perf_counter() - t0)
        if not truncate:
            for i, enc in enumerate(encoded):
                if enc.truncated:
                    raise ServiceError(
                        ErrorKind.INPUT_TOO_LONG,
                        f"inputs[{i}] has {enc.original_length} tokens, {enc.original_length - max_len} more than "
                        f"model {self.name!r} accepts ({max_len}); shorten it or send truncate=true",
                        field=f"inputs[{i}]",
                    )
        return encoded

    def _enqueue(
        self, encoded: list[Encoded], deadline: float, own_ms: int | None, return_routing: bool, finish: Finish
    ) -> PendingRequest:
        now = time.monotonic()
        if now >= deadline:
            raise deadline_exceeded(self.name, own_ms)
        req = PendingRequest(finish, len(encoded), deadline, return_routing, own_ms=own_ms)
        self._admit([WorkItem(req, i, e.ids, e.truncated, now) for i, e in enumerate(encoded)])
        return req

    def _complete(
        self, req: PendingRequest, results: list[TextResult], encoded: list[Encoded], tokenization_s: float
    ) -> ClassifyResult:
        if req.return_routing:
            vocab = self.backend.tokenizer.tokenizer
            for r, enc in zip(results, encoded, strict=True):
                r.tokens = [vocab.id_to_token(t) or "" for t in enc.ids]
        # Counted here, once, for every API that classifies (/v1 and /v2 alike).
        self._m_texts.inc(len(results))
        truncated = sum(r.truncated for r in results)
        if truncated:
            self._m_truncated.inc(truncated)
        return ClassifyResult(results, tokenization_s, req.queue_s, req.inference_s)

    def _check_room(self, n: int) -> None:
        """Admission: 503 while stopping, 429 when n more texts would overfill the queue. Called before
        tokenizing (cheap refusal) and again when the texts are queued (the queue may have filled meanwhile)."""
        if self._stopping:
            raise ServiceError(ErrorKind.MODEL_NOT_READY, f"model {self.name!r} is shutting down")
        if len(self._queue) + n > self.settings.max_queue_texts:
            raise queue_full(self.name, retry_after_ms(len(self._queue) + n, self._texts_per_s))

    def _admit(self, items: list[WorkItem]) -> None:
        with self._cond:
            self._check_room(len(items))
            self._queue.extend(items)
            self._queued_tokens += sum(len(it.ids) for it in items)
            self._m_queue.set(len(self._queue))
            self._cond.notify()

    @property
    def texts_per_s(self) -> float:
        return self._texts_per_s


    # -- inference thread ----------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                if not self._step():
                    return
            except Exception:
                # Whatever went wrong outside the model call (metrics, a closed event loop, ...), the thread must
                # live on: a dead inference thread would turn every later request into a 504.
                log.exception("model %s: inference loop error", self.name)

    def _step(self) -> bool:
        """One batch. Returns False once the worker is stopping."""
        with self._cond:
            idle = not self._queue
            self._wait_for_work()
            if self._stopping:
                self._fail_all(ServiceError(ErrorKind.MODEL_NOT_READY, f"model {self.name!r} is shutting down"))
                return False
            if not idle:
                self._wait_for_more()
        self.run_batch()
        return True

    def run_batch(self) -> None:
        """Cut one batch from the queue and run it; each request is finished once all its texts have run."""
        with self._cond:
            batch = self._cut_batch()
            self._m_queue.set(len(self._queue))
        if not batch:
            return
        self.busy_since = time.monotonic()
        try:
            self._execute(batch)
        except Exception:
            # The id ties each failed request's 500 to this log line; the response carries no trace.
            error_id = uuid.uuid4().hex[:12]
            log.exception("model %s: batch of %d texts failed (error id %s)", self.name, len(batch), error_id)
            message = f"model {self.name!r} failed on this batch (error id {error_id})"
            self._fail(batch, ServiceError(ErrorKind.INTERNAL, message, headers={"x-error-id": error_id}))
        finally:
            self.busy_since = None
            self._last_batch = time.monotonic()

    @property
    def batch_full(self) -> bool:
        return len(self._queue) >= self.settings.max_batch_size or self._queued_tokens >= self.max_batch_tokens

    def tick_due_in(self) -> float | None:
        """Seconds until the next keep-warm tick (see _wait_for_work), or None when the engine may go cold."""
        if time.monotonic() >= self._last_batch + self.settings.keep_warm_s:
            return None
        return self._tick_s

    def tick(self) -> None:
        t0 = time.perf_counter()
        self.backend.forward([[1, 1]])
        self._tick_s = max(MIN_TICK_S, 20 * (time.perf_counter() - t0))

    def _wait_for_work(self) -> None:
        """Called with the lock held; returns once texts are queued or the worker stops. For keep_warm_s after a
        batch, an idle engine runs a two-token forward every tick: a lone request after a short pause then finds
        the weights in cache and the thread awake (measured: 2.3 ms -> 1.2 ms for a short text on bbc-news-moe
        after 50 ms idle). The tick interval keeps that work under 5% of a core."""
        while not self._queue and not self._stopping:
            due = self.tick_due_in()
            if due is None:
                self._cond.wait()
            elif not self._cond.wait(due):
                self._cond.release()
                try:
                    self.tick()
                finally:
                    self._cond.acquire()

    def _wait_for_more(self) -> None:
        """Busy engine: give a not-yet-full batch up to max_wait_ms to fill. An idle engine never waits."""
        wait_s = self.settings.max_wait_ms / 1000
        if wait_s <= 0:
            return
        end = time.monotonic() + wait_s
        while not self.batch_full and not self._stopping:
            left = end - time.monotonic()
            if left <= 0:
                return
            self._cond.wait(left)

    def _is_dead(self, item: WorkItem, now: float) -> bool:
        req = item.request
        if req.cancelled or req.failed:
            return True
        if now >= req.deadline:
            req.failed = True  # counted in the failure metrics by the API's error handler, like every 504
            req.finish(deadline_exceeded(self.name, req.own_ms))
            return True
        return False

    def _cut_batch(self) -> list[WorkItem]:
        """Called with the lock held. Takes the oldest live text and its closest neighbours in length."""
        now = time.monotonic()
        window: list[WorkItem] = []
        limit = 4 * self.settings.max_batch_size
        while self._queue and len(window) < limit:
            item = self._queue.popleft()
            self._queued_tokens -= len(item.ids)
            if not self._is_dead(item, now):
                window.append(item)
        if not window:
            return []
        batch, rest = cut_batch(window, self.settings.max_batch_size, self.max_batch_tokens)
        self._queue.extendleft(reversed(rest))
        self._queued_tokens += sum(len(it.ids) for it in rest)
        return batch

    def _execute(self, batch: list[WorkItem]) -> None:
        start = time.monotonic()
        for it in batch:
            it.request.queue_s = max(it.request.queue_s, start - it.enqueued)
            self._m_queue_wait.observe(start - it.enqueued)
        want_routing = any(it.request.return_routing for it in batch)
        seqs = [it.ids for it in batch]
        t0 = time.perf_counter()
        out = self.backend.forward(seqs, return_routing=want_routing)  # errors: see _step
        infer_s = time.perf_counter() - t0
        self.batches_run += 1
        n, tokens = len(batch), sum(len(s) for s in seqs)
        self._m_inference.observe(infer_s)
        self._m_batch_texts.observe(n)
        self._m_batch_tokens.observe(tokens)
        self._m_padding.observe(1 - tokens / (n * max(len(s) for s in seqs)))
        self.stats.add(out.expert_counts, n)
        rate = n / max(infer_s, 1e-6)
        self._texts_per_s = rate if not self._texts_per_s else 0.8 * self._texts_per_s + 0.2 * rate

        logits = self._scale(out.logits)
        offsets = np.cumsum([0] + [len(s) for s in seqs])
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
        t = self.info.temperature
        return logits if t == 1.0 else (logits / np.float32(t)).astype(logits.dtype, copy=False)

    def _fail(self, items: list[WorkItem], err: ServiceError) -> None:
        for it in items:
            req = it.request
            if not req.failed:
                req.failed = True
                req.finish(err)

    def _fail_all(self, err: ServiceError) -> None:
        self._fail(list(self._queue), err)
        self._queue.clear()
        self._queued_tokens = 0
