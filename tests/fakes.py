"""A numpy fake backend for fast tests of the engine and the API (no torch, no weights). Its logits depend only on a
text's own ids, so batched and unbatched answers agree exactly; it can be made slow to test deadlines and overload."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from service.backends.base import Backend, BatchOutput, LayerRouting, check_tasks, expert_counts, model_info
from service.config import Settings
from service.engine.local_model import LocalModel
from service.engine.loop import InferenceThread
from service.metrics import Metrics
from service.modeling.config import ModelConfig
from service.modeling.folder import ModelFolder, TaskInfo
from service.modeling.tokenizer import Encoded

LABELS = ["business", "sport", "tech"]


class FakeTokenizer:
    pad_id = 0

    def __init__(self) -> None:
        self.tokenizer = self  # the engine reads token strings through .tokenizer, as from an HF tokenizer
        self.prefix: list[int] = []  # no special tokens around a text
        self.suffix: list[int] = []
        self.fallback_id = 1

    def id_to_token(self, i: int) -> str:
        return f"t{i}"

    def encode_inner(self, texts: list[str]) -> list[list[int]]:
        return [[1 + ord(c) % 50 for c in t] for t in texts]

    def encode_batch(self, texts: list[str], max_length: int) -> list[Encoded]:
        return [Encoded(ids[:max_length] or [1], max(len(ids), 1)) for ids in self.encode_inner(texts)]


class FakeBackend(Backend):
    kind, device = "fake", "cpu"

    def __init__(self, name: str = "fake", delay_s: float = 0.0, max_length: int = 64) -> None:
        self.tokenizer = FakeTokenizer()  # type: ignore[assignment]
        cfg = ModelConfig(64, len(LABELS), max_length, d_model=8, n_layers=1, n_heads=2, d_ff=16, num_experts=4)
        self.info = model_info(ModelFolder(Path(name), cfg, tuple(LABELS)))
        self.delay_s = delay_s
        self.calls = 0

    def forward(
        self, sequences: list[list[int]], return_routing: bool = False, tasks: list[list[int]] | None = None
    ) -> BatchOutput:
        self.calls += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        logits = np.array([[sum(s) % 7, len(s) % 5, s[0] % 3] for s in sequences], dtype=np.float32)
        tokens = sum(len(s) for s in sequences)
        experts = np.stack([np.arange(tokens) % 4, (np.arange(tokens) + 1) % 4], axis=1)
        routing = [LayerRouting(experts, np.full((tokens, 2), 0.5, dtype=np.float32))] if return_routing else None
        return BatchOutput(logits, np.bincount(experts.reshape(-1), minlength=4)[None, :].astype(np.int64), routing)

    def warmup(self) -> None:
        pass


TASKS = {"topic": LABELS, "mood": ["glad", "sad"]}
TEMPERATURES = {"topic": 1.0, "mood": 2.0}


class MultiTaskFakeBackend(FakeBackend):
    """A two-task fake (topic: 3 labels, mood: 2 labels with temperature 2): a row per (text, task), as the backend
    contract says. A row's logits depend only on its text's ids and its task."""

    def __init__(self, name: str = "fake-mt", delay_s: float = 0.0, max_length: int = 64) -> None:
        super().__init__(name, delay_s, max_length)
        cfg = ModelConfig(
            64, 3, max_length, d_model=8, n_layers=1, n_heads=2, d_ff=16, num_experts=4, tasks={"topic": 3, "mood": 2}
        )
        tasks = tuple(TaskInfo(t, tuple(labs), TEMPERATURES[t]) for t, labs in TASKS.items())
        self.info = model_info(ModelFolder(Path(name), cfg, (), tasks=tasks))
        self.batches: list[list[list[int]]] = []  # each batch's tasks, to see what ran together

    def forward(
        self, sequences: list[list[int]], return_routing: bool = False, tasks: list[list[int]] | None = None
    ) -> BatchOutput:
        check_tasks(tasks, len(sequences), list(TASKS))
        assert tasks is not None
        self.calls += 1
        self.batches.append(tasks)
        rows = [(s, t) for s, ts in zip(sequences, tasks, strict=True) for t in ts]
        logits = np.full((len(rows), 3), -np.inf, dtype=np.float32)
        for i, (s, t) in enumerate(rows):
            logits[i, : len(list(TASKS.values())[t])] = task_logits(s, t)
        token_task = np.concatenate([np.full(len(s), t) for s, t in rows])
        experts = np.stack([token_task + 2, np.arange(len(token_task)) % 2], 1)  # a task's tokens: expert 2 + task
        routing = None
        if return_routing:
            routing = [LayerRouting(experts, np.full((len(token_task), 2), 0.5, dtype=np.float32))]
        counts, by_task = expert_counts([experts], 4, token_task, len(TASKS))
        return BatchOutput(logits, counts, routing, by_task)


def task_logits(ids: list[int], task: int) -> list[float]:
    full = [float(sum(ids) % 7 + task), float(len(ids) % 5), float(ids[0] % 3 + 2 * task)]
    return full[: len(list(TASKS.values())[task])]


def expected_task_logits(text: str, task: int) -> list[float]:
    return task_logits(FakeTokenizer().encode_batch([text], 64)[0].ids, task)


def expected_logits(text: str) -> list[float]:
    ids = FakeTokenizer().encode_batch([text], 64)[0].ids
    return [float(sum(ids) % 7), float(len(ids) % 5), float(ids[0] % 3)]


class ServedModel:
    """A LocalModel and its inference thread, started on demand (a test may queue texts first)."""

    def __init__(self, backend: Backend, **settings: object) -> None:
        self.model = LocalModel(backend, Settings(**settings), Metrics(), ThreadPoolExecutor(1))  # type: ignore[arg-type]
        self.thread = InferenceThread(self.model)

    def start(self) -> LocalModel:
        self.model.warm_up()
        self.thread.start()
        return self.model

    def stop(self) -> None:
        self.model.close()
        self.thread.join(5)
