"""A model folder: config.json + model.safetensors + tokenizer.json (+ eval.json, routing_profile.json, card).

Weights are read with safetensors only; nothing in a model folder is ever unpickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from service.modeling.classifier import ModelConfig, MoEClassifier
from service.modeling.layout import CONFIG_FILE, MODEL_TYPE, TOKENIZER_FILE, WEIGHTS_FILE
from service.modeling.tokenizer import TextTokenizer


class ModelFolderError(ValueError):
    """A model folder is missing a file or holds an inconsistent one."""


@dataclass
class ModelBundle:
    name: str
    path: Path
    model: MoEClassifier
    tokenizer: TextTokenizer
    config: ModelConfig
    id2label: dict[int, str]
    training: dict[str, Any] = field(default_factory=dict)  # dataset, split, recipe name: lets evaluate find data

    @property
    def labels(self) -> list[str]:
        return [self.id2label[i] for i in range(len(self.id2label))]

    def read_json(self, filename: str) -> dict[str, Any] | None:
        p = self.path / filename
        return json.loads(p.read_text()) if p.exists() else None


def save_model(
    out_dir: str | Path,
    model: MoEClassifier,
    tokenizer: TextTokenizer,
    labels: list[str],
    training: dict[str, Any] | None = None,
) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    config = {
        "model_type": MODEL_TYPE,
        "architecture": cfg.to_dict(),
        "id2label": {str(i): lab for i, lab in enumerate(labels)},
        "label2id": {lab: i for i, lab in enumerate(labels)},
        "max_length": cfg.max_length,
        "training": training or {},
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt", "model_type": MODEL_TYPE})
    (out / WEIGHTS_FILE).chmod(0o644)  # safetensors creates it owner-only; a server running as another user reads it
    tokenizer.save(out / TOKENIZER_FILE)
    return out


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> ModelBundle:
    path = Path(model_dir)
    for name in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE):
        if not (path / name).is_file():
            raise ModelFolderError(f"{path}: missing {name}")
    raw = json.loads((path / CONFIG_FILE).read_text())
    if raw.get("model_type") != MODEL_TYPE:
        raise ModelFolderError(
            f"{path}/{CONFIG_FILE}: model_type is {raw.get('model_type')!r}, expected {MODEL_TYPE!r}"
        )
    cfg = ModelConfig.from_dict(raw["architecture"])
    id2label = {int(k): v for k, v in raw["id2label"].items()}
    if sorted(id2label) != list(range(cfg.num_labels)):
        raise ModelFolderError(f"{path}: id2label must cover 0..{cfg.num_labels - 1}")
    tokenizer = TextTokenizer.from_file(path / TOKENIZER_FILE)
    model = MoEClassifier(cfg)
    state = load_file(str(path / WEIGHTS_FILE), device="cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelFolderError(f"{path}/{WEIGHTS_FILE}: missing tensors {missing}, unexpected tensors {unexpected}")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ModelFolderError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens, model only {cfg.vocab_size}")
    model.to(device).eval()
    return ModelBundle(path.name, path, model, tokenizer, cfg, id2label, raw.get("training", {}))
