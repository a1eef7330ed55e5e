"""Multi-task folders on every variant: the ONNX graphs (fp32, int8) and torch bf16 against the torch fp32 reference,
on batches whose texts ask for one task or for several.

Tolerances as in test_onnx.py: ONNX fp32 probabilities within 1e-4 of torch fp32 with identical routing (and so
identical expert counts, per task too); int8 and bf16 judged on agreement (each row's label, probabilities within a
loose bound on random ids). Folders: the tiny two-task model `moe-serve train` builds (every MoE layer task-routed),
and two untrained ones saved here (far-apart routers, so routing is decisive), with every layer task-routed and with
only the top one (the bottom ones shared, run once per text)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from service.backends import load_backend, resolve
from service.backends.base import BatchOutput
from service.bench.backends import BUDGETS
from service.modeling.artifacts import save_model
from service.modeling.classifier import ModelConfig, MoEClassifier
from service.modeling.folder import read_folder
from service.modeling.layout import ONNX_FILE, ONNX_INT8_FILE
from service.modeling.onnx_export import export_model
from service.modeling.tokenizer import TextTokenizer

TOL = 1e-4
# Texts asking one task, both, and both in the other order (a row's place follows the order asked).
ASKED = [[0, 1], [1], [0], [1, 0], [0, 1], [1], [0], [0, 1], [1, 0]]


def _built(out: Path, task_routed_layers: int | None) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=120,
        num_labels=3,
        max_length=48,
        d_model=32,
        n_heads=4,
        n_layers=3,
        d_ff=48,
        dropout=0.0,
        tasks={"topic": 3, "mood": 2},
        task_routed_layers=task_routed_layers,
    )
    model = MoEClassifier(cfg).eval()
    with torch.no_grad():
        for layer in model.moe_layers:
            layer.router.weight.normal_(0, 1.0)
    tok = TextTokenizer.train(["stocks fell sharply today", "a dull and tedious film", "the match was won"] * 10, 120)
    labels = {"topic": ["business", "sport", "tech"], "mood": ["fresh", "rotten"]}
    return save_model(out, model, tok, labels)


@pytest.fixture(scope="module")
def multitask_graphs(tiny_multitask_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """name -> a multi-task folder exported (fp32 and int8) by `moe-serve export`'s code."""
    repo = tmp_path_factory.mktemp("onnx-multitask")
    folders = {"trained": repo / "trained"}
    shutil.copytree(tiny_multitask_dir, folders["trained"])
    folders["all-routed"] = _built(repo / "all-routed", None)
    folders["top-routed"] = _built(repo / "top-routed", 1)
    for folder in folders.values():
        export_model(folder, int8=True)
    return folders


def _rows(n: int, vocab: int, max_len: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(5, vocab, rng.integers(1, max_len + 1)).tolist() for _ in range(n)]
    return seqs, [ASKED[i % len(ASKED)] for i in range(n)]


def _task_probs(out: BatchOutput, asked: list[list[int]], widths: list[int]) -> list[np.ndarray]:
    """Each row's probabilities over its own task's labels (the -inf padding cut off)."""
    tasks = [t for ts in asked for t in ts]
    probs = []
    for row, t in zip(out.logits, tasks, strict=True):
        z = np.exp(row[: widths[t]] - row[: widths[t]].max())
        probs.append(z / z.sum())
    return probs


def _widths(backend) -> list[int]:
    return [len(t.labels) for t in backend.info.tasks.values()]


