"""A model folder's record, read once from its config.json and checked, without torch: every backend (torch, ONNX
Runtime), the engine (through ModelInfo), evaluation and the CLI judge and describe a folder by this one record."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.modeling.config import ModelConfig
from service.modeling.layout import CONFIG_FILE, MODEL_TYPE, ONNX_FILE, ONNX_INT8_FILE, TOKENIZER_FILE, WEIGHTS_FILE

# What a model's answers depend on: a change to any of these is a new version (eval.json, plots, README are not).
VERSIONED_FILES = (CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, ONNX_FILE, ONNX_INT8_FILE)


class ModelFolderError(ValueError):
    """A model folder is missing a file or holds an inconsistent one."""


@dataclass(frozen=True)
class TaskInfo:
    """One task of a multi-task folder: its labels (class id 0, 1, ... of its head) and its own temperature."""

    name: str
    labels: tuple[str, ...]
    temperature: float = 1.0


@dataclass(frozen=True)
class ModelFolder:
    """What config.json says about a model folder, checked. Frozen: one load reads it once and passes it on."""

    path: Path
    config: ModelConfig
    labels: tuple[str, ...]  # label of class id 0, 1, ...
    training: dict[str, Any] = field(default_factory=dict)  # dataset, split, recipe name: lets evaluate find data
    temperature: float = 1.0  # probabilities are softmax(logits / temperature); the model's logits never change
    serving: dict[str, Any] = field(default_factory=dict)  # the measured {"backend", "precision"} (`export --choose`)
    # Multi-task folders (config.json "tasks"): every task, in task-id order; labels and temperature are then empty
    # and 1.0, since each task has its own. Single-task folders: ().
    tasks: tuple[TaskInfo, ...] = ()

    @property
    def name(self) -> str:
        return self.path.name

    def file(self, filename: str) -> Path:
        """The path of a file the caller is about to read (weights, graph): a missing one is a folder error."""
        path = self.path / filename
        if not path.is_file():
            raise ModelFolderError(f"{self.path}: missing {filename}")
        return path


def read_folder(model_dir: str | Path | ModelFolder) -> ModelFolder:
    """The checked record of a folder (config.json and the tokenizer present); a record is passed through as is."""
    if isinstance(model_dir, ModelFolder):
        return model_dir
    path = Path(model_dir)
    for name in (CONFIG_FILE, TOKENIZER_FILE):
        if not (path / name).is_file():
            raise ModelFolderError(f"{path}: missing {name}")
    raw = json.loads((path / CONFIG_FILE).read_text())
    if raw.get("model_type") != MODEL_TYPE:
        raise ModelFolderError(
            f"{path}/{CONFIG_FILE}: model_type is {raw.get('model_type')!r}, expected {MODEL_TYPE!r}"
        )
    cfg = ModelConfig.from_dict(raw["architecture"])
    if "tasks" in raw:
        tasks = _read_tasks(path, raw["tasks"], cfg)
        return ModelFolder(path, cfg, (), raw.get("training", {}), 1.0, raw.get("serving") or {}, tasks)
    temperature = raw.get("temperature", 1.0)  # folders from before calibration have none
    if not valid_temperature(temperature):
        raise ModelFolderError(f"{path}/{CONFIG_FILE}: temperature must be a finite number > 0, got {temperature!r}")
    id2label = {int(k): v for k, v in raw["id2label"].items()}
    if sorted(id2label) != list(range(cfg.num_labels)):
        raise ModelFolderError(f"{path}: id2label must cover 0..{cfg.num_labels - 1}")
    labels = tuple(id2label[i] for i in range(cfg.num_labels))
    return ModelFolder(path, cfg, labels, raw.get("training", {}), float(temperature), raw.get("serving") or {})


def _read_tasks(path: Path, raw: Any, cfg: ModelConfig) -> tuple[TaskInfo, ...]:
    """config.json "tasks": {name: {"labels": [...], "temperature": T}}, matching the architecture's task heads."""
    where = f"{path}/{CONFIG_FILE}"
    if not isinstance(raw, dict) or not raw:
        raise ModelFolderError(f"{where}: tasks must map each task name to its labels")
    if cfg.tasks is None or list(cfg.tasks) != list(raw):
        raise ModelFolderError(f"{where}: tasks {list(raw)} do not match the architecture's {cfg.task_names}")
    out = []
    for name, spec in raw.items():
        labels = spec.get("labels") if isinstance(spec, dict) else None
        named = isinstance(labels, list) and all(isinstance(x, str) for x in labels)
        if not named or len(labels) != cfg.tasks[name]:
            raise ModelFolderError(f"{where}: task {name!r} needs a list of its {cfg.tasks[name]} label names")
        temperature = spec.get("temperature", 1.0)
        if not valid_temperature(temperature):
            raise ModelFolderError(f"{where}: task {name!r} temperature must be a finite number > 0")
        out.append(TaskInfo(name, tuple(labels), float(temperature)))
    return tuple(out)


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


def write_task_temperatures(model_dir: str | Path, temperatures: dict[str, float]) -> None:
    """A multi-task folder's temperatures, per task, into config.json's tasks (the rest kept as is)."""
    path = Path(model_dir)
    tasks = json.loads((path / CONFIG_FILE).read_text())["tasks"]
    for task, t in temperatures.items():
        if task not in tasks or not valid_temperature(t):
            raise ValueError(f"no task {task!r}, or temperature {t!r} is not a finite number > 0")
        tasks[task]["temperature"] = float(t)
    update_config(path, tasks=tasks)


def write_temperature(model_dir: str | Path, temperature: float) -> None:
    if not valid_temperature(temperature):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    update_config(model_dir, temperature=float(temperature))


def folder_version(model_dir: str | Path) -> str:
    """A short hash of the folder's config, tokenizer and weights (those present): the model's version, the same
    for the same files wherever they are."""
    digest = hashlib.sha256()
    for name in VERSIONED_FILES:
        path = Path(model_dir) / name
        if path.is_file():
            digest.update(name.encode() + b"\0")
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()[:12]
