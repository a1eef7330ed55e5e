"""What the API layer sees of the engine: a façade per model, the same whether the model runs in this process
(LocalModel in service/engine/local_model.py, held by LocalEngine) or in a model process behind IPC (RemoteModel,
held by RemoteEngine, in service/engine/remote.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from service.errors import ErrorKind, ServiceError, model_not_found

if TYPE_CHECKING:
    from service.backends.base import ModelInfo
    from service.config import Settings
    from service.engine.results import ClassifyResult
    from service.modeling.windows import LongText


class ModelHandle(Protocol):
    name: str
    info: ModelInfo
    evaluation: dict | None  # eval.json's headline figures, read once at load
    experts: dict | None  # service/modeling/expert_profile.py: each expert's training share and classes, from load

    @property
    def kind(self) -> str: ...  # backend: torch | onnx

    @property
    def device(self) -> str: ...

    @property
    def ready(self) -> bool: ...

    async def classify(
        self,
        texts: list[str],
        *,
        truncate: bool = True,
        long_text: LongText | None = None,  # None: the server's setting
        return_routing: bool = False,
        timeout_s: float | None = None,
        tasks: list[int] | None = None,  # multi-task: the task ids to run (service/engine/tasks.py); None: all
    ) -> ClassifyResult: ...

    async def queued(self) -> int: ...  # texts waiting in the model's queue

    async def routing(self) -> dict: ...  # RoutingStats.snapshot()


class EngineHandle(Protocol):
    settings: Settings
    failed: dict[str, str]  # model name -> why it could not be loaded
    fatal: str | None  # set when the engine can no longer serve: the process must be restarted

    @property
    def models(self) -> dict[str, ModelHandle]: ...

    @property
    def default_model(self) -> str: ...

    def get(self, name: str | None) -> ModelHandle: ...

    async def metrics_exposition(self) -> bytes: ...  # the engine's share of /metrics

    async def start(self) -> None: ...  # load and warm up every model

    async def close(self) -> None: ...

    def watch(self, on_fatal: Callable[[str], None]) -> object: ...  # on_fatal(why) once the engine cannot serve


def lookup(engine: EngineHandle, name: str | None) -> ModelHandle:
    """The model a request names (or the default), or the error that says why it cannot serve."""
    name = name or engine.default_model
    if name in engine.failed:
        raise ServiceError(ErrorKind.MODEL_FAILED, f"model {name!r} failed to load: {engine.failed[name]}")
    model = engine.models.get(name)
    if model is None:
        raise model_not_found(name, [*engine.models, *engine.failed])
    if not model.ready:
        raise ServiceError(ErrorKind.MODEL_NOT_READY, f"model {name!r} is not ready")
    return model
