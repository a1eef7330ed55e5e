"""Helpers shared by the /v1 and /v2 routes: fast JSON responses, timing headers, client-disconnect watching."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
from fastapi.responses import Response
from starlette.types import Receive

from service.engine.results import ClassifyResult
from service.errors import ErrorKind, ServiceError

if TYPE_CHECKING:
    from service.metrics import Metrics

T = TypeVar("T")


class JSON(Response):
    """orjson-encoded response (numpy floats and ints serialise directly)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def error_response(err: ServiceError) -> JSON:
    """The one JSON body every error has ({"error", "type", "field"?}), with its status and headers."""
    return JSON(err.body(), status_code=err.status, headers=err.headers)


def counted_failure(metrics: Metrics, model: str, err: ServiceError) -> JSON:
    """A failed request's response, counted once in moe_request_failures_total by model and reason."""
    metrics.failures.labels(model, err.kind.value).inc()
    return error_response(err)


def timing_headers(result: ClassifyResult, total_s: float) -> dict[str, str]:
    """Milliseconds, as text-embeddings-inference reports them."""
    return {
        "x-tokenization-time": f"{result.tokenization_s * 1000:.3f}",
        "x-queue-time": f"{result.queue_s * 1000:.3f}",
        "x-inference-time": f"{result.inference_s * 1000:.3f}",
        "x-total-time": f"{total_s * 1000:.3f}",
    }


async def _wait_disconnect(receive: Receive) -> None:
    # The body has been read already, so the next ASGI message can only be the client leaving.
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class ClientDisconnected(Exception):
    """The client left before its answer was ready: nothing is sent; counted as a client_disconnected failure."""


CLIENT_GONE = ServiceError(ErrorKind.CLIENT_GONE, "client disconnected")


async def unless_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first (its texts are then dropped from the queue)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    if not watcher.cancelled() and watcher.exception() is not None:
        raise watcher.exception()  # type: ignore[misc]
    raise ClientDisconnected


def _field(loc: tuple) -> str:
    """('body', 'inputs', 'list[str]', 0) -> 'inputs[0]'; union branch names are dropped."""
    out = ""
    for p in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(p, int):
            out += f"[{p}]"
        elif "[" in p or p in ("str", "int", "bool", "float"):
            continue
        else:
            out += f".{p}" if out else p
    return out or "body"


def validation_error(errors: Sequence[Any]) -> ServiceError:
    """pydantic's errors for a request body -> one ServiceError naming the field. With unions (str | list[str])
    pydantic reports one error per branch: the deepest one is the useful one."""
    e = max(errors, key=lambda err: len(err.get("loc", ())))
    field = _field(tuple(e.get("loc", ())))
    if e.get("type") == "json_invalid":
        field = "body"
        msg = f"request body is not valid JSON ({e.get('ctx', {}).get('error', e['msg'])} at byte {e['loc'][-1]})"
    else:
        msg = f"{field}: {e['msg']}"
    return ServiceError(ErrorKind.VALIDATION, msg, field=field)
