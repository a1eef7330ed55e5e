"""End-to-end against a real uvicorn process: correctness under concurrency, metrics, OIP v2, bad input."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import struct
import subprocess
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.modeling.artifacts import load_model
from service.training.data import load_dataset
from service.training.predict import predict_texts
from tests.e2e.conftest import run_server, spawn_serve

pytestmark = pytest.mark.e2e
TOL = 1e-5


def _texts(n: int) -> list[str]:
    """Real articles of mixed length (first 1-40 words, some whole), cycling through the test split."""
    test = load_dataset("bbc-news")["test"]
    out = []
    for i in range(n):
        words = test[i % len(test)].text.split()
        out.append(" ".join(words[: 1 + (i * 7) % 40]) if i % 5 else test[i % len(test)].text)
    return out


def _reference_probs(model_dir: Path, texts: list[str]) -> np.ndarray:
    """Plain in-process reference: each text alone through the model (its windows, if longer than the model reads,
    as served by default), at the model's temperature."""
    bundle = load_model(model_dir)
    return np.concatenate([predict_texts(bundle, [t])[0].probs for t in texts])


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        named = line.startswith(name + "{") or line.startswith(name + " ")
        if named and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_200_concurrent_requests_match_reference_and_are_batched(server: str, models_dir: Path) -> None:
    texts = _texts(200)
    ref = _reference_probs(models_dir / "tiny", texts)
    before = httpx.get(f"{server}/metrics").text

    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(base_url=server, timeout=60, limits=limits) as client:
            return await asyncio.gather(*[client.post("/v1/classify", json={"inputs": t}) for t in texts])

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 200
    labels = httpx.get(f"{server}/v1/models/tiny").json()["labels"]  # label id order
    for i, r in enumerate(responses):
        got = {s["label"]: s["score"] for s in r.json()["predictions"][0]["scores"]}
        np.testing.assert_allclose([got[lab] for lab in labels], ref[i], atol=TOL, rtol=0)
        for h in ("x-queue-time", "x-inference-time", "x-total-time", "x-tokenization-time"):
            assert float(r.headers[h]) >= 0
    after = httpx.get(f"{server}/metrics").text
    batches = _metric(after, "moe_batch_size_texts_count", model="tiny") - _metric(
        before, "moe_batch_size_texts_count", model="tiny"
    )
    singles = _metric(after, "moe_batch_size_texts_bucket", model="tiny", le="1.0") - _metric(
        before, "moe_batch_size_texts_bucket", model="tiny", le="1.0"
    )
    assert batches < 200, "every request ran alone: no dynamic batching happened"
    assert batches - singles >= 1, "no batch larger than one text"
    assert _metric(after, "moe_expert_tokens_total", model="tiny", layer="0") > 0


