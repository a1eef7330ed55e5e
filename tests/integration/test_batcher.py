"""A LocalModel on its inference thread with a real model: grouped execution per batch, deadlines, independence,
failures. (The queue alone: tests/unit/test_request_queue.py; the decision when to run: test_scheduler.py.)"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from service.backends import load_backend
from service.backends.base import Backend
from service.engine.local_model import future_finish
from service.engine.request_queue import PendingRequest, WorkItem
from service.errors import ServiceError
from tests.fakes import ServedModel


def _count_expert_calls(backend: Backend) -> Counter:
    """Wrap every MoE layer's expert MLP to count (layer, expert) calls; the real maths still runs."""
    calls: Counter = Counter()
    for li, layer in enumerate(backend.model.moe_layers):  # type: ignore[attr-defined]
        original = layer.expert_mlp

        def counting(e, rows, _li=li, _orig=original):
            calls[(_li, e)] += 1
            return _orig(e, rows)

        layer.expert_mlp = counting
    return calls


def _request(loop: asyncio.AbstractEventLoop, deadline: float, own_ms: int | None = None) -> PendingRequest:
    """A one-text request finished through an asyncio future, kept on it as .future for the assertions."""
    future = loop.create_future()
    req = PendingRequest(future_finish(loop, future), 1, deadline, False, own_ms=own_ms)
    req.future = future  # type: ignore[attr-defined]
    return req


def test_n_requests_one_batch_one_matmul_per_expert_per_layer(tiny_model_dir: Path) -> None:
    """32 concurrent requests run as one batch: each active expert's GEMM runs once per MoE layer, not 32 times."""
    served = ServedModel(load_backend(tiny_model_dir), max_wait_ms=0)
    model = served.model
    calls = _count_expert_calls(model.backend)

    async def run() -> list:
        loop = asyncio.get_running_loop()
        reqs, futures = [], []
        for i in range(32):  # queued before the inference thread starts, so the first cut sees them all
            req = _request(loop, time.monotonic() + 60)
            futures.append(req.future)
            ids = model.backend.tokenizer.encode_batch([f"report number {i} on shares and football"], 64)[0].ids
            model.queue.admit([WorkItem(req, 0, ids, False, time.monotonic())])
            reqs.append(req)
        served.thread.start()
        return await asyncio.gather(*futures)

    results = asyncio.run(run())
    served.stop()
    assert len(results) == 32 and model.runner.batches_run == 1
    assert calls and set(calls.values()) == {1}
    layers = {li for li, _ in calls}
    assert layers == {0, 1}


def test_batched_results_equal_single_results(tiny_model_dir: Path) -> None:
    served = ServedModel(load_backend(tiny_model_dir), max_wait_ms=20)
    worker = served.start()
    texts = [("share prices " * (1 + i % 9)).strip() for i in range(24)]

    async def run():
        alone = [await worker.classify([t]) for t in texts]
        together = await asyncio.gather(*[worker.classify([t]) for t in texts])
        return alone, together

    alone, together = asyncio.run(run())
    served.stop()
    for a, b in zip(alone, together, strict=True):
        np.testing.assert_allclose(a.results[0].logits, b.results[0].logits, atol=1e-5, rtol=0)
    assert worker.runner.batches_run < 48  # some of the concurrent ones shared a batch


def test_model_error_fails_its_batch_and_the_worker_lives_on(tiny_model_dir: Path) -> None:
    """A token id beyond the vocabulary makes the real model raise: that request gets an internal error, the
    inference thread survives, and the next request is served."""
    served = ServedModel(load_backend(tiny_model_dir), max_wait_ms=0)
    worker = served.start()

    async def run():
        loop = asyncio.get_running_loop()
        bad = _request(loop, time.monotonic() + 30)
        worker.queue.admit([WorkItem(bad, 0, [10**6], False, time.monotonic())])
        with pytest.raises(ServiceError, match="failed on this batch") as failed:
            await bad.future
        # A 500 whose id names the log line, and no trace or path in what the client sees.
        err = failed.value
        assert err.status == 500 and err.headers["x-error-id"] in err.message and "Traceback" not in err.message
        return await worker.classify(["the markets rallied"])

    ok = asyncio.run(run())
    served.stop()
    assert ok.results[0].logits.shape == (5,)
