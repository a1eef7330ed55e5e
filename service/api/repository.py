"""The model repository extension of the Open Inference Protocol (as Triton has it): the index of every model
folder with its state, version and reason, and explicit load (or zero-downtime reload) and unload.

Load and unload need MOE_MODEL_CONTROL=explicit (409 otherwise); the whole extension needs the model-process path
(MOE_MODEL_PROCESS=true, the default): in single-process mode every route answers 501."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel

from service.api.common import JSON
from service.api.schemas import ErrorBody
from service.engine.repository import LoadError
from service.errors import ErrorKind, ServiceError

router = APIRouter(prefix="/v2/repository", tags=["v2 model repository"])
ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": ErrorBody} for s in (401, 404, 409, 422, 501, 503)}


class IndexEntry(BaseModel):
    name: str
    version: str | None
    state: str  # UNAVAILABLE | LOADING | READY | RESTARTING | UNLOADING | FAILED
    reason: str


def _repository(request: Request, control: bool = False) -> Any:
    repository = getattr(request.app.state.engine, "repository", None)
    if repository is None:
        raise ServiceError(
            ErrorKind.NOT_SUPPORTED, "the model repository needs the model-process mode (MOE_MODEL_PROCESS=true)"
        )
    mode = request.app.state.settings.model_control
    if control and mode != "explicit":
        raise ServiceError(
            ErrorKind.MODEL_CONTROL_OFF,
            f"model control is {mode!r}: load and unload need MOE_MODEL_CONTROL=explicit",
        )
    return repository


async def index(request: Request) -> JSON:
    return JSON(_repository(request).index())


# One route serves both methods, so that a 405 (Starlette's, from the first route whose path matches) names both in
# Allow; the two documented ones after it, with their own operation ids, are never reached.
INDEX = {"response_model": list[IndexEntry], "responses": ERRORS, "summary": "Every model folder with its state"}
router.add_api_route("/index", index, methods=["GET", "POST"], include_in_schema=False)
router.add_api_route("/index", index, methods=["GET"], operation_id="repository_index_get", **INDEX)
router.add_api_route("/index", index, methods=["POST"], operation_id="repository_index", **INDEX)


@router.post(
    "/models/{model}/load",
    response_model=IndexEntry,
    responses=ERRORS,
    summary="Load a model folder, or reload it with no downtime (the old version serves until the new one is warm)",
)
async def load(model: str, request: Request) -> JSON:
    try:
        entry = await _repository(request, control=True).load(model)
    except LoadError as exc:
        raise ServiceError(ErrorKind.MODEL_FAILED, f"model {model!r} could not be loaded: {exc}") from None
    return JSON(entry.public())


@router.post(
    "/models/{model}/unload",
    response_model=IndexEntry,
    responses=ERRORS,
    summary="Unload a model (the requests it holds finish first)",
)
async def unload(model: str, request: Request) -> JSON:
    entry = await _repository(request, control=True).unload(model)
    return JSON(entry.public())