def test_multi_text_request_and_options(server: str) -> None:
    texts = _texts(5)
    r = httpx.post(f"{server}/v1/classify", json={"inputs": texts, "top_k": 2, "return_routing": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tiny" and len(body["predictions"]) == 5
    for p in body["predictions"]:
        assert len(p["scores"]) == 2 and p["scores"][0]["score"] >= p["scores"][1]["score"]
        assert p["label"] == p["scores"][0]["label"]
        routing = p["routing"]
        assert len(routing["tokens"]) == p["tokens"]
        assert len(routing["layers"]) == 2
        for layer in routing["layers"]:
            assert len(layer["experts"]) == p["tokens"] and all(len(e) == 2 for e in layer["experts"])
            assert all(abs(sum(g) - 1) < 1e-4 for g in layer["gates"])
            assert 1 <= len(layer["top_experts"]) <= 3
    raw = httpx.post(f"{server}/v1/classify", json={"inputs": texts[0], "raw_scores": True}).json()
    scores = [s["score"] for s in raw["predictions"][0]["scores"]]
    assert abs(sum(np.exp(scores) / np.exp(scores).sum()) - 1) < 1e-6 and abs(sum(scores) - 1) > 1e-3
    other = httpx.post(f"{server}/v1/classify", json={"inputs": texts[0], "model": "tiny-b"}).json()
    assert other["model"] == "tiny-b"


def test_converted_pretrained_model_is_served_like_any_other(server: str, models_dir: Path) -> None:
    """A BERT-format encoder converted to experts: same answers as in-process, WordPiece frame in the routing,
    routing statistics counted, OIP v2 too."""
    texts = ["stocks fell sharply\nthe bank said profit rose", "match team goal", "phone chip users"]
    ref = _reference_probs(models_dir / "tiny-bert-moe", texts)
    body = {"inputs": texts, "model": "tiny-bert-moe", "return_routing": True, "top_k": 3}
    r = httpx.post(f"{server}/v1/classify", json=body)
    assert r.status_code == 200, r.text
    labels = httpx.get(f"{server}/v1/models/tiny-bert-moe").json()["labels"]
    for i, p in enumerate(r.json()["predictions"]):
        got = {s["label"]: s["score"] for s in p["scores"]}
        np.testing.assert_allclose([got[lab] for lab in labels], ref[i], atol=TOL, rtol=0)
        tokens = p["routing"]["tokens"]
        assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]" and len(tokens) == p["tokens"]
        assert len(p["routing"]["layers"]) == 2
    stats = httpx.get(f"{server}/v1/models/tiny-bert-moe/routing").json()
    assert all(sum(layer["tokens_per_expert"]) > 0 for layer in stats["since_start"]["layers"])
    v2 = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [texts[0]]}]}
    infer = httpx.post(f"{server}/v2/models/tiny-bert-moe/infer", json=v2)
    assert infer.status_code == 200, infer.text


def test_models_and_routing_endpoints(server: str) -> None:
    models = httpx.get(f"{server}/v1/models").json()
    assert models["default_model"] == "tiny"
    card = next(m for m in models["models"] if m["name"] == "tiny")
    assert card["architecture"]["experts"] == 4 and card["architecture"]["top_k"] == 2
    assert card["labels"][0] == "business" and card["eval"]["macro_f1"] > 0 and card["status"] == "ready"
    assert card["temperature"] > 0  # the served scores are softmax(logits / temperature)
    # The token budget in effect: the default, and tiny-b's own, measured for the variant it serves (torch fp32).
    budgets = {m["name"]: m["max_batch_tokens"] for m in models["models"]}
    assert budgets["tiny"] == 16384 and budgets["tiny-b"] == 512
    httpx.post(f"{server}/v1/classify", json={"inputs": _texts(3)})
    stats = httpx.get(f"{server}/v1/models/tiny/routing").json()
    for view in ("since_start", "window"):
        for layer in stats[view]["layers"]:
            assert sum(layer["tokens_per_expert"]) > 0
            assert abs(sum(layer["share"]) - 1) < 1e-4
            assert layer["imbalance_max_over_mean"] >= 1 and layer["drift_kl"] >= 0
            assert 0 <= layer["normalized_entropy"] <= 1
    assert httpx.get(f"{server}/v1/models/nope/routing").status_code == 404


def test_metrics_exposition_passes_promtool(server: str) -> None:
    httpx.post(f"{server}/v1/classify", json={"inputs": "warm"})
    text = httpx.get(f"{server}/metrics").text
    for name in (
        "moe_requests_total",
        "moe_request_duration_seconds_bucket",
        "moe_queue_duration_seconds_bucket",
        "moe_inference_duration_seconds_bucket",
        "moe_tokenization_duration_seconds_bucket",
        "moe_batch_size_tokens_bucket",
        "moe_batch_padding_ratio_bucket",
        "moe_queue_texts",
        "moe_expert_imbalance_ratio",
        "moe_router_entropy_ratio",
        "moe_routing_drift_kl",
        "moe_request_failures_total",
    ):
        assert name in text, name
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: run `make tools`"
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stdout + r.stderr


