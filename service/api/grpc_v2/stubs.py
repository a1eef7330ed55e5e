"""The messages and the service of inference.proto, built when this module is first imported: grpcio-tools' protoc
compiles the .proto into descriptors, and protobuf makes the message classes from them. Nothing generated is
committed or written beside the code, so the messages cannot drift from the .proto and the service runs on a
read-only root filesystem (deploy/kubernetes; protoc's output passes through a temporary file). About 0.1 s, once
per process, and only where MOE_GRPC_PORT is set.

The descriptors go into a pool of their own, not protobuf's default one: a process may also hold another copy of
the protocol (tritonclient.grpc's, in the tests and the bench), and the default pool refuses a second definition of
inference.ModelInferRequest.
"""

from __future__ import annotations

import importlib.resources
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_tools import protoc

PROTO = Path(__file__).with_name("inference.proto")
SERVICE = "inference.GRPCInferenceService"


def _compile(proto: Path) -> descriptor_pb2.FileDescriptorSet:
    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    with tempfile.TemporaryDirectory(prefix="moe-serve-proto-") as tmp:
        out = Path(tmp) / "descriptors.pb"
        rc = protoc.main(["protoc", f"-I{proto.parent}", f"-I{well_known}", f"--descriptor_set_out={out}", proto.name])
        if rc != 0:
            raise RuntimeError(f"protoc could not compile {proto} (exit {rc})")
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _build(proto: Path) -> tuple[SimpleNamespace, dict[str, tuple[Any, Any]]]:
    files = list(_compile(proto).file)
    pool = descriptor_pool.DescriptorPool()
    for f in files:
        pool.Add(f)
    classes = message_factory.GetMessages(files, pool=pool)
    messages = SimpleNamespace(**{name.rsplit(".", 1)[1]: cls for name, cls in classes.items() if name.count(".") == 1})
    methods = {
        m.name: (classes[m.input_type.full_name], classes[m.output_type.full_name])
        for m in pool.FindServiceByName(SERVICE).methods
    }
    return messages, methods


# pb2.ModelInferRequest, ...; METHODS: method name -> (request class, response class)
pb2, METHODS = _build(PROTO)
