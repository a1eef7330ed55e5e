"""The bench's dense yardsticks compute what they stand for: the dense base fused by ONNX Runtime's transformer
optimizer and the same export run by OpenVINO (against HF transformers, 1e-4), OpenVINO's static int8 of it (stated
tolerance), and the all-experts copy of a MoEfied folder (every expert on every token: its dense original, against
the base through the project's own dense model, 1e-4)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from service.bench.dense_openvino import OpenVINOGraph
from service.bench.dense_vs_moe import REGIMES, all_experts_copy, compare
from service.bench.dense_vs_moe import dense_graphs as bench_graphs
from service.bench.dense_yardstick import DenseGraph, _export, load_graph
from service.modeling.artifacts import load_model

pytestmark = pytest.mark.slow


def _sequences(n: int, vocab: int, max_len: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[2, *rng.integers(5, vocab, int(rng.integers(1, max_len - 2))).tolist(), 3] for _ in range(n)]


@pytest.fixture(scope="module")
def dense_graphs(tiny_bert_moe_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every yardstick as the bench builds it (OpenVINO's int8 calibrated on the folder's validation texts)."""
    return bench_graphs(load_model(tiny_bert_moe_dir), tmp_path_factory.mktemp("dense"))


def _reference_logits(base: Path, seqs: list[list[int]], num_labels: int) -> np.ndarray:
    """The sequences through transformers, mean-pooled, and the yardstick's own head (seeded, untrained)."""
    from tests.bert_fixture import reference_model

    ref = reference_model(base)
    torch.manual_seed(0)
    head = torch.nn.Linear(ref.config.hidden_size, num_labels)
    with torch.no_grad():
        return np.stack([head(ref(input_ids=torch.tensor([s])).last_hidden_state[0].mean(0)).numpy() for s in seqs])


def test_dense_yardstick_is_the_base_with_fused_attention(dense_graphs: dict[str, Path], tiny_bert_moe_dir: Path):
    base = Path(load_model(tiny_bert_moe_dir).folder.training["base"])
    ops = {n.op_type for n in onnx.load(str(dense_graphs["dense-ort fp32"])).graph.node}
    assert {"Attention", "SkipLayerNormalization"} <= ops  # the transformer optimizer fused the graph
    seqs = _sequences(6, 40, 40)
    logits = DenseGraph(dense_graphs["dense-ort fp32"]).forward(seqs)
    np.testing.assert_allclose(logits, _reference_logits(base, seqs, logits.shape[1]), atol=1e-4)
    q = DenseGraph(dense_graphs["dense-ort int8"]).forward(seqs)
    assert np.abs(q - logits).max() < 0.1


def test_openvino_runs_the_same_export(tiny_bert_moe_dir: Path, tmp_path: Path) -> None:
    """The raw export the OpenVINO yardstick is quantised from, read and run by OpenVINO in f32 (padded batches,
    one call): transformers' logits within 1e-4."""
    pytest.importorskip("openvino", reason="the `openvino` extra")
    loaded = load_model(tiny_bert_moe_dir)
    base = Path(loaded.folder.training["base"])
    _export(base, len(loaded.folder.labels), tmp_path / "raw.onnx")
    seqs = _sequences(8, 40, 40, seed=1)
    logits = OpenVINOGraph(tmp_path / "raw.onnx", bf16=False).forward(seqs)
    np.testing.assert_allclose(logits, _reference_logits(base, seqs, logits.shape[1]), atol=1e-4)


def test_openvino_int8_yardstick(dense_graphs: dict[str, Path], tiny_bert_moe_dir: Path) -> None:
    """OpenVINO's static int8 IR: activations quantised too (FakeQuantize before the MatMuls) and int8 weights;
    as the bench runs it (bf16 elsewhere where the CPU has it) near the fp32 graph. Tolerances: on these texts the
    logits spread 0.37 (std) and int8 moved them by at most 0.053 when written (AMD EPYC, bf16), so 0.1 is about
    twice that; the yardstick's head is untrained, so a text's top two logits may be a near-tie that any rounding
    swaps (none was here, the smallest margin 0.30): every label that differs must be such a near-tie (reference
    margin < 0.1), and at most 1 in 8 may differ."""
    pytest.importorskip("nncf", reason="the `openvino` extra")
    import openvino as ov

    ops = [o for o in ov.Core().read_model(str(dense_graphs["dense-ov int8"])).get_ordered_ops()]
    assert any(o.get_type_name() == "FakeQuantize" for o in ops)
    assert any(o.get_type_name() == "Constant" and o.get_element_type() == ov.Type.i8 for o in ops)
    seqs = _sequences(32, 40, 40, seed=2)
    want = DenseGraph(dense_graphs["dense-ort fp32"]).forward(seqs)
    got = OpenVINOGraph(dense_graphs["dense-ov int8"], load_model(tiny_bert_moe_dir).tokenizer.pad_id).forward(seqs)
    assert np.abs(got - want).max() < 0.1
    top2 = np.sort(want, axis=1)[:, -2:]
    differ = got.argmax(1) != want.argmax(1)
    assert differ.mean() <= 1 / 8 and (top2[differ, 1] - top2[differ, 0] < 0.1).all()


