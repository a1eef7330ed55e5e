"""A model process's loop: a LocalEngine served behind a ZeroMQ ROUTER socket (ipc:// between processes, inproc://
when the tests run it on a thread of their own process).

One thread does everything: reads requests, tokenizes and queues them, follows scheduler.next_step (run a batch,
keep warm, or wait, here by polling the socket), sends results. No event loop and no inference thread to hand work
between: while a batch runs, new requests wait in the socket and are read right after it, into the next batch.
Measured against an asyncio loop with an inference thread, that loop spun at 100% of a core handing work over
(epoll returning at once), and a short request took more hops.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import zmq

from service.engine import ipc
from service.engine.local_engine import LocalEngine
from service.engine.local_model import routing_snapshot
from service.engine.request_queue import PendingRequest
from service.engine.results import ClassifyResult
from service.engine.scheduler import Run, Tick, Wait
from service.errors import ErrorKind, ServiceError
from service.metrics import Metrics

log = logging.getLogger("moe_serve.model_process")
IDLE_POLL_S = 1.0  # an idle loop still looks at its stop flag this often


def configure(sock: zmq.Socket) -> None:
    """No high-water mark: at the default (1,000 messages) a ROUTER silently drops replies to a busy reader, and the
    API would wait for them until its deadline. What is in flight is bounded by admission control (429) already."""
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)


def describe(engine: LocalEngine) -> dict[str, Any]:
    """What the API process needs to know of the models, sent once when the engine is ready."""
    models = {
        name: {
            "info": ipc.info_to_dict(m.info),
            "kind": m.kind,
            "device": m.device,
            "evaluation": m.evaluation,
            "experts": m.experts,
        }
        for name, m in engine.models.items()
    }
    return {"models": models, "failed": engine.failed, "pid": os.getpid()}


class ModelServer:
    def __init__(self, engine: LocalEngine, metrics: Metrics, address: str, ctx: zmq.Context | None = None) -> None:
        self.engine, self.metrics, self.address = engine, metrics, address
        self.ctx = ctx or zmq.Context()
        self.models = list(engine.models.values())
        self.pending: dict[tuple[bytes, int], PendingRequest] = {}  # for cancellation
        self.stopping = False

    def run(self) -> None:
        self.sock = self.ctx.socket(zmq.ROUTER)
        configure(self.sock)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a reply to a vanished peer raises instead of vanishing
        self.sock.bind(self.address)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        log.info("model process %d serving %s", os.getpid(), ", ".join(self.engine.models))
        try:
            while not self.stopping:
                self._turn()
        finally:
            self.sock.close()

    def _turn(self) -> None:
        steps = [(m, m.decide()) for m in self.models]
        runs = [m for m, step in steps if isinstance(step, Run)]
        ticks = [m for m, step in steps if isinstance(step, Tick)]
        for m in runs:
            m.run_batch()
        for m in [] if runs else ticks:  # idle for a tick: keep the engine warm (scheduler.py)
            m.tick()
        if runs or ticks:
            if self._poll(0):  # texts that came during the batch join the queue before the next decision
                self._drain()
            return
        waits = [step.seconds for _, step in steps if isinstance(step, Wait) and step.seconds is not None]
        if self._poll(min(waits, default=IDLE_POLL_S)):
            self._drain()

    def _poll(self, wait_s: float) -> bool:
        return bool(self.poller.poll(max(0, int(wait_s * 1000))))

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
        elif op == "stop":
            self.stopping = True
        else:
            self._send(peer, ipc.encode({"id": rid, "ok": True, **self._query(op, h)}, *self._buffers(op)))

    def _query(self, op: str, h: dict[str, Any]) -> dict[str, Any]:
        if op == "hello":
            return describe(self.engine)
        if op in ("ping", "metrics"):
            return {}
        if op == "queued":
            return {"texts": len(self.engine.get(h["model"]).queue)}
        if op == "routing":
            model = self.engine.get(h["model"])
            return {"snapshot": routing_snapshot(model.stats, model.task_stats)}
        raise ServiceError(ErrorKind.INTERNAL, f"model process: unknown operation {op!r}")

    def _buffers(self, op: str) -> list[bytes]:
        return [self.metrics.exposition()] if op == "metrics" else []

    def _classify(self, peer: bytes, h: dict[str, Any]) -> None:
        key = (peer, h["id"])

        def finish(outcome: ClassifyResult | ServiceError) -> None:
            self.pending.pop(key, None)
            if isinstance(outcome, ServiceError):
                self._send(peer, ipc.error_reply(h["id"], outcome))
            else:
                self._send(peer, ipc.result_reply(h["id"], outcome, model.texts_per_s))

        model = self.engine.get(h["model"])
        self.pending[key] = model.submit(
            h["texts"],
            truncate=h["truncate"],
            long_text=h["long_text"],
            return_routing=h["routing"],
            timeout_s=h["timeout_s"],
            finish=finish,
            tasks=h.get("tasks"),
        )
