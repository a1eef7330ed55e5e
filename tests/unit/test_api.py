"""The API in-process: the real app (routes, middleware, error table, queue, scheduler) over a numpy fake backend,
driven through httpx (Starlette's TestClient runs the lifespan). Every test runs twice: on the default path (the
model server and its socket loop, on a thread over inproc:// instead of in a process of its own) and on the
one-process path (MOE_MODEL_PROCESS=false, an inference thread). Milliseconds per test; the end-to-end tier
(tests/e2e) checks what needs real processes against a real uvicorn server and real models."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from tests.fakes import LABELS, FakeBackend, expected_logits


def _repo(tmp_path: Path, *names: str) -> Path:
    for name in names:
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "config.json").write_text("{}")  # discovered; the fake loader reads nothing
    return tmp_path


@pytest.fixture(params=[True, False], ids=["model-server", "one-process"])
def make_client(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator:
    clients: list[TestClient] = []

    def make(delay_s: float = 0.0, broken: tuple[str, ...] = (), **settings: object) -> TestClient:
        def loader(path: Path) -> FakeBackend:
            if path.name in broken:
                raise ValueError(f"{path}/model.safetensors: truncated")
            return FakeBackend(path.name, delay_s)

        repo = _repo(tmp_path / f"repo{len(clients)}", "alpha", "beta", *broken)
        settings = {"model_process": request.param, **settings}
        app = create_app(Settings(models_dir=repo, default_model="alpha", **settings), loader)  # type: ignore[arg-type]
        client = TestClient(app).__enter__()
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


def test_classify_answers_with_scores_timings_and_request_id(make_client) -> None:
    client = make_client()
    r = client.post("/v1/classify", json={"inputs": ["shares rose", "a goal"], "return_routing": True, "top_k": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "alpha" and len(body["predictions"]) == 2
    for text, p in zip(["shares rose", "a goal"], body["predictions"], strict=True):
        best = LABELS[max(range(3), key=lambda i: expected_logits(text)[i])]
        assert p["label"] == best and len(p["scores"]) == 2
        assert p["routing"]["tokens"][0].startswith("t") and len(p["routing"]["layers"]) == 1
    assert {"x-queue-time", "x-inference-time", "x-total-time", "x-request-id"} <= set(r.headers)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"inputs": []}, "inputs"),
        ({"inputs": ["ok", "   "]}, "inputs[1]"),
        ({"inputs": "x", "top_k": 0}, "top_k"),
        ({"inputs": "x", "top_k": 1.5}, "top_k"),
        ({"inputs": "x", "colour": "red"}, "colour"),
        ({"inputs": 5}, "inputs"),
        ({"inputs": ["x"] * 65}, "inputs"),
    ],
)
def test_bad_input_is_422_naming_the_field(make_client, body: dict, field: str) -> None:
    r = make_client().post("/v1/classify", json=body)
    assert r.status_code == 422 and r.json()["type"] == "validation", r.text
    assert r.json()["field"] == field, r.json()


def test_error_table(make_client) -> None:
    client = make_client(max_body_bytes=2000)
    unknown = client.post("/v1/classify", json={"inputs": "x", "model": "gamma"})
    assert unknown.status_code == 404 and unknown.json()["type"] == "model_not_found"
    big = client.post("/v1/classify", content=b"{" + b" " * 3000 + b"}", headers={"content-type": "application/json"})
    assert big.status_code == 413 and big.json()["type"] == "payload_too_large"
    undecodable = client.post("/v1/classify", content=b"\xff\xfe", headers={"content-type": "application/json"})
    assert undecodable.status_code == 422 and undecodable.json()["field"] == "body"
    assert client.get("/nope").status_code == 404


def test_full_queue_is_429_before_any_work(make_client) -> None:
    client = make_client(max_queue_texts=2)
    r = client.post("/v1/classify", json={"inputs": ["a", "b", "c"]})  # more than the queue may ever hold
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and int(r.headers["retry-after-ms"]) >= 1
    assert r.json()["type"] == "queue_full"


def test_own_timeout_is_408(make_client) -> None:
    client = make_client(delay_s=0.3)
    client.post("/v1/classify", json={"inputs": "warm"})
    r = client.post("/v1/classify", json={"inputs": ["slow"], "timeout_ms": 50})
    assert r.status_code == 408 and r.json()["field"] == "timeout_ms"


def test_v2_json_and_binary(make_client) -> None:
    client = make_client()
    texts = ["shares rose", "a goal"]
    tensor = {"name": "text", "shape": [2], "datatype": "BYTES", "data": texts}
    j = client.post("/v2/models/beta/infer", json={"inputs": [tensor], "id": "r1"})
    assert j.status_code == 200 and j.json()["id"] == "r1"
    payload = b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in texts)
    head = {"inputs": [{**tensor, "data": None, "parameters": {"binary_data_size": len(payload)}}]}
    header = json.dumps({"inputs": [{k: v for k, v in head["inputs"][0].items() if v is not None}]}).encode()
    b = client.post(
        "/v2/models/beta/infer",
        content=header + payload,
        headers={"Inference-Header-Content-Length": str(len(header)), "content-type": "application/octet-stream"},
    )
    assert b.status_code == 200, b.text
    assert b.json()["outputs"][0]["data"] == j.json()["outputs"][0]["data"]
    truncated = client.post(
        "/v2/models/beta/infer",
        content=header + payload[:-3],
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert truncated.status_code == 422 and "binary data" in truncated.json()["error"]


def test_api_key(make_client) -> None:
    client = make_client(api_key="k")
    assert client.post("/v1/classify", json={"inputs": "x"}).status_code == 401
    ok = client.post("/v1/classify", json={"inputs": "x"}, headers={"authorization": "Bearer k"})
    assert ok.status_code == 200
    assert client.get("/v2/health/ready").status_code == 200 and client.get("/metrics").status_code == 200


def test_broken_folder_fails_alone(make_client) -> None:
    client = make_client(broken=("gamma",))
    cards = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert cards["gamma"]["status"] == "failed" and "truncated" in cards["gamma"]["error"]
    assert "repo" not in cards["gamma"]["error"]  # no internal paths
    assert client.post("/v1/classify", json={"inputs": "x", "model": "gamma"}).status_code == 503
    assert client.post("/v1/classify", json={"inputs": "x"}).status_code == 200
    assert client.get("/v2/health/ready").json() == {"ready": True, "failed_models": ["gamma"]}


def test_v2_nested_rows_and_documented_response(make_client) -> None:
    """Shape [n, 1] with one text per row is accepted, and the response matches the documented output schema."""
    client = make_client()
    tensor = {"name": "text", "shape": [2, 1], "datatype": "BYTES", "data": [["shares rose"], ["a goal"]]}
    r = client.post("/v2/models/beta/infer", json={"inputs": [tensor]})
    assert r.status_code == 200, r.text
    from service.api.schemas import InferResponse

    InferResponse.model_validate(r.json())


def test_unexpected_error_is_a_500_with_the_request_id(make_client, monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception nobody planned for still gets a JSON 500 carrying the request id (no trace), and is logged."""
    import service.api.v1 as v1

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("/secret/path exploded")

    monkeypatch.setattr(v1, "prediction", broken)
    client = make_client()
    r = client.post("/v1/classify", json={"inputs": "x"}, headers={"x-request-id": "abc-1"})
    assert r.status_code == 500 and r.headers["x-request-id"] == "abc-1"
    assert "abc-1" in r.json()["error"] and "secret" not in r.text


