"""Classifier behaviour: batch independence, packing, save/load round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from service.modeling.artifacts import ModelFolderError, load_model, save_model
from service.modeling.classifier import ModelConfig, MoEClassifier, pad_batch
from service.modeling.tokenizer import TextTokenizer

TOL = 1e-5


def _model(**kw) -> MoEClassifier:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=100, num_labels=3, max_length=64, d_model=32, n_heads=4, d_ff=48, dropout=0.0, **kw)
    return MoEClassifier(cfg).eval()


def _texts(n: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(2, 100, (int(torch.randint(1, 60, (1,), generator=g)),), generator=g).tolist() for _ in range(n)
    ]


@pytest.mark.parametrize("kw", [{}, {"moe_every": 2}, {"attention": [True, False]}, {"attention": False}])
def test_logits_independent_of_batch(kw: dict) -> None:
    model = _model(**kw)
    seqs = _texts(12)
    with torch.no_grad():
        alone = torch.cat([model(*pad_batch([s])).logits for s in seqs])
        together = model(*pad_batch(seqs)).logits
        perm = list(reversed(range(len(seqs))))
        shuffled = model(*pad_batch([seqs[i] for i in perm])).logits[torch.tensor(perm).argsort()]
        # Neighbours of a different text mix: the same first text inside other company.
        other = model(*pad_batch([seqs[0], *_texts(9, seed=7)])).logits[0]
    torch.testing.assert_close(together, alone, atol=TOL, rtol=TOL)
    torch.testing.assert_close(shuffled, alone, atol=TOL, rtol=TOL)
    torch.testing.assert_close(other, alone[0], atol=TOL, rtol=TOL)


def test_padding_value_does_not_matter() -> None:
    model = _model()
    seqs = _texts(5)
    ids, mask = pad_batch(seqs)
    ids2 = ids.clone()
    ids2[mask == 0] = 57  # garbage in padding positions
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask).logits, model(ids2, mask).logits, atol=TOL, rtol=TOL)


def test_routing_reported_for_packed_tokens() -> None:
    model = _model(moe_every=2, n_layers=4)
    seqs = _texts(4)
    with torch.no_grad():
        out = model(*pad_batch(seqs))
    assert len(out.routing) == 2  # blocks 1 and 3
    total = sum(len(s) for s in seqs)
    for r in out.routing:
        assert r.expert_ids.shape == (total, 2)
        torch.testing.assert_close(r.gates.sum(-1), torch.ones(total))


def test_too_long_rejected() -> None:
    model = _model()
    with pytest.raises(ValueError, match="exceeds max_length"):
        model(*pad_batch([[3] * 65]))


def test_save_load_round_trip(tmp_path: Path) -> None:
    model = _model()
    tok = TextTokenizer.train(["the cat sat on the mat", "stocks fell sharply today"] * 10, vocab_size=100)
    save_model(tmp_path / "m", model, tok, ["a", "b", "c"], {"dataset": "x"})
    bundle = load_model(tmp_path / "m")
    assert bundle.folder.labels == ("a", "b", "c") and bundle.folder.training == {"dataset": "x"}
    seqs = _texts(6)
    with torch.no_grad():
        assert torch.equal(model(*pad_batch(seqs)).logits, bundle.model(*pad_batch(seqs)).logits)
    assert tok.encode_batch(["the cat"], 10)[0].ids == bundle.tokenizer.encode_batch(["the cat"], 10)[0].ids


def test_load_rejects_broken_folder(tmp_path: Path) -> None:
    model = _model()
    tok = TextTokenizer.train(["a b c"] * 5, vocab_size=50)
    save_model(tmp_path / "m", model, tok, ["a", "b", "c"])
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(ModelFolderError, match=r"missing model\.safetensors"):
        load_model(tmp_path / "m")
    with pytest.raises(ModelFolderError, match=r"missing config\.json"):
        load_model(tmp_path / "nothing")


def test_tokenizer_truncation_and_empty() -> None:
    tok = TextTokenizer.train(["hello world again and again"] * 5, vocab_size=60)
    enc = tok.encode_batch(["hello world again and again", "   "], max_length=3)
    assert enc[0].ids == enc[0].ids[:3] and len(enc[0].ids) == 3 and enc[0].truncated
    assert enc[0].original_length == 5
    assert len(enc[1].ids) == 1  # an empty text still gets one (unknown) token


def test_per_sequence_expert_baseline_matches_grouped() -> None:
    """The benchmark's padded, expert-per-request baseline computes the same logits as the grouped fast path."""
    model = _model()
    seqs = _texts(7)
    from service.bench.engine import experts_per_sequence

    with torch.no_grad():
        grouped = model(*pad_batch(seqs)).logits
        with experts_per_sequence(model) as forward:
            baseline = forward(*pad_batch(seqs)).logits
        after = model(*pad_batch(seqs)).logits  # the model is itself again
    torch.testing.assert_close(baseline, grouped, atol=TOL, rtol=TOL)
    torch.testing.assert_close(after, grouped, atol=0, rtol=0)
    assert all(type(b.ffn).__name__ == "MoEFeedForward" for b in model.blocks if b.is_moe)


