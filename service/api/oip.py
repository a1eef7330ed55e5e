"""The Open Inference Protocol v2's protocol-independent part, shared by HTTP (service/api/v2.py) and gRPC
(service/api/grpc_v2): the texts a request's BYTES tensor holds, the outputs it asks for, the model's metadata and
the answer's tensors. Each transport only decodes its own wire form into an InferRequest and encodes the tensors.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
from pydantic import ValidationError

from service import __version__
from service.api.schemas import InferRequest
from service.api.v1 import validate_texts
from service.engine.handle import EngineHandle, ModelHandle
from service.engine.results import ClassifyResult
from service.errors import ErrorKind, ServiceError
from service.modeling.probabilities import softmax
from service.modeling.windows import LONG_TEXT_MODES, LongText

INPUT_NAME = "text"
OUTPUTS = ("label", "probabilities")
SERVER_NAME = "moe-serve"
SERVER_VERSION = __version__


def bad(message: str, field: str | None = None) -> ServiceError:
    return ServiceError(ErrorKind.VALIDATION, message, field=field)


def decode_bytes_tensor(raw: bytes, field: str = "inputs[0]") -> list[str]:
    """A BYTES tensor in its binary layout (each element a 4-byte little-endian length and UTF-8 bytes): HTTP's
    binary tensor extension and gRPC's raw_input_contents."""
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise bad("binary BYTES tensor is truncated", field)
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise bad("binary BYTES tensor is truncated", field)
        try:
            out.append(raw[pos : pos + n].decode("utf-8"))
        except UnicodeDecodeError:
            raise bad("binary BYTES element is not valid UTF-8", field) from None
        pos += n
    return out


def infer_request(doc: Any) -> InferRequest:
    """A decoded request document as the one InferRequest schema, or a 422-kind error naming the field."""
    try:
        return InferRequest.model_validate(doc)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise bad(f"{loc}: {err['msg']}", loc) from None


def server_ready(engine: EngineHandle, draining: bool) -> bool:
    """Every model that loaded is ready (folders that failed are not waited for), and the server is not draining."""
    return not draining and bool(engine.models) and all(m.ready for m in engine.models.values())


def request_texts(req: InferRequest, max_texts: int) -> list[str]:
    if len(req.inputs) != 1:
        raise bad(f"expected exactly one input tensor ({INPUT_NAME!r}), got {len(req.inputs)}", "inputs")
    t = req.inputs[0]
    if t.datatype != "BYTES":
        raise bad(f"input {t.name!r} must have datatype BYTES, got {t.datatype}", "inputs[0].datatype")
    if t.data is None:
        raise bad(f"input {t.name!r} has no data", "inputs[0].data")
    data = t.data
    if any(isinstance(x, list) for x in data):  # nested [[..], [..]] form of a [n, 1] tensor
        if not all(isinstance(x, list) and len(x) == 1 for x in data) or t.shape[1:] != [1]:
            raise bad(f"input {t.name!r}: nested data must be [[text], ...] with shape [n, 1]", "inputs[0].data")
        data = [row[0] for row in data]
    if not all(isinstance(x, str) for x in data):
        raise bad(f"input {t.name!r}: every element must be a string", "inputs[0].data")
    if int(np.prod(t.shape)) != len(data) or not (len(t.shape) == 1 or (len(t.shape) == 2 and t.shape[1] == 1)):
        raise bad(
            f"input {t.name!r}: shape {t.shape} does not match {len(data)} texts (use [n] or [n, 1])", "inputs[0].shape"
        )
    return validate_texts(data, max_texts, field="inputs[0].data")


def wanted_outputs(req: InferRequest) -> list[str]:
    """The outputs the request names, in its order (all of them when it names none)."""
    if not req.outputs:
        return list(OUTPUTS)
    unknown = [o.name for o in req.outputs if o.name not in OUTPUTS]
    if unknown:
        raise bad(f"unknown output(s) {unknown}; available: {list(OUTPUTS)}", "outputs")
    return [o.name for o in req.outputs]


def output_tensors(model: ModelHandle, result: ClassifyResult) -> dict[str, tuple[str, list[int], np.ndarray]]:
    """name -> (datatype, shape, elements in row-major order): `label` (BYTES, [n]) and `probabilities` (FP32,
    [n, labels], label order as in the metadata's `parameters.labels`)."""
    probs = softmax(np.stack([r.logits for r in result.results]).astype(np.float64)).astype(np.float32)
    labels = model.info.labels
    n = len(result.results)
    return {
        "label": ("BYTES", [n], np.array([labels[i] for i in probs.argmax(1)], dtype=object)),
        "probabilities": ("FP32", [n, len(labels)], probs.reshape(-1)),
    }


def model_metadata(model: ModelHandle) -> dict[str, Any]:
    n = len(model.info.labels)
    return {
        "name": model.name,
        "versions": ["1"],
        "platform": f"moe-serve_{model.kind}",
        "inputs": [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, n]},
        ],
        "parameters": {
            "labels": model.info.labels,
            "max_length": model.info.max_length,
            "temperature": model.info.temperature,
        },
    }


def long_text_option(parameters: dict[str, Any] | None) -> LongText | None:
    """parameters.long_text, as /v1's long_text: "chunk" or "truncate"; absent, the server's setting."""
    value = (parameters or {}).get("long_text")
    if value is not None and value not in LONG_TEXT_MODES:
        raise bad(f"parameters.long_text must be one of {list(LONG_TEXT_MODES)}", "parameters.long_text")
    return value
