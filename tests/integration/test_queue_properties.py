"""The request queue and inference worker under Hypothesis: random arrivals, lengths, cancellations and deadlines
through a real ModelWorker (its thread, queue, batching and futures) with a fake numpy backend, so every example
runs in milliseconds. Every request must be resolved exactly once, and results must equal the unbatched ones."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from service.backends.base import Backend, BatchOutput, ModelInfo
from service.config import Settings
from service.engine.batcher import ModelWorker
from service.errors import ServiceError
from service.metrics import Metrics
from service.modeling.tokenizer import Encoded


class FakeTokenizer:
    pad_id = 0

    def encode_batch(self, texts: list[str], max_length: int) -> list[Encoded]:
        return [Encoded([1 + ord(c) % 50 for c in t][:max_length] or [1], max(len(t), 1)) for t in texts]


class FakeBackend(Backend):
    """Logits that depend only on the text's own ids: batched and unbatched answers must agree exactly."""

    kind, device = "fake", "cpu"

    def __init__(self) -> None:
        self.tokenizer = FakeTokenizer()  # type: ignore[assignment]
        self.info = ModelInfo("fake", Path("."), ["a", "b", "c"], 64, 4, 2, 1, 1, {})
        self.calls = 0

    def forward(self, sequences: list[list[int]], return_routing: bool = False) -> BatchOutput:
        self.calls += 1
        logits = np.array([[sum(s), len(s), s[0]] for s in sequences], dtype=np.float32)
        return BatchOutput(logits, np.zeros((1, 4), dtype=np.int64))

    def warmup(self) -> None:
        pass


def expected(text: str) -> list[float]:
    ids = FakeTokenizer().encode_batch([text], 64)[0].ids
    return [float(sum(ids)), float(len(ids)), float(ids[0])]


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
        assert [r.logits.tolist() for r in out.results] == [expected(t) for t in texts]
    assert worker.queued_texts == 0
