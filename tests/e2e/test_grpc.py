"""The Open Inference Protocol over gRPC against a real `moe-serve serve` (models/bbc-news-moe), with tritonclient's
gRPC client: health, metadata, inference with BYTES inputs in both forms (raw_input_contents, what tritonclient
sends, and contents.bytes_contents), the errors and their codes, the API key, and the metrics' protocol label."""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from service.bench.served import free_port
from tests.e2e.conftest import run_server, spawn_serve

pytestmark = pytest.mark.slow

MODEL = "bbc-news-moe"
KEY = "grpc-test-key"
AUTH = {"authorization": f"Bearer {KEY}"}
TEXTS = ["Shares in the bank rose after profits beat forecasts.", "The striker scored twice in the cup final."]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(HTTP base URL, gRPC address) of one server with the API key set."""
    port = free_port()
    log = tmp_path_factory.mktemp("grpc") / "server.log"
    with run_server(
        Path("models"), log, models=MODEL, grpc_port=port, api_key=KEY, max_client_batch_size=8, max_body_bytes=100_000
    ) as url:
        yield url, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def client(served: tuple[str, str]) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(served[1])
    yield c
    c.close()


@pytest.fixture(scope="module")
def stub(served: tuple[str, str]) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(served[1]) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def _http(url: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url + path, data=data, headers={**AUTH, "content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _texts_input(texts: list[str], shape: list[int]) -> triton.InferInput:
    t = triton.InferInput("text", shape, "BYTES")
    t.set_data_from_numpy(np.array([s.encode() for s in texts], dtype=object).reshape(shape))
    return t


def test_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()  # open, like /v2/health/*
    assert client.is_model_ready(MODEL, headers=AUTH)
    assert client.get_server_metadata(headers=AUTH).name == "moe-serve"
    meta = client.get_model_metadata(MODEL, headers=AUTH)
    assert meta.name == MODEL and list(meta.versions) == ["1"] and meta.platform.startswith("moe-serve_")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("text", "BYTES", [-1])]
    assert [(t.name, list(t.shape)) for t in meta.outputs] == [("label", [-1]), ("probabilities", [-1, 5])]


@pytest.mark.parametrize("shape", [[2], [2, 1]])
def test_infer_raw_input_contents_matches_http(
    client: triton.InferenceServerClient, served: tuple[str, str], shape: list[int]
) -> None:
    """tritonclient sends raw_input_contents; the answer is the HTTP route's, from the same engine."""
    result = client.infer(MODEL, [_texts_input(TEXTS, shape)], request_id="g-1", headers=AUTH)
    labels = [b.decode() for b in result.as_numpy("label")]
    probs = result.as_numpy("probabilities")
    assert labels == ["business", "sports"] and probs.shape == (2, 5) and probs.dtype == np.float32
    assert result.get_response().id == "g-1" and len(result.get_response().raw_output_contents) == 2
    body = {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": TEXTS}]}
    http = {o["name"]: o["data"] for o in _http(served[0], f"/v2/models/{MODEL}/infer", body)["outputs"]}
    assert labels == http["label"]
    np.testing.assert_allclose(probs.reshape(-1), http["probabilities"], rtol=1e-5, atol=1e-7)


def test_infer_contents_form_and_chosen_output(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    req = service_pb2.ModelInferRequest(model_name=MODEL)
    req.inputs.add(name="text", datatype="BYTES", shape=[2]).contents.bytes_contents.extend(t.encode() for t in TEXTS)
    req.outputs.add(name="label")
    resp = stub.ModelInfer(req, metadata=tuple(AUTH.items()))
    assert not resp.raw_output_contents  # answered in the form it was asked
    assert [(o.name, list(o.contents.bytes_contents)) for o in resp.outputs] == [("label", [b"business", b"sports"])]


def _rpc_error(call) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value


def _trailers(err: grpc.RpcError) -> dict[str, str]:
    return dict(err.trailing_metadata() or ())


def test_errors_have_codes_and_name_the_field(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    md = tuple(AUTH.items())

    def infer(texts: list[str], shape: list[int], datatype: str = "BYTES", **fields: str) -> grpc.RpcError:
        req = service_pb2.ModelInferRequest(model_name=fields.get("model", MODEL), model_version=fields.get("v", ""))
        t = req.inputs.add(name="text", datatype=datatype, shape=shape)
        t.contents.bytes_contents.extend(s.encode() for s in texts)
        return _rpc_error(lambda: stub.ModelInfer(req, metadata=md))

    err = infer(TEXTS, [2], model="nope")
    assert err.code() == grpc.StatusCode.NOT_FOUND and "available: bbc-news-moe" in err.details()
    assert _trailers(err) == {"moe-error-type": "model_not_found", "moe-error-field": "model"}
    err = infer(TEXTS, [2], v="2")
    assert err.code() == grpc.StatusCode.NOT_FOUND and _trailers(err)["moe-error-field"] == "model_version"
    err = infer(TEXTS, [3])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and _trailers(err)["moe-error-field"] == "inputs[0].shape"
    err = infer(["a"] * 9, [9])  # max_client_batch_size=8
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 8" in err.details()
    err = infer(TEXTS, [2], datatype="FP32")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and _trailers(err)["moe-error-type"] == "validation"
    err = infer(["x" * 150_000], [1])  # over MOE_MAX_BODY_BYTES: refused by gRPC itself, as HTTP answers 413
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    err = _rpc_error(lambda: stub.ModelReady(service_pb2.ModelReadyRequest(name="nope"), metadata=md))
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_api_key(client: triton.InferenceServerClient, stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    with pytest.raises(InferenceServerException) as e:
        client.infer(MODEL, [_texts_input(TEXTS, [2])])
    assert e.value.status() == "StatusCode.UNAUTHENTICATED"
    err = _rpc_error(
        lambda: stub.ModelMetadata(
            service_pb2.ModelMetadataRequest(name=MODEL), metadata=(("authorization", "Bearer no"),)
        )
    )
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and _trailers(err)["moe-error-type"] == "unauthorized"
    assert stub.ServerLive(service_pb2.ServerLiveRequest()).live  # health needs no key


def test_metrics_by_protocol(served: tuple[str, str], client: triton.InferenceServerClient) -> None:
    client.infer(MODEL, [_texts_input(TEXTS[:1], [1])], headers=AUTH)
    req = urllib.request.Request(served[0] + "/metrics")
    with urllib.request.urlopen(req, timeout=10) as r:
        lines = r.read().decode().splitlines()

    def value(prefix: str, *labels: str) -> float:
        hits = [float(x.rsplit(" ", 1)[1]) for x in lines if x.startswith(prefix) and all(s in x for s in labels)]
        return sum(hits)

    route = 'route="/inference.GRPCInferenceService/ModelInfer"'
    assert value("moe_requests_total{", 'protocol="grpc"', route, 'status="200"', f'model="{MODEL}"') >= 1
    assert value("moe_requests_total{", 'protocol="grpc"', route, 'status="401"') >= 1
    assert value("moe_request_duration_seconds_count{", 'protocol="grpc"', route) >= 1
    assert value("moe_request_failures_total{", 'reason="unauthorized"') >= 1
    assert value("moe_texts_total{", f'model="{MODEL}"') >= 1  # the same engine counted the gRPC texts


def test_draining_refuses_with_unavailable(tmp_path: Path) -> None:
    """After SIGTERM, as over HTTP: ServerReady says false, the other methods get UNAVAILABLE (shutting_down), until
    the drain ends and the process exits 0."""
    port = free_port()
    proc, _ = spawn_serve(
        tmp_path / "server.log",
        MOE_MODELS_DIR="models",
        MOE_MODELS=MODEL,
        MOE_GRPC_PORT=str(port),
        MOE_SHUTDOWN_DRAIN_S="3",
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerReady(service_pb2.ServerReadyRequest()).ready
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 2
            while stub.ServerReady(service_pb2.ServerReadyRequest()).ready and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not stub.ServerReady(service_pb2.ServerReadyRequest()).ready
            err = _rpc_error(lambda: stub.ModelMetadata(service_pb2.ModelMetadataRequest(name=MODEL)))
            assert err.code() == grpc.StatusCode.UNAVAILABLE and _trailers(err)["moe-error-type"] == "shutting_down"
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
