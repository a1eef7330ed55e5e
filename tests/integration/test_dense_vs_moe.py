"""The bench's dense yardsticks compute what they stand for: the dense base fused by ONNX Runtime's transformer
optimizer (against HF transformers, 1e-4), and the all-experts copy of a MoEfied folder (every expert on every
token: its dense original, against the base through the project's own dense model, 1e-4)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from service.bench.dense_vs_moe import REGIMES, all_experts_copy, compare
from service.bench.dense_yardstick import DenseGraph, build
from service.modeling.artifacts import load_model

pytestmark = pytest.mark.slow


def _sequences(n: int, vocab: int, max_len: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[2, *rng.integers(5, vocab, int(rng.integers(1, max_len - 2))).tolist(), 3] for _ in range(n)]


@pytest.fixture(scope="module")
def dense_graphs(tiny_bert_moe_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    loaded = load_model(tiny_bert_moe_dir)
    return build(loaded.folder.training["base"], len(loaded.folder.labels), tmp_path_factory.mktemp("dense"))


def test_dense_yardstick_is_the_base_with_fused_attention(dense_graphs: dict[str, Path], tiny_bert_moe_dir: Path):
    from tests.bert_fixture import reference_model

    base = Path(load_model(tiny_bert_moe_dir).folder.training["base"])
    ops = {n.op_type for n in onnx.load(str(dense_graphs["fp32"])).graph.node}
    assert {"Attention", "SkipLayerNormalization"} <= ops  # the transformer optimizer fused the graph
    graph = DenseGraph(dense_graphs["fp32"])
    seqs = _sequences(6, 40, 40)
    logits = graph.forward(seqs)
    # The same sequences through transformers, mean-pooled, and the yardstick's own head (seeded, untrained).
    ref = reference_model(base)
    torch.manual_seed(0)
    head = torch.nn.Linear(ref.config.hidden_size, logits.shape[1])
    for row, s in zip(logits, seqs, strict=True):
        with torch.no_grad():
            want = head(ref(input_ids=torch.tensor([s])).last_hidden_state[0].mean(0)).numpy()
        np.testing.assert_allclose(row, want, atol=1e-4)
    q = DenseGraph(dense_graphs["int8"]).forward(seqs)
    assert np.abs(q - logits).max() < 0.1


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
    assert {("dense-ort", "onnx", "fp32"), ("dense-ort", "onnx", "int8")} <= kinds
    for row in r["rows"]:
        assert all(row[k] > 0 for k in REGIMES)
    assert set(r["ratios"]["best_moe_vs_best_dense_ort"]) == set(REGIMES)
    assert "onnx int8" in r["ratios"]["moe_vs_all_experts"]
    assert not (tiny_bert_moe_dir / "model.onnx").exists()  # the bench works on a copy


def test_dense_server_batches_and_answers(dense_graphs: dict[str, Path], tiny_bert_moe_dir: Path, tmp_path: Path):
    """The served yardstick: the fused dense graph behind its small batching server answers concurrent requests
    with the graph's own labels (a batch of several requests, one at a time, the same answers)."""
    import asyncio

    import httpx

    from service.bench.dense_vs_moe import _dense_server

    loaded = load_model(tiny_bert_moe_dir)
    texts = ["alpha beta gamma", "delta epsilon", "gamma gamma alpha beta delta"] * 4
    graph = DenseGraph(dense_graphs["fp32"], loaded.tokenizer.pad_id)
    want = graph.forward([e.ids for e in loaded.tokenizer.encode_batch(texts, loaded.folder.config.max_length)])
    with _dense_server(dense_graphs["fp32"], loaded, 1, tmp_path / "dense.log") as url:

        async def post_all() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                return await asyncio.gather(*(client.post("/v1/classify", json={"inputs": t}) for t in texts))

        responses = asyncio.run(post_all())
    assert [r.status_code for r in responses] == [200] * len(texts)
    assert [r.json()["predictions"][0]["label"] for r in responses] == want.argmax(1).tolist()
