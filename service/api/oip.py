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
from service.backends.base import ModelInfo
from service.engine.handle import EngineHandle, ModelHandle
from service.engine.results import ClassifyResult
from service.engine.tasks import task_labels
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


def model_outputs(info: ModelInfo) -> list[str]:
    """`label`, `probabilities`; a multi-task model has that pair per task: `<task>_label`, `<task>_probabilities`."""
    if not info.tasks:
        return list(OUTPUTS)
    return [f"{task}_{o}" for task in info.tasks for o in OUTPUTS]


def wanted_outputs(req: InferRequest, info: ModelInfo) -> list[str]:
    """The outputs the request names, in its order (all of them when it names none). An output the model does not
    have is not found (404, as an unknown task in /v1)."""
    available = model_outputs(info)
    if not req.outputs:
        return available
    unknown = [o.name for o in req.outputs if o.name not in available]
    if unknown:
        raise ServiceError(
            ErrorKind.TASK_NOT_FOUND, f"unknown output(s) {unknown}; available: {available}", field="outputs"
        )
    return [o.name for o in req.outputs]


def output_tasks(info: ModelInfo, wanted: list[str]) -> list[int] | None:
    """The task ids a multi-task request runs: those its outputs name, in the order first named (None: single-task)."""
    if not info.tasks:
        return None
    names = list(info.tasks)
    order = [names.index(w.rsplit("_", 1)[0]) for w in wanted]
    return list(dict.fromkeys(order))


def _pair(labels: list[str], logits: np.ndarray, prefix: str) -> dict[str, tuple[str, list[int], np.ndarray]]:
    probs = softmax(logits.astype(np.float64)).astype(np.float32)
    n = len(logits)
    return {
        f"{prefix}label": ("BYTES", [n], np.array([labels[i] for i in probs.argmax(1)], dtype=object)),
        f"{prefix}probabilities": ("FP32", [n, len(labels)], probs.reshape(-1)),
    }


def output_tensors(model: ModelHandle, result: ClassifyResult) -> dict[str, tuple[str, list[int], np.ndarray]]:
    """name -> (datatype, shape, elements in row-major order): `label` (BYTES, [n]) and `probabilities` (FP32,
    [n, labels], label order as in the metadata's `parameters.labels`); multi-task, that pair for each task run,
    named `<task>_...` (its labels in the metadata's `parameters.tasks`)."""
    if result.tasks is None:
        return _pair(model.info.labels, np.stack([r.logits for r in result.results]), "")
    out = {}
    for j, t in enumerate(result.tasks):
        labels = task_labels(model.info, t)
        logits = np.stack([r.logits[j, : len(labels)] for r in result.results])
        out |= _pair(labels, logits, f"{list(model.info.tasks)[t]}_")
    return out


def model_metadata(model: ModelHandle) -> dict[str, Any]:
    info = model.info
    outputs = []
    for name in model_outputs(info):
        task = name.rsplit("_", 1)[0] if info.tasks else None
        n = len(info.tasks[task].labels) if task else len(info.labels)
        is_label = name.endswith("label")
        outputs.append(
            {"name": name, "datatype": "BYTES" if is_label else "FP32", "shape": [-1] if is_label else [-1, n]}
        )
    parameters: dict[str, Any] = {"labels": info.labels, "max_length": info.max_length, "temperature": info.temperature}
    if info.tasks:
        parameters["tasks"] = {t: {"labels": v.labels, "temperature": v.temperature} for t, v in info.tasks.items()}
    return {
        "name": model.name,
        "versions": ["1"],
        "platform": f"moe-serve_{model.kind}",
        "inputs": [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}],
        "outputs": outputs,
        "parameters": parameters,
    }


def long_text_option(parameters: dict[str, Any] | None) -> LongText | None:
    """parameters.long_text, as /v1's long_text: "chunk" or "truncate"; absent, the server's setting."""
    value = (parameters or {}).get("long_text")
    if value is not None and value not in LONG_TEXT_MODES:
        raise bad(f"parameters.long_text must be one of {list(LONG_TEXT_MODES)}", "parameters.long_text")
    return value
