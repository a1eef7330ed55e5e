"""ONNX export and the ONNX Runtime backend against the torch fp32 reference; bf16 torch against fp32.

Tolerances: ONNX fp32 probabilities within 1e-4 of torch fp32 with identical routing (the graph computes the same
maths; only summation order differs); bf16 and int8 are judged on agreement, not digits."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from service.backends import load_backend, resolve
from service.modeling.folder import read_folder
from service.modeling.layout import ONNX_FILE, ONNX_INT8_FILE

TOL = 1e-4


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def _sequences(n: int, vocab: int, max_len: int, seed: int) -> list[list[int]]:
    """Lengths and ids unlike the export example (two texts of 12 and 6 tokens), so routing differs too."""
    rng = np.random.default_rng(seed)
    return [rng.integers(5, vocab, rng.integers(1, max_len + 1)).tolist() for _ in range(n)]


@pytest.fixture(params=["tiny", "tiny-bert-moe"])
def exported(request: pytest.FixtureRequest, onnx_models_dir: Path) -> Path:
    folder = onnx_models_dir / request.param
    assert (folder / ONNX_FILE).is_file() and (folder / ONNX_INT8_FILE).is_file()
    return folder


@pytest.mark.parametrize("batch", [1, 7, 33])
def test_onnx_matches_torch_on_new_shapes_and_routing(exported: Path, batch: int) -> None:
    torch_b = load_backend(exported, "cpu", "torch", precision="fp32")
    onnx_b = load_backend(exported, "cpu", "onnx", precision="fp32")
    seqs = _sequences(batch, torch_b.info.architecture["vocab_size"], torch_b.info.max_length, seed=batch)
    ref = torch_b.forward(seqs, return_routing=True)
    got = onnx_b.forward(seqs, return_routing=True)
    np.testing.assert_allclose(_softmax(got.logits), _softmax(ref.logits), atol=TOL, rtol=0)
    assert (got.logits.argmax(1) == ref.logits.argmax(1)).all()
    np.testing.assert_array_equal(got.expert_counts, ref.expert_counts)
    assert ref.routing is not None and got.routing is not None
    for a, b in zip(got.routing, ref.routing, strict=True):
        # The same expert set per token (order within the top-k too) and the same gates.
        np.testing.assert_array_equal(a.expert_ids, b.expert_ids)
        np.testing.assert_allclose(a.gates, b.gates, atol=TOL, rtol=0)


def test_graphs_fuse_attention_and_keep_routers_fp32(exported: Path) -> None:
    """Self-attention is ONNX Runtime's fused Attention (QAttention in int8, its QKV projection int8); the int8
    graph's routers stay plain fp32 MatMuls, so routing is not moved by weight rounding."""
    import onnx

    for graph, attention in ((ONNX_FILE, "Attention"), (ONNX_INT8_FILE, "QAttention")):
        nodes = onnx.load(str(exported / graph)).graph.node
        ops = [n.op_type for n in nodes]
        assert attention in ops and "Softmax" not in ops[: ops.index(attention)], graph
        routers = [n for n in nodes if "/router/" in n.name]
        assert routers and {n.op_type for n in routers} == {"MatMul"}, (graph, {n.op_type for n in routers})


def test_int8_and_bf16_agree_with_fp32(exported: Path) -> None:
    ref_b = load_backend(exported, "cpu", "torch", precision="fp32")
    seqs = _sequences(40, ref_b.info.architecture["vocab_size"], ref_b.info.max_length, seed=3)
    ref = _softmax(ref_b.forward(seqs).logits)
    for kind, precision in (("onnx", "int8"), ("torch", "bf16")):
        b = load_backend(exported, "cpu", kind, precision=precision)
        assert b.info.precision == precision
        got = _softmax(b.forward(seqs).logits)
        # Random ids, not text: a loose bound that still catches a broken graph (e.g. frozen routing).
        assert np.abs(got - ref).max() < 0.15, (kind, precision, np.abs(got - ref).max())
        assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.85, (kind, precision)


