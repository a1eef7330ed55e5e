"""A model folder: config.json + model.safetensors + tokenizer.json (+ eval.json, routing_profile.json, card).

Weights are read with safetensors only; nothing in a model folder is ever unpickled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from service.modeling.classifier import MoEClassifier
from service.modeling.folder import (  # noqa: F401 (re-exported: callers load and write folders through here)
    ModelFolder,
    ModelFolderError,
    read_folder,
    valid_temperature,
    write_config,
    write_temperature,
)
from service.modeling.layout import MODEL_TYPE, TOKENIZER_FILE, WEIGHTS_FILE
from service.modeling.tokenizer import TextTokenizer

# How weights may be stored on disk; computation is fp32 whatever the file holds.
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class LoadedModel:
    """A model folder loaded for torch: its record (the one description of the folder), the weights and tokenizer."""

    folder: ModelFolder
    model: MoEClassifier
    tokenizer: TextTokenizer


def save_model(
    out_dir: str | Path,
    model: MoEClassifier,
    tokenizer: TextTokenizer,
    labels: list[str] | dict[str, list[str]],
    training: dict[str, Any] | None = None,
    temperature: float | dict[str, float] = 1.0,
    weights_dtype: str = "float32",
) -> Path:
    """Write the folder. weights_dtype float16/bfloat16 halves the file; loading always computes in fp32 (the
    trainer checks the rounded weights' answers against fp32 before it chooses to store them so). A multi-task
    model takes labels and temperatures per task ({task: ...}), written as config.json "tasks"."""
    if weights_dtype not in STORAGE_DTYPES:
        raise ValueError(f"weights_dtype must be one of {', '.join(STORAGE_DTYPES)}, got {weights_dtype!r}")
    temperatures = temperature if isinstance(temperature, dict) else {"": temperature}
    if not all(valid_temperature(t) for t in temperatures.values()):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    config: dict[str, Any] = {"model_type": MODEL_TYPE, "architecture": cfg.to_dict()}
    if isinstance(labels, dict):
        config["tasks"] = {
            t: {"labels": list(labs), "temperature": float(temperatures.get(t, 1.0))} for t, labs in labels.items()
        }
    else:
        config["id2label"] = {str(i): lab for i, lab in enumerate(labels)}
        config["label2id"] = {lab: i for i, lab in enumerate(labels)}
    config |= {"max_length": cfg.max_length, "training": training or {}}
    if not isinstance(labels, dict):
        config["temperature"] = float(temperatures[""])
    config["weights_dtype"] = weights_dtype
    write_config(out, config)
    dtype = STORAGE_DTYPES[weights_dtype]
    state = {
        k: (v.to(dtype) if v.is_floating_point() else v).detach().contiguous().cpu()
        for k, v in model.state_dict().items()
    }
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt", "model_type": MODEL_TYPE})
    (out / WEIGHTS_FILE).chmod(0o644)  # safetensors creates it owner-only; a server running as another user reads it
    tokenizer.save(out / TOKENIZER_FILE)
    return out


def load_model(model_dir: str | Path | ModelFolder, device: str | torch.device = "cpu") -> LoadedModel:
    folder = read_folder(model_dir)
    cfg, weights = folder.config, folder.file(WEIGHTS_FILE)
    tokenizer = TextTokenizer.from_file(folder.path / TOKENIZER_FILE)
    model = MoEClassifier(cfg)
    state = load_file(str(weights), device="cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelFolderError(f"{weights}: missing tensors {missing}, unexpected tensors {unexpected}")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ModelFolderError(
            f"{folder.path}: tokenizer has {tokenizer.vocab_size} tokens, model only {cfg.vocab_size}"
        )
    model.to(device).eval()
    return LoadedModel(folder, model, tokenizer)
