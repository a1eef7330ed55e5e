"""A real `moe-serve serve` process (uvicorn) on a free loopback port, serving models trained by our own code."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def run_server(models_dir: Path, log_path: Path, **settings: str) -> Iterator[str]:
    port = _free_port()
    env = {
        **os.environ,
        "MOE_MODELS_DIR": str(models_dir),
        "MOE_PORT": str(port),
        "MOE_HOST": "127.0.0.1",
        "MOE_LOG_LEVEL": "warning",
        **{f"MOE_{k.upper()}": str(v) for k, v in settings.items()},
    }
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready after 90 s:\n{log_path.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def models_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two models in one repository: `tiny` (default) and a copy named `tiny-b`."""
    d = tmp_path_factory.mktemp("repo")
    shutil.copytree(tiny_model_dir, d / "tiny")
    shutil.copytree(tiny_model_dir, d / "tiny-b")
    return d


@pytest.fixture(scope="module")
def server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with run_server(
        models_dir, log, default_model="tiny", max_client_batch_size=8, max_body_bytes=200_000, max_wait_ms=5
    ) as url:
        yield url
