"""Texts over the model's maximum length: windows (pure), pooling, and the engine that queues every window as a
sequence of its own and answers once per text (the numpy fake backend: one token per character, max_length 64)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.backends.base import BatchOutput
from service.errors import ServiceError
from service.modeling.windows import LongTextPolicy, cut_windows, pool_logits, request_policy, window_starts
from tests.fakes import FakeBackend, ServedModel, expected_logits


@given(n=st.integers(1, 3000), room=st.integers(2, 300), overlap=st.integers(0, 400), cap=st.integers(1, 50))
def test_windows_cover_the_text_from_its_start_and_end_full_length(n: int, room: int, overlap: int, cap: int) -> None:
    inner = list(range(n))
    enc = cut_windows(inner, [-1], [-2], 0, room + 2, LongTextPolicy("chunk", overlap, cap))
    assert all(len(w) <= room + 2 and w[0] == -1 and w[-1] == -2 for w in enc.windows)
    assert enc.windows[0][1] == 0 and len(enc.windows) <= cap
    read = sorted({t for w in enc.windows for t in w[1:-1]})
    assert read == list(range(len(read)))  # no gap: the windows read a prefix of the text
    assert enc.truncated == (len(read) < n)
    if not enc.truncated:
        assert read[-1] == n - 1
        if n >= room:  # the last window ends at the text's end and is full length
            assert enc.windows[-1][1:-1] == inner[n - room :]


def test_window_starts_step_by_the_stride_and_stop_at_the_cap() -> None:
    assert window_starts(10, 20, 5, 8) == [0]
    assert window_starts(150, 64, 48, 8) == [0, 48, 86]  # the last one moved back to end at 150
    assert window_starts(1000, 64, 48, 3) == [0, 48, 96]


def test_truncate_reads_the_first_window_and_an_empty_text_one_token() -> None:
    enc = cut_windows(list(range(100)), [7], [8], 0, 10, LongTextPolicy("truncate"))
    assert enc.windows == [[7, *range(8), 8]] and enc.truncated and enc.original_length == 102
    empty = cut_windows([], [], [], 3, 10, LongTextPolicy("chunk"))
    assert empty.windows == [[3]] and not empty.truncated


def test_a_request_policy_keeps_truncate_false_a_422_unless_it_asks_for_chunks() -> None:
    server = LongTextPolicy("chunk", 16, 4)
    assert request_policy(server, None, True) == server
    assert request_policy(server, None, False).mode == "truncate"  # today's meaning: over the maximum is a 422
    assert request_policy(server, "chunk", False).mode == "chunk"
    assert request_policy(LongTextPolicy("truncate"), "chunk", True).mode == "chunk"


def test_pooling_is_the_token_weighted_mean() -> None:
    logits = np.array([[1.0, 0.0], [3.0, 2.0]], dtype=np.float32)
    np.testing.assert_allclose(pool_logits(logits, [30, 10]), [1.5, 0.5])
    np.testing.assert_array_equal(pool_logits(logits[:1], [5]), logits[0])  # one window: its own logits, untouched


class RecordingBackend(FakeBackend):
    """Records the sequences of every forward, to see which windows shared a batch."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.batches: list[list[list[int]]] = []

    def forward(
        self, sequences: list[list[int]], return_routing: bool = False, tasks: list[list[int]] | None = None
    ) -> BatchOutput:
        self.batches.append([list(s) for s in sequences])
        return super().forward(sequences, return_routing, tasks)


LONG = "".join(chr(ord("a") + i % 26) for i in range(150))  # 150 tokens: windows at 0, 48, 86 with overlap 16


def _expected(text: str, starts: list[int], room: int = 64) -> np.ndarray:
    logits = np.array([expected_logits(text[s : s + room]) for s in starts], dtype=np.float32)
    return pool_logits(logits, [min(room, len(text) - s) for s in starts])


def _run(served: ServedModel, *requests: tuple[list[str], dict]) -> list:
    async def go() -> list:
        return await asyncio.gather(*(served.model.classify(texts, **kw) for texts, kw in requests))

    served.start()
    try:
        return asyncio.run(go())
    finally:
        served.stop()


