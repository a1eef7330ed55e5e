"""The API process's side of the model processes: RemoteEngine starts one model process per model folder
(through a launcher: service/engine/launchers.py), talks to each over its own ZeroMQ socket and gives the API one
RemoteModel façade per model, with the same interface as an in-process LocalModel. One process per model: a
model's batches never wait behind another model's, and on a machine with more cores each model has its own.

Failure handling: when a model process exits (killed, crashed, its watchdog found a hung batch) or stops answering
pings for `worker_hang_s` + PING_SLACK_S (then it is killed), its waiting requests get 503 `model_not_ready` with
Retry-After, the model turns unready and the repository (service/engine/repository.py) restarts it with backoff
while the other models serve. `on_fatal` stops the server (exit 3) only once every model has failed, or at the
first crash with exit_on_model_crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from service.backends.base import ModelInfo
from service.config import Settings
from service.engine import ipc
from service.engine.handle import lookup
from service.engine.launchers import Child, Launcher, SubprocessLauncher
from service.engine.local_engine import discover_models
from service.engine.model_server import configure
from service.engine.repository import LoadError, Repository
from service.engine.request_queue import deadline_for, retry_after_ms
from service.engine.results import ClassifyResult
from service.engine.tasks import label_width
from service.errors import ErrorKind, ServiceError, deadline_exceeded, queue_full
from service.metrics import Metrics, merge_expositions
from service.modeling.folder import folder_version
from service.modeling.windows import LongText

log = logging.getLogger(__name__)
PING_EVERY_S = 1.0
REPLY_SLACK_S = 5.0  # how long a query (queue depth, routing, metrics) may take
# Pings are answered between batches, so a long batch delays them: the model process's own watchdog (checking every
# second) reports a batch over worker_hang_s and exits first; this kill is for a process that cannot even do that.
PING_SLACK_S = 5.0


class ModelProcess:
    """One model process: the child, its socket and the calls waiting on it."""

    def __init__(
        self,
        settings: Settings,
        folder: str,
        address: str,
        launcher: Launcher,
        on_death: Callable[[ModelProcess, str], None],
    ) -> None:
        self.settings, self.folder, self.address, self.launcher = settings, folder, address, launcher
        self.on_death = on_death
        self.proc: Child | None = None
        self.closing = False
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._tasks: list[asyncio.Task] = []

    async def start(self, ctx: zmq.asyncio.Context) -> dict[str, Any]:
        """Start it and wait until its model is loaded and warm (or failed): its description."""
        own = self.settings.model_copy(update={"models": [self.folder], "default_model": None})
        self.proc = await self.launcher.start(own, self.address, ctx)
        self.sock = ctx.socket(zmq.DEALER)
        configure(self.sock)
        self.sock.connect(self.address)
        self._tasks.append(asyncio.ensure_future(self._read()))
        exited = asyncio.ensure_future(self.proc.wait())
        hello = asyncio.ensure_future(self.call("hello", None))
        await asyncio.wait({exited, hello}, return_when=asyncio.FIRST_COMPLETED)
        if not hello.done():
            hello.cancel()
            raise RuntimeError(f"model process for {self.folder!r} exited with code {exited.result()} (see log)")
        exited.cancel()
        desc, _ = hello.result()
        return desc

    def watch(self) -> None:
        self._tasks += [asyncio.ensure_future(self._watch_exit()), asyncio.ensure_future(self._ping())]

    @property
    def busy(self) -> bool:
        """Calls waiting on an answer, pings aside."""
        return bool(self._pending)

    async def close(self) -> None:
        self.closing = True
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(zmq.ZMQError):
                await self._send(ipc.encode({"op": "stop", "id": 0}))
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        for task in self._tasks:
            task.cancel()
        self.fail_pending(ServiceError(ErrorKind.SHUTTING_DOWN, "the server is shutting down"))
        self.sock.close()

    async def call(
        self, op: str, wait_s: float | None, *, own_ms: int | None = None, **fields: Any
    ) -> tuple[dict[str, Any], list[bytes]]:
        rid = next(self._ids)
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        try:
            try:
                await self._send(ipc.encode({"op": op, "id": rid, **fields}))
            except zmq.ZMQError as exc:
                raise ServiceError(
                    ErrorKind.MODEL_NOT_READY,
                    f"model {self.folder!r} is not ready: its model process is gone ({exc})",
                    headers={"Retry-After": "1"},
                ) from None
            header, buffers = await asyncio.wait_for(future, wait_s)
        except (asyncio.CancelledError, TimeoutError) as exc:
            # The client went away or the deadline passed: the model process drops the request's queued texts.
            with contextlib.suppress(zmq.ZMQError):
                await self._send(ipc.encode({"op": "cancel", "id": rid}))
            if isinstance(exc, TimeoutError):
                raise deadline_exceeded(fields.get("model", self.folder), own_ms) from None
            raise
        finally:
            self._pending.pop(rid, None)
        if not header["ok"]:
            raise ipc.error_from(header)
        return header, buffers

    async def _send(self, frames: ipc.Frames) -> None:
        """Never waits. With no high-water mark (configure) a DEALER refuses a message only when it has no peer at
        all: over inproc:// once the model server's socket has closed (ThreadLauncher), where no reconnect comes, so an
        awaited send would wait forever (a request or `close` hung, not answered 503). zmq.Again says so at once."""
        await self.sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)

    async def _read(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            header, buffers = ipc.decode(frames)
            future = self._pending.get(header["id"])
            if future is not None and not future.done():
                future.set_result((header, buffers))

    async def _watch_exit(self) -> None:
        assert self.proc is not None
        code = await self.proc.wait()
        if not self.closing:
            self.on_death(self, f"model process for {self.folder!r} exited with code {code}")

    async def _ping(self) -> None:
        """A model process that holds its GIL (or is stopped) cannot even answer: kill it, and _watch_exit follows."""
        hang_s = self.settings.worker_hang_s + PING_SLACK_S
        while not self.closing:
            await asyncio.sleep(PING_EVERY_S)
            try:
                await self.call("ping", hang_s)
            except ServiceError:
                if not self.closing and self.proc is not None and self.proc.returncode is None:
                    log.critical("model process %d did not answer for %g s: killing it", self.proc.pid, hang_s)
                    self.proc.kill()
                return

    def fail_pending(self, err: ServiceError) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(err)
        self._pending.clear()


class RemoteModel:
    """One model version served by one model process. A reload swaps in a new RemoteModel; the old one is `retired`:
    calls that reach it after the swap go on to the new one, those it holds finish on the old process."""

    def __init__(self, engine: RemoteEngine, process: ModelProcess, desc: dict[str, Any], version: str) -> None:
        self.engine, self.process, self.version = engine, process, version
        self.info: ModelInfo = ipc.info_from_dict(desc["info"])
        self.name = self.info.name
        self.evaluation: dict | None = desc["evaluation"]
        self.experts: dict | None = desc["experts"]
        self._kind, self._device = desc["kind"], desc["device"]
        s = engine.settings
        self.capacity = s.max_queue_texts + s.max_batch_size  # the queue, and the batch running
        self.in_flight = 0  # texts sent to the model process and not answered yet
        self.texts_per_s = 0.0  # the engine's measured rate, from its replies
        self.retired = False  # replaced by a newer version (or unloaded)
        self.down: str | None = None  # why its process is gone (it is being restarted)

    @property
    def kind(self) -> str:
        return self._kind

    @property
    def device(self) -> str:
        return self._device

    @property
    def ready(self) -> bool:
        return self.engine.fatal is None and self.down is None and not self.retired

    def _current(self) -> RemoteModel | None:
        """The model that serves this name now, when this one was replaced."""
        return self.engine.get(self.name) if self.retired else None

    async def classify(
        self,
        texts: list[str],
        *,
        truncate: bool = True,
        long_text: LongText | None = None,
        return_routing: bool = False,
        timeout_s: float | None = None,
        tasks: list[int] | None = None,
    ) -> ClassifyResult:
        if (current := self._current()) is not None:
            return await current.classify(
                texts,
                truncate=truncate,
                long_text=long_text,
                return_routing=return_routing,
                timeout_s=timeout_s,
                tasks=tasks,
            )
        n = len(texts)
        self._admit(n)
        # The model process answers deadlines of texts still queued; a batch that runs past one is answered here.
        at, own_ms = deadline_for(timeout_s, self.engine.settings.request_timeout_s)
        wait_s = max(0.0, at - time.monotonic())
        request = {"model": self.name, "texts": texts, "truncate": truncate, "long_text": long_text}
        request["routing"] = return_routing
        request["tasks"] = tasks
        self.in_flight += n
        try:
            header, buffers = await self._call("classify", wait_s, own_ms=own_ms, **request, timeout_s=timeout_s)
        finally:
            self.in_flight -= n
        self.texts_per_s = header["rate"]
        return ipc.result_from(header, buffers, label_width(self.info))

    def _admit(self, n: int) -> None:
        """429 here, before any IPC, when the texts already sent to the model process fill its queue and a batch:
        under overload most requests are refused, and a refusal must cost as little as possible. The model
        process still checks its queue itself (the authority, and the one that counts a long text's windows, which
        only tokenizing tells); this is the cheap early answer."""
        if self.in_flight + n > self.capacity:
            raise queue_full(self.name, retry_after_ms(self.in_flight + n, self.texts_per_s))

    async def queued(self) -> int:
        if (current := self._current()) is not None:
            return await current.queued()
        header, _ = await self._call("queued", REPLY_SLACK_S, model=self.name)
        return header["texts"]

    async def routing(self) -> dict:
        if (current := self._current()) is not None:
            return await current.routing()
        header, _ = await self._call("routing", REPLY_SLACK_S, model=self.name)
        return header["snapshot"]

    async def _call(self, op: str, wait_s: float, **fields: Any) -> tuple[dict[str, Any], list[bytes]]:
        if self.engine.fatal is not None or self.down is not None:
            raise self.engine.not_ready(self.name, self.engine.fatal or self.down or "")
        return await self.process.call(op, wait_s, **fields)  # type: ignore[arg-type]


class RemoteEngine:
    """Every served model's current RemoteModel; the repository (service/engine/repository.py) decides what is
    loaded, swapped and restarted, through spawn / serve / retire here."""

    def __init__(self, settings: Settings, launcher: Launcher | None = None, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.failed: dict[str, str] = {}
        self.fatal: str | None = None
        self._models: dict[str, RemoteModel] = {}
        self._default = ""
        self._dir = tempfile.TemporaryDirectory(prefix="moe-serve-")  # the ipc sockets
        self.launcher = launcher or SubprocessLauncher(Path(self._dir.name))
        self._addresses = itertools.count()  # a fresh socket per process: an old one may still drain
        self._on_fatal: Callable[[str], None] = lambda _: None
        self.repository = Repository(self, metrics)

    @property
    def models(self) -> dict[str, RemoteModel]:
        return self._models

    @property
    def processes(self) -> list[ModelProcess]:
        return [m.process for m in self._models.values() if m.down is None]

    @property
    def default_model(self) -> str:
        return self._default

    def get(self, name: str | None) -> RemoteModel:
        model = self._models.get(name or self._default)
        if model is not None and model.down is not None and self.fatal is None:
            raise self.not_ready(model.name, model.down)  # being restarted: with Retry-After
        return lookup(self, name)  # type: ignore[return-value]

    # -- lifecycle -----------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """One model process per model folder, started together; returns once every model is loaded and warm or
        has failed (a folder that fails is reported, the others serve)."""
        s = self.settings
        names = [p.name for p in discover_models(s.models_dir, s.models)]
        if s.default_model and s.default_model not in names:
            raise FileNotFoundError(f"default model {s.default_model!r} is not among {', '.join(names)}")
        self.ctx = zmq.asyncio.Context()
        await self.repository.start(names)
        if not self._models:
            await self.close()
            raise RuntimeError(f"no model could be loaded from {s.models_dir}: {self.failed}")
        self._default = s.default_model or next(n for n in names if n in self._models)
        pids = ", ".join(f"{p.folder} ({p.proc.pid})" for p in self.processes if p.proc)
        log.info("model processes ready: %s", pids)

    def watch(self, on_fatal: Callable[[str], None]) -> None:
        self._on_fatal = on_fatal

    async def close(self) -> None:
        await self.repository.close()
        for model in list(self._models.values()):
            await model.process.close()
        # destroy, not term: term waits for every socket of the context to close, forever for one whose process was
        # never closed (a spawn cancelled by this shutdown, say a poll-mode load); linger is 0 on all of them anyway.
        self.ctx.destroy(linger=0)
        self._dir.cleanup()

    async def metrics_exposition(self) -> bytes:
        calls = (p.call("metrics", REPLY_SLACK_S) for p in self.processes)
        parts = await asyncio.gather(*calls, return_exceptions=True)
        # A process that died or was swapped out during the scrape is left out of this one.
        return merge_expositions([part[1][0] for part in parts if not isinstance(part, BaseException)])

    # -- what the repository does with model processes -----------------------------------------------------------
    async def spawn(self, name: str) -> RemoteModel:
        """A new model process for folder `name`, loaded and warm, not yet serving; LoadError if it cannot serve."""
        version = await asyncio.to_thread(folder_version, self.settings.models_dir / name)
        process = ModelProcess(
            self.settings, name, self.launcher.address(next(self._addresses)), self.launcher, self._died
        )
        try:
            desc = await process.start(self.ctx)
        except Exception as exc:
            with contextlib.suppress(Exception):
                await process.close()
            raise LoadError(str(exc)) from None
        if name in desc["failed"] or name not in desc["models"]:
            await process.close()
            raise LoadError(desc["failed"].get(name, "the model process serves no model of that name"))
        return RemoteModel(self, process, desc["models"][name], version)

    def serve(self, model: RemoteModel) -> RemoteModel | None:
        """New requests for the name go to `model` from now on; returns the model it replaced, if any."""
        old = self._models.get(model.name)
        self._models[model.name] = model
        self.failed.pop(model.name, None)
        model.process.watch()
        if old is not None:
            old.retired = True
        return old

    def withdraw(self, name: str) -> RemoteModel | None:
        """The name serves no more (unloaded, or failed); returns the model that served it."""
        model = self._models.pop(name, None)
        if model is not None:
            model.retired = True
        return model

    async def retire(self, model: RemoteModel, drain_s: float) -> None:
        """Let the process finish the calls it holds (up to drain_s), then stop it."""
        deadline = time.monotonic() + drain_s
        while (model.in_flight or model.process.busy) and time.monotonic() < deadline and model.down is None:
            await asyncio.sleep(0.02)
        await model.process.close()

    def not_ready(self, name: str, why: str) -> ServiceError:
        retry_s = max(1, math.ceil(self.repository.retry_after_s(name)))
        return ServiceError(
            ErrorKind.MODEL_NOT_READY,
            f"model {name!r} is not ready: the model process is gone ({why})",
            headers={"Retry-After": str(retry_s)},
        )

    def _died(self, process: ModelProcess, why: str) -> None:
        model = self._models.get(process.folder)
        if model is None or model.process is not process:
            log.warning("%s (a retired version; nothing to restart)", why)
            process.fail_pending(self.not_ready(process.folder, why))
            return
        model.down = why
        if self.settings.exit_on_model_crash:
            self.stop_serving(why)
            return
        log.error("%s; restarting it", why)
        self.repository.crashed(process.folder, why)
        process.fail_pending(self.not_ready(process.folder, why))

    def stop_serving(self, why: str) -> None:
        """The server must stop (exit 3): every model failed, or a crash with exit_on_model_crash."""
        if self.fatal is not None:
            return
        self.fatal = why
        log.critical("%s; stopping so that the service is restarted", why)
        for p in [m.process for m in self._models.values()]:
            p.fail_pending(ServiceError(ErrorKind.MODEL_NOT_READY, f"the model process is gone ({why})"))
        self._on_fatal(why)