@pytest.mark.parametrize("name", ["trained", "all-routed", "top-routed"])
@pytest.mark.parametrize("batch", [1, 9, 30])
def test_onnx_fp32_matches_torch_per_row_and_routing(multitask_graphs: dict[str, Path], name: str, batch: int) -> None:
    folder = multitask_graphs[name]
    ref_b = load_backend(folder, "cpu", "torch", precision="fp32")
    onnx_b = load_backend(folder, "cpu", "onnx", precision="fp32")
    seqs, asked = _rows(batch, ref_b.info.architecture["vocab_size"], ref_b.info.max_length, seed=batch)
    ref = ref_b.forward(seqs, return_routing=True, tasks=asked)
    got = onnx_b.forward(seqs, return_routing=True, tasks=asked)
    assert got.logits.shape == ref.logits.shape == (sum(map(len, asked)), 3)
    np.testing.assert_array_equal(np.isinf(got.logits), np.isinf(ref.logits))  # the same -inf padding columns
    for a, b in zip(_task_probs(got, asked, _widths(ref_b)), _task_probs(ref, asked, _widths(ref_b)), strict=True):
        np.testing.assert_allclose(a, b, atol=TOL, rtol=0)
        assert a.argmax() == b.argmax()
    np.testing.assert_array_equal(got.expert_counts, ref.expert_counts)
    assert got.task_expert_counts is not None and ref.task_expert_counts is not None
    np.testing.assert_array_equal(got.task_expert_counts, ref.task_expert_counts)
    assert ref.routing is not None and got.routing is not None
    for a, b in zip(got.routing, ref.routing, strict=True):
        np.testing.assert_array_equal(a.expert_ids, b.expert_ids)
        np.testing.assert_allclose(a.gates, b.gates, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["trained", "all-routed", "top-routed"])
def test_int8_and_bf16_agree_with_fp32_per_row(multitask_graphs: dict[str, Path], name: str) -> None:
    folder = multitask_graphs[name]
    ref_b = load_backend(folder, "cpu", "torch", precision="fp32")
    seqs, asked = _rows(40, ref_b.info.architecture["vocab_size"], ref_b.info.max_length, seed=3)
    ref = _task_probs(ref_b.forward(seqs, tasks=asked), asked, _widths(ref_b))
    for kind, precision in (("onnx", "int8"), ("torch", "bf16")):
        b = load_backend(folder, "cpu", kind, precision=precision)
        assert b.info.precision == precision
        out = b.forward(seqs, tasks=asked)
        got = _task_probs(out, asked, _widths(ref_b))
        diff = max(float(np.abs(g - r).max()) for g, r in zip(got, ref, strict=True))
        agree = np.mean([g.argmax() == r.argmax() for g, r in zip(got, ref, strict=True)])
        # Random ids, not text: a loose bound that still catches a broken graph (e.g. a row given another task).
        assert diff < 0.15 and agree >= 0.85, (kind, precision, diff, agree)
        assert out.task_expert_counts is not None and (out.task_expert_counts.sum(0) == out.expert_counts).all()


@pytest.mark.parametrize("name", ["trained", "top-routed"])
def test_graphs_take_rows_and_keep_every_task_s_router_fp32(multitask_graphs: dict[str, Path], name: str) -> None:
    import onnx

    for graph in (ONNX_FILE, ONNX_INT8_FILE):
        g = onnx.load(str(multitask_graphs[name] / graph)).graph
        assert [i.name for i in g.input] == ["input_ids", "attention_mask", "row_text", "row_task"]
        routers = [n for n in g.node if "/router/" in n.name]
        # One router MatMul per MoE layer, [d, tasks * E] where the layer is task-routed, all left fp32.
        assert len(routers) == 3 - (name == "trained") and {n.op_type for n in routers} == {"MatMul"}, graph


def test_onnx_backend_checks_each_text_s_tasks(multitask_graphs: dict[str, Path]) -> None:
    b = load_backend(multitask_graphs["top-routed"], "cpu", "onnx", precision="int8")
    for bad in (None, [[0]], [[0, 0], [1]], [[2], [0]]):
        with pytest.raises(ValueError, match="task"):
            b.forward([[5, 6, 7], [8, 9]], tasks=bad)


def test_chosen_graph_is_built_on_first_load(multitask_graphs: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "fresh-clone"
    shutil.copytree(multitask_graphs["top-routed"], folder)
    for graph in (ONNX_FILE, ONNX_INT8_FILE):
        (folder / graph).unlink()
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "serving": {"backend": "onnx", "precision": "int8"}}))
    assert resolve(read_folder(folder)) == ("onnx", "int8") and (folder / ONNX_INT8_FILE).is_file()
    b = load_backend(folder, "cpu")
    assert (b.kind, b.info.precision) == ("onnx", "int8")
    out = b.forward([[5, 6, 7], [8, 9]], tasks=[[1, 0], [1]])
    assert out.logits.shape == (3, 3) and np.isinf(out.logits[[0, 2], 2]).all() and np.isfinite(out.logits[1]).all()


