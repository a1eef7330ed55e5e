"""The request path under Hypothesis: random arrivals, lengths, cancellations and deadlines through both loops that
run batches (a LocalModel on its inference thread, and the model server's socket loop behind a RemoteEngine, on a
thread over inproc://), with a fake numpy backend, so every example runs in milliseconds. Every request must be
resolved exactly once, and results must equal the unbatched ones."""

from __future__ import annotations

import asyncio
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.config import Settings
from service.engine.launchers import ThreadLauncher
from service.engine.local_model import LocalModel
from service.engine.loop import InferenceThread
from service.engine.remote import RemoteEngine
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


async def _clients(model, reqs: list) -> list:
    async def client(texts: list[str], action: str, delay: float):
        await asyncio.sleep(delay)
        timeout = 1e-6 if action == "timeout" else None
        task = asyncio.ensure_future(model.classify(texts, timeout_s=timeout))
        if action == "cancel":
            await asyncio.sleep(0)
            task.cancel()
        return await task

    return await asyncio.gather(*[client(*r) for r in reqs], return_exceptions=True)


def _settled(queued, wait_s: float = 1.0) -> int:
    """Texts still queued once the loop has had time to drop the dead ones (cancelled, late)."""
    end = time.monotonic() + wait_s
    while queued() and time.monotonic() < end:
        time.sleep(0.01)
    return queued()


def _on_thread(reqs: list, s: Settings) -> tuple[list, int]:
    model = LocalModel(FakeBackend(), s, Metrics(), ThreadPoolExecutor(1))
    model.warm_up()
    thread = InferenceThread(model)
    thread.start()
    try:
        outcomes = asyncio.run(_clients(model, reqs))
        return outcomes, _settled(lambda: len(model.queue))
    finally:
        model.close()
        thread.join(5)


def _on_model_server(reqs: list, s: Settings) -> tuple[list, int]:
    async def run() -> tuple[list, int]:
        engine = RemoteEngine(s, ThreadLauncher(lambda path: FakeBackend(path.name)))
        await engine.start()
        try:
            outcomes = await _clients(engine.get(None), reqs)
            for _ in range(100):  # cancels and passed deadlines reach the model server, whose loop drops them
                if not await engine.get(None).queued():
                    break
                await asyncio.sleep(0.01)
            return outcomes, await engine.get(None).queued()
        finally:
            await engine.close()

    return asyncio.run(run())


@pytest.mark.parametrize("loop", ["inference-thread", "model-server"])
def test_every_request_resolved_once_and_equal_to_unbatched(loop: str) -> None:
    @settings(max_examples=40 if loop == "inference-thread" else 20, deadline=None)
    @given(reqs=requests, max_batch=st.integers(1, 16), budget=st.integers(64, 512))
    def check(reqs: list, max_batch: int, budget: int) -> None:
        with tempfile.TemporaryDirectory() as repo:
            (Path(repo) / "fake").mkdir()
            (Path(repo) / "fake" / "config.json").write_text("{}")
            s = Settings(
                models_dir=Path(repo),
                max_batch_size=max_batch,
                max_batch_tokens=budget,
                max_wait_ms=1,
                max_queue_texts=10_000,
            )
            outcomes, left = (_on_thread if loop == "inference-thread" else _on_model_server)(reqs, s)
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
        assert left == 0

    check()


def test_keep_warm_ticks_run_on_the_thread_and_are_not_traffic() -> None:
    """The tick rules themselves are pure (test_scheduler.py); here: the loop runs them, and only for a while."""
    backend = FakeBackend()
    model = LocalModel(backend, Settings(keep_warm_s=0.3, max_wait_ms=0), Metrics(), ThreadPoolExecutor(1))
    thread = InferenceThread(model)
    thread.start()
    try:
        time.sleep(0.1)
        assert backend.calls == 0  # never used: nothing to keep warm
        asyncio.run(model.classify(["a text"]))
        after_batch = backend.calls
        deadline = time.monotonic() + 5
        while backend.calls == after_batch and time.monotonic() < deadline:
            time.sleep(0.01)
        assert backend.calls > after_batch  # ticks follow the batch
        time.sleep(0.5)  # past keep_warm_s
        settled = backend.calls
        time.sleep(0.3)
        assert backend.calls == settled  # idle means idle
        assert model.runner.batches_run == 1 and model.stats.snapshot()["since_start"]["texts"] == 1
    finally:
        model.close()
        thread.join(5)
