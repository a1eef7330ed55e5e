"""The request queue alone: admission (429 with the wait, 503 once closed), length-aware cutting, dropping dead
texts with the right status, the token count. No model, no thread: each test is a few microseconds of queue."""

from __future__ import annotations

import random
import time

import pytest

from service.engine.request_queue import PendingRequest, RequestQueue, WorkItem, drain_batches
from service.errors import ServiceError


def _queue(max_texts: int = 100, max_batch_size: int = 4, max_batch_tokens: int = 250) -> RequestQueue:
    return RequestQueue("m", max_texts, max_batch_size, max_batch_tokens, rate=lambda: 1000.0)


def _request(deadline: float, own_ms: int | None = None) -> PendingRequest:
    outcomes: list[object] = []
    req = PendingRequest(outcomes.append, 1, deadline, False, own_ms=own_ms)
    req.outcomes = outcomes  # type: ignore[attr-defined]
    return req


def _item(req: PendingRequest, n: int, at: float) -> WorkItem:
    return WorkItem(req, 0, [1] * n, False, at)


def test_cut_is_length_aware_and_keeps_the_oldest() -> None:
    q = _queue(max_batch_size=4, max_batch_tokens=250)
    now = time.monotonic()
    lengths = [10, 60, 12, 64, 11, 9, 61, 13]
    q.admit([_item(_request(now + 60), n, now + i * 1e-3) for i, n in enumerate(lengths)])
    assert q.tokens == sum(lengths)
    first, second = q.cut(), q.cut()
    # Oldest (10 tokens) goes with its nearest lengths; the 60-ish texts form the next batch, oldest first.
    assert sorted(len(it.ids) for it in first) == [9, 10, 11, 12]
    assert len(second[0].ids) == 60 and sorted(len(it.ids) for it in second) == [60, 61, 64]  # + 13: 4 x 64 > 250
    assert len(q) == 1 and q.tokens == 13


def test_expired_and_cancelled_texts_never_reach_a_batch() -> None:
    q = _queue()
    now = time.monotonic()
    expired, cancelled, live = _request(now - 1), _request(now + 60), _request(now + 60)
    cancelled.cancelled = True
    q.admit([_item(r, 3, now) for r in (expired, cancelled, live)])
    assert [it.request for it in q.cut()] == [live]
    assert [e.status for e in expired.outcomes] == [504]  # type: ignore[attr-defined]
    assert cancelled.outcomes == [] and len(q) == 0 and q.tokens == 0  # type: ignore[attr-defined]


def test_own_deadline_passing_in_the_queue_is_408_the_servers_cap_504() -> None:
    q = _queue()
    past = time.monotonic() - 1
    own, capped = _request(past, own_ms=5), _request(past)
    q.admit([_item(r, 2, past) for r in (own, capped)])
    assert q.cut() == []
    assert own.outcomes[0].status == 408 and capped.outcomes[0].status == 504  # type: ignore[attr-defined]


def test_overfull_queue_refuses_with_the_wait_at_the_measured_rate() -> None:
    q = _queue(max_texts=4)
    q.admit([_item(_request(time.monotonic() + 60), 2, 0.0) for _ in range(3)])
    with pytest.raises(ServiceError) as refused:
        q.check_room(2)
    assert refused.value.status == 429 and refused.value.headers["retry-after-ms"] == "5"  # 5 texts at 1,000/s
    q.check_room(1)  # exactly full is fine


def test_closed_queue_fails_what_it_holds_once_and_refuses_more() -> None:
    q = _queue()
    req = _request(time.monotonic() + 60)
    req.n = req.remaining = 2
    q.admit([_item(req, 2, 0.0), _item(req, 3, 0.0)])
    q.close()
    assert [e.status for e in req.outcomes] == [503]  # type: ignore[attr-defined]  # one answer per request
    assert len(q) == 0 and q.tokens == 0
    with pytest.raises(ServiceError, match="shutting down"):
        q.admit([_item(_request(time.monotonic() + 60), 1, 0.0)])


def test_full_means_a_whole_batch_is_waiting() -> None:
    q = _queue(max_batch_size=3, max_batch_tokens=100)
    q.admit([_item(_request(time.monotonic() + 60), 10, 0.0) for _ in range(2)])
    assert not q.full
    q.admit([_item(_request(time.monotonic() + 60), 10, 0.0)])
    assert q.full  # by texts
    q2 = _queue(max_batch_size=30, max_batch_tokens=100)
    q2.admit([_item(_request(time.monotonic() + 60), 100, 0.0)])
    assert q2.full  # by tokens


def test_drain_batches_is_what_the_queue_cuts_when_nothing_arrives() -> None:
    """The bench times token budgets on drain_batches' plan (service/bench/backends.py): it must be the queue's."""
    rng = random.Random(3)
    lengths = [rng.choice([rng.randint(5, 40), rng.randint(200, 256)]) for _ in range(150)]
    q = _queue(max_texts=1000, max_batch_size=16, max_batch_tokens=1024)
    now = time.monotonic()
    items = [_item(_request(now + 60), n, now + i * 1e-3) for i, n in enumerate(lengths)]
    q.admit(items)
    cut = []
    while len(q):
        cut.append(q.cut())
    assert drain_batches(items, 16, 1024) == cut
    assert sorted(id(it) for b in cut for it in b) == sorted(id(it) for it in items)
    assert all(len(b) == 1 or len(b) * max(len(it.ids) for it in b) <= 1024 for b in cut)