def test_oip_v2_json_round_trip(server: str) -> None:
    assert httpx.get(f"{server}/v2/health/live").status_code == 200
    assert httpx.get(f"{server}/v2/health/ready").status_code == 200
    meta = httpx.get(f"{server}/v2/models/tiny").json()
    assert meta["inputs"][0]["datatype"] == "BYTES"
    assert httpx.get(f"{server}/v2/models/tiny/ready").json()["ready"] is True
    texts = _texts(3)
    r = httpx.post(
        f"{server}/v2/models/tiny/infer",
        json={"id": "abc", "inputs": [{"name": "text", "shape": [3], "datatype": "BYTES", "data": texts}]},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == "abc" and body["model_name"] == "tiny"
    out = {o["name"]: o for o in body["outputs"]}
    probs = np.array(out["probabilities"]["data"]).reshape(out["probabilities"]["shape"])
    assert probs.shape == (3, 5) and np.allclose(probs.sum(1), 1, atol=1e-5)
    v1 = httpx.post(f"{server}/v1/classify", json={"inputs": texts}).json()["predictions"]
    assert out["label"]["data"] == [p["label"] for p in v1]


def test_oip_v2_binary_extension_round_trip(server: str) -> None:
    texts = ["stocks and shares", "a film star won an award"]
    payload = b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in texts)
    header = json.dumps(
        {
            "inputs": [
                {"name": "text", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": len(payload)}}
            ]
        }
    ).encode()
    r = httpx.post(
        f"{server}/v2/models/tiny/infer",
        content=header + payload,
        headers={"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["shape"] == [2]


def test_tritonclient_works_unchanged(server: str) -> None:
    httpclient = pytest.importorskip("tritonclient.http")
    client = httpclient.InferenceServerClient(url=server.removeprefix("http://"))
    assert client.is_server_live() and client.is_model_ready("tiny")
    texts = np.array([t.encode() for t in _texts(4)], dtype=np.object_)
    inp = httpclient.InferInput("text", [4], "BYTES")
    inp.set_data_from_numpy(texts)  # binary tensor extension, the client's default
    res = client.infer(
        "tiny",
        [inp],
        outputs=[httpclient.InferRequestedOutput("probabilities"), httpclient.InferRequestedOutput("label")],
    )
    probs = res.as_numpy("probabilities")
    assert probs.shape == (4, 5) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert len(res.as_numpy("label")) == 4
    client.close()


BAD_REQUESTS = [
    ({"inputs": []}, 422, "inputs"),
    ({"inputs": ""}, 422, "inputs[0]"),
    ({"inputs": ["ok", "   "]}, 422, "inputs[1]"),
    ({"inputs": ["ok", 5]}, 422, "inputs[1]"),
    ({"inputs": None}, 422, "inputs"),
    ({}, 422, "inputs"),
    ({"inputs": ["x"] * 9}, 422, "inputs"),
    ({"inputs": "x", "top_k": 0}, 422, "top_k"),
    ({"inputs": "x", "truncat": True}, 422, "truncat"),
    ({"inputs": "x", "model": "nope"}, 404, "model"),
]


@pytest.mark.parametrize(("body", "status", "field"), BAD_REQUESTS)
def test_bad_requests_get_clear_errors(server: str, body: dict, status: int, field: str) -> None:
    r = httpx.post(f"{server}/v1/classify", json=body)
    assert r.status_code == status, r.text
    err = r.json()
    assert err["field"] == field and field.split("[")[0] in err["error"]


def test_bad_json_body(server: str) -> None:
    r = httpx.post(f"{server}/v1/classify", content=b'{"inputs": ', headers={"content-type": "application/json"})
    assert r.status_code == 422 and "not valid JSON" in r.json()["error"]
    r = httpx.post(f"{server}/v2/models/tiny/infer", content=b"{nope")
    assert r.status_code == 422 and "not valid JSON" in r.json()["error"]


def test_too_long_text(server: str) -> None:
    long_text = "the market rallied " * 400  # far more than the tiny model's 64 tokens, and its 8 windows
    r = httpx.post(f"{server}/v1/classify", json={"inputs": long_text, "truncate": False})
    assert r.status_code == 422
    m = re.search(r"has (\d+) tokens, (\d+) more than model 'tiny' accepts \(64\)", r.json()["error"])
    assert m and int(m.group(1)) - 64 == int(m.group(2))
    ok = httpx.post(f"{server}/v1/classify", json={"inputs": long_text, "long_text": "truncate"})
    assert ok.status_code == 200 and ok.json()["predictions"][0]["truncated"] is True
    assert ok.json()["predictions"][0]["tokens"] == 64 and ok.json()["predictions"][0]["windows"] == 1
    # The server's default, chunk: windows of 64 up to MOE_MAX_WINDOWS (8), and this text needs more.
    chunked = httpx.post(f"{server}/v1/classify", json={"inputs": long_text}).json()["predictions"][0]
    assert (chunked["windows"], chunked["tokens"], chunked["truncated"]) == (8, 8 * 64, True)
    over_cap = httpx.post(f"{server}/v1/classify", json={"inputs": long_text, "long_text": "chunk", "truncate": False})
    assert over_cap.status_code == 422 and "more than 8 windows of 64" in over_cap.json()["error"]


def test_body_too_large(server: str) -> None:
    r = httpx.post(f"{server}/v1/classify", json={"inputs": "word " * 60_000})
    assert r.status_code == 413 and r.json()["type"] == "payload_too_large"


def test_streamed_body_too_large(server: str) -> None:
    """A chunked body (no Content-Length) is counted as it arrives and refused with 413 too."""

    def chunks():
        yield b'{"inputs": "'
        for _ in range(300):
            yield b"word " * 200
        yield b'"}'

    r = httpx.post(f"{server}/v1/classify", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["type"] == "payload_too_large"


def test_unknown_route(server: str) -> None:
    r = httpx.get(f"{server}/v1/nope")
    assert r.status_code == 404 and r.json()["type"] == "not_found"


def test_v2_bad_binary_and_nested_data(server: str) -> None:
    url = f"{server}/v2/models/tiny/infer"
    payload = struct.pack("<I", 2) + b"hi"

    def post(size: object, extra: bytes = b"") -> httpx.Response:
        header = json.dumps(
            {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": size}}]}
        ).encode()
        return httpx.post(
            url, content=header + payload + extra, headers={"Inference-Header-Content-Length": str(len(header))}
        )

    assert post(len(payload)).status_code == 200
    for size in ("6", -1, 10**6, 1.5):
        r = post(size)
        assert r.status_code == 422 and "binary_data_size" in r.json()["error"], (size, r.text)
    r = post(len(payload), extra=b"junk")
    assert r.status_code == 422 and "not claimed" in r.json()["error"]
    mixed = {"inputs": [{"name": "text", "shape": [4], "datatype": "BYTES", "data": [["hi"], "abc"]}]}
    assert httpx.post(url, json=mixed).status_code == 422


def test_v2_bad_inputs(server: str) -> None:
    url = f"{server}/v2/models/tiny/infer"
    bad = [
        {"inputs": [{"name": "text", "shape": [1], "datatype": "FP32", "data": [1.0]}]},
        {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["one"]}]},
        {"inputs": []},
        {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["x"]}], "outputs": [{"name": "z"}]},
    ]
    for body in bad:
        r = httpx.post(url, json=body)
        assert r.status_code == 422 and isinstance(r.json()["error"], str), (body, r.text)
    assert httpx.post(f"{server}/v2/models/nope/infer", json=bad[0]).status_code == 404


def test_own_deadline_passed_gives_408(server: str) -> None:
    """A 1 ms timeout_ms cannot cover tokenizing ~170 kB of text: refused before reaching the model, with a status
    that says the request's own deadline passed (408), not an upstream failure (504)."""
    r = httpx.post(f"{server}/v1/classify", json={"inputs": ["market " * 3000] * 8, "timeout_ms": 1})
    assert r.status_code == 408 and r.json()["type"] == "request_timeout" and r.json()["field"] == "timeout_ms"


def test_server_still_serves_after_bad_input(server: str) -> None:
    """Its own five 422s, counted as such, then a good request served: no reliance on other tests' bad input."""
    before = httpx.get(f"{server}/metrics").text
    for body in ({"inputs": []}, {"inputs": ""}, {"inputs": None}, {}, {"inputs": "x", "top_k": 0}):
        assert httpx.post(f"{server}/v1/classify", json=body).status_code == 422, body
    r = httpx.post(f"{server}/v1/classify", json={"inputs": "Profits rose at the bank"})
    assert r.status_code == 200
    text = httpx.get(f"{server}/metrics").text
    for name, labels in (
        ("moe_request_failures_total", {"reason": "validation"}),
        ("moe_requests_total", {"route": "/v1/classify", "status": "422"}),
    ):
        assert _metric(text, name, **labels) - _metric(before, name, **labels) == 5, name


def test_queue_full_gives_429_with_retry_after(models_dir: Path, tmp_path: Path) -> None:
    """Under a real flood some requests are served and the rest refused; the server serves on. (A request larger
    than the queue, and the headers of a 429: tests/unit/test_api.py.)"""
    with run_server(models_dir, tmp_path / "log", max_queue_texts=2, max_batch_size=2, max_wait_ms=0) as url:

        async def flood() -> list[int]:
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                rs = await asyncio.gather(
                    *[client.post("/v1/classify", json={"inputs": ["market " * 60] * 2}) for _ in range(60)]
                )
                return [x.status_code for x in rs]

        codes = asyncio.run(flood())
        assert set(codes) <= {200, 429} and 200 in codes and 429 in codes
        assert httpx.post(f"{url}/v1/classify", json={"inputs": "still here"}).status_code == 200


def test_onnx_backend_serves_with_routing(onnx_models_dir: Path, tmp_path: Path) -> None:
    """`--backend onnx` (MOE_BACKEND=onnx): the exported graphs behind the real server, routing and statistics
    included, answers equal to the torch reference."""
    texts = ["stocks fell sharply\nthe bank said profit rose", "match team goal", "phone chip users said"]
    with run_server(onnx_models_dir, tmp_path / "onnx.log", backend="onnx", default_model="tiny-bert-moe") as url:
        models = httpx.get(f"{url}/v1/models").json()["models"]
        assert {(m["name"], m["backend"], m["precision"]) for m in models} == {
            ("tiny", "onnx", "fp32"),
            ("tiny-bert-moe", "onnx", "fp32"),
        }
        r = httpx.post(f"{url}/v1/classify", json={"inputs": texts, "return_routing": True})
        assert r.status_code == 200, r.text
        ref = _reference_probs(onnx_models_dir / "tiny-bert-moe", texts)
        labels = models[[m["name"] for m in models].index("tiny-bert-moe")]["labels"]
        for i, p in enumerate(r.json()["predictions"]):
            got = {s["label"]: s["score"] for s in p["scores"]}
            np.testing.assert_allclose([got[lab] for lab in labels], ref[i], atol=1e-4, rtol=0)
            assert p["routing"]["tokens"][0] == "[CLS]" and len(p["routing"]["layers"]) == 2
        stats = httpx.get(f"{url}/v1/models/tiny-bert-moe/routing").json()
        assert all(sum(layer["tokens_per_expert"]) > 0 for layer in stats["since_start"]["layers"])
        metrics = httpx.get(f"{url}/metrics").text
        assert 'moe_model_info{backend="onnx",device="cpu",model="tiny-bert-moe",precision="fp32"} 1.0' in metrics


def test_broken_model_folder_fails_alone(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Truncated weights, a bad config and a missing tokenizer, each in its own folder beside a good one: the
    server starts, each broken model reports its error (no internal paths) and readiness, the good one serves."""
    repo = tmp_path / "repo"
    for name in ("good", "truncated", "bad-config", "no-tokenizer"):
        shutil.copytree(tiny_model_dir, repo / name)
    weights = repo / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (repo / "bad-config" / "config.json").write_text('{"model_type": "moe-text-classifier", "architecture": {}}')
    (repo / "no-tokenizer" / "tokenizer.json").unlink()
    with run_server(repo, tmp_path / "log", default_model="good") as url:
        cards = {m["name"]: m for m in httpx.get(f"{url}/v1/models").json()["models"]}
        assert cards["good"]["status"] == "ready"
        for name in ("truncated", "bad-config", "no-tokenizer"):
            assert cards[name]["status"] == "failed" and cards[name]["error"], cards[name]
            assert str(repo) not in cards[name]["error"]
            r = httpx.post(f"{url}/v1/classify", json={"inputs": "stocks fell", "model": name})
            assert r.status_code == 503 and r.json()["type"] == "model_failed", r.text
            ready = httpx.get(f"{url}/v2/models/{name}/ready")
            assert ready.status_code == 503 and ready.json()["ready"] is False
        assert "missing tokenizer.json" in cards["no-tokenizer"]["error"]
        health = httpx.get(f"{url}/v2/health/ready")
        assert health.status_code == 200 and health.json()["failed_models"] == [
            "bad-config",
            "no-tokenizer",
            "truncated",
        ]
        assert httpx.post(f"{url}/v1/classify", json={"inputs": "stocks fell"}).status_code == 200
        metrics = httpx.get(f"{url}/metrics").text  # what the model-not-ready and queue alerts read
        for name in ("bad-config", "no-tokenizer", "truncated"):
            assert f'moe_model_ready{{model="{name}"}} 0.0' in metrics
        assert 'moe_model_ready{model="good"} 1.0' in metrics
        assert 'moe_queue_capacity_texts{model="good"} 2048.0' in metrics
    log = (tmp_path / "log").read_text()
    assert "model truncated failed to load" in log


def test_api_key_request_ids_and_access_log(models_dir: Path, tmp_path: Path) -> None:
    """MOE_API_KEY: prediction and model routes need the Bearer key (401 otherwise); health and metrics stay open.
    Every response carries x-request-id (the client's own when it is plain), and the JSON access log names it."""
    key = "s3cret-key"
    log = tmp_path / "log"
    with run_server(models_dir, log, default_model="tiny", api_key=key, access_log="json", log_level="info") as url:
        body = {"inputs": "stocks fell"}
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": key}):
            r = httpx.post(f"{url}/v1/classify", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["type"] == "unauthorized", headers
            assert r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/v2/models/tiny").status_code == 401
        for open_path in ("/health", "/v2/health/ready", "/v2/health/live", "/metrics"):
            assert httpx.get(f"{url}{open_path}").status_code == 200, open_path
        auth = {"authorization": f"Bearer {key}", "x-request-id": "client-42"}
        r = httpx.post(f"{url}/v1/classify", json=body, headers=auth)
        assert r.status_code == 200 and r.headers["x-request-id"] == "client-42"
        odd = httpx.post(f"{url}/v1/classify", json=body, headers={**auth, "x-request-id": "bad id\\n"})
        assert odd.status_code == 200 and re.fullmatch(r"[0-9a-f]{32}", odd.headers["x-request-id"])
    lines = [json.loads(line.split(" ", 4)[-1]) for line in log.read_text().splitlines() if '"request_id"' in line]
    mine = [x for x in lines if x["request_id"] == "client-42"]
    assert mine and mine[0]["status"] == 200 and mine[0]["path"] == "/v1/classify" and mine[0]["model"] == "tiny"
    assert any(x["status"] == 401 for x in lines)


def test_hung_worker_makes_the_process_exit_non_zero(tmp_path: Path) -> None:
    """A batch that runs past MOE_WORKER_HANG_S (here: the MiniLM model on 64 long texts against a 0.3 s limit)
    counts as a hung worker: the model process exits 3, the waiting request gets 503, and (MOE_EXIT_ON_MODEL_CRASH;
    by default the model process is restarted) the server exits with 3 so an orchestrator restarts it."""
    env = {
        "MOE_MODELS_DIR": str(Path(__file__).resolve().parents[2] / "models"),
        "MOE_MODELS": "bbc-news-minilm-moe",
        "MOE_BACKEND": "torch",
        "MOE_PRECISION": "fp32",
        "MOE_WORKER_HANG_S": "0.3",
        "MOE_EXIT_ON_MODEL_CRASH": "true",
    }
    proc, url = spawn_serve(tmp_path / "log", **env)
    try:
        long_texts = [" ".join(["the market fell as shares slid"] * 60)] * 64
        # Answered before the server stops: uvicorn's graceful shutdown finishes the requests in flight.
        r = httpx.post(f"{url}/v1/classify", json={"inputs": long_texts}, timeout=30)
        assert r.status_code == 503 and r.json()["type"] == "model_not_ready", r.text
        assert proc.wait(60) == 3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = (tmp_path / "log").read_text()
    # The model process's watchdog exits 3, and the API process follows.
    assert "one batch has run for more than 0.3 s" in text
    assert "stopped: model process for 'bbc-news-minilm-moe' exited with code 3" in text


def test_sigterm_under_load_leaves_no_accepted_connection_unanswered(models_dir: Path, tmp_path: Path) -> None:
    """A burst of one-request connections, SIGTERM in the middle. The client behaves as a load balancer does: once
    the instance answers 503 (draining), it opens no new connection to it. Every connection opened before that gets
    an HTTP answer (200, or 503 while the server drains), none is reset; the process then exits 0."""
    env = {"MOE_MODELS_DIR": str(models_dir), "MOE_DEFAULT_MODEL": "tiny", "MOE_SHUTDOWN_DRAIN_S": "1.5"}
    proc, url = spawn_serve(tmp_path / "log", **env)
    outcomes: Counter = Counter()
    slots = asyncio.Semaphore(128)
    marked_down = False

    async def one(client: httpx.AsyncClient) -> None:
        nonlocal marked_down
        async with slots:
            if marked_down:
                outcomes["not sent"] += 1
                return
            try:
                r = await client.post("/v1/classify", json={"inputs": "shares rose after profits beat forecasts"})
                outcomes[r.status_code] += 1
                marked_down |= r.status_code == 503
            except httpx.TransportError as exc:  # refused, reset or closed after the connection was opened
                outcomes[f"lost: {type(exc).__name__}"] += 1

    async def burst() -> None:
        limits = httpx.Limits(max_connections=128, max_keepalive_connections=0)  # a new connection per request
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
            tasks = [asyncio.create_task(one(client)) for _ in range(600)]
            while outcomes[200] < 50 and not all(t.done() for t in tasks):  # mid-burst: answers flowing
                await asyncio.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            await asyncio.gather(*tasks)

    try:
        asyncio.run(burst())
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert set(outcomes) <= {200, 503, "not sent"}, outcomes  # nothing lost
    assert outcomes[200] >= 50 and outcomes[503] > 0, outcomes


def test_model_names_cannot_reach_outside_the_repository(server: str) -> None:
    """Model names only ever select folders found in the repository at start: paths are unknown models."""
    for name in ("../tiny", "..%2F..%2Fetc%2Fpasswd", "/etc/passwd", "tiny/../tiny-b"):
        r = httpx.post(f"{server}/v1/classify", json={"inputs": "x", "model": name})
        assert r.status_code == 404 and r.json()["type"] == "model_not_found", (name, r.text)
        assert "/" not in r.json()["error"].split("available:")[1]
    assert httpx.get(f"{server}/v1/models/..%2F..%2Fetc%2Fpasswd").status_code == 404


def test_v1_and_v2_count_texts_and_truncations_alike(server: str) -> None:
    """Text and truncation counters live in the engine: both APIs count the same way (v2 used to skip truncations)."""
    long_text = "the market rallied " * 400  # over the tiny model's 64 tokens, and its 8 windows

    def counts() -> tuple[float, float]:
        text = httpx.get(f"{server}/metrics").text
        return (
            _metric(text, "moe_texts_total", model="tiny"),
            _metric(text, "moe_texts_truncated_total", model="tiny"),
        )

    for send in (
        lambda: httpx.post(f"{server}/v1/classify", json={"inputs": [long_text, "short"], "model": "tiny"}),
        lambda: httpx.post(
            f"{server}/v2/models/tiny/infer",
            json={"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": [long_text, "short"]}]},
        ),
    ):
        texts0, trunc0 = counts()
        assert send().status_code == 200
        texts1, trunc1 = counts()
        assert (texts1 - texts0, trunc1 - trunc0) == (2, 1)
