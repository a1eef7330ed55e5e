"""The wire between the API process and the model process: ZeroMQ multipart messages, an orjson header frame and
raw buffers after it (logits as float32 bytes), no pickles.

Requests carry {"op", "id", ...}; every reply carries the request's "id" and either "ok": true or an "error" that
rebuilds the ServiceError on the API side, so the status table (service/errors.py) stays the only mapping.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from service.backends.base import LayerRouting, ModelInfo, TaskLabels
from service.engine.results import ClassifyResult, TextResult
from service.errors import ErrorKind, ServiceError

Frames = list[bytes]


def encode(header: dict[str, Any], *buffers: bytes) -> Frames:
    return [orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY), *buffers]


def decode(frames: Sequence[bytes]) -> tuple[dict[str, Any], list[bytes]]:
    return orjson.loads(frames[0]), list(frames[1:])


def error_reply(request_id: int, err: ServiceError) -> Frames:
    error = {"kind": err.kind.value, "message": err.message, "field": err.field, "headers": err.headers}
    return encode({"id": request_id, "ok": False, "error": error})


def error_from(header: dict[str, Any]) -> ServiceError:
    e = header["error"]
    return ServiceError(ErrorKind(e["kind"]), e["message"], field=e.get("field"), headers=e.get("headers"))


def result_reply(request_id: int, result: ClassifyResult, texts_per_s: float) -> Frames:
    """texts_per_s: the engine's measured rate, for the API process's own Retry-After estimates."""
    rs = result.results
    header: dict[str, Any] = {
        "id": request_id,
        "ok": True,
        "rate": texts_per_s,
        "n_tokens": [r.n_tokens for r in rs],
        "truncated": [r.truncated for r in rs],
        "windows": [r.windows for r in rs],
        "times": [result.tokenization_s, result.queue_s, result.inference_s],
        "tasks": result.tasks,  # multi-task: each text's logits are a row per task, in this order
    }
    if rs[0].routing is not None:  # asked for: a rare, debugging path, so plain JSON lists are good enough
        header["tokens"] = [r.tokens for r in rs]
        header["window_tokens"] = [r.window_tokens for r in rs]
        header["routing"] = [[[lay.expert_ids, lay.gates] for lay in r.routing or []] for r in rs]
    logits = np.ascontiguousarray(np.stack([r.logits for r in rs]), dtype=np.float32)
    return encode(header, logits.tobytes())


def result_from(header: dict[str, Any], buffers: list[bytes], num_labels: int) -> ClassifyResult:
    """num_labels: the width of a logits row (service/engine/tasks.py label_width)."""
    tasks = header.get("tasks")
    logits = np.frombuffer(buffers[0], dtype=np.float32).reshape(-1, num_labels)
    if tasks:
        logits = logits.reshape(-1, len(tasks), num_labels)
    routing = header.get("routing")
    tokens = header.get("tokens")
    results = []
    for i, (n, cut, k) in enumerate(zip(header["n_tokens"], header["truncated"], header["windows"], strict=True)):
        r = TextResult(logits[i], n, cut, windows=k)
        if routing is not None and tokens is not None:
            r.routing = [LayerRouting(np.asarray(ids), np.asarray(g, dtype=np.float32)) for ids, g in routing[i]]
            r.tokens = tokens[i]
            r.window_tokens = header["window_tokens"][i]
        results.append(r)
    tok_s, queue_s, infer_s = header["times"]
    return ClassifyResult(results, tok_s, queue_s, infer_s, tasks)


def info_to_dict(info: ModelInfo) -> dict[str, Any]:
    return {**info.__dict__, "path": str(info.path)}


def info_from_dict(d: dict[str, Any]) -> ModelInfo:
    tasks = {name: TaskLabels(**t) for name, t in d.get("tasks", {}).items()}
    return ModelInfo(**{**d, "path": Path(d["path"]), "tasks": tasks})
