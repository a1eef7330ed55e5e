"""The model process: one model's engine (batcher, tokenizer and backend) behind a ZeroMQ ROUTER socket.

The API process starts one per model folder (service/engine/remote.py), so that HTTP parsing and the engine's own
Python work run under two GILs instead of taking turns on one, and a model's batches never wait behind another
model's. It loads and warms its model, then binds and answers (a model that fails to load is reported in the
first answer); it exits 3 when its watchdog finds a batch running past worker_hang_s, and 0 when its parent
process is gone.

Run by the API process: `python -m service.engine.model_process ADDRESS` with the settings in
MOE_MODEL_PROCESS_SETTINGS (JSON).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any

import orjson
import zmq

from service.config import Settings
from service.engine import ipc
from service.engine.batcher import ClassifyResult, ModelWorker, PendingRequest
from service.engine.registry import Engine
from service.errors import ErrorKind, ServiceError
from service.metrics import Metrics

log = logging.getLogger("moe_serve.model_process")
SETTINGS_ENV = "MOE_MODEL_PROCESS_SETTINGS"
# The engine yields the CPU to the API process when both want it: HTTP work is light and latency-bound (accepting,
# answering 429s and health checks under overload), the engine's is throughput work.
NICE = 5


def configure(sock: zmq.Socket) -> None:
    """No high-water mark: at the default (1,000 messages) a ROUTER silently drops replies to a busy reader, and the
    API would wait for them until its deadline. What is in flight is bounded by admission control (429) already."""
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)


def describe(engine: Engine) -> dict[str, Any]:
    """What the API process needs to know of the models, sent once when the engine is ready."""
    models = {
        name: {"info": ipc.info_to_dict(w.info), "kind": w.kind, "device": w.device, "evaluation": w.evaluation}
        for name, w in engine.workers.items()
    }
    return {"models": models, "failed": engine.failed, "pid": os.getpid()}


class ModelServer:
    """One thread does everything: reads requests, tokenizes and queues them, runs batches, sends results. No event
    loop and no inference thread to hand work between: while a batch runs, new requests wait in the socket and
    are read right after it, into the next batch. Measured against an asyncio loop with an inference thread, that
    loop spun at 100% of a core handing work over (epoll returning at once), and a short request took more hops."""

    def __init__(self, engine: Engine, metrics: Metrics, address: str) -> None:
        self.engine, self.metrics, self.address = engine, metrics, address
        self.workers = list(engine.workers.values())
        self.pending: dict[tuple[bytes, int], PendingRequest] = {}  # for cancellation
        self.stopping = False
        self.busy = False  # the last turn ran batches

    def run(self) -> None:
        ctx = zmq.Context()
        self.sock = ctx.socket(zmq.ROUTER)
        configure(self.sock)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a reply to a vanished peer raises instead of vanishing
        self.sock.bind(self.address)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        log.info("model process %d serving %s", os.getpid(), ", ".join(self.engine.workers))
        try:
            while not self.stopping:
                self._turn()
        finally:
            self.sock.close()
            ctx.term()

    def _turn(self) -> None:
        busy = [w for w in self.workers if w.queued_texts]
        was_busy, self.busy = self.busy, bool(busy)
        if not busy:
            ticks = [(due, w) for w in self.workers if (due := w.tick_due_in()) is not None]
            wait_s = min(due for due, _ in ticks) if ticks else None
            if self._poll(wait_s):
                self._drain()
            else:
                for _, w in ticks:
                    w.tick()  # idle for a tick: keep the engine warm (ModelWorker.keep_warm_s)
            return
        for w in busy:
            if was_busy:  # an idle engine never waits: a lone request runs at once
                self._fill(w)
            w.run_batch()
        if self._poll(0):
            self._drain()

    def _poll(self, wait_s: float | None) -> bool:
        timeout = None if wait_s is None else max(0, int(wait_s * 1000))
        return bool(self.poller.poll(timeout))

    def _fill(self, w: ModelWorker) -> None:
        """A busy engine gives a not-yet-full batch up to max_wait_ms to fill (ModelWorker._wait_for_more)."""
        end = time.monotonic() + w.settings.max_wait_ms / 1000
        while not w.batch_full and not self.stopping and (left := end - time.monotonic()) > 0:
            if self._poll(left):
                self._drain()

    def _drain(self) -> None:
        """Read every request waiting in the socket."""
        while not self.stopping:
            try:
                peer, *frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            header, _ = ipc.decode(frames)
            try:
                self._handle(peer, header)
            except ServiceError as err:
                self._send(peer, ipc.error_reply(header["id"], err))
            except Exception as exc:
                log.exception("model process: %s failed", header.get("op"))
                err = ServiceError(ErrorKind.INTERNAL, f"model process error: {type(exc).__name__}")
                self._send(peer, ipc.error_reply(header["id"], err))

    def _send(self, peer: bytes, frames: ipc.Frames) -> None:
        try:
            self.sock.send_multipart([peer, *frames], copy=False)
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the API process is gone; it has no use for the answer
            log.warning("model process: reply not delivered: %s", exc)

    def _handle(self, peer: bytes, h: dict[str, Any]) -> None:
        op, rid = h["op"], h["id"]
        if op == "classify":
            self._classify(peer, h)
        elif op == "cancel":  # the client went away: its queued texts are dropped when the next batch is cut
            req = self.pending.pop((peer, rid), None)
            if req is not None:
                req.cancelled = True
        elif op == "hello":
            self._send(peer, ipc.encode({"id": rid, "ok": True, **describe(self.engine)}))
        elif op == "ping":
            self._send(peer, ipc.encode({"id": rid, "ok": True}))
        elif op == "queued":
            self._send(peer, ipc.encode({"id": rid, "ok": True, "texts": self.engine.get(h["model"]).queued_texts}))
        elif op == "routing":
            snapshot = self.engine.get(h["model"]).stats.snapshot()
            self._send(peer, ipc.encode({"id": rid, "ok": True, "snapshot": snapshot}))
        elif op == "metrics":
            self._send(peer, ipc.encode({"id": rid, "ok": True}, self.metrics.exposition()))
        elif op == "stop":
            self.stopping = True
        else:
            raise ServiceError(ErrorKind.INTERNAL, f"model process: unknown operation {op!r}")

    def _classify(self, peer: bytes, h: dict[str, Any]) -> None:
        key = (peer, h["id"])

        def finish(outcome: ClassifyResult | ServiceError) -> None:
            self.pending.pop(key, None)
            if isinstance(outcome, ServiceError):
                self._send(peer, ipc.error_reply(h["id"], outcome))
            else:
                self._send(peer, ipc.result_reply(h["id"], outcome, worker.texts_per_s))

        worker = self.engine.get(h["model"])
        self.pending[key] = worker.submit(
            h["texts"], truncate=h["truncate"], return_routing=h["routing"], timeout_s=h["timeout_s"], finish=finish
        )


def _exit_with_parent(parent: int) -> None:
    """An orphaned model process holds memory and maybe a GPU for nobody: leave when the API process is gone."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def main(address: str) -> int:
    settings = Settings(**orjson.loads(os.environ[SETTINGS_ENV]))
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), name="parent-watch", daemon=True).start()
    os.nice(NICE)
    metrics = Metrics(http=False)
    engine = Engine(settings, metrics, threads=False)  # ModelServer runs the batches in its own thread
    try:
        engine.load()
    except RuntimeError:
        pass  # its model failed: the reason is in engine.failed, for the API process to report (hello)
    except Exception as exc:
        log.critical("no model could be served: %s", exc)
        return 2

    def fatal(why: str) -> None:
        # A dead or hung inference thread cannot be recovered in-process: exit, and the API process follows.
        logging.shutdown()
        os._exit(3)

    engine.watch(fatal)
    ModelServer(engine, metrics, address).run()
    engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
