"""One task of a multi-task model seen as a single-task model: every text asks for that task, the logits are that
task's head's own columns, and the folder record carries that task's labels, temperature and data. Evaluation,
calibration and reports then run on a task exactly as on a single-task folder, with no code of their own; a
backend (ONNX, bf16) of the folder is seen the same way by TaskBackend."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from service.backends.base import Backend, BatchOutput
from service.modeling.artifacts import LoadedModel
from service.modeling.classifier import ClassifierOutput, MoEClassifier


class TaskModel(nn.Module):
    """`model` asked for task `task_id` on every text; logits cut to that task's labels."""

    def __init__(self, model: MoEClassifier, task_id: int) -> None:
        super().__init__()
        self.model = model
        self.task_id = task_id
        self.width = list((model.config.tasks or {}).values())[task_id]
        # What callers (run_model, predict) see: a one-task model of that task's width, taking no task ids.
        self.config = dataclasses.replace(model.config, tasks=None, num_labels=self.width)

    @property
    def moe_layers(self) -> list:
        return self.model.moe_layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> ClassifierOutput:
        tasks = torch.full((input_ids.shape[0],), self.task_id, dtype=torch.long, device=input_ids.device)
        out = self.model(input_ids, attention_mask, tasks)
        return dataclasses.replace(out, logits=out.logits[:, : self.width], token_task=None)


def task_names(loaded: LoadedModel) -> list[str]:
    return [t.name for t in loaded.folder.tasks]


def task_view(loaded: LoadedModel, task: str) -> LoadedModel:
    """The folder's task `task` as a single-task LoadedModel (name `<folder>/<task>`). Its training record is the
    task's own data record (config.json training.tasks[task]), so evaluate finds the task's data and split."""
    folder = loaded.folder
    names = [t.name for t in folder.tasks]
    if task not in names:
        known = ", ".join(names) or "none: a single-task folder"
        raise ValueError(f"model {folder.name} has no task {task!r} (tasks: {known})")
    info = folder.tasks[names.index(task)]
    training = {**folder.training, **(folder.training.get("tasks") or {}).get(task, {})}
    view = dataclasses.replace(folder, labels=info.labels, temperature=info.temperature, training=training, tasks=())
    return LoadedModel(view, TaskModel(loaded.model, names.index(task)), loaded.tokenizer)  # type: ignore[arg-type]


class TaskBackend(Backend):
    """A multi-task folder's backend asked for one task on every text, logits cut to that task's labels: the
    backend twin of TaskModel (what evaluating another backend or precision per task runs)."""

    def __init__(self, backend: Backend, task: str) -> None:
        names = list(backend.info.tasks)
        if task not in names:
            raise ValueError(f"model {backend.info.name} has no task {task!r} (tasks: {', '.join(names) or 'none'})")
        self.backend, self.task_id = backend, names.index(task)
        labels = backend.info.tasks[task]
        self.width = len(labels.labels)
        self.info = dataclasses.replace(backend.info, labels=labels.labels, temperature=labels.temperature, tasks={})
        self.kind, self.device, self.tokenizer = backend.kind, backend.device, backend.tokenizer

    def forward(
        self, sequences: list[list[int]], return_routing: bool = False, tasks: list[list[int]] | None = None
    ) -> BatchOutput:
        if tasks is not None:
            raise ValueError("tasks given to a single-task view")
        out = self.backend.forward(sequences, return_routing, [[self.task_id]] * len(sequences))
        return dataclasses.replace(out, logits=out.logits[:, : self.width], task_expert_counts=None)
