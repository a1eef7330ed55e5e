"""`moe-serve train` with a pretrained base: convert, fine-tune, calibrate, write a servable model folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from service.modeling.artifacts import load_model
from service.modeling.classifier import pad_batch

pytest.importorskip("transformers")


def test_fine_tuned_converted_model_folder(tiny_bert_moe_dir: Path) -> None:
    config = json.loads((tiny_bert_moe_dir / "config.json").read_text())
    arch = config["architecture"]
    assert (arch["norm"], arch["combine"], arch["num_experts"], arch["top_k"], arch["expert_d_ff"]) == (
        "post",
        "sum",
        4,
        2,
        16,
    )
    assert config["training"]["conversion"] == "moefication" and config["training"]["base"].endswith("tiny-bert")
    assert config["temperature"] > 0
    # Stored as float16: the weights were rounded to that grid before validation, so the file holds exactly the
    # model that was chosen, calibrated and evaluated; what rounding moved is on record.
    assert config["weights_dtype"] == "float16"
    storage = config["training"]["storage"]
    assert storage["weights_dtype"] == "float16" and storage["rounding_vs_unrounded"]["texts"] > 0
    from safetensors import safe_open

    with safe_open(str(tiny_bert_moe_dir / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
    assert dtypes == {"F16"}
    report = json.loads((tiny_bert_moe_dir / "eval.json").read_text())
    # Three topics told apart by their words: a few epochs must clearly beat chance (0.33), titles included.
    assert report["accuracy"] > 0.8, report["accuracy"]
    assert report["headline"]["accuracy"] > 0.6, report["headline"]
    assert report["calibration"]["ece"] <= report["calibration"]["ece_before"] + 0.05
    log = json.loads((tiny_bert_moe_dir / "training_log.json").read_text())
    assert all(len(row["expert_imbalance"]) == 2 for row in log)  # per-epoch balance of both MoE layers
    card = (tiny_bert_moe_dir / "README.md").read_text()
    assert "moefication" in card and "tiny-bert" in card


def test_converted_model_answers_with_its_own_tokenizer_frame(tiny_bert_moe_dir: Path) -> None:
    bundle = load_model(tiny_bert_moe_dir)
    tok = bundle.tokenizer
    (enc,) = tok.encode_batch(["stocks fell sharply"], bundle.folder.config.max_length)
    assert tok.tokenizer.id_to_token(enc.ids[0]) == "[CLS]" and tok.tokenizer.id_to_token(enc.ids[-1]) == "[SEP]"
    with torch.no_grad():
        out = bundle.model(*pad_batch([enc.ids], tok.pad_id))
    assert bundle.folder.labels[int(out.logits.argmax())] == "business"
    assert len(out.routing) == 2 and out.routing[0].expert_ids.shape == (len(enc.ids), 2)


def test_written_recipe_loads_back(tiny_bert_moe_dir: Path) -> None:
    """recipe.json reproduces the model: it must be a valid recipe itself (no `model` section beside `base`)."""
    from service.training.recipe import Recipe

    recipe = Recipe.from_file(tiny_bert_moe_dir / "recipe.json")
    assert recipe.base is not None and recipe.base.method == "moefication"
