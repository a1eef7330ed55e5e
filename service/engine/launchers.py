"""How the API process starts a model's server: a real model process (SubprocessLauncher, what `moe-serve serve`
does), or the same ModelServer on a thread of this process over inproc:// (ThreadLauncher: the in-process test
tier drives the default path through it in milliseconds, with the same IPC, loop and errors)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
from pathlib import Path
from typing import Protocol

import zmq
import zmq.asyncio

from service.config import Settings
from service.engine.local_engine import BackendLoader, LocalEngine
from service.engine.model_process import SETTINGS_ENV
from service.engine.model_server import ModelServer
from service.metrics import Metrics

EXIT_POLL_S = 0.05


class Child(Protocol):
    """A running model server, as the API process watches it (asyncio.subprocess.Process is one)."""

    pid: int

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...

    def kill(self) -> None: ...


class Launcher(Protocol):
    def address(self, index: int) -> str: ...

    async def start(self, settings: Settings, address: str, ctx: zmq.asyncio.Context) -> Child: ...


class SubprocessLauncher:
    def __init__(self, socket_dir: Path) -> None:
        self.socket_dir = socket_dir

    def address(self, index: int) -> str:
        return f"ipc://{self.socket_dir / f'{index}.sock'}"

    async def start(self, settings: Settings, address: str, ctx: zmq.asyncio.Context) -> Child:
        env = {**os.environ, SETTINGS_ENV: settings.model_dump_json(exclude={"api_key"})}
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "service.engine.model_process", address, env=env
        )


class ServerThread:
    """A ModelServer on a thread: 'killing' it stops its loop; it 'exits' 3 when its watchdog fires, as a model
    process does."""

    def __init__(self, server: ModelServer) -> None:
        self.server, self.pid, self.code = server, os.getpid(), 0
        self.thread = threading.Thread(target=self._run, name=f"model-server-{server.address}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.server.run()
        self.server.engine.stop()

    @property
    def returncode(self) -> int | None:
        return None if self.thread.is_alive() else self.code

    async def wait(self) -> int:
        while self.thread.is_alive():
            await asyncio.sleep(EXIT_POLL_S)
        return self.code

    def kill(self) -> None:
        self.code = -9
        self.server.stopping = True

    def fatal(self, why: str) -> None:
        self.code = 3
        self.server.stopping = True


class ThreadLauncher:
    def __init__(self, loader: BackendLoader) -> None:
        self.loader = loader

    def address(self, index: int) -> str:
        return f"inproc://moe-model-{id(self)}-{index}"

    async def start(self, settings: Settings, address: str, ctx: zmq.asyncio.Context) -> Child:
        metrics = Metrics(http=False)
        engine = LocalEngine(settings, metrics, self.loader, loop="external")
        with contextlib.suppress(RuntimeError):  # its model failed: reported in hello, as a model process does
            await asyncio.to_thread(engine.load)
        child = ServerThread(ModelServer(engine, metrics, address, zmq.Context.shadow(ctx.underlying)))
        engine.watch(child.fatal)
        return child
