"""The API layer knows nothing of torch (its sources name it nowhere; importing the app in a fresh interpreter is
in tests/integration/test_layering.py), and the server runs uvloop and httptools."""

from __future__ import annotations

from tests.conftest import ROOT


def test_no_torch_import_under_api() -> None:
    for path in (ROOT / "service" / "api").glob("*.py"):
        assert "torch" not in path.read_text(), path


def test_server_runs_uvloop_and_httptools() -> None:
    from service.server import uvicorn_config

    config = uvicorn_config(object(), "127.0.0.1", 0, "warning", 1.0)
    config.load()  # resolves the classes: fails if uvloop or httptools is missing
    assert config.loop == "uvloop" and config.http_protocol_class.__name__ == "HttpToolsProtocol"
