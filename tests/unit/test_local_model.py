"""A LocalModel's own refusals, over the numpy fake backend (milliseconds): 503 once closed, 429 before any token
is computed, 408 for the request's own deadline and 504 for the server's cap."""

from __future__ import annotations

import asyncio

import pytest

from service.config import DEFAULT_BATCH_TOKENS
from service.errors import ServiceError
from tests.fakes import FakeBackend, ServedModel


def test_stopped_worker_refuses_new_work() -> None:
    served = ServedModel(FakeBackend())
    worker = served.start()
    served.stop()
    assert not worker.ready
    with pytest.raises(ServiceError, match="shutting down") as exc:
        asyncio.run(worker.classify(["late request"]))
    assert exc.value.status == 503


def test_overload_is_refused_before_tokenizing() -> None:
    """A request that cannot fit in the queue gets its 429 (with the wait in ms) without a token being computed."""
    worker = ServedModel(FakeBackend(), max_queue_texts=4, max_wait_ms=0).model
    calls: list[int] = []
    original = worker.backend.tokenizer.encode_inner

    def counting(texts: list[str]):
        calls.append(len(texts))
        return original(texts)

    worker.backend.tokenizer.encode_inner = counting  # type: ignore[method-assign]
    with pytest.raises(ServiceError) as refused:
        asyncio.run(worker.classify(["market news"] * 5))
    assert refused.value.status == 429 and int(refused.value.headers["retry-after-ms"]) >= 1
    assert calls == []


def test_own_timeout_is_a_request_timeout() -> None:
    """The request's own timeout_ms passing is 408 (its choice); the server's cap passing stays 504."""
    worker = ServedModel(FakeBackend(), request_timeout_s=30).model  # never started: nothing runs, deadlines pass
    with pytest.raises(ServiceError) as own:
        asyncio.run(worker.classify(["market news"], timeout_s=0.05))
    assert own.value.status == 408 and "timeout_ms (50 ms)" in own.value.message
    capped = ServedModel(FakeBackend(), request_timeout_s=0.05).model
    with pytest.raises(ServiceError) as server:
        asyncio.run(capped.classify(["market news"]))
    assert server.value.status == 504


@pytest.mark.parametrize(
    ("setting", "measured", "in_effect"),
    [(None, None, DEFAULT_BATCH_TOKENS), (None, 2048, 2048), (4096, 2048, 4096), (8, None, 64)],
)
def test_token_budget_is_the_setting_then_the_folder_s_then_the_default(
    setting: int | None, measured: int | None, in_effect: int
) -> None:
    """MOE_MAX_BATCH_TOKENS wins, then the folder's measured budget, then the default; never below one text of
    maximum length (the fake's is 64). The budget in effect is what the queue cuts by and what the model card shows."""
    backend = FakeBackend()
    backend.info.batch_tokens = measured
    model = ServedModel(backend, max_batch_tokens=setting).model
    assert model.queue.max_batch_tokens == model.info.batch_tokens == in_effect
