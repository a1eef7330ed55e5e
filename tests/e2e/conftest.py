"""A real `moe-serve serve` process (uvicorn) on a free loopback port, serving models trained by our own code."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.bench.served import free_port, server_process, spawn_ready
from service.modeling.folder import update_config

SERVE = [sys.executable, "-m", "service.cli", "serve"]


def spawn_serve(log_path: Path, **env: str) -> tuple[subprocess.Popen, str]:
    """A `moe-serve serve` process the test controls itself (signals, exit status), configured by MOE_* variables
    in env; returned once it is ready."""
    port = free_port()
    full_env = {**os.environ, "MOE_PORT": str(port), "MOE_LOG_LEVEL": "warning", **env}
    return spawn_ready(SERVE, full_env, port, log_path, 90)


@contextlib.contextmanager
def run_server(models_dir: Path, log_path: Path, **settings: str) -> Iterator[str]:
    """`moe-serve serve` configured through MOE_* variables, as a deployment would be."""
    port = free_port()
    env = {
        **os.environ,
        "MOE_MODELS_DIR": str(models_dir),
        "MOE_PORT": str(port),
        "MOE_HOST": "127.0.0.1",
        "MOE_LOG_LEVEL": "warning",
        **{f"MOE_{k.upper()}": str(v) for k, v in settings.items()},
    }
    # A server that exits or never gets ready raises RuntimeError with the end of its log.
    with server_process(SERVE, env, port, log_path, 90) as url:
        yield url


@pytest.fixture(scope="session")
def models_dir(tiny_model_dir: Path, tiny_bert_moe_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three models in one repository: `tiny` (default), a copy named `tiny-b` that carries a measured token budget
    for its variant (as `export --choose` writes it), and `tiny-bert-moe`, a BERT-format encoder converted to experts
    and fine-tuned."""
    d = tmp_path_factory.mktemp("repo")
    shutil.copytree(tiny_model_dir, d / "tiny")
    shutil.copytree(tiny_model_dir, d / "tiny-b")
    update_config(d / "tiny-b", serving={"backend": "torch", "precision": "fp32", "max_batch_tokens": 512})
    shutil.copytree(tiny_bert_moe_dir, d / "tiny-bert-moe")
    return d


@pytest.fixture(scope="module")
def server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with run_server(
        models_dir, log, default_model="tiny", max_client_batch_size=8, max_body_bytes=200_000, max_wait_ms=5
    ) as url:
        yield url
