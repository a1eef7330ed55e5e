"""Open Inference Protocol v2 (KServe / Triton HTTP), so standard clients work unchanged.

Input: one BYTES tensor of texts, shape [n] or [n, 1], as JSON `data` or in the binary tensor extension (the
`Inference-Header-Content-Length` header; each element a 4-byte little-endian length and UTF-8 bytes), which is
what tritonclient sends by default. Outputs, always as JSON: `label` (BYTES, [n]) and `probabilities` (FP32,
[n, labels], label order as in the model metadata's `parameters.labels`).
"""

from __future__ import annotations

import struct
import time
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request
from pydantic import ValidationError

from service import __version__
from service.api.common import JSON, timing_headers, unless_disconnected
from service.api.schemas import InferRequest, InferResponse, InferTensor, ModelMetadata
from service.api.v1 import ERRORS, engine_of, settings_of, softmax, validate_texts
from service.config import Settings
from service.errors import ErrorKind, ServiceError

router = APIRouter(prefix="/v2", tags=["v2 (Open Inference Protocol)"])
INPUT_NAME = "text"
OUTPUTS = ("label", "probabilities")


def _bad(message: str, field: str | None = None) -> ServiceError:
    return ServiceError(ErrorKind.VALIDATION, message, field=field)


def _decode_bytes_tensor(raw: bytes) -> list[str]:
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise _bad("binary BYTES tensor is truncated", "inputs[0]")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise _bad("binary BYTES tensor is truncated", "inputs[0]")
        try:
            out.append(raw[pos : pos + n].decode("utf-8"))
        except UnicodeDecodeError:
            raise _bad("binary BYTES element is not valid UTF-8", "inputs[0]") from None
        pos += n
    return out


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
        parsed = InferRequest.model_validate(orjson.loads(body))
    except orjson.JSONDecodeError as exc:
        raise _bad(f"request body is not valid JSON: {exc}") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise _bad(f"{loc}: {err['msg']}", loc) from None
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
        t.data, binary = _decode_bytes_tensor(binary[:size]), binary[size:]
    if binary:
        raise _bad(f"{len(binary)} bytes of binary data are not claimed by any input's binary_data_size")
    return parsed


def _texts(req: InferRequest, max_texts: int) -> list[str]:
    if len(req.inputs) != 1:
        raise _bad(f"expected exactly one input tensor ({INPUT_NAME!r}), got {len(req.inputs)}", "inputs")
    t = req.inputs[0]
    if t.datatype != "BYTES":
        raise _bad(f"input {t.name!r} must have datatype BYTES, got {t.datatype}", "inputs[0].datatype")
    if t.data is None:
        raise _bad(f"input {t.name!r} has no data", "inputs[0].data")
    data = t.data
    if any(isinstance(x, list) for x in data):  # nested [[..], [..]] form of a [n, 1] tensor
        if not all(isinstance(x, list) and len(x) == 1 for x in data) or t.shape[1:] != [1]:
            raise _bad(f"input {t.name!r}: nested data must be [[text], ...] with shape [n, 1]", "inputs[0].data")
        data = [row[0] for row in data]
    if not all(isinstance(x, str) for x in data):
        raise _bad(f"input {t.name!r}: every element must be a string", "inputs[0].data")
    if int(np.prod(t.shape)) != len(data) or not (len(t.shape) == 1 or (len(t.shape) == 2 and t.shape[1] == 1)):
        raise _bad(
            f"input {t.name!r}: shape {t.shape} does not match {len(data)} texts (use [n] or [n, 1])", "inputs[0].shape"
        )
    return validate_texts(data, max_texts, field="inputs[0].data")


@router.get("", summary="Server metadata")
async def server_metadata() -> JSON:
    return JSON({"name": "moe-serve", "version": __version__, "extensions": ["binary_tensor_data"]})


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
    ok = not draining and bool(engine.models) and all(w.ready for w in engine.models.values())
    return JSON({"ready": ok, "failed_models": sorted(engine.failed)}, status_code=200 if ok else 503)


@router.get("/models/{model}", response_model=ModelMetadata, responses=ERRORS, summary="Model metadata")
async def model_metadata(model: str, request: Request) -> JSON:
    w = engine_of(request).get(model)
    n = len(w.info.labels)
    return JSON(
        {
            "name": w.name,
            "versions": [_version(w)],
            "platform": f"moe-serve_{w.kind}",
            "inputs": [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}],
            "outputs": [
                {"name": "label", "datatype": "BYTES", "shape": [-1]},
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, n]},
            ],
            "parameters": {"labels": w.info.labels, "max_length": w.info.max_length, "temperature": w.info.temperature},
        }
    )


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
    texts = _texts(req, settings_of(request).max_client_batch_size)
    if req.outputs:
        unknown = [o.name for o in req.outputs if o.name not in OUTPUTS]
        if unknown:
            raise _bad(f"unknown output(s) {unknown}; available: {list(OUTPUTS)}", "outputs")
    wanted = [o.name for o in req.outputs] if req.outputs else list(OUTPUTS)
    result = await unless_disconnected(request.receive, worker.classify(texts))
    probs = softmax(np.stack([r.logits for r in result.results]).astype(np.float64)).astype(np.float32)
    labels = worker.info.labels
    tensors: dict[str, dict[str, Any]] = {
        "label": {
            "name": "label",
            "datatype": "BYTES",
            "shape": [len(texts)],
            "data": [labels[i] for i in probs.argmax(1)],
        },
        "probabilities": {
            "name": "probabilities",
            "datatype": "FP32",
            "shape": [len(texts), len(labels)],
            "data": probs.reshape(-1).tolist(),
        },
    }
    body = {"model_name": worker.name, "model_version": _version(worker), "outputs": [tensors[n] for n in wanted]}
    if req.id is not None:
        body["id"] = req.id
    return JSON(body, headers=timing_headers(result, time.perf_counter() - t0))