def test_a_long_text_is_chunked_batched_with_others_and_answered_alone_the_same() -> None:
    backend = RecordingBackend()
    together = ServedModel(backend, long_text="chunk", chunk_overlap=16, max_wait_ms=50)
    long_res, short_res = _run(together, ([LONG], {}), (["short news"], {}))
    (r,) = long_res.results
    assert (r.windows, r.n_tokens, r.truncated) == (3, 192, False)
    np.testing.assert_allclose(r.logits, _expected(LONG, [0, 48, 86]), atol=1e-5)
    assert short_res.results[0].windows == 1
    # The three windows and the other request's text ran in one forward: the same expert-grouped GEMMs.
    assert any(len(b) == 4 for b in backend.batches), backend.batches
    alone = ServedModel(FakeBackend(), long_text="chunk", chunk_overlap=16)
    (solo,) = _run(alone, ([LONG], {}))
    np.testing.assert_allclose(solo.results[0].logits, r.logits, atol=1e-5)


def test_truncate_mode_reads_the_first_window_and_the_request_overrides_the_setting() -> None:
    served = ServedModel(FakeBackend(), long_text="chunk", chunk_overlap=16)
    cut, chunked = _run(served, ([LONG], {"long_text": "truncate"}), ([LONG], {}))
    assert (cut.results[0].windows, cut.results[0].n_tokens, cut.results[0].truncated) == (1, 64, True)
    np.testing.assert_allclose(cut.results[0].logits, expected_logits(LONG[:64]))
    assert chunked.results[0].windows == 3
    by_setting = ServedModel(FakeBackend(), long_text="truncate")
    (r,) = _run(by_setting, ([LONG], {}))
    assert r.results[0].windows == 1 and r.results[0].truncated


def test_the_window_cap_cuts_or_refuses_as_the_request_says() -> None:
    served = ServedModel(FakeBackend(), long_text="chunk", chunk_overlap=16, max_windows=2)
    (capped,) = _run(served, ([LONG], {}))
    assert (capped.results[0].windows, capped.results[0].truncated) == (2, True)
    np.testing.assert_allclose(capped.results[0].logits, _expected(LONG, [0, 48]), atol=1e-5)
    model = ServedModel(FakeBackend(), long_text="chunk", chunk_overlap=16, max_windows=2).model
    with pytest.raises(ServiceError) as over_cap:
        asyncio.run(model.classify(["ok", LONG], truncate=False, long_text="chunk"))
    assert over_cap.value.status == 422 and over_cap.value.field == "inputs[1]"
    assert "more than 2 windows of 64" in over_cap.value.message
    with pytest.raises(ServiceError) as over_max:  # truncate=false alone: a 422 as before chunking, not chunks
        asyncio.run(model.classify([LONG], truncate=False))
    assert over_max.value.status == 422 and "86 more than model" in over_max.value.message


def test_the_queue_bound_counts_windows() -> None:
    model = ServedModel(FakeBackend(), long_text="chunk", chunk_overlap=16, max_queue_texts=2).model
    with pytest.raises(ServiceError) as refused:  # one text, three windows: over a queue of two
        asyncio.run(model.classify([LONG]))
    assert refused.value.status == 429
    assert len(model.queue) == 0


def test_metrics_count_windows_per_text_and_each_truncated_text_once() -> None:
    served = ServedModel(FakeBackend(), long_text="chunk", chunk_overlap=16, max_windows=2)
    _run(served, ([LONG, "short", LONG], {}))
    reg = served.model.m
    assert reg.truncated._value.get() == 2  # two texts cut, each once, though each ran in two windows
    assert reg.texts._value.get() == 3
    assert reg.windows._sum.get() == 5  # 2 + 1 + 2


def test_routing_covers_every_window() -> None:
    served = ServedModel(FakeBackend(), long_text="chunk", chunk_overlap=16)
    (res,) = _run(served, ([LONG], {"return_routing": True}))
    r = res.results[0]
    assert r.window_tokens == [64, 64, 64] and len(r.tokens or []) == 192
    assert r.routing is not None and all(len(layer.expert_ids) == 192 for layer in r.routing)
