"""POST /v1/classify with a JSON body, answered without FastAPI's router, dependency solving and response model.

That machinery costs more CPU than the rest of a short request together (py-spy at 64 connections), and the API
process is what limits served throughput. The answer is the same code (`answer_classify`), the same validation
(the ClassifyRequest model) and the same errors; the FastAPI route stays for the OpenAPI document and for bodies
sent without a JSON content type. Sits inside RequestContext and BodyLimitAndMetrics, so ids, auth, draining, the
body limit and the HTTP metrics apply unchanged.
"""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api import v1
from service.api.common import CLIENT_GONE, ClientDisconnected, counted_failure, validation_error
from service.api.schemas import ClassifyRequest
from service.api.v1 import answer_classify
from service.errors import ErrorKind, ServiceError

PATH = "/v1/classify"


def _json_body(scope: Scope) -> bool:
    ctype = next((v for k, v in scope["headers"] if k == b"content-type"), b"")
    return ctype.split(b";")[0].strip().lower() == b"application/json"


async def read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def parse(body: bytes) -> ClassifyRequest:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        message = f"request body is not valid JSON ({exc.msg} at byte {exc.pos})"
        raise ServiceError(ErrorKind.VALIDATION, message, field="body") from None
    try:
        return ClassifyRequest.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None


class FastClassify:
    def __init__(self, app: ASGIApp, state: Any) -> None:
        self.app = app
        self.state = state  # the app's state: engine (set at startup), settings and metrics
        # The FastAPI route, set on the scope so that HTTP metrics label this route as FastAPI would.
        self.route = next(r for r in v1.router.routes if getattr(r, "path", None) == PATH)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST" or not _json_body(scope):
            await self.app(scope, receive, send)
            return
        scope["route"] = self.route
        state = scope.setdefault("state", {})
        try:
            body = parse(await read_body(receive))
            max_texts = self.state.settings.max_client_batch_size
            response = await answer_classify(self.state.engine, body, state, receive, max_texts)
        except ServiceError as err:
            response = counted_failure(self.state.metrics, state.get("model", ""), err)
        except ClientDisconnected:
            response = counted_failure(self.state.metrics, state.get("model", ""), CLIENT_GONE)
        await response(scope, receive, send)
