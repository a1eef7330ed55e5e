"""Backends behind one interface (base.Backend). Imported lazily so the API layer never imports torch, and the ONNX
backend never does either.

The variants (backend x precision x device, and what each needs) are one table: service/backends/variants.py.
Which one runs a model: the setting (MOE_BACKEND / MOE_PRECISION, or --backend / --precision), whose default `auto`
takes the model folder's own choice, config.json "serving": {"backend", "precision"} (written by `moe-serve export
--choose` from measurements), and the reference variant (torch fp32) when the folder has none.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from service.backends.variants import AUTO, BACKENDS, PRECISIONS, REFERENCE, device_kind, devices, find
from service.modeling.folder import ModelFolder, ModelFolderError, read_folder

if TYPE_CHECKING:
    from service.backends.base import Backend

log = logging.getLogger(__name__)


def resolve(folder: ModelFolder, kind: str = AUTO, precision: str = AUTO) -> tuple[str, str]:
    """(backend, precision) for this folder: explicit settings first, then the folder's "serving", then torch fp32."""
    model_dir, serving = folder.path, folder.serving
    chosen = find(serving.get("backend"), serving.get("precision"))
    # The choice matters (and its graph is built) only where the settings leave the variant to it.
    uses_choice = kind == AUTO or (precision == AUTO and serving.get("backend") == kind)
    graph = chosen.graph if chosen and uses_choice else None
    if graph and not (model_dir / graph).is_file() and not build_graphs(model_dir, graph):
        # Without the chosen graph and no way to build it here, `auto` serves torch rather than failing.
        choice = f"{serving.get('backend')} {serving.get('precision')}"
        log.warning("%s: serving choice %s needs %s (run `moe-serve export`); using torch", model_dir, choice, graph)
        serving = {}
    if kind == AUTO:
        kind = serving.get("backend", REFERENCE.backend)
        if precision == AUTO:
            precision = serving.get("precision", REFERENCE.precision)
    if precision == AUTO:
        precision = (
            serving.get("precision", REFERENCE.precision) if serving.get("backend") == kind else REFERENCE.precision
        )
    if kind not in BACKENDS:
        raise ValueError(f"unknown backend {kind!r}; available: {', '.join(BACKENDS)}")
    if precision not in PRECISIONS[kind]:
        raise ValueError(f"backend {kind} runs {' or '.join(PRECISIONS[kind])}, not {precision!r}")
    return kind, precision


def build_graphs(model_dir: Path, graph: str) -> bool:
    """Graphs are build artefacts, not committed (they are derived from the weights, and the int8 graph alone would
    double a folder): the folder's chosen one is exported on first load, into the folder (~15 s for MiniLM; the
    Docker image builds them at image build). False where it cannot be (read-only folder, no torch installed)."""
    log.info("%s: building %s from the weights (moe-serve export), once", model_dir, graph)
    try:
        from service.modeling.onnx_export import export_model

        export_model(model_dir, int8=True)
    except (ImportError, OSError, ModelFolderError) as exc:  # then loading torch says what is wrong, if anything
        log.warning("%s: cannot build %s here: %s", model_dir, graph, exc)
        return False
    return (model_dir / graph).is_file()


def measured_budget(folder: ModelFolder, kind: str, precision: str, device: str) -> int | None:
    """The folder's token budget per batch, measured by `moe-serve export --choose` on its chosen variant on the
    CPU: it holds for that variant there only (a GPU wants far bigger batches)."""
    serving = folder.serving
    if device_kind(device) != "cpu" or (serving.get("backend"), serving.get("precision")) != (kind, precision):
        return None
    return serving.get("max_batch_tokens")


def load_backend(
    model_dir: str | Path | ModelFolder,
    device: str = AUTO,
    kind: str = AUTO,
    threads: int | None = None,
    precision: str = AUTO,
) -> Backend:
    folder = read_folder(model_dir)  # config.json read once for the whole load
    kind, precision = resolve(folder, kind, precision)
    backend = _build(folder, device, kind, threads, precision)
    backend.info.batch_tokens = measured_budget(folder, kind, precision, backend.device)
    return backend


def _build(folder: ModelFolder, device: str, kind: str, threads: int | None, precision: str) -> Backend:
    if kind == "torch":
        from service.backends.torch_backend import TorchBackend, set_threads

        set_threads(threads)
        return TorchBackend(folder, device, precision)
    if device != AUTO and device_kind(device) not in devices(kind):
        able = [b for b in BACKENDS if device_kind(device) in devices(b)]
        needs = " or ".join(f"--backend {b}" for b in able) or "another device"
        raise ValueError(f"the {kind} backend runs on {' or '.join(devices(kind))}; device {device!r} needs {needs}")
    from service.backends.onnx_backend import OnnxBackend

    return OnnxBackend(folder, precision, threads)
