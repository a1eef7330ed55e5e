"""One model's bounded request queue: admission (429 with Retry-After, 503 while stopping), a running token count,
dropping texts whose request is gone or late, and cutting length-aware batches with the pure `cut_batch`.

Batch cutting is length aware: from a window at the head of the queue it takes the oldest text plus the texts
closest to it in length, while (texts x longest text) stays within the token budget. The oldest text always goes,
so nothing starves, and a batch of similar lengths wastes little attention compute on padding.

Thread-safe: the API's event loop admits while an inference thread cuts; `cond` is what a loop waits on for work.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from service.engine.results import TextResult
from service.errors import ErrorKind, ServiceError, deadline_exceeded, queue_full

Finish = Callable[[object], None]  # called once with a request's results (list[TextResult]) or its ServiceError
WINDOW_BATCHES = 4  # cut_batch looks at this many batches' worth of texts at the head of the queue


@dataclass(eq=False)
class PendingRequest:
    finish: Finish  # hands the outcome to whoever waits (an event loop, the model process's socket)
    n: int
    deadline: float  # time.monotonic()
    return_routing: bool
    results: list[TextResult | None] = field(default_factory=list)
    remaining: int = 0
    cancelled: bool = False  # set when the client left; the texts still queued are dropped at the next cut
    failed: bool = False
    queue_s: float = 0.0
    inference_s: float = 0.0
    own_ms: int | None = None  # the request's own timeout_ms when it is the binding deadline (408, not 504)
    tasks: list[int] | None = None  # multi-task model: the task ids every text of the request runs, in order

    def __post_init__(self) -> None:
        self.results = [None] * self.n
        self.remaining = self.n

    def fail(self, err: ServiceError) -> None:
        """Finish with an error, once: a request whose texts sit in several batches fails only the first time."""
        if not self.failed:
            self.failed = True
            self.finish(err)


@dataclass(eq=False)
class WorkItem:
    request: PendingRequest
    index: int
    ids: list[int]
    truncated: bool
    enqueued: float  # time.monotonic()


def deadline_for(timeout_s: float | None, cap_s: float) -> tuple[float, int | None]:
    """(time.monotonic() by which to answer, the request's own timeout_ms when it binds): a request's own
    timeout_ms below the server's cap is answered 408 when it passes, the server's cap 504."""
    timeout_s = cap_s if timeout_s is None else min(timeout_s, cap_s)
    own_ms = round(timeout_s * 1000) if timeout_s < cap_s else None
    return time.monotonic() + timeout_s, own_ms


def retry_after_ms(texts: int, texts_per_s: float) -> int:
    """How long `texts` waiting ahead take to drain at the measured rate: 1 ms to 60 s."""
    rate = texts_per_s or 100.0
    return int(min(60_000, max(1, math.ceil(1000 * texts / rate))))


class HasIds(Protocol):
    ids: list[int]


Item = TypeVar("Item", bound=HasIds)


def cut_batch(items: list[Item], max_texts: int, max_tokens: int) -> tuple[list[Item], list[Item]]:
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


def drain_batches(items: list[Item], max_texts: int, max_tokens: int) -> list[list[Item]]:
    """The batches a queue holding `items` (oldest first) is cut into when nothing else arrives: what
    `RequestQueue.cut` does batch after batch, each from a window of WINDOW_BATCHES batches' worth of texts."""
    batches, waiting = [], list(items)
    while waiting:
        window, waiting = waiting[: WINDOW_BATCHES * max_texts], waiting[WINDOW_BATCHES * max_texts :]
        batch, rest = cut_batch(window, max_texts, max_tokens)
        batches.append(batch)
        waiting = rest + waiting
    return batches


class RequestQueue:
    def __init__(
        self,
        model: str,
        max_texts: int,
        max_batch_size: int,
        max_batch_tokens: int,
        rate: Callable[[], float],
        on_depth: Callable[[int], None] = lambda _: None,
    ) -> None:
        self.model = model
        self.max_texts, self.max_batch_size, self.max_batch_tokens = max_texts, max_batch_size, max_batch_tokens
        self.rate = rate  # the engine's measured texts/s, for Retry-After
        self.on_depth = on_depth  # the queue-depth gauge
        self.cond = threading.Condition()
        self.stopping = False
        self._items: deque[WorkItem] = deque()
        self._tokens = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def tokens(self) -> int:
        return self._tokens

    @property
    def full(self) -> bool:
        """A whole batch is waiting: no reason to wait for more texts."""
        return len(self._items) >= self.max_batch_size or self._tokens >= self.max_batch_tokens

    def check_room(self, n: int) -> None:
        """Admission: 503 while stopping, 429 when n more texts would overfill the queue. Called before tokenizing
        (a cheap refusal) and again when the texts are queued (the queue may have filled meanwhile)."""
        if self.stopping:
            raise ServiceError(ErrorKind.MODEL_NOT_READY, f"model {self.model!r} is shutting down")
        if len(self._items) + n > self.max_texts:
            raise queue_full(self.model, retry_after_ms(len(self._items) + n, self.rate()))

    def admit(self, items: list[WorkItem]) -> None:
        with self.cond:
            self.check_room(len(items))
            self._items.extend(items)
            self._tokens += sum(len(it.ids) for it in items)
            self.on_depth(len(self._items))
            self.cond.notify_all()

    def cut(self) -> list[WorkItem]:
        """The next batch: the oldest live text and its closest neighbours in length (texts of requests that are
        gone or past their deadline are dropped on the way, the late ones answered 408/504)."""
        with self.cond:
            window = self._pop_live(WINDOW_BATCHES * self.max_batch_size, time.monotonic())
            batch, rest = cut_batch(window, self.max_batch_size, self.max_batch_tokens)
            self._items.extendleft(reversed(rest))
            self._tokens += sum(len(it.ids) for it in rest)
            self.on_depth(len(self._items))
        return batch

    def _pop_live(self, limit: int, now: float) -> list[WorkItem]:
        window: list[WorkItem] = []
        while self._items and len(window) < limit:
            item = self._items.popleft()
            self._tokens -= len(item.ids)
            if not self._is_dead(item, now):
                window.append(item)
        return window

    def _is_dead(self, item: WorkItem, now: float) -> bool:
        req = item.request
        if req.cancelled or req.failed:
            return True
        if now >= req.deadline:
            req.fail(deadline_exceeded(self.model, req.own_ms))  # counted by the API's error handler, like every 504
            return True
        return False

    def close(self) -> None:
        """Refuse new texts and fail the queued ones with 503."""
        with self.cond:
            self.stopping = True
            err = ServiceError(ErrorKind.MODEL_NOT_READY, f"model {self.model!r} is shutting down")
            for it in self._items:
                it.request.fail(err)
            self._items.clear()
            self._tokens = 0
            self.on_depth(0)
            self.cond.notify_all()
