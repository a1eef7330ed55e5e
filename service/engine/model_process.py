"""The model process: the engine (each model's batcher, tokenizer and backend) behind a ZeroMQ ROUTER socket.

The API process starts it (service/engine/remote.py) so that HTTP parsing and the model's own Python work run
under two GILs on two cores instead of taking turns on one. It loads every model, then binds and answers; it
exits 3 when its watchdog finds a dead or hung inference thread, and 0 when its parent process is gone.

Run by the API process: `python -m service.engine.model_process ADDRESS` with the settings in
MOE_MODEL_PROCESS_SETTINGS (JSON).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from typing import Any

import orjson
import zmq
import zmq.asyncio

from service.config import Settings
from service.engine import ipc
from service.engine.registry import Engine
from service.errors import ErrorKind, ServiceError
from service.metrics import Metrics

log = logging.getLogger("moe_serve.model_process")
SETTINGS_ENV = "MOE_MODEL_PROCESS_SETTINGS"


def describe(engine: Engine) -> dict[str, Any]:
    """What the API process needs to know of the models, sent once when the engine is ready."""
    models = {
        name: {"info": ipc.info_to_dict(w.info), "kind": w.kind, "device": w.device, "evaluation": w.evaluation}
        for name, w in engine.workers.items()
    }
    return {"models": models, "failed": engine.failed, "default_model": engine.default_model, "pid": os.getpid()}


class ModelServer:
    def __init__(self, engine: Engine, metrics: Metrics, address: str) -> None:
        self.engine, self.metrics, self.address = engine, metrics, address
        self.tasks: dict[tuple[bytes, int], asyncio.Task] = {}

    async def run(self) -> None:
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self.address)
        self.sock = sock
        log.info("model process %d serving %s", os.getpid(), ", ".join(self.engine.workers))
        try:
            while True:
                peer, *frames = await sock.recv_multipart(copy=True)
                header, _ = ipc.decode(frames)
                if header["op"] == "stop":
                    return
                self._dispatch(peer, header)
        finally:
            for task in self.tasks.values():
                task.cancel()
            sock.close()
            ctx.term()

    def _dispatch(self, peer: bytes, header: dict[str, Any]) -> None:
        op, key = header["op"], (peer, header["id"])
        if op == "cancel":  # the client went away: its queued texts are dropped (ModelWorker.classify)
            task = self.tasks.get(key)
            if task is not None:
                task.cancel()
            return
        task = asyncio.ensure_future(self._answer(peer, header))
        self.tasks[key] = task
        task.add_done_callback(lambda _: self.tasks.pop(key, None))

    async def _answer(self, peer: bytes, header: dict[str, Any]) -> None:
        rid = header["id"]
        try:
            reply = await self._handle(header)
        except ServiceError as err:
            reply = ipc.error_reply(rid, err)
        except asyncio.CancelledError:
            return  # nobody is waiting for this answer
        except Exception as exc:
            log.exception("model process: %s failed", header["op"])
            reply = ipc.error_reply(rid, ServiceError(ErrorKind.INTERNAL, f"model process error: {type(exc).__name__}"))
        await self.sock.send_multipart([peer, *reply], copy=False)

    async def _handle(self, h: dict[str, Any]) -> ipc.Frames:
        op, rid = h["op"], h["id"]
        if op == "classify":
            worker = self.engine.get(h["model"])
            result = await worker.classify(
                h["texts"], truncate=h["truncate"], return_routing=h["routing"], timeout_s=h["timeout_s"]
            )
            return ipc.result_reply(rid, result)
        if op == "hello":
            return ipc.encode({"id": rid, "ok": True, **describe(self.engine)})
        if op == "ping":
            return ipc.encode({"id": rid, "ok": True})
        if op == "queued":
            return ipc.encode({"id": rid, "ok": True, "texts": await self.engine.get(h["model"]).queued()})
        if op == "routing":
            return ipc.encode({"id": rid, "ok": True, "snapshot": await self.engine.get(h["model"]).routing()})
        if op == "metrics":
            return ipc.encode({"id": rid, "ok": True}, self.metrics.exposition())
        raise ServiceError(ErrorKind.INTERNAL, f"model process: unknown operation {op!r}")


def _exit_with_parent(parent: int) -> None:
    """An orphaned model process holds memory and maybe a GPU for nobody: leave when the API process is gone."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def main(address: str) -> int:
    settings = Settings(**orjson.loads(os.environ[SETTINGS_ENV]))
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), name="parent-watch", daemon=True).start()
    metrics = Metrics(http=False)
    engine = Engine(settings, metrics)
    try:
        engine.load()
    except Exception as exc:
        log.critical("no model could be served: %s", exc)
        return 2

    def fatal(why: str) -> None:
        # A dead or hung inference thread cannot be recovered in-process: exit, and the API process follows.
        logging.shutdown()
        os._exit(3)

    engine.watch(fatal)
    try:
        import uvloop

        uvloop.run(ModelServer(engine, metrics, address).run())
    except ImportError:
        asyncio.run(ModelServer(engine, metrics, address).run())
    engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