def test_any_tokenizer_json_loads(tmp_path: Path) -> None:
    """A tokenizer.json made elsewhere (here: byte-level BPE, no [PAD]/[UNK]) loads and encodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["some text to learn from", "more text here"] * 5, trainers.BpeTrainer(vocab_size=300))
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = TextTokenizer.from_file(tmp_path / "tokenizer.json")
    assert loaded.pad_id == 0
    enc = loaded.encode_batch(["text here", ""], max_length=8)
    assert 0 < len(enc[0].ids) <= 8 and len(enc[1].ids) == 1


def test_recipe_model_section_covers_the_model_config() -> None:
    """The recipe's model section mirrors ModelConfig; a field added to one must be added to the other."""
    from dataclasses import fields

    from service.training.recipe import ModelRecipe

    config_fields = {f.name for f in fields(ModelConfig)} - {"num_labels", "pad_token_id", "tasks"}
    assert set(ModelRecipe.model_fields) == config_fields


def test_committed_default_model_gives_the_same_logits() -> None:
    """The architecture grew BERT options; the committed from-scratch model must load and answer exactly as it did
    (logits recorded with the code before that change)."""
    import json

    from tests.conftest import DEFAULT_MODEL, ROOT

    golden = json.loads((ROOT / "tests" / "data" / "bbc_news_moe_golden.json").read_text())
    bundle = load_model(DEFAULT_MODEL)
    ids = [e.ids for e in bundle.tokenizer.encode_batch(golden["texts"], bundle.folder.config.max_length)]
    assert ids == golden["ids"]
    with torch.no_grad():
        logits = bundle.model(*pad_batch(ids, bundle.tokenizer.pad_id)).logits
    torch.testing.assert_close(logits, torch.tensor(golden["logits"]), atol=1e-5, rtol=1e-5)


def test_half_precision_storage_loads_as_fp32(tmp_path: Path) -> None:
    """float16 on disk, fp32 in memory: half the file, answers within fp16 rounding."""
    model = _model()
    tok = TextTokenizer.train(["a b c"] * 5, vocab_size=50)
    save_model(tmp_path / "full", model, tok, ["a", "b", "c"])
    save_model(tmp_path / "half", model, tok, ["a", "b", "c"], weights_dtype="float16")
    full, half = (tmp_path / n / "model.safetensors" for n in ("full", "half"))
    assert half.stat().st_size < 0.6 * full.stat().st_size
    bundle = load_model(tmp_path / "half")
    assert all(p.dtype == torch.float32 for p in bundle.model.parameters())
    seqs = _texts(6)
    with torch.no_grad():
        torch.testing.assert_close(
            bundle.model(*pad_batch(seqs)).logits, model(*pad_batch(seqs)).logits, atol=5e-3, rtol=5e-3
        )
    with pytest.raises(ValueError, match="weights_dtype"):
        save_model(tmp_path / "bad", model, tok, ["a", "b", "c"], weights_dtype="int8")


@pytest.mark.parametrize("kw", [{}, {"moe_every": 2}, {"attention": [True, False]}])
def test_row_buckets_give_the_plain_model_s_answers(kw: dict) -> None:
    """Serving on CPU pads GEMM rows to buckets (service/modeling/row_buckets.py): same logits and routing as the
    plain model, in fp32 within 1e-5, for batch sizes around bucket edges."""
    plain, bucketed = _model(**kw), _model(**kw)
    bucketed.use_row_buckets()
    assert bucketed.blocks[0].ffn.row_buckets and not plain.blocks[0].ffn.row_buckets
    for n in (1, 3, 16, 17, 40):
        seqs = _texts(n, seed=n)
        with torch.no_grad():
            a, b = plain(*pad_batch(seqs)), bucketed(*pad_batch(seqs))
        torch.testing.assert_close(b.logits, a.logits, atol=TOL, rtol=TOL)
        for ra, rb in zip(a.routing, b.routing, strict=True):
            assert torch.equal(ra.expert_ids, rb.expert_ids)


def test_bucket_sizes_are_few_and_waste_little() -> None:
    from service.modeling.row_buckets import bucket

    sizes = {bucket(n) for n in range(1, 16385)}
    assert len(sizes) <= 72
    assert all(bucket(n) >= n and (n <= 64 or bucket(n) - n <= n / 8) for n in range(1, 16385))


@pytest.mark.parametrize("kw", [{}, {"combine": "sum"}, {"moe_every": 2}])
def test_masked_dense_route_keeps_batch_independence(kw: dict) -> None:
    """With the small-batch route on, a text alone (few tokens: one masked GEMM pair) and inside a batch (many
    tokens: grouped by expert) takes different routes and gets the same logits and routing, in fp32 within 1e-5."""
    model = _model(**kw)
    model.use_masked_dense(60)  # every text here has < 60 tokens; the batch has more
    seqs = _texts(12)
    with torch.no_grad():
        alone = [model(*pad_batch([s])) for s in seqs]
        together = model(*pad_batch(seqs))
        model.use_masked_dense(0)
        grouped_alone = torch.cat([model(*pad_batch([s])).logits for s in seqs])
    assert sum(map(len, seqs)) > 60
    torch.testing.assert_close(together.logits, torch.cat([a.logits for a in alone]), atol=TOL, rtol=TOL)
    torch.testing.assert_close(grouped_alone, torch.cat([a.logits for a in alone]), atol=TOL, rtol=TOL)
    for li, r in enumerate(together.routing):
        assert torch.equal(r.expert_ids, torch.cat([a.routing[li].expert_ids for a in alone]))
