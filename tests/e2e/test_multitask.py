"""A multi-task model served end to end: a real `moe-serve serve` (model processes) on a repository holding the tiny
two-task folder (tests/conftest.py tiny_multitask_dir) beside a single-task one. /v1/classify with and without
`task` and its errors, /v1/models listing the tasks and their evaluation, OIP v2 over HTTP and gRPC with selected
outputs, per-task routing statistics and the task label in /metrics."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from service.bench.served import free_port
from tests.e2e.conftest import run_server

pytestmark = pytest.mark.e2e
TEXTS = ["stocks market\nthe bank said profits rose", "dull awful boring film"]


@pytest.fixture(scope="module")
def served(
    tiny_multitask_dir: Path, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    repo = tmp_path_factory.mktemp("mt-repo")
    shutil.copytree(tiny_multitask_dir, repo / "mt")
    shutil.copytree(tiny_model_dir, repo / "single")
    port = free_port()
    log = tmp_path_factory.mktemp("mt-logs") / "server.log"
    with run_server(repo, log, default_model="mt", grpc_port=port, max_wait_ms=5) as url:
        yield url, f"127.0.0.1:{port}"


def test_classify_every_task_or_those_asked(served: tuple[str, str]) -> None:
    url = served[0]
    tasks = list(httpx.get(f"{url}/v1/models/mt").json()["tasks"])
    every = httpx.post(f"{url}/v1/classify", json={"inputs": TEXTS}).json()["predictions"]
    assert [(p["text"], p["task"]) for p in every] == [(i, t) for i in range(2) for t in tasks]
    asked = httpx.post(f"{url}/v1/classify", json={"inputs": TEXTS, "task": [tasks[1], tasks[0]]}).json()
    assert [(p["text"], p["task"]) for p in asked["predictions"]] == [(i, t) for i in range(2) for t in tasks[::-1]]
    for p in asked["predictions"]:  # the same answer whichever tasks the text was asked with
        same = next(q for q in every if (q["text"], q["task"]) == (p["text"], p["task"]))
        np.testing.assert_allclose([s["score"] for s in p["scores"]], [s["score"] for s in same["scores"]], atol=1e-5)
    one = httpx.post(f"{url}/v1/classify", json={"inputs": TEXTS[1], "task": "mood"}).json()["predictions"]
    assert len(one) == 1 and one[0]["task"] == "mood" and one[0]["label"] in ("fresh", "rotten")


def test_task_errors_and_single_task_model(served: tuple[str, str]) -> None:
    url = served[0]
    r = httpx.post(f"{url}/v1/classify", json={"inputs": TEXTS, "task": "weather"})
    assert r.status_code == 404 and r.json()["type"] == "task_not_found" and "weather" in r.json()["error"]
    r = httpx.post(f"{url}/v1/classify", json={"inputs": TEXTS, "task": ["mood", "mood"]})
    assert r.status_code == 422 and r.json()["field"] == "task"
    r = httpx.post(f"{url}/v1/classify", json={"model": "single", "inputs": TEXTS, "task": "mood"})
    assert r.status_code == 404 and r.json()["type"] == "task_not_found"
    single = httpx.post(f"{url}/v1/classify", json={"model": "single", "inputs": TEXTS}).json()["predictions"]
    assert len(single) == 2 and "task" not in single[0]


def test_models_list_tasks_labels_and_evaluation(served: tuple[str, str]) -> None:
    card = httpx.get(f"{served[0]}/v1/models/mt").json()
    assert card["tasks"]["mood"]["labels"] == ["fresh", "rotten"] and len(card["tasks"]["topic"]["labels"]) == 3
    assert card["tasks"]["topic"]["eval"]["macro_f1"] is not None and card["eval"]["mean_macro_f1"] is not None


def test_v2_http_and_grpc_selected_outputs(served: tuple[str, str]) -> None:
    url, address = served
    meta = httpx.get(f"{url}/v2/models/mt").json()
    assert {o["name"] for o in meta["outputs"]} == {
        "topic_label",
        "topic_probabilities",
        "mood_label",
        "mood_probabilities",
    }
    infer = {
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": TEXTS}],
        "outputs": [{"name": "mood_label"}, {"name": "mood_probabilities"}],
    }
    r = httpx.post(f"{url}/v2/models/mt/infer", json=infer)
    assert r.status_code == 200, r.text
    label, probs = r.json()["outputs"]
    assert label["name"] == "mood_label" and probs["shape"] == [2, 2]
    with grpc.insecure_channel(address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        req = service_pb2.ModelInferRequest(model_name="mt")
        t = req.inputs.add(name="text", datatype="BYTES", shape=[2])
        t.contents.bytes_contents.extend(s.encode() for s in TEXTS)
        req.outputs.add(name="mood_probabilities")
        out = stub.ModelInfer(req, timeout=30)
        assert [o.name for o in out.outputs] == ["mood_probabilities"]
        np.testing.assert_allclose(list(out.outputs[0].contents.fp32_contents), probs["data"], atol=1e-6)
        req.outputs[0].name = "weather_label"
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(req, timeout=30)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_routing_statistics_and_metrics_per_task(served: tuple[str, str]) -> None:
    url = served[0]
    httpx.post(f"{url}/v1/classify", json={"inputs": TEXTS, "task": "topic"})
    stats = httpx.get(f"{url}/v1/models/mt/routing").json()
    topic = stats["tasks"]["topic"]
    assert topic["since_start"]["texts"] >= 2 and topic["reference"] is not None
    assert topic["window"]["layers"][-1]["drift_kl"] is not None  # against the task's own routing profile
    metrics = httpx.get(f"{url}/metrics").text
    drift = [line for line in metrics.splitlines() if line.startswith("moe_task_routing_drift_kl{")]
    assert any('model="mt"' in line and 'task="topic"' in line for line in drift), drift
    assert 'task="mood"' in metrics and 'moe_expert_tokens_total{expert="0",layer="0",model="single"}' in metrics
