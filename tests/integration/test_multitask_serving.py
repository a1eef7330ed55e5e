"""A multi-task model served by the engine on the torch backend (tests/conftest.py tiny_multitask_dir): a text's
result is the same alone or batched with texts of other tasks and requests (1e-5), each task's logits are divided
by that task's temperature, long texts are chunked and pooled per task, and the folder's routing profile gives each
task its own drift reference."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from service.backends.torch_backend import TorchBackend
from service.config import Settings
from service.engine.local_model import LocalModel
from service.engine.loop import InferenceThread
from service.engine.results import ClassifyResult
from service.metrics import Metrics
from service.modeling.windows import LongTextPolicy, encode_windows, pool_logits

TOL = 1e-5
TEXTS = [
    "stocks market\nthe bank said profits rose as shares fell",
    "great superb film",
    "match team goal\nthe team won the match with a late goal in the new year said the player",
    "dull awful boring",
    "phone chip",
]
LONG = " ".join(["the bank said profits rose as shares fell", "dull awful boring film of the year"] * 6)


def _serve(backend: TorchBackend, requests: list[tuple[list[str], list[int] | None]], **settings: object) -> list:
    """Every request at once on one LocalModel and its inference thread, so that they share batches."""
    opts = {"max_wait_ms": 50, "long_text": "chunk", "chunk_overlap": 8, "max_windows": 32, **settings}
    model = LocalModel(backend, Settings(**opts), Metrics(), ThreadPoolExecutor(1))  # type: ignore[arg-type]
    model.warm_up()
    thread = InferenceThread(model)
    thread.start()

    async def go() -> list[ClassifyResult]:
        return await asyncio.gather(*(model.classify(texts, tasks=tasks) for texts, tasks in requests))

    try:
        return asyncio.run(go())
    finally:
        model.close()
        thread.join(5)


@pytest.fixture(scope="module")
def backend(tiny_multitask_dir: Path) -> TorchBackend:
    b = TorchBackend(tiny_multitask_dir, device="cpu")
    assert sorted(b.info.tasks) == ["mood", "topic"]
    return b


def test_a_text_is_the_same_alone_or_batched_with_other_tasks_and_requests(backend: TorchBackend) -> None:
    asks = [[0], [1], [1, 0], [0, 1], None]
    batched = _serve(backend, [([t], a) for t, a in zip(TEXTS, asks, strict=True)] + [(TEXTS, [1])])
    for text, ask, together in zip(TEXTS, asks, batched[:-1], strict=True):
        for j, task in enumerate(ask or [0, 1]):
            (alone,) = _serve(backend, [([text], [task])])
            np.testing.assert_allclose(together.results[0].logits[j], alone.results[0].logits[0], atol=TOL, rtol=0)
    mixed = batched[-1]
    assert mixed.tasks == [1] and [r.logits.shape for r in mixed.results] == [(1, 3)] * len(TEXTS)
    assert [r.logits.shape for r in batched[2].results] == [(2, 3)]


def test_each_task_is_scaled_by_its_own_temperature(tiny_multitask_dir: Path) -> None:
    backend = TorchBackend(tiny_multitask_dir, device="cpu")
    # The tiny model's fitted temperatures may coincide (both at the fit's floor): set two that cannot be mixed up.
    for task, t in zip(backend.info.tasks.values(), (0.5, 4.0), strict=True):
        task.temperature = t
    (served,) = _serve(backend, [(TEXTS, [1, 0])])
    raw = backend.forward([backend.tokenizer.encode_batch([t], 48)[0].ids for t in TEXTS], tasks=[[1, 0]] * len(TEXTS))
    temps = [4.0, 0.5]  # task 1, then task 0
    for i, r in enumerate(served.results):
        for j in range(2):
            np.testing.assert_allclose(r.logits[j], raw.logits[2 * i + j] / temps[j], atol=TOL, rtol=1e-6)


def test_long_texts_are_chunked_and_pooled_per_task(backend: TorchBackend) -> None:
    (served,) = _serve(backend, [([LONG, TEXTS[0]], [0, 1])])
    (enc,) = encode_windows(backend.tokenizer, [LONG], backend.info.max_length, LongTextPolicy("chunk", 8, 32))
    assert len(enc.windows) > 1 and served.results[0].windows == len(enc.windows)
    per_window = backend.forward(list(enc.windows), tasks=[[0, 1]] * len(enc.windows)).logits.reshape(-1, 2, 3)
    temps = np.array([[t.temperature] for t in backend.info.tasks.values()], dtype=np.float32)
    want = pool_logits(per_window / temps, [len(w) for w in enc.windows])
    np.testing.assert_allclose(served.results[0].logits, want, atol=TOL, rtol=0)


def test_routing_profile_has_each_task_and_feeds_its_drift(backend: TorchBackend, tiny_multitask_dir: Path) -> None:
    profile = json.loads((tiny_multitask_dir / "routing_profile.json").read_text())
    assert set(profile["tasks"]) == {"topic", "mood"} and len(profile["layers"]) == backend.info.moe_layers
    for part in profile["tasks"].values():
        assert part["split"] == "validation" and len(part["layers"]) == backend.info.moe_layers
    model = LocalModel(backend, Settings(), Metrics(), ThreadPoolExecutor(1), profile)
    assert all(s.reference is not None for s in model.task_stats.values()) and model.stats.reference is not None
    shares = [np.array(profile["tasks"][t]["layers"][-1]["share"]) for t in ("topic", "mood")]
    assert not np.allclose(shares[0], shares[1])  # the tasks route apart in the task-routed top layer
