"""The HTTP server process: uvicorn with a shutdown that leaves no accepted connection unanswered.

On SIGTERM or SIGINT, uvicorn alone closes its listening socket at once: connections the kernel had already
accepted but the server had not yet read are reset. Here the server first *drains* for `shutdown_drain_s`: it
keeps accepting, readiness turns 503 (load balancers stop sending), and every new request is answered 503 with
`Connection: close`; then it stops accepting and finishes the requests in flight within `shutdown_grace_s`
(uvicorn's graceful shutdown), and the engine fails what is still queued with 503. A second signal skips the drain.
"""

from __future__ import annotations

import signal
import time
from types import FrameType
from typing import Any

import uvicorn


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: Any, drain_s: float) -> None:
        super().__init__(config)
        self.state = state  # the app's state: `draining` is read by the request middleware and readiness
        self.drain_s = drain_s
        self.drain_until: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_until is None and self.drain_s > 0 and sig in (signal.SIGTERM, signal.SIGINT):
            self.state.draining = True
            self.drain_until = time.monotonic() + self.drain_s
            return
        # Second signal, or no drain: uvicorn's own handling, minus re-raising the signal at exit (exit 0).
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.drain_until is not None and time.monotonic() >= self.drain_until:
            self.should_exit = True
        return await super().on_tick(counter)


def uvicorn_config(app: Any, host: str, port: int, log_level: str, grace_s: float) -> uvicorn.Config:
    """uvloop and httptools named, not left to "auto": they are dependencies (uvicorn[standard]), and a silent
    fallback to asyncio and h11 would cost a good part of the API process's throughput."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=grace_s,
        loop="uvloop",
        http="httptools",
    )


def serve(app: Any, host: str, port: int, log_level: str, drain_s: float, grace_s: float) -> None:
    config = uvicorn_config(app, host, port, log_level, grace_s)
    server = DrainingServer(config, app.state, drain_s)
    app.state.draining = False
    # A dead or hung worker asks the server to stop (no drain: nothing can be served).
    app.state.stop_server = lambda: setattr(server, "should_exit", True)
    server.run()
