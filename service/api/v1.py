"""/v1 routes: classify, model listing, routing statistics."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from starlette.types import Receive

from service.api.common import JSON, timing_headers, unless_disconnected
from service.api.schemas import ClassifyRequest, ClassifyResponse, ErrorBody, ExpertsResponse
from service.backends.base import LayerRouting, ModelInfo
from service.config import Settings
from service.engine.handle import EngineHandle, ModelHandle
from service.engine.results import ClassifyResult, TextResult
from service.engine.tasks import select_tasks, task_labels, task_name
from service.errors import ErrorKind, ServiceError
from service.modeling.probabilities import softmax

router = APIRouter(prefix="/v1", tags=["v1"])
ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorBody} for s in (401, 404, 408, 413, 422, 429, 500, 503, 504)
}
TOP_EXPERTS = 3


def engine_of(request: Request) -> EngineHandle:
    return request.app.state.engine


def settings_of(request: Request) -> Settings:
    """The app's own settings (its HTTP limits), not the engine's."""
    return request.app.state.settings


def validate_texts(inputs: str | list[str], max_texts: int, field: str = "inputs") -> list[str]:
    texts = [inputs] if isinstance(inputs, str) else inputs
    if not texts:
        raise ServiceError(ErrorKind.VALIDATION, f"{field} is empty; send at least one text", field=field)
    if len(texts) > max_texts:
        raise ServiceError(
            ErrorKind.VALIDATION, f"{field} has {len(texts)} texts; at most {max_texts} per request", field=field
        )
    for i, t in enumerate(texts):
        if not t.strip():
            raise ServiceError(ErrorKind.VALIDATION, f"{field}[{i}] is empty or whitespace", field=f"{field}[{i}]")
    return texts


def _routing(worker: ModelHandle, r: TextResult, routing: list[LayerRouting]) -> dict[str, Any]:
    e = worker.info.num_experts
    layers = []
    for i, lay in enumerate(routing):
        counts = np.bincount(lay.expert_ids.reshape(-1), minlength=e)
        share = counts / max(counts.sum(), 1)
        top = np.argsort(-share, kind="stable")[:TOP_EXPERTS]
        layers.append(
            {
                "layer": i,
                "experts": lay.expert_ids.tolist(),
                "gates": np.round(lay.gates.astype(np.float64), 5).tolist(),
                "top_experts": [{"expert": int(j), "share": round(float(share[j]), 4)} for j in top if share[j] > 0],
            }
        )
    return {"tokens": r.tokens or [], "window_tokens": r.window_tokens or [len(r.tokens or [])], "layers": layers}


def prediction(
    worker: ModelHandle,
    r: TextResult,
    top_k: int | None,
    raw: bool,
    task_id: int | None = None,
    row: int = 0,
    rows: int = 1,
) -> dict[str, Any]:
    """One text's prediction; for a multi-task model its prediction for task `task_id`, which is row `row` of the
    text's `rows` (the tasks asked, in order): that task's labels, logits and routing."""
    labels = task_labels(worker.info, task_id)
    logits = r.logits if task_id is None else r.logits[row, : len(labels)]
    scores = logits if raw else softmax(logits.astype(np.float64))
    order = np.argsort(-scores, kind="stable")[: top_k or len(labels)]
    out: dict[str, Any] = {
        "label": labels[order[0]],
        "score": float(scores[order[0]]),
        "scores": [{"label": labels[j], "score": float(scores[j])} for j in order],
        "tokens": r.n_tokens,
        "windows": r.windows,
        "truncated": r.truncated,
    }
    if r.routing is not None:
        part = r.routing if task_id is None else [task_run(lay, row, rows) for lay in r.routing]
        out["routing"] = _routing(worker, r, part)
    return out


def task_run(layer: LayerRouting, j: int, rows: int) -> LayerRouting:
    """The j-th of a multi-task text's `rows` runs of routing (service/engine/local_model.py task_major)."""
    return LayerRouting(np.array_split(layer.expert_ids, rows)[j], np.array_split(layer.gates, rows)[j])


def predictions(worker: ModelHandle, result: ClassifyResult, top_k: int | None, raw: bool) -> list[dict[str, Any]]:
    """Single-task: one prediction per text. Multi-task: text after text, each text's tasks in the order asked,
    each prediction naming its `task` and its `text` (index in inputs)."""
    if result.tasks is None:
        return [prediction(worker, r, top_k, raw) for r in result.results]
    out = []
    for i, r in enumerate(result.results):
        for j, t in enumerate(result.tasks):
            p = prediction(worker, r, top_k, raw, t, j, len(result.tasks))
            out.append({"task": task_name(worker.info, t), "text": i, **p})
    return out


