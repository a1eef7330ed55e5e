"""gRPC messages <-> the protocol-independent Open Inference Protocol (service/api/oip.py).

Inputs come in either form the protocol has: `contents.bytes_contents` (one element per text) or
`raw_input_contents` (one entry per input, the BYTES layout of HTTP's binary extension). The answer uses the form
the request used, as Triton's clients expect: raw_output_contents for a raw request (BYTES as length-prefixed
UTF-8, FP32 as little-endian floats), otherwise `contents`.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from service.api.grpc_v2.stubs import pb2
from service.api.oip import bad, decode_bytes_tensor


def _parameter(p: Any) -> Any:
    choice = p.WhichOneof("parameter_choice")
    return getattr(p, choice) if choice else None


def _input_data(t: Any, i: int, raw: list[bytes]) -> list[str] | None:
    field = f"inputs[{i}]"
    if raw:
        return decode_bytes_tensor(raw[i], field) if t.datatype == "BYTES" else None
    if t.datatype != "BYTES" or not t.contents.bytes_contents:
        return None  # the schema then names what is missing or wrong
    try:
        return [b.decode("utf-8") for b in t.contents.bytes_contents]
    except UnicodeDecodeError:
        raise bad("BYTES element is not valid UTF-8", f"{field}.contents.bytes_contents") from None


def request_document(msg: Any) -> dict[str, Any]:
    """A ModelInferRequest as the document HTTP's JSON body would be, for the one InferRequest schema."""
    raw = list(msg.raw_input_contents)
    if raw and len(raw) != len(msg.inputs):
        raise bad(
            f"raw_input_contents has {len(raw)} entries for {len(msg.inputs)} inputs (one per input)",
            "raw_input_contents",
        )
    doc: dict[str, Any] = {
        "inputs": [
            {
                "name": t.name,
                "datatype": t.datatype,
                "shape": list(t.shape),
                "parameters": {k: _parameter(v) for k, v in t.parameters.items()} or None,
                "data": _input_data(t, i, raw),
            }
            for i, t in enumerate(msg.inputs)
        ],
    }
    if msg.id:
        doc["id"] = msg.id
    if msg.parameters:
        doc["parameters"] = {k: _parameter(v) for k, v in msg.parameters.items()}
    if msg.outputs:
        doc["outputs"] = [{"name": o.name} for o in msg.outputs]
    return doc


def _raw(datatype: str, data: np.ndarray) -> bytes:
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(b)) + b for b in (s.encode("utf-8") for s in data))
    return data.astype("<f4").tobytes()


def infer_response(
    model: str, req_id: str, tensors: dict[str, tuple[str, list[int], np.ndarray]], wanted: list[str], raw: bool
) -> Any:
    out = pb2.ModelInferResponse(model_name=model, model_version="1", id=req_id)
    for name in wanted:
        datatype, shape, data = tensors[name]
        tensor = out.outputs.add(name=name, datatype=datatype, shape=shape)
        if raw:
            out.raw_output_contents.append(_raw(datatype, data))
        elif datatype == "BYTES":
            tensor.contents.bytes_contents.extend(s.encode("utf-8") for s in data)
        else:
            tensor.contents.fp32_contents.extend(data.tolist())
    return out


def model_metadata(meta: dict[str, Any]) -> Any:
    """oip.model_metadata's dict as the message (the protocol's message has no `parameters`: label order is in
    HTTP's /v2/models/{model} metadata)."""
    return pb2.ModelMetadataResponse(
        name=meta["name"],
        versions=meta["versions"],
        platform=meta["platform"],
        inputs=[pb2.ModelMetadataResponse.TensorMetadata(**t) for t in meta["inputs"]],
        outputs=[pb2.ModelMetadataResponse.TensorMetadata(**t) for t in meta["outputs"]],
    )
