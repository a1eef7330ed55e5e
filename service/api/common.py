"""Helpers shared by the /v1 and /v2 routes: fast JSON responses, timing headers, client-disconnect watching."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

import orjson
from fastapi import Request
from fastapi.responses import Response

from service.engine.batcher import ClassifyResult
from service.errors import ErrorKind, ServiceError

T = TypeVar("T")


class JSON(Response):
    """orjson-encoded response (numpy floats and ints serialise directly)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def error_response(err: ServiceError) -> JSON:
    """The one JSON body every error has ({"error", "type", "field"?}), with its status and headers."""
    return JSON(err.body(), status_code=err.status, headers=err.headers)


def timing_headers(result: ClassifyResult, total_s: float) -> dict[str, str]:
    """Milliseconds, as text-embeddings-inference reports them."""
    return {
        "x-tokenization-time": f"{result.tokenization_s * 1000:.3f}",
        "x-queue-time": f"{result.queue_s * 1000:.3f}",
        "x-inference-time": f"{result.inference_s * 1000:.3f}",
        "x-total-time": f"{total_s * 1000:.3f}",
    }


async def _wait_disconnect(request: Request) -> None:
    # The body has been read already, so the next ASGI message can only be the client leaving.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class ClientDisconnected(Exception):
    pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first (its texts are then dropped from the queue)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
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
    model = getattr(request.state, "model", "")
    request.app.state.metrics.failures.labels(model, ErrorKind.CLIENT_GONE.value).inc()
    raise ClientDisconnected
