"""The API layer knows nothing of torch: importing the app (routes, engine, metrics) must not import it."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_app_imports_without_torch() -> None:
    code = "import sys, service.app, service.api.v1, service.api.v2; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_no_torch_import_under_api() -> None:
    for path in (ROOT / "service" / "api").glob("*.py"):
        assert "torch" not in path.read_text(), path


def test_server_runs_uvloop_and_httptools() -> None:
    from service.server import uvicorn_config

    config = uvicorn_config(object(), "127.0.0.1", 0, "warning", 1.0)
    config.load()  # resolves the classes: fails if uvloop or httptools is missing
    assert config.loop == "uvloop" and config.http_protocol_class.__name__ == "HttpToolsProtocol"