def test_backend_choice_follows_settings_then_folder(exported: Path, tmp_path: Path) -> None:
    import json

    assert resolve(read_folder(exported)) == ("torch", "fp32")  # no "serving" in config.json yet
    config = json.loads((exported / "config.json").read_text())
    config["serving"] = {"backend": "onnx", "precision": "int8"}
    folder = tmp_path / "chosen"
    shutil.copytree(exported, folder)
    (folder / "config.json").write_text(json.dumps(config))
    assert resolve(read_folder(folder)) == ("onnx", "int8")
    assert resolve(read_folder(folder), "torch") == ("torch", "fp32")
    assert resolve(read_folder(folder), "onnx", "fp32") == ("onnx", "fp32")
    with pytest.raises(ValueError, match="runs fp32 or bf16"):
        resolve(read_folder(folder), "torch", "int8")
    assert load_backend(folder, "cpu").kind == "onnx"
    # Graphs are build artefacts: a fresh clone has the choice but not the graph, which `auto` then builds once.
    (folder / ONNX_INT8_FILE).unlink()
    assert resolve(read_folder(folder), "torch", "fp32") == ("torch", "fp32")
    assert not (folder / ONNX_INT8_FILE).is_file()  # asked for torch: the folder's choice is not built
    assert resolve(read_folder(folder)) == ("onnx", "int8")
    assert (folder / ONNX_INT8_FILE).is_file()
    assert not [p for p in folder.iterdir() if p.name.startswith(".export-")]  # the scratch folder is gone


