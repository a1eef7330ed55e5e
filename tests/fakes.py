"""A numpy fake backend for fast tests of the engine and the API (no torch, no weights). Its logits depend only on a
text's own ids, so batched and unbatched answers agree exactly; it can be made slow to test deadlines and overload."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from service.backends.base import Backend, BatchOutput, LayerRouting, model_info
from service.config import Settings
from service.engine.local_model import LocalModel
from service.engine.loop import InferenceThread
from service.metrics import Metrics
from service.modeling.config import ModelConfig
from service.modeling.folder import ModelFolder
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