def test_dockerfile_export_then_choose_on_a_multitask_folder(multitask_graphs: dict[str, Path], tmp_path: Path) -> None:
    """The Dockerfile's `moe-serve export --quantize int8` on a multi-task folder, with --choose: every CPU variant
    timed on texts of both tasks (each asked for both) and judged per task on their validation splits; ONNX fp32
    passes the fp32 bar (probabilities within 1e-4, the same labels and routing) on real texts of each task."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    folder = tmp_path / "baked"
    shutil.copytree(multitask_graphs["trained"], folder)
    for graph in (ONNX_FILE, ONNX_INT8_FILE):
        (folder / graph).unlink()
    cmd = [sys.executable, "-m", "service.cli", "export", "--model", str(folder), "--quantize", "int8", "--choose"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)
    rows = {(v["backend"], v["precision"]): v for v in result["variants"]}
    assert set(rows) == {("torch", "fp32"), ("torch", "bf16"), ("onnx", "fp32"), ("onnx", "int8")}
    for row in rows.values():
        assert set(row["tasks"]) == {"mood", "topic"} and row["batch_1"]["texts_per_s"] > 0
        assert row["macro_f1"] == round(float(np.mean([t["macro_f1"] for t in row["tasks"].values()])), 4)
    onnx = rows[("onnx", "fp32")]
    for p in (onnx["parity"], *(t["parity"] for t in onnx["tasks"].values())):
        assert p["max_abs_diff"] <= TOL and p["argmax_agreement"] == 1.0 and p["routing_agreement"] >= 0.999, p
    assert onnx["parity"]["max_abs_diff"] == max(t["parity"]["max_abs_diff"] for t in onnx["tasks"].values())
    serving = json.loads((folder / "config.json").read_text())["serving"]
    assert {k: serving[k] for k in ("backend", "precision", "max_batch_tokens")} == result["chosen"]
    assert serving["budgets"] == result["budgets"] and serving["max_batch_tokens"] in BUDGETS
    served = load_backend(folder, "cpu")
    assert served.info.batch_tokens == serving["max_batch_tokens"]  # what the server's batcher then cuts by
    assert served.forward([[5, 6, 7]], tasks=[[0, 1]]).logits.shape == (2, 3)


def test_evaluate_reports_each_task_s_parity_for_another_backend(multitask_graphs: dict[str, Path]) -> None:
    """`moe-serve evaluate --backend onnx` on a multi-task folder: each task's report computed by ONNX Runtime, with
    its parity against torch fp32 on that task's texts (and headlines), and the same figures as torch fp32."""
    from service.modeling.artifacts import load_model
    from service.training.task_eval import evaluate_tasks

    folder = multitask_graphs["trained"]
    bundle = load_model(folder)
    ref = evaluate_tasks(bundle, "test", None)
    got = evaluate_tasks(bundle, "test", None, backend=load_backend(folder, "cpu", "onnx", precision="fp32"))
    assert set(got["tasks"]) == {"mood", "topic"}
    for task, summary in got["tasks"].items():
        assert summary["engine"] == {"backend": "onnx", "precision": "fp32"}
        p = summary["parity"]
        assert p["max_abs_diff"] <= TOL and p["argmax_agreement"] == 1.0 and p["routing_agreement"] >= 0.999, task
        assert summary["macro_f1"] == ref["tasks"][task]["macro_f1"]
    np.testing.assert_allclose(
        np.array([layer[t] for layer in got["expert_share_by_task"] for t in ("mood", "topic")]),
        np.array([layer[t] for layer in ref["expert_share_by_task"] for t in ("mood", "topic")]),
        atol=1e-3,
    )
