"""A multi-task model served in process over a numpy fake (tests/fakes.py MultiTaskFakeBackend), on both paths (the
model server on a thread over inproc://, and one process): /v1/classify with and without `task`, its errors, the
OIP v2 outputs per task and their selection, the tasks in /v1/models, per-task routing statistics and metrics; and
the engine batching texts of different tasks and requests together."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from service.engine.request_queue import PendingRequest
from service.engine.results import ClassifyResult
from service.errors import ServiceError
from tests.fakes import (
    LABELS,
    TASKS,
    TEMPERATURES,
    FakeBackend,
    MultiTaskFakeBackend,
    ServedModel,
    expected_task_logits,
)

TEXTS = ["shares rose", "a goal in the last minute"]


def softmax(x: list[float], t: float = 1.0) -> list[float]:
    e = [math.exp(v / t - max(x) / t) for v in x]
    return [v / sum(e) for v in e]


@pytest.fixture(params=[True, False], ids=["model-server", "one-process"])
def client(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[TestClient]:
    backends: list[MultiTaskFakeBackend] = []

    def loader(path: Path) -> FakeBackend:
        if path.name == "single":
            return FakeBackend(path.name)
        backends.append(MultiTaskFakeBackend(path.name))
        return backends[-1]

    for name in ("mt", "single"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    settings = Settings(models_dir=tmp_path, default_model="mt", model_process=request.param)
    with TestClient(create_app(settings, loader)) as c:  # type: ignore[arg-type]
        c.backends = backends  # type: ignore[attr-defined]
        yield c


def _scores(p: dict) -> dict[str, float]:
    return {s["label"]: s["score"] for s in p["scores"]}


def test_without_task_every_task_text_after_text(client: TestClient) -> None:
    r = client.post("/v1/classify", json={"model": "mt", "inputs": TEXTS})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [(p["text"], p["task"]) for p in preds] == [(0, "topic"), (0, "mood"), (1, "topic"), (1, "mood")]
    for p in preds:
        t = list(TASKS).index(p["task"])
        want = softmax(expected_task_logits(TEXTS[p["text"]], t), TEMPERATURES[p["task"]])
        assert set(_scores(p)) == set(TASKS[p["task"]])  # the task's own labels only, no padding
        np.testing.assert_allclose([_scores(p)[lab] for lab in TASKS[p["task"]]], want, rtol=1e-5)
        assert p["label"] == TASKS[p["task"]][int(np.argmax(want))]


def test_one_task_or_a_list_in_the_order_asked(client: TestClient) -> None:
    one = client.post("/v1/classify", json={"model": "mt", "inputs": TEXTS, "task": "mood"}).json()["predictions"]
    assert [(p["text"], p["task"]) for p in one] == [(0, "mood"), (1, "mood")]
    both = client.post("/v1/classify", json={"inputs": TEXTS[:1], "task": ["mood", "topic"], "raw_scores": True})
    preds = both.json()["predictions"]
    assert [p["task"] for p in preds] == ["mood", "topic"]
    raw = _scores(preds[0])  # raw scores: the logits over the task's temperature
    np.testing.assert_allclose([raw[lab] for lab in TASKS["mood"]], np.array(expected_task_logits(TEXTS[0], 1)) / 2)
    alone = client.post("/v1/classify", json={"inputs": TEXTS[:1], "task": "mood", "raw_scores": True}).json()
    assert alone["predictions"][0]["scores"] == preds[0]["scores"]


@pytest.mark.parametrize(
    ("model", "task", "status", "kind", "says"),
    [
        ("mt", "weather", 404, "task_not_found", "no task 'weather'; its tasks: topic, mood"),
        ("mt", ["mood", "weather"], 404, "task_not_found", "no task 'weather'"),
        ("mt", ["mood", "mood"], 422, "validation", "['mood'] more than once"),
        ("mt", [], 422, "validation", "task"),
        ("mt", 3, 422, "validation", "task"),
        ("single", "mood", 404, "task_not_found", "single-task model"),
    ],
)
def test_task_errors_name_the_problem(
    client: TestClient, model: str, task: object, status: int, kind: str, says: str
) -> None:
    r = client.post("/v1/classify", json={"model": model, "inputs": TEXTS, "task": task})
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == kind and says in body["error"] and body["field"] == "task"


def test_single_task_answers_are_unchanged(client: TestClient) -> None:
    preds = client.post("/v1/classify", json={"model": "single", "inputs": TEXTS}).json()["predictions"]
    assert len(preds) == 2 and "task" not in preds[0] and "text" not in preds[0]
    assert set(_scores(preds[0])) == set(LABELS)


def test_routing_per_task(client: TestClient) -> None:
    body = {"inputs": TEXTS[:1], "task": ["topic", "mood"], "return_routing": True}
    topic, mood = client.post("/v1/classify", json=body).json()["predictions"]
    n = len(TEXTS[0])  # the fake tokenizer: one token per character
    for t, p in enumerate((topic, mood)):
        experts = p["routing"]["layers"][0]["experts"]
        assert len(experts) == n and len(p["routing"]["tokens"]) == n
        assert [e[0] for e in experts] == [2 + t] * n  # the fake routes task t's tokens to expert 2 + t


def test_long_texts_are_chunked_and_pooled_per_task(client: TestClient) -> None:
    long = "word " * 40  # 200 tokens of the fake tokenizer, max_length 64: four windows
    body = {"inputs": [long], "long_text": "chunk", "raw_scores": True}
    preds = client.post("/v1/classify", json=body).json()["predictions"]
    assert [p["task"] for p in preds] == ["topic", "mood"] and all(p["windows"] > 1 for p in preds)
    single = client.post("/v1/classify", json={**body, "task": "mood"}).json()["predictions"]
    assert single[0]["scores"] == preds[1]["scores"]  # pooled per task: the same with or without the other task


def test_models_list_tasks_with_labels(client: TestClient) -> None:
    card = client.get("/v1/models/mt").json()
    assert card["tasks"] == {
        t: {"labels": TASKS[t], "temperature": TEMPERATURES[t], "eval": None} for t in ("topic", "mood")
    }
    assert client.get("/v1/models/single").json()["tasks"] == {}


def test_v2_outputs_per_task_and_selection(client: TestClient) -> None:
    meta = client.get("/v2/models/mt").json()
    assert [o["name"] for o in meta["outputs"]] == [
        "topic_label",
        "topic_probabilities",
        "mood_label",
        "mood_probabilities",
    ]
    assert meta["outputs"][3]["shape"] == [-1, 2] and meta["parameters"]["tasks"]["mood"]["labels"] == TASKS["mood"]
    infer = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": TEXTS}]}
    r = client.post("/v2/models/mt/infer", json=infer)
    assert [o["name"] for o in r.json()["outputs"]] == [o["name"] for o in meta["outputs"]]
    before = sum(len(b) for b in client.backends[0].batches)  # type: ignore[attr-defined]
    r = client.post("/v2/models/mt/infer", json={**infer, "outputs": [{"name": "mood_probabilities"}]})
    assert r.status_code == 200, r.text
    (out,) = r.json()["outputs"]
    assert out["name"] == "mood_probabilities" and out["shape"] == [2, 2]
    want = [p for text in TEXTS for p in softmax(expected_task_logits(text, 1), 2.0)]
    np.testing.assert_allclose(out["data"], want, rtol=1e-5)
    if client.backends:  # one-process path: the backend is in this process; only the mood task ran
        ran = [ts for b in client.backends[0].batches for ts in b][before:]  # type: ignore[attr-defined]
        assert ran.count([1]) == 2 and [0, 1] not in ran  # ([0] of a keep-warm tick may follow)
    bad = client.post("/v2/models/mt/infer", json={**infer, "outputs": [{"name": "weather_label"}]})
    assert bad.status_code == 404 and bad.json()["type"] == "task_not_found"
    assert (
        client.post("/v2/models/single/infer", json={**infer, "outputs": [{"name": "mood_label"}]}).status_code == 404
    )
    single = client.post("/v2/models/single/infer", json={**infer, "outputs": [{"name": "label"}]})
    assert single.status_code == 200 and single.json()["outputs"][0]["name"] == "label"


def test_routing_statistics_and_metrics_per_task(client: TestClient) -> None:
    client.post("/v1/classify", json={"inputs": TEXTS, "task": "mood"})
    client.post("/v1/classify", json={"inputs": TEXTS[:1]})
    stats = client.get("/v1/models/mt/routing").json()
    assert stats["tasks"]["mood"]["since_start"]["texts"] == 3 and stats["tasks"]["topic"]["since_start"]["texts"] == 1
    assert stats["since_start"]["texts"] == 3  # texts, not (text, task) rows
    metrics = client.get("/metrics").text
    assert 'moe_task_expert_tokens_total{expert="0",layer="0",model="mt",task="mood"}' in metrics
    assert "task=" not in next(line for line in metrics.splitlines() if line.startswith("moe_expert_tokens_total"))


def test_one_batch_mixes_tasks_and_requests() -> None:
    """Texts of two requests asking different tasks are cut into one batch; each gets its own tasks' rows."""
    backend = MultiTaskFakeBackend()
    served = ServedModel(backend, max_wait_ms=0)
    outcomes: list[ClassifyResult | ServiceError] = []
    reqs: list[PendingRequest] = []
    for text, tasks in (("shares rose", [1]), ("a goal", [0, 1]), ("new phone", None)):
        reqs.append(
            served.model.submit(
                [text], truncate=True, return_routing=False, timeout_s=5, finish=outcomes.append, tasks=tasks
            )
        )
    served.start()
    try:
        for _ in range(200):
            if len(outcomes) == 3:
                break
            time.sleep(0.01)
    finally:
        served.stop()
    assert backend.batches[-1] == [[1], [0, 1], [0, 1]]  # one forward: every request's texts and tasks
    by_text = {r.results[0].logits.shape[0]: r for r in outcomes if isinstance(r, ClassifyResult)}
    assert len(outcomes) == 3 and set(by_text) == {1, 2}
    first = next(o for o in outcomes if isinstance(o, ClassifyResult) and o.tasks == [1])
    np.testing.assert_allclose(first.results[0].logits[0, :2], np.array(expected_task_logits("shares rose", 1)) / 2)
