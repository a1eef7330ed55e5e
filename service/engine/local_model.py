"""A model served in this process: its tokenizer, request queue (service/engine/request_queue.py) and batch runner
(service/engine/runner.py) behind the ModelHandle façade the API sees (service/engine/handle.py). Which loop runs
its batches is chosen once, by whoever builds it: an inference thread (service/engine/loop.py) or the model
process's socket loop (service/engine/model_server.py); both follow service/engine/scheduler.py's next_step."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from service.backends.base import Backend, LayerRouting
from service.config import Settings
from service.engine.request_queue import Finish, PendingRequest, RequestQueue, WorkItem, deadline_for
from service.engine.results import ClassifyResult, TextResult
from service.engine.routing_stats import RoutingStats
from service.engine.runner import BatchRunner
from service.engine.scheduler import Pacing, Step, next_step
from service.errors import ErrorKind, ServiceError, deadline_exceeded
from service.metrics import Metrics
from service.modeling.windows import LongText, LongTextPolicy, Windowed, encode_windows, pool_logits, request_policy

INLINE_TOKENIZE_CHARS = 1024  # requests up to this many characters are tokenized on the event loop itself
Deadline = tuple[float, int | None]  # see deadline_for
Encoding = tuple[list[Windowed], float]  # the texts' windows, and the seconds tokenizing took


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


class LocalModel:
    def __init__(
        self,
        backend: Backend,
        settings: Settings,
        metrics: Metrics,
        tokenize_pool: ThreadPoolExecutor,
        profile: dict | None = None,
    ) -> None:
        self.backend, self.info, self.name = backend, backend.info, backend.info.name
        self.settings, self.tokenize_pool = settings, tokenize_pool
        self.long_text = settings.long_text_policy()
        self.m = metrics.for_model(self.name)
        # A batch must hold one text of maximum length.
        self.info.batch_tokens = max(settings.batch_tokens(self.info.batch_tokens), self.info.max_length)
        metrics.queue_capacity.labels(self.name).set(settings.max_queue_texts)
        self.stats = RoutingStats(self.info.moe_layers, self.info.num_experts, settings.routing_window_s, profile)
        # Multi-task: each task's routing too, against its own part of the profile (routing_profile.json "tasks").
        self.task_stats = {
            task: RoutingStats(self.info.moe_layers, self.info.num_experts, settings.routing_window_s, part)
            for task, part in task_profiles(profile, list(self.info.tasks)).items()
        }
        self.runner = BatchRunner(backend, self.stats, self.m, list(self.task_stats.values()))
        self.queue = RequestQueue(
            self.name,
            settings.max_queue_texts,
            settings.max_batch_size,
            self.info.batch_tokens,
            rate=lambda: self.runner.texts_per_s,
            on_depth=self.m.queue_depth.set,
        )
        self.pacing = Pacing(settings.max_wait_ms / 1000, settings.keep_warm_s)
        self.ready = False
        self.evaluation: dict | None = None  # eval.json's headline figures, read once at load (LocalEngine)
        self.experts: dict | None = None  # expert_profile(): training share and classes per expert (LocalEngine)

    # -- lifecycle and scheduling (the loop that runs this model calls these) ---------------------------------
    def warm_up(self) -> None:
        self.backend.warmup()
        self.ready = True

    def close(self) -> None:
        self.ready = False
        self.queue.close()

    def decide(self) -> Step:
        with self.queue.cond:
            state = self.pacing.state(len(self.queue), self.queue.full, self.queue.stopping)
            return next_step(state, time.monotonic())

    def run_batch(self) -> None:
        batch = self.queue.cut()
        if batch:  # every text it looked at may have been dead: then nothing ran
            self.runner.run(batch)
            self.pacing.after_batch(time.monotonic())

    def tick(self) -> None:
        self.pacing.after_tick(time.monotonic(), self.runner.tick())

    # -- what the API sees of a model (the same for a model in a model process: service/engine/remote.py) ------
    @property
    def kind(self) -> str:
        return self.backend.kind

    @property
    def device(self) -> str:
        return self.backend.device

    @property
    def texts_per_s(self) -> float:
        return self.runner.texts_per_s

    async def queued(self) -> int:
        return len(self.queue)

    async def routing(self) -> dict:
        return routing_snapshot(self.stats, self.task_stats)

    async def classify(
        self,
        texts: list[str],
        *,
        truncate: bool = True,
        long_text: LongText | None = None,
        return_routing: bool = False,
        timeout_s: float | None = None,
        tasks: list[int] | None = None,
    ) -> ClassifyResult:
        loop = asyncio.get_running_loop()
        deadline = self._deadline(timeout_s)
        self.queue.check_room(len(texts))  # refuse before any work: a refused request must not burn the cores
        policy = request_policy(self.long_text, long_text, truncate)
        if sum(map(len, texts)) <= INLINE_TOKENIZE_CHARS:
            encoded = self._encode(texts, policy, truncate)  # tens of microseconds: cheaper than a hop to the pool
        else:
            encoded = await loop.run_in_executor(self.tokenize_pool, self._encode, texts, policy, truncate)
        future = loop.create_future()
        req = self._enqueue(encoded, deadline, return_routing, future_finish(loop, future), tasks)
        try:
            done, _ = await asyncio.wait({future}, timeout=max(0.0, deadline[0] - time.monotonic()))
        except asyncio.CancelledError:
            req.cancelled = True  # client went away: its texts still queued are dropped
            future.cancel()
            raise
        if not done:
            req.cancelled = True
            future.cancel()  # a late result or error from the inference thread then goes nowhere, quietly
            raise deadline_exceeded(self.name, deadline[1])
        return future.result()

    def submit(
        self,
        texts: list[str],
        *,
        truncate: bool,
        long_text: LongText | None = None,
        return_routing: bool,
        timeout_s: float | None,
        finish: Callable[[ClassifyResult | ServiceError], None],
        tasks: list[int] | None = None,
    ) -> PendingRequest:
        """classify() for a caller that runs the batches itself in the same thread (the model process): admits the
        texts and returns; `finish` gets the ClassifyResult or the ServiceError later, from run_batch(). Refusals
        (429, 422, ...) are raised."""
        deadline = self._deadline(timeout_s)
        self.queue.check_room(len(texts))
        encoded = self._encode(texts, request_policy(self.long_text, long_text, truncate), truncate)
        return self._enqueue(encoded, deadline, return_routing, finish, tasks)  # type: ignore[arg-type]

    # -- the steps of a request --------------------------------------------------------------------------------
    def _deadline(self, timeout_s: float | None) -> Deadline:
        return deadline_for(timeout_s, self.settings.request_timeout_s)

    def _encode(self, texts: list[str], policy: LongTextPolicy, may_cut: bool) -> Encoding:
        t0 = time.perf_counter()
        encoded = encode_windows(self.backend.tokenizer, texts, self.info.max_length, policy)
        took = time.perf_counter() - t0
        self.m.tokenization.observe(took)
        if not may_cut:
            for i, enc in enumerate(encoded):
                if enc.truncated:
                    raise too_long(self.name, self.info.max_length, i, enc, policy)
        return encoded, took

    def _enqueue(
        self, encoded: Encoding, deadline: Deadline, return_routing: bool, finish: Finish, tasks: list[int] | None
    ) -> PendingRequest:
        texts, tokenization_s = encoded
        if self.info.tasks:  # checked at the edge (service/engine/tasks.py); none named: every task
            tasks = list(range(len(self.info.tasks))) if tasks is None else tasks
        elif tasks is not None:
            raise ServiceError(ErrorKind.TASK_NOT_FOUND, f"model {self.name!r} is a single-task model", field="task")
        now = time.monotonic()
        if now >= deadline[0]:
            raise deadline_exceeded(self.name, deadline[1])

        def done(value: object) -> None:
            if isinstance(value, ServiceError):
                finish(value)
            else:
                finish(self._complete(req, value, texts, tokenization_s))  # type: ignore[arg-type]

        # Every window is a work item of its own: the queue's bound, its token count and its batches count windows.
        items = [(w, enc.truncated) for enc in texts for w in enc.windows]
        req = PendingRequest(done, len(items), deadline[0], return_routing, own_ms=deadline[1], tasks=tasks)
        self.queue.admit([WorkItem(req, i, ids, cut, now) for i, (ids, cut) in enumerate(items)])
        return req

    def _complete(
        self, req: PendingRequest, results: list[TextResult], encoded: list[Windowed], tokenization_s: float
    ) -> ClassifyResult:
        """The request's answer from its windows' results: one TextResult per text."""
        vocab = self.backend.tokenizer.tokenizer if req.return_routing else None
        texts, at = [], 0
        for enc in encoded:
            texts.append(join_windows(results[at : at + len(enc.windows)], enc, vocab, len(req.tasks or [None])))
            at += len(enc.windows)
        # Counted here, once per text, for every API that classifies (/v1 and /v2 alike).
        self.m.texts.inc(len(texts))
        for enc in encoded:
            self.m.windows.observe(len(enc.windows))
        truncated = sum(enc.truncated for enc in encoded)
        if truncated:
            self.m.truncated.inc(truncated)
        return ClassifyResult(texts, tokenization_s, req.queue_s, req.inference_s, req.tasks)


def too_long(model: str, max_len: int, i: int, enc: Windowed, policy: LongTextPolicy) -> ServiceError:
    """The 422 for a text that may not be cut: over the maximum length, or over the window cap when chunked."""
    n = enc.original_length
    if policy.mode == "truncate":
        how = f"{n - max_len} more than model {model!r} accepts ({max_len}); shorten it, send truncate=true "
        how += 'or long_text="chunk"'
    else:
        how = f"more than {policy.max_windows} windows of {max_len} (the server's max_windows) cover; shorten it "
        how += "or send truncate=true to read its first windows only"
    return ServiceError(ErrorKind.INPUT_TOO_LONG, f"inputs[{i}] has {n} tokens, {how}", field=f"inputs[{i}]")


def join_windows(parts: list[TextResult], enc: Windowed, vocab: Any | None, rows: int = 1) -> TextResult:
    """A text's one result from its windows' (in order): pooled logits (per task), every window's tokens; with
    `vocab` (the request asked for routing), the token strings and the routing of every window, window after window
    (multi-task, `rows` tasks: task after task, each with every window's tokens)."""
    lengths = [len(w) for w in enc.windows]
    logits = pool_logits(np.stack([p.logits for p in parts]), lengths)
    r = TextResult(logits, sum(lengths), enc.truncated, windows=len(parts))
    if vocab is not None and parts[0].routing is not None:
        r.tokens = [vocab.id_to_token(t) or "" for w in enc.windows for t in w]
        r.window_tokens = lengths
        joined = zip(*(p.routing or [] for p in parts), strict=True)  # per layer: that layer of every window
        r.routing = [task_major(layer, rows) for layer in joined]
    return r


def task_major(windows: tuple[LayerRouting, ...], rows: int) -> LayerRouting:
    """One layer's routing of a text from its windows' (each `rows` runs of its tokens, one per task): task after
    task, each task's run over every window."""
    runs = [(np.array_split(w.expert_ids, rows), np.array_split(w.gates, rows)) for w in windows]
    ids = [run[0][t] for t in range(rows) for run in runs]
    gates = [run[1][t] for t in range(rows) for run in runs]
    return LayerRouting(np.concatenate(ids), np.concatenate(gates))


def task_profiles(profile: dict | None, tasks: list[str]) -> dict[str, dict | None]:
    """Each task's routing profile (routing_profile.json "tasks"; None for a task it lacks), for a multi-task model;
    empty for a single-task one."""
    per_task = (profile or {}).get("tasks") or {}
    return {t: per_task.get(t) for t in tasks}


def routing_snapshot(stats: RoutingStats, task_stats: dict[str, RoutingStats]) -> dict:
    """/v1/models/{m}/routing: every token's statistics, and for a multi-task model each task's."""
    snap = stats.snapshot()
    if task_stats:
        snap["tasks"] = {t: s.snapshot() for t, s in task_stats.items()}
    return snap