@router.post("/classify", response_model=ClassifyResponse, responses=ERRORS, summary="Classify one or more texts")
async def classify(body: ClassifyRequest, request: Request) -> JSON:
    # Requests with a JSON body are answered before they reach this route (service/api/fast_route.py); this one
    # serves the others and documents the API.
    max_texts = settings_of(request).max_client_batch_size
    return await answer_classify(engine_of(request), body, request.scope["state"], request.receive, max_texts)


async def answer_classify(
    engine: EngineHandle, body: ClassifyRequest, state: dict, receive: Receive, max_texts: int
) -> JSON:
    """POST /v1/classify once the body is parsed. `state` is the request's scope state: the model name goes there
    for the metrics and the access log. `max_texts`: the app's max_client_batch_size."""
    t0 = time.perf_counter()
    worker = engine.get(body.model)
    state["model"] = worker.name
    texts = validate_texts(body.inputs, max_texts)
    tasks = select_tasks(worker.info, body.task)
    timeout = body.timeout_ms / 1000 if body.timeout_ms else None
    work = worker.classify(
        texts,
        truncate=body.truncate,
        long_text=body.long_text,
        return_routing=body.return_routing,
        timeout_s=timeout,
        tasks=tasks,
    )
    result = await unless_disconnected(receive, work)
    preds = predictions(worker, result, body.top_k, body.raw_scores)
    return JSON({"model": worker.name, "predictions": preds}, headers=timing_headers(result, time.perf_counter() - t0))


async def model_card(worker: ModelHandle) -> dict[str, Any]:
    info = worker.info
    return {
        "name": info.name,
        "labels": info.labels,
        "max_length": info.max_length,
        "temperature": info.temperature,  # scores are softmax(logits / temperature)
        "architecture": info.architecture,
        "backend": worker.kind,
        "precision": worker.info.precision,
        "device": worker.device,
        "max_batch_tokens": info.batch_tokens,  # token budget per batch in effect (README: How it works)
        "base": info.training.get("base"),  # the pretrained encoder it was converted from, if any
        "eval": worker.evaluation,  # read once when the model was loaded
        "tasks": task_cards(info, worker.evaluation),  # multi-task models; {} for a single-task one
        "status": "ready" if worker.ready else "loading",
        "queue_texts": await worker.queued(),
    }


def task_cards(info: ModelInfo, evaluation: dict | None) -> dict[str, Any]:
    """Each task of a multi-task model: its labels, temperature and evaluation (eval.json's figures for it)."""
    per_task = (evaluation or {}).get("tasks") or {}
    return {
        name: {"labels": t.labels, "temperature": t.temperature, "eval": per_task.get(name)}
        for name, t in info.tasks.items()
    }


@router.get("/models", summary="Models served: labels, temperature, architecture, backend, device, eval metrics")
async def list_models(request: Request) -> JSON:
    engine = engine_of(request)
    cards = [await model_card(w) for w in engine.models.values()]
    cards += [{"name": name, "status": "failed", "error": why} for name, why in engine.failed.items()]
    return JSON({"default_model": engine.default_model, "models": cards})


@router.get("/models/{model}", summary="One model", responses=ERRORS)
async def get_model(model: str, request: Request) -> JSON:
    return JSON(await model_card(engine_of(request).get(model)))


@router.get(
    "/models/{model}/routing",
    responses=ERRORS,
    summary="Routing statistics: expert load, balance, entropy and drift from the training profile",
)
async def routing(model: str, request: Request) -> JSON:
    worker = engine_of(request).get(model)
    request.state.model = worker.name
    return JSON(
        {
            "model": worker.name,
            "num_experts": worker.info.num_experts,
            "top_k": worker.info.top_k,
            **(await worker.routing()),
        }
    )


@router.get(
    "/models/{model}/experts",
    response_model=ExpertsResponse,
    responses=ERRORS,
    summary="What each expert is for, from the model's evaluation: training share and the classes that use it most",
)
async def experts(model: str, request: Request) -> JSON:
    worker = engine_of(request).get(model)
    request.state.model = worker.name
    info = worker.info
    profile = worker.experts or {"training_split": None, "evaluation_split": None, "layers": []}
    head = {"model": worker.name, "num_experts": info.num_experts, "top_k": info.top_k, "labels": info.labels}
    return JSON({**head, **profile})
