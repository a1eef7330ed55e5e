"""The variant table (service/backends/variants.py) and what is derived from it: settings, CLI choices, resolve(),
the ONNX graph names and the bench's variants."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest

from service.backends import load_backend, measured_budget, resolve
from service.backends.variants import (
    ALL_PRECISIONS,
    BACKENDS,
    PRECISIONS,
    REFERENCE,
    VARIANTS,
    find,
    graphs,
    on_device,
)
from service.bench.backends import available
from service.cli import build_parser
from service.config import Settings
from service.modeling.config import ModelConfig
from service.modeling.folder import ModelFolder
from service.modeling.layout import ONNX_FILE, ONNX_INT8_FILE, WEIGHTS_FILE


def test_table_rows_are_unique_and_the_reference_comes_first() -> None:
    keys = [(v.backend, v.precision, v.device) for v in VARIANTS]
    assert len(keys) == len(set(keys))
    assert (REFERENCE.backend, REFERENCE.precision, REFERENCE.device) == ("torch", "fp32", "cpu")
    assert BACKENDS == ("torch", "onnx")
    assert PRECISIONS == {"torch": ("fp32", "bf16"), "onnx": ("fp32", "int8")}
    assert find("torch", "bf16", "cuda:1") is not None and find("onnx", "int8", "cuda") is None
    assert find("torch", "bf16").cpu_feature == "avx512_bf16"  # type: ignore[union-attr]


def test_graph_names_come_from_the_table() -> None:
    from service.backends.onnx_backend import GRAPHS  # imports no onnxruntime until a backend is built

    assert GRAPHS == graphs("onnx") == {"fp32": ONNX_FILE, "int8": ONNX_INT8_FILE}
    assert {v.file for v in VARIANTS if v.backend == "torch"} == {WEIGHTS_FILE}


def test_settings_and_cli_choices_come_from_the_table() -> None:
    fields = Settings.model_fields
    assert get_args(fields["backend"].annotation) == ("auto", *BACKENDS)
    assert get_args(fields["precision"].annotation) == ("auto", *ALL_PRECISIONS)
    parser = build_parser()
    for backend in BACKENDS:
        for precision in PRECISIONS[backend]:
            args = parser.parse_args(["evaluate", "--model", "m", "--backend", backend, "--precision", precision])
            assert (args.backend, args.precision) == (backend, precision)
            args = parser.parse_args(["serve", "--backend", backend, "--precision", precision])
            assert (args.backend, args.precision) == (backend, precision)
    defaults = parser.parse_args(["evaluate", "--model", "m"])
    assert (defaults.backend, defaults.precision) == (REFERENCE.backend, REFERENCE.precision)
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--backend", "tensorrt"])


def test_bench_measures_the_cpu_variants_whose_files_are_there(tmp_path: Path) -> None:
    (tmp_path / WEIGHTS_FILE).write_bytes(b"")
    assert [(v.backend, v.precision) for v in available(tmp_path)] == [("torch", "fp32"), ("torch", "bf16")]
    (tmp_path / ONNX_FILE).write_bytes(b"")
    (tmp_path / ONNX_INT8_FILE).write_bytes(b"")
    assert available(tmp_path) == list(on_device("cpu"))
    assert all(v.device == "cpu" for v in available(tmp_path))


def _folder(tmp_path: Path, serving: dict | None, *files: str) -> ModelFolder:
    """A folder's record with its measured "serving" choice and the graph files it holds."""
    tmp_path.mkdir(exist_ok=True)
    for name in files:
        (tmp_path / name).write_bytes(b"")
    return ModelFolder(tmp_path, ModelConfig(vocab_size=8, num_labels=2), ("a", "b"), serving=serving or {})


def test_resolve_settings_first_then_the_folder_then_the_reference(tmp_path: Path) -> None:
    assert resolve(_folder(tmp_path / "none", None)) == ("torch", "fp32")
    chosen = _folder(tmp_path / "chosen", {"backend": "onnx", "precision": "int8"}, ONNX_INT8_FILE)
    assert resolve(chosen) == ("onnx", "int8")
    assert resolve(chosen, "onnx") == ("onnx", "int8")  # auto precision: the folder's, for the folder's backend
    assert resolve(chosen, "torch") == ("torch", "fp32")
    assert resolve(chosen, "auto", "fp32") == ("onnx", "fp32")
    # The chosen graph is a build artefact: without it, and where it cannot be built (here, a folder without
    # weights), `auto` serves the reference.
    assert resolve(_folder(tmp_path / "no-graph", {"backend": "onnx", "precision": "int8"})) == ("torch", "fp32")


def test_resolve_and_load_refuse_what_the_table_lacks(tmp_path: Path) -> None:
    folder = _folder(tmp_path, None)
    with pytest.raises(ValueError, match="runs fp32 or bf16"):
        resolve(folder, "torch", "int8")
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'; available: torch, onnx"):
        resolve(folder, "tensorrt")
    with pytest.raises(ValueError, match="device 'cuda:0' needs --backend torch"):
        load_backend(folder, "cuda:0", "onnx")


def test_the_folder_s_token_budget_holds_for_its_variant_on_the_cpu_only(tmp_path: Path) -> None:
    """`export --choose` measured the budget on the chosen variant on the CPU: another variant or a GPU gets the
    server's default (None here)."""
    folder = _folder(tmp_path, {"backend": "onnx", "precision": "int8", "max_batch_tokens": 2048}, ONNX_INT8_FILE)
    assert measured_budget(folder, "onnx", "int8", "cpu") == 2048
    assert measured_budget(folder, "onnx", "fp32", "cpu") is None
    assert measured_budget(folder, "torch", "int8", "cpu") is None
    assert measured_budget(folder, "onnx", "int8", "cuda:0") is None
    older = _folder(tmp_path / "older", {"backend": "onnx", "precision": "int8"})  # chosen before budgets were
    assert measured_budget(older, "onnx", "int8", "cpu") is None
