"""inference.GRPCInferenceService over the same engine as HTTP: the same ModelHandle and batcher, the same parsing
and shaping (service/api/oip.py), the one error table (service/errors.py, GRPC_STATUS), the API key (the
`authorization` metadata) and the request metrics with protocol="grpc".

Every method goes through `InferenceService._call`, which does for gRPC what the HTTP middlewares do: refuse while
draining, check the key, time and count the call, and turn a ServiceError into its status code with the error's
type, field and retry hints in the trailing metadata.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from service.api.access import bearer_matches
from service.api.grpc_v2 import codec
from service.api.grpc_v2.stubs import METHODS, SERVICE, pb2
from service.api.oip import (
    SERVER_NAME,
    SERVER_VERSION,
    infer_request,
    long_text_option,
    model_metadata,
    output_tasks,
    output_tensors,
    request_texts,
    server_ready,
    wanted_outputs,
)
from service.engine.handle import EngineHandle
from service.errors import GRPC_STATUS, STATUS, ErrorKind, ServiceError, model_not_found

log = logging.getLogger("moe_serve.grpc")
OPEN_METHODS = {"ServerLive", "ServerReady"}  # like /v2/health/live and /v2/health/ready: no key, answered draining
Handler = Callable[[Any, dict[str, Any]], Awaitable[Any]]


class InferenceService:
    def __init__(self, state: Any) -> None:
        self.state = state  # the FastAPI app's state: engine, settings, metrics, draining
        key = state.settings.api_key
        self.key = key.get_secret_value().encode() if key else None

    @property
    def engine(self) -> EngineHandle:
        return self.state.engine

    async def _call(self, method: str, request: Any, context: grpc.aio.ServicerContext, handler: Handler) -> Any:
        t0 = time.perf_counter()
        call: dict[str, Any] = {"model": ""}  # the handler names the model once it knows it
        kind: ErrorKind | None = None
        try:
            self._admit(method, context)
            return await handler(request, call)
        except ServiceError as err:
            kind = err.kind
            await context.abort(grpc.StatusCode[GRPC_STATUS[err.kind]], err.message, _trailers(err))
        except asyncio.CancelledError:  # the client left or its deadline passed: its texts leave the queue
            kind = ErrorKind.CLIENT_GONE
            raise
        except Exception:
            kind = ErrorKind.INTERNAL
            rid = uuid.uuid4().hex
            log.exception("gRPC %s failed (request id %s)", method, rid)
            err = ServiceError(ErrorKind.INTERNAL, f"internal error (request id {rid})")
            await context.abort(grpc.StatusCode.INTERNAL, err.message, _trailers(err))
        finally:
            self._count(method, call["model"], kind, time.perf_counter() - t0)

    def _admit(self, method: str, context: grpc.aio.ServicerContext) -> None:
        if method in OPEN_METHODS:
            return
        if getattr(self.state, "draining", False):
            raise ServiceError(ErrorKind.SHUTTING_DOWN, "the server is shutting down; retry on another instance")
        if self.key is None:
            return
        auth = next((v for k, v in context.invocation_metadata() or () if k == "authorization"), "")
        if not bearer_matches(auth.encode() if isinstance(auth, str) else auth, self.key):
            raise ServiceError(ErrorKind.UNAUTHORIZED, "missing or wrong API key: send authorization: Bearer <key>")

    def _count(self, method: str, model: str, kind: ErrorKind | None, seconds: float) -> None:
        metrics = self.state.metrics
        route = f"/{SERVICE}/{method}"
        metrics.requests.labels(model, route, str(STATUS[kind] if kind else 200), "grpc").inc()
        metrics.request_duration.labels(model, route, "grpc").observe(seconds)
        if kind is not None:
            metrics.failures.labels(model, kind.value).inc()

    # --- the protocol's methods ----------------------------------------------------------------------------------

    def handler(self) -> grpc.GenericRpcHandler:
        """The service's six methods, each through _call, with the messages' (de)serialisers."""
        impl = {
            "ServerLive": self._live,
            "ServerReady": self._ready,
            "ModelReady": self._model_ready,
            "ServerMetadata": self._server_metadata,
            "ModelMetadata": self._model_metadata,
            "ModelInfer": self._infer,
        }
        assert impl.keys() == METHODS.keys(), "inference.proto and the implemented methods differ"

        def method(name: str) -> grpc.RpcMethodHandler:
            async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
                return await self._call(name, request, context, impl[name])

            req, resp = METHODS[name]
            return grpc.unary_unary_rpc_method_handler(
                run, request_deserializer=req.FromString, response_serializer=resp.SerializeToString
            )

        return grpc.method_handlers_generic_handler(SERVICE, {name: method(name) for name in impl})

    async def _live(self, request: Any, call: dict[str, Any]) -> Any:
        return pb2.ServerLiveResponse(live=True)

    async def _ready(self, request: Any, call: dict[str, Any]) -> Any:
        return pb2.ServerReadyResponse(ready=server_ready(self.engine, getattr(self.state, "draining", False)))

    async def _model_ready(self, request: Any, call: dict[str, Any]) -> Any:
        call["model"] = request.name
        if request.name in self.engine.failed:
            return pb2.ModelReadyResponse(ready=False)
        model = self.engine.models.get(request.name)
        if model is None:
            raise model_not_found(request.name, [*self.engine.models, *self.engine.failed])
        return pb2.ModelReadyResponse(ready=model.ready)

    async def _server_metadata(self, request: Any, call: dict[str, Any]) -> Any:
        return pb2.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION)

    async def _model_metadata(self, request: Any, call: dict[str, Any]) -> Any:
        model = self.engine.get(_versioned(request.name, request.version))
        call["model"] = model.name
        return codec.model_metadata(model_metadata(model))

    async def _infer(self, request: Any, call: dict[str, Any]) -> Any:
        model = self.engine.get(_versioned(request.model_name, request.model_version))
        call["model"] = model.name
        req = infer_request(codec.request_document(request))
        texts = request_texts(req, self.state.settings.max_client_batch_size)
        wanted = wanted_outputs(req, model.info)
        tasks = output_tasks(model.info, wanted)
        result = await model.classify(texts, long_text=long_text_option(req.parameters), tasks=tasks)
        tensors = output_tensors(model, result)
        return codec.infer_response(model.name, request.id, tensors, wanted, raw=bool(request.raw_input_contents))


def _versioned(name: str, version: str) -> str:
    """Every model has one version, "1" (as in HTTP's metadata); none named means that one."""
    if version not in ("", "1"):
        raise ServiceError(
            ErrorKind.MODEL_NOT_FOUND, f"model {name!r} has no version {version!r} (only '1')", field="model_version"
        )
    return name


def _trailers(err: ServiceError) -> tuple[tuple[str, str], ...]:
    """The error body's type and field, and its retry hint (retry-after-ms), as trailing metadata."""
    out = [("moe-error-type", err.kind.value)]
    if err.field:
        out.append(("moe-error-field", err.field))
    out += [(k.lower(), v) for k, v in err.headers.items() if k.lower() == "retry-after-ms"]
    return tuple(out)
