"""Reading and checking a model folder's config.json, without torch: every backend (torch, ONNX Runtime) and the
API use it, so a folder is judged the same way whichever runs it."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.modeling.config import ModelConfig
from service.modeling.layout import CONFIG_FILE, MODEL_TYPE, TOKENIZER_FILE


class ModelFolderError(ValueError):
    """A model folder is missing a file or holds an inconsistent one."""


@dataclass
class FolderConfig:
    path: Path
    config: ModelConfig
    id2label: dict[int, str]
    training: dict[str, Any] = field(default_factory=dict)  # dataset, split, recipe name: lets evaluate find data
    temperature: float = 1.0  # probabilities are softmax(logits / temperature); the model's logits never change
    raw: dict[str, Any] = field(default_factory=dict)  # the whole config.json

    @property
    def labels(self) -> list[str]:
        return [self.id2label[i] for i in range(len(self.id2label))]


def read_folder(model_dir: str | Path, weights_file: str) -> FolderConfig:
    """config.json checked, plus the presence of the tokenizer and of `weights_file` (what the backend will read)."""
    path = Path(model_dir)
    for name in (CONFIG_FILE, weights_file, TOKENIZER_FILE):
        if not (path / name).is_file():
            raise ModelFolderError(f"{path}: missing {name}")
    raw = json.loads((path / CONFIG_FILE).read_text())
    if raw.get("model_type") != MODEL_TYPE:
        raise ModelFolderError(
            f"{path}/{CONFIG_FILE}: model_type is {raw.get('model_type')!r}, expected {MODEL_TYPE!r}"
        )
    temperature = raw.get("temperature", 1.0)  # folders from before calibration have none
    if not valid_temperature(temperature):
        raise ModelFolderError(f"{path}/{CONFIG_FILE}: temperature must be a finite number > 0, got {temperature!r}")
    cfg = ModelConfig.from_dict(raw["architecture"])
    id2label = {int(k): v for k, v in raw["id2label"].items()}
    if sorted(id2label) != list(range(cfg.num_labels)):
        raise ModelFolderError(f"{path}: id2label must cover 0..{cfg.num_labels - 1}")
    return FolderConfig(path, cfg, id2label, raw.get("training", {}), float(temperature), raw)


def valid_temperature(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def write_config(model_dir: Path, config: dict[str, Any]) -> None:
    (model_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def update_config(model_dir: str | Path, **keys: Any) -> None:
    """Set top-level keys of config.json in place; every other key keeps its content and order."""
    path = Path(model_dir)
    config = json.loads((path / CONFIG_FILE).read_text())
    config.update(keys)
    write_config(path, config)


def write_temperature(model_dir: str | Path, temperature: float) -> None:
    if not valid_temperature(temperature):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    update_config(model_dir, temperature=float(temperature))
