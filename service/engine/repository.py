"""The model repository (the Open Inference Protocol's repository extension, as Triton has it): every folder's
state, version and reason, and the orchestration of load, unload, zero-downtime reload and restart after a crash.

A reload starts a second model process, warms it, switches new requests to it and lets the old one finish what it
holds before stopping it; a folder that fails to load leaves the old version serving. A crash restarts the process
in place after a backoff (service/engine/supervisor.py) until max_restarts crashes within the window make the model
FAILED. The state machine (`Entry.move`) is pure; `Repository` drives the engine (service/engine/remote.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

from service.engine.folder_watch import Poller, snapshot
from service.engine.supervisor import CrashLog, RestartPolicy
from service.errors import ErrorKind, ServiceError, model_not_found
from service.modeling.layout import CONFIG_FILE

if TYPE_CHECKING:
    from service.engine.remote import RemoteEngine, RemoteModel
    from service.metrics import Metrics

log = logging.getLogger(__name__)


class ModelState(str, Enum):
    UNAVAILABLE = "UNAVAILABLE"  # not loaded: never, unloaded, or its load failed with nothing serving
    LOADING = "LOADING"
    READY = "READY"  # also while a new version loads beside it
    RESTARTING = "RESTARTING"  # its process died; a new one starts after the backoff
    UNLOADING = "UNLOADING"
    FAILED = "FAILED"  # crashed max_restarts times within the window; a load tries again


S = ModelState
MOVES: dict[ModelState, set[ModelState]] = {
    S.UNAVAILABLE: {S.LOADING},
    S.LOADING: {S.READY, S.UNAVAILABLE},
    S.READY: {S.READY, S.RESTARTING, S.UNLOADING, S.FAILED},
    S.RESTARTING: {S.READY, S.RESTARTING, S.FAILED, S.UNLOADING},
    S.UNLOADING: {S.UNAVAILABLE},
    S.FAILED: {S.LOADING, S.UNAVAILABLE},
}


class LoadError(Exception):
    """A folder could not be loaded (the message is the reason shown in the index)."""


@dataclass
class Entry:
    name: str
    state: ModelState = S.UNAVAILABLE
    version: str | None = None  # of the version serving (or last served)
    reason: str = ""

    def move(self, to: ModelState, reason: str = "") -> None:
        if to not in MOVES[self.state]:
            raise ValueError(f"model {self.name!r}: no move from {self.state.value} to {to.value}")
        self.state, self.reason = to, reason

    def public(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "state": self.state.value, "reason": self.reason}


class Repository:
    def __init__(self, engine: RemoteEngine, metrics: Metrics | None) -> None:
        self.engine, self.metrics, self.settings = engine, metrics, engine.settings
        self.entries: dict[str, Entry] = {}
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._policy = RestartPolicy.from_settings(self.settings)
        self._crashes: dict[str, CrashLog] = {}
        self._next_start: dict[str, float] = {}  # name -> when its restart is due (monotonic), for Retry-After
        self._tasks: set[asyncio.Task] = set()

    def entry(self, name: str) -> Entry:
        return self.entries.setdefault(name, Entry(name))

    def index(self) -> list[dict[str, Any]]:
        """Every folder of the models directory and every model known, sorted by name."""
        on_disk = snapshot(self.settings.models_dir, self.settings.models)
        return [self.entry(n).public() for n in sorted(set(on_disk) | set(self.entries))]

    async def start(self, names: list[str]) -> None:
        await asyncio.gather(*(self.load(n) for n in names), return_exceptions=True)
        if self.settings.model_control == "poll":
            self._spawn_task(Poller(self).run())

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _count(self, what: str, name: str, outcome: str) -> None:
        if self.metrics is not None:
            getattr(self.metrics, f"model_{what}").labels(name, outcome).inc()

    # -- load / reload / unload ----------------------------------------------------------------------------------
    async def load(self, name: str) -> Entry:
        """Load the folder, or reload it beside the version serving (switched over once warm). LoadError (with the
        old version still serving, if there was one) when the folder cannot serve."""
        if name.startswith(".") or "/" in name or not (self.settings.models_dir / name / CONFIG_FILE).is_file():
            raise model_not_found(name, sorted(snapshot(self.settings.models_dir, self.settings.models)))
        async with self._locks[name]:
            entry = self.entry(name)
            serving = name in self.engine.models and entry.state in (S.READY, S.RESTARTING)
            what = "reloads" if serving else "loads"
            if not serving:
                entry.move(S.LOADING)
            try:
                model = await self.engine.spawn(name)
            except LoadError as exc:
                self._count(what, name, "error")
                if serving:
                    entry.reason = f"reload failed, version {entry.version} still serves: {exc}"
                else:
                    entry.move(S.UNAVAILABLE, f"load failed: {exc}")
                    self.engine.failed[name] = str(exc)
                log.error("model %s: %s", name, entry.reason)
                raise
            old = self.engine.serve(model)
            if entry.state is not S.READY:
                entry.move(S.READY)
            entry.version, entry.reason = model.version, ""
            self._crashes.pop(name, None)
            self._count(what, name, "ok")
            self._set_version(name, model.version, old.version if old else None)
            log.info("model %s version %s serving", name, model.version)
        if old is not None:  # outside the lock: draining may take a while
            await self.engine.retire(old, self.settings.request_timeout_s)
        return entry

    async def unload(self, name: str) -> Entry:
        entry = self.entries.get(name)
        if entry is None or name not in self.engine.models:
            raise ServiceError(ErrorKind.MODEL_NOT_FOUND, f"model {name!r} is not loaded", field="model")
        async with self._locks[name]:
            entry.move(S.UNLOADING)
            model = self.engine.withdraw(name)
            self._set_version(name, None, entry.version)
            try:
                if model is not None:
                    await self.engine.retire(model, self.settings.request_timeout_s)
                self._count("unloads", name, "ok")
            except Exception:
                self._count("unloads", name, "error")
                raise
            finally:
                entry.move(S.UNAVAILABLE, "unloaded")
        return entry

    def _set_version(self, name: str, new: str | None, old: str | None) -> None:
        if self.metrics is None:
            return
        if old is not None and old != new:
            with contextlib.suppress(KeyError):
                self.metrics.model_version.remove(name, old)
        if new is not None:
            self.metrics.model_version.labels(name, new).set(1)

    # -- crash recovery ------------------------------------------------------------------------------------------
    def crashed(self, name: str, why: str) -> None:
        """A serving model's process died: restart it after the backoff, or give up."""
        self._spawn_task(self._restart(name, self.engine.models[name], why))

    def retry_after_s(self, name: str) -> float:
        return max(0.0, self._next_start.get(name, 0.0) - time.monotonic())

    async def _restart(self, name: str, dead: RemoteModel, why: str) -> None:
        async with self._locks[name]:
            entry = self.entry(name)
            crashes = self._crashes.setdefault(name, CrashLog(self._policy))
            # A reload that held the lock may have replaced the dead version already: nothing left to restart then.
            while self.engine.models.get(name) is dead:
                delay = crashes.crashed(time.monotonic())
                if delay is None:
                    return self._give_up(entry, why, len(crashes.times))
                entry.move(S.RESTARTING, f"{why}; restart in {delay:g} s")
                self._next_start[name] = time.monotonic() + delay
                await asyncio.sleep(delay)
                try:
                    model = await self.engine.spawn(name)
                except LoadError as exc:
                    self._count("restarts", name, "error")
                    why = f"restart failed: {exc}"
                    continue
                old = self.engine.serve(model)
                if old is not None:
                    await old.process.close()  # already dead: this releases its socket
                entry.move(S.READY, f"restarted after: {why}")
                self._set_version(name, model.version, entry.version)
                entry.version = model.version
                self._count("restarts", name, "ok")
                return None

    def _give_up(self, entry: Entry, why: str, crashes: int) -> None:
        reason = f"{crashes} crashes within {self._policy.window_s:g} s; last: {why}"
        entry.move(S.FAILED, reason)
        model = self.engine.withdraw(entry.name)
        if model is not None:
            self._spawn_task(model.process.close())
        self.engine.failed[entry.name] = reason
        self._set_version(entry.name, None, entry.version)
        self._count("restarts", entry.name, "gave_up")
        log.critical("model %s failed: %s", entry.name, reason)
        if not self.engine.models:
            self.engine.stop_serving(f"every model has failed (last: {entry.name}: {reason})")
