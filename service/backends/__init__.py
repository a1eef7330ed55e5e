"""Backends behind one interface (base.Backend). Imported lazily so the API layer never imports torch."""

from __future__ import annotations

from pathlib import Path

from service.backends.base import Backend

BACKENDS = ("torch",)


def load_backend(
    model_dir: str | Path, device: str = "auto", kind: str = "torch", threads: int | None = None
) -> Backend:
    if kind == "torch":
        from service.backends.torch_backend import TorchBackend, set_threads

        set_threads(threads)
        return TorchBackend(str(model_dir), device)
    raise ValueError(f"unknown backend {kind!r}; available: {', '.join(BACKENDS)}")
