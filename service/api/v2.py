"""Open Inference Protocol v2 (KServe / Triton HTTP), so standard clients work unchanged.

Input: one BYTES tensor of texts, shape [n] or [n, 1], as JSON `data` or in the binary tensor extension (the
`Inference-Header-Content-Length` header; each element a 4-byte little-endian length and UTF-8 bytes), which is
what tritonclient sends by default. Outputs, always as JSON: `label` (BYTES, [n]) and `probabilities` (FP32,
[n, labels], label order as in the model metadata's `parameters.labels`).
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from fastapi import APIRouter, Request

from service.api.common import JSON, timing_headers, unless_disconnected
from service.api.oip import (
    INPUT_NAME,
    SERVER_NAME,
    SERVER_VERSION,
    decode_bytes_tensor,
    infer_request,
    long_text_option,
    output_tasks,
    output_tensors,
    request_texts,
    server_ready,
    wanted_outputs,
)
from service.api.oip import bad as _bad
from service.api.oip import model_metadata as oip_model_metadata
from service.api.schemas import InferRequest, InferResponse, InferTensor, ModelMetadata
from service.api.v1 import ERRORS, engine_of, settings_of
from service.config import Settings

router = APIRouter(prefix="/v2", tags=["v2 (Open Inference Protocol)"])


async def _parse(request: Request) -> InferRequest:
    body = await request.body()
    header_len = request.headers.get("inference-header-content-length")
    binary = b""
    if header_len is not None:
        try:
            n = int(header_len)
        except ValueError:
            raise _bad("Inference-Header-Content-Length is not an integer") from None
        if not 0 <= n <= len(body):
            raise _bad("Inference-Header-Content-Length is larger than the body")
        body, binary = body[:n], body[n:]
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _bad(f"request body is not valid JSON: {exc}") from None
    parsed = infer_request(doc)
    for i, t in enumerate(parsed.inputs):
        size = (t.parameters or {}).get("binary_data_size")
        if size is None:
            continue
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= len(binary):
            raise _bad(
                f"inputs[{i}].parameters.binary_data_size must be an integer within the {len(binary)} bytes "
                "of binary data",
                f"inputs[{i}].parameters.binary_data_size",
            )
        t.data, binary = decode_bytes_tensor(binary[:size]), binary[size:]
    if binary:
        raise _bad(f"{len(binary)} bytes of binary data are not claimed by any input's binary_data_size")
    return parsed


@router.get("", summary="Server metadata")
async def server_metadata() -> JSON:
    return JSON({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": ["binary_tensor_data"]})


@router.get("/health/live", summary="Liveness")
async def live() -> JSON:
    return JSON({"live": True})


@router.get(
    "/health/ready",
    summary="Readiness: every model that loaded is ready (folders that failed to load are listed, not waited for)",
    responses=ERRORS,
)
async def ready(request: Request) -> JSON:
    engine = engine_of(request)
    draining = getattr(request.app.state, "draining", False)  # shutting down: send no more traffic here
    ok = server_ready(engine, draining)
    return JSON({"ready": ok, "failed_models": sorted(engine.failed)}, status_code=200 if ok else 503)


@router.get("/models/{model}", response_model=ModelMetadata, responses=ERRORS, summary="Model metadata")
async def model_metadata(model: str, request: Request) -> JSON:
    w = engine_of(request).get(model)
    return JSON({**oip_model_metadata(w), "versions": [_version(w)]})


def _version(model: object) -> str:
    """The folder's version hash on the model-process path (GET /v2/repository/index); "1" in one-process mode."""
    return getattr(model, "version", None) or "1"


@router.get("/models/{model}/ready", responses=ERRORS, summary="Model readiness")
async def model_ready(model: str, request: Request) -> JSON:
    engine = engine_of(request)
    if model in engine.failed:
        return JSON({"name": model, "ready": False, "error": engine.failed[model]}, status_code=503)
    w = engine.get(model)
    return JSON({"name": w.name, "ready": w.ready}, status_code=200 if w.ready else 503)