def test_all_experts_copy_is_the_dense_original(tiny_bert_moe_dir: Path, tmp_path: Path) -> None:
    """top-k = E: each layer is one dense FFN of width E x expert width, the experts' slices concatenated (with
    MoEfication's summed combine, exactly the dense FFN the experts were cut from)."""
    copy = all_experts_copy(tiny_bert_moe_dir, tmp_path / "all")
    config = json.loads((copy / "config.json").read_text())
    assert config["architecture"]["top_k"] == config["architecture"]["num_experts"] and "serving" not in config
    model = load_model(copy).model.eval()
    x = torch.randn(7, config["architecture"]["d_model"])
    for layer in model.moe_layers:
        assert layer.combine == "sum"
        w1 = torch.cat(list(layer.w1), dim=1)  # [d, E * f]
        w2 = torch.cat(list(layer.w2), dim=0)  # [E * f, d]
        dense = layer._act(x @ w1 + layer.b1.reshape(-1)) @ w2 + layer.b2.sum(0)
        with torch.no_grad():
            out, _ = layer(x)
        np.testing.assert_allclose(out.numpy(), dense.detach().numpy(), atol=1e-5)


def test_compare_rows_and_ratios(tiny_bert_moe_dir: Path, tmp_path: Path) -> None:
    r = compare(load_model(tiny_bert_moe_dir), 8, 1, 1, tmp_path)
    kinds = {(row["model"], row["backend"], row["precision"]) for row in r["rows"]}
    for model in ("moe", "all-experts"):
        assert {(model, "torch", "fp32"), (model, "onnx", "fp32"), (model, "onnx", "int8")} <= kinds
    assert {("dense-ort", "onnx", "fp32"), ("dense-ort", "onnx", "int8"), ("dense-ov", "openvino", "int8")} <= kinds
    for row in r["rows"]:
        assert all(row[k] > 0 for k in REGIMES)
    best = r["ratios"]["best_moe_vs_best_dense"]
    assert set(best) == set(REGIMES)
    for k, v in best.items():  # against the fastest dense row of any runtime, named
        fastest = max((row for row in r["rows"] if row["model"].startswith("dense-")), key=lambda row: row[k])
        assert v["dense"] == f"{fastest['model']} {fastest['precision']}"
    assert "onnx int8" in r["ratios"]["moe_vs_all_experts"]
    assert not (tiny_bert_moe_dir / "model.onnx").exists()  # the bench works on a copy


@pytest.mark.parametrize("name", ["dense-ort fp32", "dense-ov int8"])
def test_dense_server_batches_and_answers(
    name: str, dense_graphs: dict[str, Path], tiny_bert_moe_dir: Path, tmp_path: Path
) -> None:
    """The served yardstick: each runtime's graph behind the small batching server answers concurrent requests
    with the graph's own labels (a batch of several requests, one at a time, the same answers)."""
    import asyncio

    import httpx

    from service.bench.dense_vs_moe import _dense_server

    loaded = load_model(tiny_bert_moe_dir)
    texts = ["alpha beta gamma", "delta epsilon", "gamma gamma alpha beta delta"] * 4
    graph = load_graph(dense_graphs[name], loaded.tokenizer.pad_id)
    want = graph.forward([e.ids for e in loaded.tokenizer.encode_batch(texts, loaded.folder.config.max_length)])
    with _dense_server(dense_graphs[name], loaded, 1, tmp_path / "dense.log") as url:

        async def post_all() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                return await asyncio.gather(*(client.post("/v1/classify", json={"inputs": t}) for t in texts))

        responses = asyncio.run(post_all())
    assert [r.status_code for r in responses] == [200] * len(texts)
    assert [r.json()["predictions"][0]["label"] for r in responses] == want.argmax(1).tolist()


def test_served_rows_take_turns(
    dense_graphs: dict[str, Path], tiny_bert_moe_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """moe-serve and every dense server are up at once and take turns run by run, so that a slow spell of the
    machine hits them alike; each point keeps its median run and lists every run's rate."""
    from service.bench import served
    from service.bench.dense_vs_moe import served_rows

    order: list[tuple[str, str, int]] = []
    real = served.closed_loop

    def recorded(url: str, bodies: list[bytes], c: int, seconds: float, server: str, texts: str, workdir: Path):
        order.append((server, texts, c))
        return real(url, bodies, c, seconds, server, texts, workdir)

    monkeypatch.setattr(served, "closed_loop", recorded)
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "dense").symlink_to(next(iter(dense_graphs.values())).parent)
    cfg = {"n_texts": 8, "concurrency": [1], "seconds": 1.0, "served_runs": 2}
    rows = served_rows(load_model(tiny_bert_moe_dir), cfg, 1, tmp_path / "work", tmp_path)

    names = ["moe-serve", *dense_graphs]
    timed = order[len(names) :]  # after one warm-up run each
    assert [s for s, _, _ in timed[: 2 * len(names)]] == names * 2  # the first point: each server, then again
    assert len(timed) == 2 * len(names) * 3  # runs x servers x text kinds
    assert [(r["server"], r["texts"], r["concurrency"]) for r in rows] == [
        (s, t, 1) for s in names for t in ("headline", "article", "mixed")
    ]
    for r in rows:
        assert r["errors"] == 0 and len(r["rps_all_runs"]) == 2 and r["rps"] in r["rps_all_runs"]