def test_long_texts_are_chunked_by_default_and_the_answer_says_how(make_client) -> None:
    """Both paths (the model server over inproc:// and one process): windows, tokens and truncation in the answer,
    routing over every window, the request's long_text over the setting, and the 422s."""
    client = make_client(chunk_overlap=16)
    long = "".join(chr(ord("a") + i % 26) for i in range(150))  # 150 fake tokens: windows at 0, 48 and 86
    body = {"inputs": [long, "short"], "return_routing": True}
    chunked, short = client.post("/v1/classify", json=body).json()["predictions"]
    assert (chunked["windows"], chunked["tokens"], chunked["truncated"]) == (3, 192, False)
    assert chunked["routing"]["window_tokens"] == [64, 64, 64] and len(chunked["routing"]["tokens"]) == 192
    assert len(chunked["routing"]["layers"][0]["experts"]) == 192
    assert (short["windows"], short["truncated"], short["routing"]["window_tokens"]) == (1, False, [5])
    cut = client.post("/v1/classify", json={"inputs": long, "long_text": "truncate"}).json()["predictions"][0]
    assert (cut["windows"], cut["tokens"], cut["truncated"]) == (1, 64, True)
    refused = client.post("/v1/classify", json={"inputs": ["ok", long], "truncate": False})
    assert refused.status_code == 422 and refused.json()["type"] == "input_too_long"
    assert refused.json()["field"] == "inputs[1]"
    bad = client.post("/v1/classify", json={"inputs": long, "long_text": "summarise"})
    assert bad.status_code == 422 and bad.json()["field"] == "long_text"


def test_v2_reads_long_text_from_its_parameters(make_client) -> None:
    client = make_client(chunk_overlap=16)
    long = "".join(chr(ord("a") + i % 26) for i in range(150))

    def infer(parameters: dict | None) -> object:
        body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [long]}]}
        return client.post("/v2/models/alpha/infer", json={**body, "parameters": parameters})

    chunked, cut = infer(None).json(), infer({"long_text": "truncate"}).json()
    v1 = client.post("/v1/classify", json={"inputs": long}).json()["predictions"][0]
    assert chunked["outputs"][0]["data"] == [v1["label"]]
    assert chunked["outputs"][1]["data"] != cut["outputs"][1]["data"]  # a different reading, different scores
    bad = infer({"long_text": "all"})
    assert bad.status_code == 422 and bad.json()["field"] == "parameters.long_text"