def test_auto_serves_torch_where_the_graph_cannot_be_built(exported: Path, tmp_path: Path, monkeypatch) -> None:
    import json

    import service.modeling.onnx_export as onnx_export

    folder = tmp_path / "read-only"
    shutil.copytree(exported, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "serving": {"backend": "onnx", "precision": "int8"}}))
    (folder / ONNX_INT8_FILE).unlink()

    def read_only(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(onnx_export, "export_model", read_only)
    assert resolve(read_folder(folder)) == ("torch", "fp32")


def test_missing_graph_is_named(tiny_model_dir: Path, tmp_path: Path) -> None:
    from service.modeling.folder import ModelFolderError

    folder = tmp_path / "no-onnx"
    shutil.copytree(tiny_model_dir, folder)
    (folder / ONNX_FILE).unlink(missing_ok=True)
    with pytest.raises(ModelFolderError, match=r"missing model\.onnx"):
        load_backend(folder, "cpu", "onnx")


def test_onnx_backend_stops_spinning_after_each_run(exported: Path) -> None:
    """The model process must not keep the API's cores busy between runs (served p50 at 1 connection)."""
    from service.backends.onnx_backend import FORCE_SPINNING_STOP, OnnxBackend

    backend = OnnxBackend(exported, "int8", threads=2)
    assert backend.session.get_session_options().get_session_config_entry(FORCE_SPINNING_STOP) == "1"


def test_onnx_backend_runs_without_torch(exported: Path) -> None:
    """An ONNX-only deployment needs no torch: loading and running the backend imports none."""
    import subprocess
    import sys

    code = (
        "import sys; from service.backends import load_backend; "
        f"b = load_backend({str(exported)!r}, 'cpu', 'onnx'); b.forward([[5, 6, 7]], return_routing=True); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_evaluate_reports_parity_for_another_backend(onnx_models_dir: Path) -> None:
    """`moe-serve evaluate --backend onnx`: the same report, computed by ONNX Runtime, plus parity with torch fp32."""
    from service.modeling.artifacts import load_model
    from service.training.evaluate import evaluate_model

    folder = onnx_models_dir / "tiny-bert-moe"
    bundle = load_model(folder)
    ref = evaluate_model(bundle, None, "test", None)
    got = evaluate_model(bundle, None, "test", None, backend=load_backend(folder, "cpu", "onnx"))
    assert got["engine"] == {"backend": "onnx", "precision": "fp32"}
    p = got["parity"]
    assert p["max_abs_diff"] <= TOL and p["argmax_agreement"] == 1.0 and p["routing_agreement"] >= 0.999
    assert len(p["routing_agreement_per_layer"]) == bundle.model.config.n_layers  # every block is MoE here
    assert min(p["routing_agreement_per_layer"]) >= 0.999
    head = got["headline"]["parity"]
    assert head["max_abs_diff"] <= TOL and head["argmax_agreement"] == 1.0 and head["routing_agreement"] >= 0.999
    assert got["macro_f1"] == ref["macro_f1"] and got["headline"]["macro_f1"] == ref["headline"]["macro_f1"]


def test_masked_dense_graph_matches_torch(onnx_models_dir: Path, tmp_path: Path) -> None:
    """The small-batch masked dense route exported (scripts/masked_dense_graph.py, the graph its figures time):
    fp32 within 1e-4 of torch fp32 with identical routing; int8 judged as the sparse int8 graph is."""
    from scripts.masked_dense_graph import export_both
    from service.bench.dense_yardstick import DenseGraph
    from service.modeling.tokenizer import pad_ids

    folder = onnx_models_dir / "tiny-bert-moe"
    torch_b = load_backend(folder, "cpu", "torch", precision="fp32")
    seqs = _sequences(40, torch_b.info.architecture["vocab_size"], torch_b.info.max_length, seed=5)
    ref = torch_b.forward(seqs, return_routing=True)
    assert ref.routing is not None
    graphs = export_both(folder, tmp_path)
    ids, mask = pad_ids(seqs, torch_b.pad_id)
    for name in ("masked fp32", "masked int8"):
        logits, *routes = DenseGraph(graphs[name]).session.run(None, {"input_ids": ids, "attention_mask": mask})
        got, want = _softmax(logits), _softmax(ref.logits)
        if name == "masked fp32":
            np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
            for experts, r in zip(routes[0::2], ref.routing, strict=True):
                np.testing.assert_array_equal(experts, r.expert_ids)
        else:
            assert np.abs(got - want).max() < 0.15 and (got.argmax(1) == want.argmax(1)).mean() >= 0.85


def test_padded_experts_graph_matches_torch(onnx_models_dir: Path, tmp_path: Path) -> None:
    """The capacity-padded route (scripts/padded_experts.py: every expert in one batched GEMM pair per layer), the
    graph its figures time: fp32 within 1e-4 of torch fp32, routing identical; NNCF's static int8 of the same graph
    in OpenVINO (scripts/static_int8.py's build) judged as the dynamic int8 graph is."""
    pytest.importorskip("nncf", reason="the `openvino` extra")
    from scripts.padded_experts import _PaddedGraphModel
    from scripts.static_int8 import ov_forward, ov_nncf
    from service.bench.dense_yardstick import DenseGraph
    from service.modeling import onnx_export
    from service.modeling.artifacts import load_model
    from service.modeling.tokenizer import pad_ids

    folder = onnx_models_dir / "tiny-bert-moe"
    torch_b = load_backend(folder, "cpu", "torch", precision="fp32")
    seqs = _sequences(40, torch_b.info.architecture["vocab_size"], torch_b.info.max_length, seed=6)
    ref = torch_b.forward(seqs, return_routing=True)
    assert ref.routing is not None
    loaded = load_model(folder)
    raw = onnx_export.export_graph(loaded.model, tmp_path / "raw.onnx", _PaddedGraphModel)
    fp32 = onnx_export.optimise(raw, tmp_path / "fp32.onnx")
    ids, mask = pad_ids(seqs, torch_b.pad_id)
    logits, *routes = DenseGraph(fp32).session.run(None, {"input_ids": ids, "attention_mask": mask})
    np.testing.assert_allclose(_softmax(logits), _softmax(ref.logits), atol=TOL, rtol=0)
    for experts, r in zip(routes[0::2], ref.routing, strict=True):
        np.testing.assert_array_equal(experts, r.expert_ids)
    int8 = ov_forward(ov_nncf(raw, loaded, tmp_path / "ov.xml"), torch_b.pad_id, 1)(seqs)
    got, want = _softmax(int8), _softmax(ref.logits)
    assert np.abs(got - want).max() < 0.15 and (got.argmax(1) == want.argmax(1)).mean() >= 0.85


def test_torch_bf16_runs_small_batches_masked_and_agrees_with_fp32(exported: Path) -> None:
    """On CPU the bf16 backend runs batches up to its measured token count as one masked GEMM pair per layer
    (lone texts here) and larger ones grouped: both agree with fp32 as bf16 does."""
    from service.backends.torch_backend import MASKED_DENSE_TOKENS

    ref_b = load_backend(exported, "cpu", "torch", precision="fp32")
    bf16 = load_backend(exported, "cpu", "torch", precision="bf16")
    assert [m.masked_dense_tokens for m in bf16.model.moe_layers] == [MASKED_DENSE_TOKENS["bf16"]] * len(
        bf16.model.moe_layers
    )
    assert all(m.masked_dense_tokens == MASKED_DENSE_TOKENS["fp32"] for m in ref_b.model.moe_layers)
    seqs = _sequences(40, ref_b.info.architecture["vocab_size"], ref_b.info.max_length, seed=4)
    assert sum(map(len, seqs)) > MASKED_DENSE_TOKENS["bf16"] >= max(map(len, seqs))
    ref = _softmax(ref_b.forward(seqs).logits)
    alone = _softmax(np.concatenate([bf16.forward([s]).logits for s in seqs]))
    together = _softmax(bf16.forward(seqs).logits)
    for got in (alone, together):
        assert np.abs(got - ref).max() < 0.15 and (got.argmax(1) == ref.argmax(1)).mean() >= 0.85
