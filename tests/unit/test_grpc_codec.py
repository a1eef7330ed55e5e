"""gRPC's half of the Open Inference Protocol, in process: the error table's codes, inference.proto against
tritonclient's definition of the same protocol (wire compatibility), and the request/response codec. The server
itself is tested end to end (tests/e2e/test_grpc.py)."""

from __future__ import annotations

import struct

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as triton

from service.api.grpc_v2.codec import infer_response, request_document
from service.api.grpc_v2.stubs import METHODS, pb2
from service.api.oip import decode_bytes_tensor, infer_request, request_texts
from service.errors import GRPC_STATUS, ErrorKind, ServiceError


def test_every_error_kind_has_a_grpc_code() -> None:
    assert set(GRPC_STATUS) == set(ErrorKind)
    assert all(name in grpc.StatusCode.__members__ for name in GRPC_STATUS.values())
    assert GRPC_STATUS[ErrorKind.UNAUTHORIZED] == "UNAUTHENTICATED" and GRPC_STATUS[ErrorKind.QUEUE_FULL] == (
        "RESOURCE_EXHAUSTED"
    )


def test_the_six_methods_with_tritonclients_messages() -> None:
    assert set(METHODS) == {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer"}
    for name, (req, resp) in METHODS.items():
        assert req.DESCRIPTOR.full_name == f"inference.{name}Request"
        assert resp.DESCRIPTOR.full_name == f"inference.{name}Response"


def _fields(descriptor) -> dict[str, tuple]:  # type: ignore[no-untyped-def]
    out = {f.name: (f.number, f.type, f.is_repeated) for f in descriptor.fields}
    for nested in descriptor.nested_types:
        if not nested.GetOptions().map_entry:
            out.update({f"{nested.name}.{k}": v for k, v in _fields(nested).items()})
    return out


@pytest.mark.parametrize(
    "message",
    [name for name in pb2.__dict__ if name.endswith(("Request", "Response")) or name.startswith("Infer")],
)
def test_messages_match_tritonclients_on_the_wire(message: str) -> None:
    """Same field numbers, types and repetition as tritonclient's copy of the protocol."""
    mine, theirs = getattr(pb2, message).DESCRIPTOR, getattr(triton, message).DESCRIPTOR
    assert _fields(mine) == {k: v for k, v in _fields(theirs).items() if k in _fields(mine)}


def _triton_request(raw: bool, texts: list[str], shape: list[int]) -> bytes:
    req = triton.ModelInferRequest(model_name="m", id="r-1")
    t = req.inputs.add(name="text", datatype="BYTES", shape=shape)
    if raw:
        req.raw_input_contents.append(b"".join(struct.pack("<I", len(s.encode())) + s.encode() for s in texts))
    else:
        t.contents.bytes_contents.extend(s.encode() for s in texts)
    req.outputs.add(name="label")
    return req.SerializeToString()


@pytest.mark.parametrize("raw", [False, True], ids=["contents", "raw_input_contents"])
def test_both_input_forms_give_the_same_texts(raw: bool) -> None:
    texts = ["Shares rose.", "Le café ☕", ""]
    msg = pb2.ModelInferRequest.FromString(_triton_request(raw, texts, [3, 1]))
    doc = request_document(msg)
    assert doc["id"] == "r-1" and doc["outputs"] == [{"name": "label"}]
    with pytest.raises(ServiceError, match="empty"):  # the HTTP route's own checks apply: "" is not a text
        request_texts(infer_request(doc), 8)
    msg = pb2.ModelInferRequest.FromString(_triton_request(raw, texts[:2], [2]))
    assert request_texts(infer_request(request_document(msg)), 8) == texts[:2]


def test_bad_requests_name_the_field() -> None:
    msg = pb2.ModelInferRequest.FromString(_triton_request(True, ["a"], [1]))
    msg.raw_input_contents.append(b"")
    with pytest.raises(ServiceError) as e:
        request_document(msg)
    assert e.value.kind is ErrorKind.VALIDATION and e.value.field == "raw_input_contents"
    msg = pb2.ModelInferRequest.FromString(_triton_request(False, ["a"], [1]))
    msg.inputs[0].contents.bytes_contents[0] = b"\xff"
    with pytest.raises(ServiceError, match="UTF-8"):
        request_document(msg)
    msg = pb2.ModelInferRequest.FromString(_triton_request(False, ["a"], [1]))
    msg.inputs[0].datatype = "FP32"
    with pytest.raises(ServiceError) as e:
        infer_request(request_document(msg))
    assert e.value.field == "inputs.0.datatype"


@pytest.mark.parametrize("raw", [False, True], ids=["contents", "raw_output_contents"])
def test_response_in_the_requests_form(raw: bool) -> None:
    probs = np.array([0.75, 0.25, 0.5, 0.5], dtype=np.float32)
    tensors = {
        "label": ("BYTES", [2], np.array(["bußiness", "sport"], dtype=object)),
        "probabilities": ("FP32", [2, 2], probs),
    }
    resp = triton.ModelInferResponse.FromString(
        infer_response("m", "r-1", tensors, ["probabilities", "label"], raw=raw).SerializeToString()
    )
    assert [o.name for o in resp.outputs] == ["probabilities", "label"] and resp.id == "r-1"
    assert list(resp.outputs[0].shape) == [2, 2] and resp.outputs[1].datatype == "BYTES"
    if raw:
        assert np.frombuffer(resp.raw_output_contents[0], "<f4").tolist() == probs.tolist()
        assert decode_bytes_tensor(resp.raw_output_contents[1]) == ["bußiness", "sport"]
    else:
        assert list(resp.outputs[0].contents.fp32_contents) == probs.tolist()
        assert list(resp.outputs[1].contents.bytes_contents) == ["bußiness".encode(), b"sport"]