def _inlined(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with its local $defs references replaced by the definitions: a body parsed by hand registers no
    components, and a '#/$defs/...' reference would not resolve from the root of the OpenAPI document."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return walk(defs[ref.removeprefix("#/$defs/")])
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)


def _json_tensor_schema(max_texts: int) -> dict[str, Any]:
    """The input tensor of a JSON-only body, as the code checks it: `data` present (the binary extension's
    `parameters.binary_data_size` goes with the Inference-Header-Content-Length header and binary bytes after the
    JSON, which a JSON body has not), and a shape that agrees with it: [n] and n texts, or [n, 1] and n texts or n
    one-text rows. JSON Schema cannot compare a number with a length, so each n (up to the default
    max_client_batch_size; a larger setting accepts more than this documents) is one branch."""
    text = InferTensor.model_json_schema()["properties"]["data"]["anyOf"][0]["items"]["anyOf"][0]
    row = {"type": "array", "items": text, "minItems": 1, "maxItems": 1}
    # One branch per count n: shape [n] or [n, 1] with n elements ...
    counts = [
        {"properties": {"shape": {"enum": [[n], [n, 1]]}, "data": {"minItems": n, "maxItems": n}}}
        for n in range(1, max_texts + 1)
    ]
    # ... and the elements all texts, or all one-text rows of a [n, 1] tensor.
    forms = [
        {"properties": {"data": {"items": text}}},
        {"properties": {"shape": {"minItems": 2}, "data": {"items": row}}},
    ]
    return {
        "type": "object",
        "properties": {
            "name": {"const": INPUT_NAME, "type": "string"},
            "datatype": {"const": "BYTES", "type": "string"},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 1, "maxItems": 2},
            "data": {"type": "array", "minItems": 1},
            "parameters": {
                "anyOf": [{"type": "object", "properties": {"binary_data_size": False}}, {"type": "null"}],
                "description": "binary_data_size only with the binary extension (see the operation's description)",
            },
        },
        "required": ["name", "datatype", "shape", "data"],
        "allOf": [{"anyOf": counts}, {"anyOf": forms}],
    }


def _infer_body_schema() -> dict[str, Any]:
    schema = _inlined(InferRequest.model_json_schema())
    max_texts = Settings.model_fields["max_client_batch_size"].default
    schema["properties"]["inputs"]["items"] = _json_tensor_schema(max_texts)
    return schema


@router.post(
    "/models/{model}/infer",
    response_model=InferResponse,
    responses=ERRORS,
    summary="Inference",
    description="JSON: the `text` tensor's `data` holds the texts. Binary tensor extension (what tritonclient sends): "
    "the `Inference-Header-Content-Length` header gives the length of the JSON part; the tensor then has "
    "`parameters.binary_data_size` instead of `data`, and that many bytes follow the JSON (each text a 4-byte "
    "little-endian length and its UTF-8 bytes).",
    openapi_extra={
        "requestBody": {
            "required": True,
            # Self-contained ($defs inside): the body is parsed by hand (JSON or binary), so FastAPI registers none
            # of its parts as components.
            "content": {"application/json": {"schema": _infer_body_schema()}},
        }
    },
)
async def infer(model: str, request: Request) -> JSON:
    t0 = time.perf_counter()
    engine = engine_of(request)
    worker = engine.get(model)
    request.state.model = worker.name
    req = await _parse(request)
    texts = request_texts(req, settings_of(request).max_client_batch_size)
    wanted = wanted_outputs(req, worker.info)
    tasks = output_tasks(worker.info, wanted)
    work = worker.classify(texts, long_text=long_text_option(req.parameters), tasks=tasks)
    result = await unless_disconnected(request.receive, work)
    tensors = {
        name: {"name": name, "datatype": dtype, "shape": shape, "data": data.tolist()}
        for name, (dtype, shape, data) in output_tensors(worker, result).items()
    }
    body = {"model_name": worker.name, "model_version": _version(worker), "outputs": [tensors[n] for n in wanted]}
    if req.id is not None:
        body["id"] = req.id
    return JSON(body, headers=timing_headers(result, time.perf_counter() - t0))
