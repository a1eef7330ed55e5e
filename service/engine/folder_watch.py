"""Poll mode's view of the models directory: which folders exist and have stayed unchanged for the settle delay,
so a folder still being copied (files appearing, growing) is not read half-written. The signature is cheap (file
names, sizes and modification times, no reading); the version hash is computed only when a folder is loaded.
`Settle` is pure (the caller passes the clock); `snapshot` reads the directory; `Poller` acts on what settled."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from service.modeling.folder import folder_version
from service.modeling.layout import CONFIG_FILE

if TYPE_CHECKING:
    from service.engine.repository import Repository

log = logging.getLogger(__name__)

Signature = tuple[tuple[str, int, int], ...]  # (relative path, size, mtime_ns) of every file, sorted


def signature(folder: Path) -> Signature:
    files = []
    for p in folder.rglob("*"):
        try:
            st = p.stat()
        except FileNotFoundError:  # removed while we looked: the next poll sees the folder as changed
            continue
        if p.is_file():
            files.append((str(p.relative_to(folder)), st.st_size, st.st_mtime_ns))
    return tuple(sorted(files))


def snapshot(models_dir: Path, only: list[str] | None = None) -> dict[str, Signature]:
    """Every model folder (one with a config.json) and its signature; hidden folders are left out (a copy may be
    staged as .name and renamed)."""
    if not models_dir.is_dir():
        return {}
    found = {}
    for p in models_dir.iterdir():
        if p.is_dir() and not p.name.startswith(".") and (p / CONFIG_FILE).is_file() and (not only or p.name in only):
            try:
                found[p.name] = signature(p)
            except FileNotFoundError:  # the folder itself was removed while we looked: it is gone
                continue
    return found


@dataclass
class Settle:
    """Folders whose signature has not changed for settle_s; a folder that vanished counts as gone only after it has
    stayed away as long (a folder replaced by rm + copy is not unloaded and loaded again)."""

    settle_s: float
    _since: dict[str, tuple[Signature | None, float]] = field(default_factory=dict)

    def observe(self, seen: dict[str, Signature], now: float) -> dict[str, Signature | None]:
        """Record one snapshot; return the settled state of every folder known: its signature, or None (gone)."""
        for name in set(self._since) | set(seen):
            sig = seen.get(name)
            prev = self._since.get(name)
            if prev is None or prev[0] != sig:
                self._since[name] = (sig, now)
        settled = {n: sig for n, (sig, since) in self._since.items() if now - since >= self.settle_s}
        for name in [n for n, sig in settled.items() if sig is None]:
            del self._since[name]  # reported gone once
        return settled


class Poller:
    """MOE_MODEL_CONTROL=poll: a settled new folder is loaded, a settled changed one reloaded (unless its version
    hash is the one serving), a removed one unloaded. Each settled signature is acted on once: a folder that fails
    to load is retried when it changes again."""

    def __init__(self, repository: Repository) -> None:
        self.repository = repository
        s = repository.settings
        self.models_dir, self.only, self.every_s = s.models_dir, s.models, s.poll_interval_s
        self.settle = Settle(s.poll_settle_s)
        self.acted: dict[str, Signature] = {}

    async def run(self) -> None:
        engine = self.repository.engine
        first = await asyncio.to_thread(snapshot, self.models_dir, self.only)
        self.acted = {n: sig for n, sig in first.items() if n in engine.models or n in engine.failed}
        while True:
            await asyncio.sleep(self.every_s)
            try:
                await self._poll_once()
            except OSError as exc:  # a folder changed under us (removed mid-read): the next poll sees it settled
                log.warning("poll: %s", exc)

    async def _poll_once(self) -> None:
        seen = await asyncio.to_thread(snapshot, self.models_dir, self.only)
        for name, sig in self.settle.observe(seen, time.monotonic()).items():
            if self.acted.get(name) != sig:
                await self._act(name, sig)

    async def _act(self, name: str, sig: Signature | None) -> None:
        repo = self.repository
        if sig is None:
            self.acted.pop(name, None)
            if name in repo.engine.models:
                log.info("poll: %s was removed: unloading it", name)
                await self._quietly(repo.unload(name))
            return
        self.acted[name] = sig
        entry = repo.entries.get(name)
        if entry is not None and name in repo.engine.models and entry.version is not None:
            version = await asyncio.to_thread(folder_version, self.models_dir / name)
            if version == entry.version:
                return  # touched, not changed
        log.info("poll: %s is new or changed: loading it", name)
        await self._quietly(repo.load(name))

    @staticmethod
    async def _quietly(action: object) -> None:
        try:
            await action  # type: ignore[misc]
        except Exception as exc:  # reported in the index and the log; polling goes on
            log.error("poll: %s", exc)
