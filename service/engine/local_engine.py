"""The in-process engine: every model folder of the repository loaded into a backend behind its own LocalModel.
Its batches run on one inference thread per model (loop="thread"), or from the model process's socket loop
(loop="external", service/engine/model_server.py): chosen once, at construction."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

from service.backends import load_backend
from service.backends.base import Backend
from service.config import Settings
from service.engine.handle import lookup
from service.engine.local_model import LocalModel
from service.engine.loop import InferenceThread
from service.metrics import Metrics
from service.modeling.expert_profile import expert_profile
from service.modeling.layout import CONFIG_FILE, EVAL_FILE, ROUTING_PROFILE_FILE

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


BackendLoader = Callable[[Path], Backend]


class LocalEngine:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        loader: BackendLoader | None = None,
        loop: Literal["thread", "external"] = "thread",
    ) -> None:
        self.settings = settings
        self.loop = loop  # external: the caller runs the batches (the model process's socket loop)
        self.metrics = metrics
        # How a model folder becomes a backend: load_backend with the settings; tests may pass a fake.
        self.loader = loader or self._load_backend
        self.models: dict[str, LocalModel] = {}
        self.threads: dict[str, InferenceThread] = {}
        self.failed: dict[str, str] = {}  # model name -> why it could not be loaded (no internal paths)
        self.fatal: str | None = None  # set when a model's thread died or its batch hung: the process must be restarted
        self._watchdog = threading.Event()
        # Tokenization runs here, off the event loop; HF tokenizers releases the GIL while it works.
        self.tokenize_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize")
        metrics.watch_routing(lambda: [(n, w.stats) for n, w in self.models.items()])
        metrics.watch_task_routing(lambda: [(n, t, s) for n, w in self.models.items() for t, s in w.task_stats.items()])

    def load(self) -> None:
        """Load and warm every model folder. A folder that fails (missing or corrupt weights, bad config, missing
        tokenizer, ...) fails alone: it is logged, reported in /v1/models and readiness, and the others serve."""
        s = self.settings
        paths = discover_models(s.models_dir, s.models)
        for path in paths:
            try:
                self._load_one(path)
            except Exception as exc:
                self.failed[path.name] = _public_message(exc, s.models_dir)
                log.error("model %s failed to load: %s", path.name, exc, exc_info=log.isEnabledFor(logging.DEBUG))
        if not self.models:
            raise RuntimeError(f"no model could be loaded from {s.models_dir}: {self.failed}")
        names = [p.name for p in paths]
        if s.default_model and s.default_model not in names:
            raise FileNotFoundError(f"default model {s.default_model!r} is not among {', '.join(names)}")

    def _load_backend(self, path: Path) -> Backend:
        s = self.settings
        return load_backend(path, s.device, s.backend, s.threads, s.precision)

    def _load_one(self, path: Path) -> None:
        s = self.settings
        backend = self.loader(path)
        profile = read_json(path / ROUTING_PROFILE_FILE)
        report = read_json(path / EVAL_FILE)
        model = LocalModel(backend, s, self.metrics, self.tokenize_pool, profile)
        model.evaluation = eval_summary(report)
        model.experts = expert_profile(report, profile, backend.info.moe_layers, backend.info.num_experts)
        model.warm_up()
        if self.loop == "thread":
            self.threads[model.name] = thread = InferenceThread(model)
            thread.start()
        self.models[model.name] = model
        self.metrics.model_info.labels(model.name, backend.kind, backend.device, backend.info.precision).set(1)
        info = (model.name, backend.device, backend.kind, backend.info.precision)
        log.info("model %s ready on %s (%s backend, %s)", *info)

    @property
    def default_model(self) -> str:
        return self.settings.default_model or next(iter(self.models))

    def get(self, name: str | None) -> LocalModel:
        return lookup(self, name)  # type: ignore[return-value]

    async def start(self) -> None:
        await asyncio.to_thread(self.load)  # load + warm up every model before accepting traffic

    async def close(self) -> None:
        await asyncio.to_thread(self.stop)

    async def metrics_exposition(self) -> bytes:
        return b""  # in-process: the engine's metrics are in the app's own registry already

    def watch(self, on_fatal: Callable[[str], None], every_s: float = 1.0) -> threading.Thread:
        """Watchdog: a model whose inference thread died or whose batch hangs turns unready and calls on_fatal once
        (the server then stops and exits non-zero, so an orchestrator restarts it)."""

        def loop() -> None:
            while not self._watchdog.wait(every_s):
                for m in self.models.values():
                    problem = self.health_problem(m)
                    if problem and self.fatal is None:
                        m.ready = False
                        self.fatal = f"model {m.name}: {problem}"
                        log.critical("%s; stopping so that the process is restarted", self.fatal)
                        on_fatal(self.fatal)

        thread = threading.Thread(target=loop, name="watchdog", daemon=True)
        thread.start()
        return thread

    def health_problem(self, model: LocalModel) -> str | None:
        """Why a model can no longer serve, if it cannot: its inference thread died, or one batch has run for
        longer than worker_hang_s (a hung kernel or device)."""
        thread = self.threads.get(model.name)
        if model.ready and thread is not None and not thread.alive:
            return "inference thread died"
        started, hang_s = model.runner.busy_since, self.settings.worker_hang_s
        if started is not None and time.monotonic() - started > hang_s:
            return f"one batch has run for more than {hang_s:g} s"
        return None

    def stop(self, timeout_s: float = 5.0) -> None:
        self._watchdog.set()
        for m in self.models.values():
            m.close()
        for t in self.threads.values():
            t.join(timeout_s)
        self.tokenize_pool.shutdown(wait=False, cancel_futures=True)


def _public_message(exc: Exception, models_dir: Path) -> str:
    """The error for API clients: its type and message with the model repository's location removed."""
    text = str(exc)
    for root in {str(models_dir.resolve()), str(models_dir)}:
        text = text.replace(root + "/", "").replace(root, "")
    return f"{type(exc).__name__}: {text}"[:500]


def read_json(path: Path) -> dict | None:
    """One of a model folder's JSON reports (eval.json, routing_profile.json), or None when the folder has none."""
    return json.loads(path.read_text()) if path.is_file() else None


def eval_summary(rep: dict | None) -> dict | None:
    """The headline figures of the folder's eval.json, for /v1/models (read once, at load)."""
    if rep is None:
        return None
    summary = {k: rep.get(k) for k in ("dataset", "split", "examples", "accuracy", "macro_f1", "roc_auc")}
    summary["headline_macro_f1"] = (rep.get("headline") or {}).get("macro_f1")
    summary["ece"] = (rep.get("calibration") or {}).get("ece")
    if "tasks" in rep:  # a multi-task folder's eval.json: each task's headline figures (service/training/task_eval.py)
        summary["tasks"] = rep["tasks"]
        summary["mean_macro_f1"] = rep.get("mean_macro_f1")
    return summary
