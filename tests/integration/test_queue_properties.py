"""The request queue and inference worker under Hypothesis: random arrivals, lengths, cancellations and deadlines
through a real ModelWorker (its thread, queue, batching and futures) with a fake numpy backend, so every example
runs in milliseconds. Every request must be resolved exactly once, and results must equal the unbatched ones."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from hypothesis import given, settings
from hypothesis import strategies as st

from service.config import Settings
from service.engine.batcher import ModelWorker
from service.errors import ServiceError
from service.metrics import Metrics
from tests.fakes import FakeBackend, expected_logits

requests = st.lists(
    st.tuples(
        st.lists(st.text(alphabet="abcdefgh ", min_size=0, max_size=80), min_size=1, max_size=4),  # texts
        st.sampled_from(["ok", "ok", "cancel", "timeout"]),  # what the client does
        st.floats(0, 0.005),  # arrival delay
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=40, deadline=None)
@given(reqs=requests, max_batch=st.integers(1, 16), budget=st.integers(64, 512))
def test_every_request_resolved_once_and_equal_to_unbatched(reqs: list, max_batch: int, budget: int) -> None:
    backend = FakeBackend()
    worker = ModelWorker(
        backend,
        Settings(max_batch_size=max_batch, max_batch_tokens=budget, max_wait_ms=1, max_queue_texts=10_000),
        Metrics(),
        ThreadPoolExecutor(1),
    )
    worker.start()

    async def client(texts: list[str], action: str, delay: float):
        await asyncio.sleep(delay)
        timeout = 1e-6 if action == "timeout" else None
        task = asyncio.ensure_future(worker.classify(texts, timeout_s=timeout))
        if action == "cancel":
            await asyncio.sleep(0)
            task.cancel()
        return await task

    async def run() -> list:
        return await asyncio.gather(*[client(*r) for r in reqs], return_exceptions=True)

    try:
        outcomes = asyncio.run(run())
    finally:
        worker.stop()
    assert len(outcomes) == len(reqs)  # gather: each client ends exactly once
    for (texts, action, _), out in zip(reqs, outcomes, strict=True):
        if isinstance(out, BaseException):
            if action == "cancel":
                assert isinstance(out, asyncio.CancelledError)
            else:
                assert action == "timeout" and isinstance(out, ServiceError) and out.status == 408, out
            continue
        assert action != "timeout"  # a microsecond deadline cannot be met
        assert [r.logits.tolist() for r in out.results] == [expected_logits(t) for t in texts]
    assert worker.queued_texts == 0


def test_keep_warm_ticks_follow_a_batch_and_stop_after_keep_warm_s() -> None:
    backend = FakeBackend()
    worker = ModelWorker(backend, Settings(keep_warm_s=0.3, max_wait_ms=0), Metrics(), ThreadPoolExecutor(1))
    worker.start()
    try:
        time.sleep(0.2)
        assert backend.calls == 0  # never used: nothing to keep warm
        asyncio.run(worker.classify(["a text"]))
        after_batch = backend.calls
        time.sleep(0.15)
        ticks = backend.calls - after_batch
        assert 3 <= ticks <= 16, ticks  # one per 10 ms at most
        time.sleep(0.4)
        settled = backend.calls
        time.sleep(0.2)
        assert backend.calls == settled  # keep_warm_s passed: idle means idle
        assert worker.batches_run == 1 and worker.stats.snapshot()["since_start"]["texts"] == 1  # ticks are not traffic
    finally:
        worker.stop()
