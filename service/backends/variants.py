"""The one table of variants: every way to run a model folder (backend x precision x device) and what each needs.

The settings' choices (MOE_BACKEND / MOE_PRECISION), the CLI's choices, `resolve()`'s checks, the ONNX graph file
names, the bench's variants and `moe-serve export --choose` are all derived from VARIANTS: adding a variant is one
row here plus its implementation in the backend. Imports neither torch nor onnxruntime (the settings and the API
read it).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from service.modeling.layout import ONNX_FILE, ONNX_INT8_FILE, WEIGHTS_FILE

AUTO = "auto"  # the setting that defers to the model folder's measured choice (config.json "serving")


@dataclass(frozen=True)
class Variant:
    backend: str  # the implementation: service/backends/<backend>_backend.py
    precision: str  # what it computes in
    device: str  # "cpu" or "cuda" (any cuda:N; torch needs CUDA for it)
    graph: str | None = None  # the exported graph it runs (`moe-serve export` writes it); None: the weights file
    cpu_feature: str | None = None  # the CPU flag (/proc/cpuinfo) that makes it fast; it runs without, slowly

    @property
    def file(self) -> str:
        """The file in the model folder that this variant reads its weights from."""
        return self.graph or WEIGHTS_FILE


# Declarative table. The first row is the reference every other variant is checked against (`--choose`, evaluate).
VARIANTS: tuple[Variant, ...] = (
    Variant("torch", "fp32", "cpu"),
    Variant("torch", "bf16", "cpu", cpu_feature="avx512_bf16"),  # AVX512_BF16 / AMX; emulated (slow) without
    Variant("onnx", "fp32", "cpu", graph=ONNX_FILE),
    Variant("onnx", "int8", "cpu", graph=ONNX_INT8_FILE),
    Variant("torch", "fp32", "cuda"),
    Variant("torch", "bf16", "cuda"),  # tensor cores
)
REFERENCE = VARIANTS[0]


def _unique(names: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))


BACKENDS = _unique(v.backend for v in VARIANTS)
PRECISIONS: dict[str, tuple[str, ...]] = {b: _unique(v.precision for v in VARIANTS if v.backend == b) for b in BACKENDS}
ALL_PRECISIONS = _unique(v.precision for v in VARIANTS)
BACKEND_SETTINGS = (AUTO, *BACKENDS)  # the values of the backend setting and flag
PRECISION_SETTINGS = (AUTO, *ALL_PRECISIONS)


def device_kind(device: str) -> str:
    """ "cuda:1" -> "cuda": the table's device column."""
    return "cuda" if device.startswith("cuda") else device


def find(backend: str | None, precision: str | None, device: str = "cpu") -> Variant | None:
    kind = device_kind(device)
    return next((v for v in VARIANTS if (v.backend, v.precision, v.device) == (backend, precision, kind)), None)


def devices(backend: str) -> tuple[str, ...]:
    return _unique(v.device for v in VARIANTS if v.backend == backend)


def graphs(backend: str) -> dict[str, str]:
    """precision -> graph file of a backend that runs exported graphs (onnx: model.onnx, model.int8.onnx)."""
    return {v.precision: v.graph for v in VARIANTS if v.backend == backend and v.graph is not None}


def on_device(device: str) -> tuple[Variant, ...]:
    """The variants a device runs: what the bench and `--choose` measure (on "cpu")."""
    return tuple(v for v in VARIANTS if v.device == device_kind(device))


def runs_summary() -> str:
    """'torch: fp32, bf16; onnx: fp32, int8' for help texts."""
    return "; ".join(f"{b}: {', '.join(PRECISIONS[b])}" for b in BACKENDS)
