"""Backends behind one interface (base.Backend). Imported lazily so the API layer never imports torch, and the ONNX
backend never does either.

Which backend and precision run a model: the setting (MOE_BACKEND / MOE_PRECISION, or --backend / --precision),
whose default `auto` takes the model folder's own choice, config.json "serving": {"backend", "precision"} (written
by `moe-serve export --choose` from measurements), and torch fp32 when the folder has none.
"""

from __future__ import annotations

import logging
from pathlib import Path

from service.backends.base import Backend
from service.backends.onnx_backend import GRAPHS  # the precision -> graph file table (imports no onnxruntime)
from service.modeling.folder import ModelFolder, read_folder

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnx")
PRECISIONS = {"torch": ("fp32", "bf16"), "onnx": tuple(GRAPHS)}


def resolve(folder: ModelFolder, kind: str = "auto", precision: str = "auto") -> tuple[str, str]:
    """(backend, precision) for this folder: explicit settings first, then the folder's "serving", then torch fp32."""
    model_dir, serving = folder.path, folder.serving
    graph = GRAPHS.get(serving.get("precision")) if serving.get("backend") == "onnx" else None
    if graph and not (model_dir / graph).is_file():
        # Graphs are build artefacts (`moe-serve export`; the Docker image makes them), not committed: without
        # the chosen one, `auto` serves torch rather than failing.
        choice = f"{serving.get('backend')} {serving.get('precision')}"
        log.warning("%s: serving choice %s needs %s (run `moe-serve export`); using torch", model_dir, choice, graph)
        serving = {}
    if kind == "auto":
        kind = serving.get("backend", "torch")
        if precision == "auto":
            precision = serving.get("precision", "fp32")
    if precision == "auto":
        precision = serving.get("precision", "fp32") if serving.get("backend") == kind else "fp32"
    if kind not in BACKENDS:
        raise ValueError(f"unknown backend {kind!r}; available: {', '.join(BACKENDS)}")
    if precision not in PRECISIONS[kind]:
        raise ValueError(f"backend {kind} runs {' or '.join(PRECISIONS[kind])}, not {precision!r}")
    return kind, precision


def load_backend(
    model_dir: str | Path,
    device: str = "auto",
    kind: str = "auto",
    threads: int | None = None,
    precision: str = "auto",
) -> Backend:
    folder = read_folder(model_dir)  # config.json read once for the whole load
    kind, precision = resolve(folder, kind, precision)
    if kind == "torch":
        from service.backends.torch_backend import TorchBackend, set_threads

        set_threads(threads)
        return TorchBackend(folder, device, precision)
    if device not in ("auto", "cpu"):
        raise ValueError(f"the onnx backend runs on the CPU; device {device!r} needs --backend torch")
    from service.backends.onnx_backend import OnnxBackend

    return OnnxBackend(folder, precision, threads)
