"""A tiny BERT-format checkpoint built by the tests themselves: HF config.json + model.safetensors (written by
`transformers`, the reference implementation) + tokenizer.json and vocab.txt. Seconds to build, kilobytes on disk."""

from __future__ import annotations

import json
from pathlib import Path

WORDS = [
    "the",
    "a",
    "of",
    "to",
    "and",
    "in",
    "on",
    "for",
    "is",
    "was",
    "stocks",
    "shares",
    "market",
    "bank",
    "profit",
    "fell",
    "rose",
    "sharply",
    "film",
    "music",
    "star",
    "award",
    "actor",
    "band",
    "minister",
    "election",
    "vote",
    "party",
    "government",
    "match",
    "team",
    "goal",
    "player",
    "season",
    "win",
    "phone",
    "software",
    "computer",
    "internet",
    "game",
    "chip",
    "mobile",
    "users",
    "new",
    "year",
    "said",
]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_tiny_bert(folder: Path, *, tokenizer_json: bool = True, prefix: str = "", seed: int = 0) -> Path:
    """prefix="bert." writes the weights as a BertForSequenceClassification checkpoint would name them."""
    import torch
    from safetensors.torch import save_file
    from transformers import BertConfig, BertModel

    folder.mkdir(parents=True, exist_ok=True)
    vocab = SPECIALS + WORDS + ["##s", "##ing", "##ed"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        type_vocab_size=2,
        hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = BertModel(cfg, add_pooling_layer=False).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a mis-mapped tensor shows up
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    state = {prefix + k: v.contiguous() for k, v in model.state_dict().items() if "position_ids" not in k}
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({**cfg.to_dict(), "model_type": "bert"}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    if tokenizer_json:
        from service.modeling.bert import _wordpiece_from_vocab

        _wordpiece_from_vocab(folder).save(str(folder / "tokenizer.json"))
    return folder


def reference_model(folder: Path):
    from transformers import BertModel

    return BertModel.from_pretrained(str(folder), add_pooling_layer=False).eval()
