"""Which tasks a request runs, for a multi-task model: the names a request gives (one, a list, or none for every
task) as task ids, checked once at the edge; and the shapes that follow from them (one row of logits per task,
as wide as the task with the most labels). Pure: the API, the engine and the IPC use it alike."""

from __future__ import annotations

from service.backends.base import ModelInfo
from service.errors import ErrorKind, ServiceError

TaskSpec = str | list[str] | None  # a request's `task`: one name, several, or None (every task)


def select_tasks(info: ModelInfo, task: TaskSpec, field: str = "task") -> list[int] | None:
    """The task ids a request asks for, in its order (None for a single-task model). A task named for a single-task
    model or unknown to the model is not found (404, like an unknown model); an empty or repeated list is invalid."""
    names = list(info.tasks)
    if not names:
        if task is not None:
            raise ServiceError(
                ErrorKind.TASK_NOT_FOUND, f"model {info.name!r} is a single-task model: send no {field}", field=field
            )
        return None
    if task is None:
        return list(range(len(names)))
    asked = [task] if isinstance(task, str) else task
    if not asked:
        raise ServiceError(ErrorKind.VALIDATION, f"{field} is an empty list; name at least one task", field=field)
    repeated = sorted({t for t in asked if asked.count(t) > 1})
    if repeated:
        raise ServiceError(ErrorKind.VALIDATION, f"{field} names {repeated} more than once", field=field)
    unknown = [t for t in asked if t not in names]
    if unknown:
        raise ServiceError(
            ErrorKind.TASK_NOT_FOUND,
            f"model {info.name!r} has no task {unknown[0]!r}; its tasks: {', '.join(names)}",
            field=field,
        )
    return [names.index(t) for t in asked]


def label_width(info: ModelInfo) -> int:
    """Columns of a logits row: the model's labels, or for a multi-task model its largest task's (the rows of
    smaller tasks are padded with -inf, see Backend.forward)."""
    return max((len(t.labels) for t in info.tasks.values()), default=len(info.labels))


def task_name(info: ModelInfo, task_id: int) -> str:
    return list(info.tasks)[task_id]


def task_labels(info: ModelInfo, task_id: int | None) -> list[str]:
    """The labels of one task's rows (the model's labels for a single-task model, task_id None)."""
    return info.labels if task_id is None else list(info.tasks.values())[task_id].labels


def temperatures(info: ModelInfo) -> list[float]:
    """Each task's temperature, by task id; [the model's] for a single-task model."""
    return [t.temperature for t in info.tasks.values()] or [info.temperature]
