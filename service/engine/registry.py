"""The engine: every model folder of the repository loaded into a backend with its own ModelWorker."""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from service.backends import load_backend
from service.config import Settings
from service.engine.batcher import ModelWorker
from service.errors import ErrorKind, ServiceError, model_not_found
from service.metrics import Metrics
from service.modeling.layout import CONFIG_FILE, ROUTING_PROFILE_FILE

log = logging.getLogger(__name__)


def discover_models(models_dir: Path, only: list[str] | None = None) -> list[Path]:
    if not models_dir.is_dir():
        raise FileNotFoundError(f"model repository {models_dir} does not exist")
    found = sorted(p for p in models_dir.iterdir() if (p / CONFIG_FILE).is_file())
    if only:
        missing = sorted(set(only) - {p.name for p in found})
        if missing:
            raise FileNotFoundError(f"models not found in {models_dir}: {', '.join(missing)}")
        found = [p for p in found if p.name in only]
    if not found:
        raise FileNotFoundError(f"no model folders (with {CONFIG_FILE}) in {models_dir}")
    return found


class Engine:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.workers: dict[str, ModelWorker] = {}
        # Tokenization runs here, off the event loop; HF tokenizers releases the GIL while it works.
        self.tokenize_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize")
        metrics.watch_routing(lambda: [(n, w.stats) for n, w in self.workers.items()])

    def load(self) -> None:
        s = self.settings
        for path in discover_models(s.models_dir, s.models):
            backend = load_backend(path, s.device, s.backend, s.threads, s.precision)
            profile_file = path / ROUTING_PROFILE_FILE
            profile = json.loads(profile_file.read_text()) if profile_file.is_file() else None
            worker = ModelWorker(backend, s, self.metrics, self.tokenize_pool, profile)
            worker.start()
            self.workers[worker.name] = worker
            self.metrics.model_info.labels(worker.name, backend.kind, backend.device, backend.info.precision).set(1)
            log.info("model %s ready on %s (%s backend)", worker.name, backend.device, backend.kind)
        if s.default_model and s.default_model not in self.workers:
            raise FileNotFoundError(f"default model {s.default_model!r} is not among {', '.join(self.workers)}")

    @property
    def default_model(self) -> str:
        return self.settings.default_model or next(iter(self.workers))

    def get(self, name: str | None) -> ModelWorker:
        name = name or self.default_model
        worker = self.workers.get(name)
        if worker is None:
            raise model_not_found(name, list(self.workers))
        if not worker.ready:
            raise ServiceError(ErrorKind.MODEL_NOT_READY, f"model {name!r} is not ready")
        return worker

    def stop(self) -> None:
        for w in self.workers.values():
            w.stop()
        self.tokenize_pool.shutdown(wait=False, cancel_futures=True)
