"""Shared fixtures: a tiny model trained by the project's own code (seconds), reused across the session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "bbc-news-moe"

# Two cores: keep torch from oversubscribing when the server and the tests run side by side.
torch.set_num_threads(int(os.environ.get("MOE_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from service.training.train import Recipe, train

    out = tmp_path_factory.mktemp("models") / "tiny"
    recipe = Recipe.from_file(ROOT / "recipes" / "tiny.yaml")
    train(recipe, out, progress=False)
    return out
