"""A training recipe (YAML or JSON): where the data is, the architecture (or the pretrained base to convert), and
how to train. Strict: a misspelt key is an error. The `model` section is derived from ModelConfig."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from service.modeling.config import ModelConfig
from service.training.data import DEFAULT_SEED


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in a recipe is an error, not a silently ignored key


class TaskDataRecipe(_Strict):
    """One task of a multi-task recipe: its data source and columns."""

    source: str  # built-in name or path to .csv/.jsonl (relative to the recipe file)
    text_column: str = "text"
    label_column: str = "label"


class DataRecipe(_Strict):
    source: str = "bbc-news"  # built-in name or path to .csv/.jsonl (relative to the recipe file)
    text_column: str = "text"
    label_column: str = "label"
    split_seed: int = DEFAULT_SEED
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
    max_examples_per_split: int | None = None  # deterministic stratified cap, for quick runs (per task)
    # Multi-task, either one source per task (task name -> source; `source` is then unused) or one file whose
    # `task_column` names each row's task.
    tasks: dict[str, TaskDataRecipe] | None = None
    task_column: str | None = None

    @model_validator(mode="after")
    def _one_task_source(self) -> DataRecipe:
        if self.tasks is not None and self.task_column is not None:
            raise ValueError("data: give `tasks` (a source per task) or `task_column` (one file), not both")
        return self

    @property
    def multi_task(self) -> bool:
        return self.tasks is not None or self.task_column is not None


def _model_recipe() -> type[BaseModel]:
    """The recipe's `model` section: every ModelConfig field with its default, except those the data decides
    (labels, padding id, tasks). Derived, so the two cannot drift apart; vocab_size is the size of the tokenizer to
    train."""
    hints = typing.get_type_hints(ModelConfig)
    fields: dict[str, Any] = {
        f.name: (hints[f.name], 8000 if f.name == "vocab_size" else f.default)
        for f in dataclasses.fields(ModelConfig)
        if f.name not in ("num_labels", "pad_token_id", "tasks")
    }
    return create_model("ModelRecipe", __base__=_Strict, **fields)


ModelRecipe = _model_recipe()


class BaseRecipe(_Strict):
    """Start from a pretrained dense encoder (BERT format) and convert its FFNs to experts before fine-tuning."""

    model: str  # folder with config.json + model.safetensors + tokenizer.json, or an installed package name
    method: Literal["moefication", "upcycling"] = "moefication"
    num_experts: int = 8
    top_k: int = 2
    moe_every: int = 1  # 1: every block's FFN becomes experts; 2: every other block
    max_length: int = 256  # serving length (at most the base's positions)
    dropout: float = 0.1
    # Multi-task: the top MoE layers with a router per task (None: all). 2 by measurement on MiniLM (README,
    # "Multi-task"): a second task on the same text costs ~1.4x one task there, against 2.25x with every layer.
    task_routed_layers: int | None = 2


class TrainingRecipe(_Strict):
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    grad_clip: float = 1.0
    patience: int = 3  # epochs without validation macro-F1 improvement before stopping
    aux_loss_coef: float = 0.01  # Switch load-balancing loss
    z_loss_coef: float = 0.001  # ST-MoE router z-loss
    seed: int = 0
    threads: int | None = None
    # Augmentation (training only): texts longer than max_length are read through a random window of it half of
    # the time (the first window otherwise, as at inference), and each token is dropped with this probability.
    random_window: bool = True
    token_dropout: float = 0.1
    label_smoothing: float = 0.1
    # Validation, early stopping and the saved model use an exponential moving average of the weights: on a
    # small dataset it is far steadier from epoch to epoch than the raw weights. None turns it off.
    ema_decay: float | None = 0.99
    # Short-text robustness: this share of training samples is replaced by a short view of the text, half of the
    # time its first line (a title, where the text has several lines), otherwise a random window of 4-24 tokens.
    short_text_prob: float = Field(0.0, ge=0.0, le=1.0)
    # Training reads windows of at most this many tokens (default: the model's max_length); shorter is faster.
    train_max_length: int | None = None
    # Learning rate of the parameters that start untrained (head; routers of a converted model); default lr.
    head_lr: float | None = None
    # Weights on disk. float16/bfloat16 halve the folder: the weights are rounded to that grid before every
    # validation, so the epoch chosen, the temperature and every reported figure are those of the weights as
    # stored (computed in fp32), and the file holds them exactly. What rounding moved is recorded in config.json.
    weights_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    # Validate (early stopping, best epoch) on each validation text and on its first line too (where texts have
    # titles): the model is then chosen for short inputs as well as whole documents.
    validate_headlines: bool = False
    # Multi-task: the loss weight of each task (default 1; the cross-entropy is the weighted mean over the batch's
    # texts), and how the epoch mixes tasks: each task drawn in proportion to its size ** (1 / T) (1: by size,
    # large: evenly), its texts shuffled and repeated as needed; batches mix tasks.
    task_weights: dict[str, float] = Field(default_factory=dict)
    task_sampling_temperature: float = Field(1.0, gt=0.0)


class Recipe(_Strict):
    name: str = "model"
    base: BaseRecipe | None = None  # fine-tune a converted pretrained encoder instead of training from scratch
    data: DataRecipe = Field(default_factory=DataRecipe)
    model: ModelRecipe = Field(default_factory=ModelRecipe)  # type: ignore[valid-type]
    training: TrainingRecipe = Field(default_factory=TrainingRecipe)

    @model_validator(mode="after")
    def _one_architecture_source(self) -> Recipe:
        if self.base is not None and "model" in self.model_fields_set:
            raise ValueError(
                "a recipe with `base` takes its architecture from the base model: drop the `model` section "
                "(experts, top_k, max_length and dropout are set under `base`)"
            )
        return self

    @classmethod
    def from_file(cls, path: str | Path) -> Recipe:
        path = Path(path)
        text = path.read_text()
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
        recipe = cls.model_validate(raw or {})
        # A relative data path is read relative to the recipe file, like an include.
        recipe.data.source = _beside(path, recipe.data.source)
        for task in (recipe.data.tasks or {}).values():
            task.source = _beside(path, task.source)
        return recipe


def _beside(recipe_path: Path, source: str) -> str:
    beside = recipe_path.parent / source
    return str(beside.resolve()) if not Path(source).is_absolute() and beside.is_file() else source
