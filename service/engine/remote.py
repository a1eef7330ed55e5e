"""The API process's side of the model process: RemoteEngine starts it, talks to it over a ZeroMQ ipc socket and
gives the API one RemoteModel façade per model, with the same interface as an in-process ModelWorker.

Failure handling: when the model process exits (killed, crashed, its watchdog found a hung batch) or stops
answering pings for `worker_hang_s` (then it is killed), every waiting request gets 503 `model_not_ready`, the
models turn unready and `on_fatal` stops the server, which exits non-zero so that an orchestrator restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from service.backends.base import ModelInfo
from service.config import Settings
from service.engine import ipc
from service.engine.batcher import ClassifyResult
from service.engine.handle import lookup
from service.engine.model_process import SETTINGS_ENV, configure
from service.errors import ErrorKind, ServiceError, deadline_exceeded

log = logging.getLogger(__name__)
PING_EVERY_S = 1.0
REPLY_SLACK_S = 5.0  # the model process answers its own deadlines; this only guards against a silent one
# Pings are answered between batches, so a long batch delays them: the model process's own watchdog (checking every
# second) reports a batch over worker_hang_s and exits first; this kill is for a process that cannot even do that.
PING_SLACK_S = 5.0


class RemoteModel:
    def __init__(self, engine: RemoteEngine, desc: dict[str, Any]) -> None:
        self.engine = engine
        self.info: ModelInfo = ipc.info_from_dict(desc["info"])
        self.name = self.info.name
        self.evaluation: dict | None = desc["evaluation"]
        self._kind, self._device = desc["kind"], desc["device"]

    @property
    def kind(self) -> str:
        return self._kind

    @property
    def device(self) -> str:
        return self._device

    @property
    def ready(self) -> bool:
        return self.engine.fatal is None

    async def classify(
        self, texts: list[str], *, truncate: bool = True, return_routing: bool = False, timeout_s: float | None = None
    ) -> ClassifyResult:
        cap = self.engine.settings.request_timeout_s
        wait_s = (cap if timeout_s is None else min(timeout_s, cap)) + REPLY_SLACK_S
        request = {"model": self.name, "texts": texts, "truncate": truncate, "routing": return_routing}
        header, buffers = await self.engine.call("classify", wait_s, **request, timeout_s=timeout_s)
        return ipc.result_from(header, buffers, len(self.info.labels))

    async def queued(self) -> int:
        header, _ = await self.engine.call("queued", REPLY_SLACK_S, model=self.name)
        return header["texts"]

    async def routing(self) -> dict:
        header, _ = await self.engine.call("routing", REPLY_SLACK_S, model=self.name)
        return header["snapshot"]


class RemoteEngine:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.failed: dict[str, str] = {}
        self.fatal: str | None = None
        self._workers: dict[str, RemoteModel] = {}
        self._default = ""
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._dir = tempfile.TemporaryDirectory(prefix="moe-serve-")
        self.address = f"ipc://{Path(self._dir.name) / 'engine.sock'}"
        self._tasks: list[asyncio.Task] = []
        self._on_fatal: Callable[[str], None] = lambda _: None
        self.proc: asyncio.subprocess.Process | None = None
        self._closing = False

    @property
    def workers(self) -> dict[str, RemoteModel]:
        return self._workers

    @property
    def default_model(self) -> str:
        return self._default

    def get(self, name: str | None) -> RemoteModel:
        return lookup(self, name)  # type: ignore[return-value]

    # -- lifecycle -----------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the model process and wait until it has loaded and warmed every model."""
        env = {**os.environ, SETTINGS_ENV: self.settings.model_dump_json(exclude={"api_key"})}
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "service.engine.model_process", self.address, env=env
        )
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        configure(self.sock)
        self.sock.connect(self.address)
        self._tasks.append(asyncio.ensure_future(self._read()))
        exited = asyncio.ensure_future(self.proc.wait())
        hello = asyncio.ensure_future(self.call("hello", None))
        await asyncio.wait({exited, hello}, return_when=asyncio.FIRST_COMPLETED)
        if not hello.done():
            hello.cancel()
            raise RuntimeError(f"the model process exited with code {exited.result()} before it was ready (see log)")
        exited.cancel()
        desc, _ = hello.result()
        self._workers = {name: RemoteModel(self, d) for name, d in desc["models"].items()}
        self.failed, self._default = desc["failed"], desc["default_model"]
        log.info("model process %d ready: %s", self.proc.pid, ", ".join(self._workers))
        self._tasks += [asyncio.ensure_future(self._watch_exit()), asyncio.ensure_future(self._ping())]

    def watch(self, on_fatal: Callable[[str], None]) -> None:
        self._on_fatal = on_fatal

    async def close(self) -> None:
        self._closing = True
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(zmq.ZMQError):
                await self.sock.send_multipart(ipc.encode({"op": "stop", "id": 0}))
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        for task in self._tasks:
            task.cancel()
        self._fail_pending(ServiceError(ErrorKind.SHUTTING_DOWN, "the server is shutting down"))
        self.sock.close()
        self.ctx.term()
        self._dir.cleanup()

    # -- calls ---------------------------------------------------------------------------------------------------
    async def call(self, op: str, wait_s: float | None, **fields: Any) -> tuple[dict[str, Any], list[bytes]]:
        if self.fatal is not None:
            raise ServiceError(ErrorKind.MODEL_NOT_READY, f"the model process is gone ({self.fatal})")
        rid = next(self._ids)
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        try:
            await self.sock.send_multipart(ipc.encode({"op": op, "id": rid, **fields}), copy=False)
            header, buffers = await asyncio.wait_for(future, wait_s)
        except asyncio.CancelledError:
            # The client went away: tell the model process, which drops the request's queued texts.
            with contextlib.suppress(zmq.ZMQError):
                await self.sock.send_multipart(ipc.encode({"op": "cancel", "id": rid}))
            raise
        except TimeoutError:
            raise deadline_exceeded(fields.get("model", "")) from None
        finally:
            self._pending.pop(rid, None)
        if not header["ok"]:
            raise ipc.error_from(header)
        return header, buffers

    async def metrics_exposition(self) -> bytes:
        _, buffers = await self.call("metrics", REPLY_SLACK_S)
        return buffers[0]

    async def _read(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            header, buffers = ipc.decode(frames)
            future = self._pending.get(header["id"])
            if future is not None and not future.done():
                future.set_result((header, buffers))

    # -- failure -------------------------------------------------------------------------------------------------
    async def _watch_exit(self) -> None:
        assert self.proc is not None
        code = await self.proc.wait()
        if self.fatal is None and not self._closing:
            self._die(f"model process exited with code {code}")

    async def _ping(self) -> None:
        """A model process that holds its GIL (or is stopped) cannot even answer: kill it, and _watch_exit follows."""
        while self.fatal is None:
            await asyncio.sleep(PING_EVERY_S)
            try:
                await self.call("ping", self.settings.worker_hang_s + PING_SLACK_S)
            except ServiceError:
                if self.fatal is None and self.proc is not None and self.proc.returncode is None:
                    hang_s = self.settings.worker_hang_s + PING_SLACK_S
                    log.critical("model process %d did not answer for %g s: killing it", self.proc.pid, hang_s)
                    self.proc.kill()
                return

    def _die(self, why: str) -> None:
        self.fatal = why
        log.critical("%s; stopping so that the service is restarted", why)
        self._fail_pending(ServiceError(ErrorKind.MODEL_NOT_READY, f"the model process is gone ({why})"))
        self._on_fatal(why)

    def _fail_pending(self, err: ServiceError) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(err)
        self._pending.clear()
