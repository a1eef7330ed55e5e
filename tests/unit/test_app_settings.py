"""The API's HTTP limits come from the app's own settings (app.state.settings), on every classify route."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from tests.fakes import FakeBackend


def test_client_batch_limit_is_the_apps_setting(tmp_path: Path) -> None:
    (tmp_path / "alpha").mkdir()
    (tmp_path / "alpha" / "config.json").write_text("{}")
    settings = Settings(models_dir=tmp_path, max_client_batch_size=2)
    app = create_app(settings, lambda path: FakeBackend(path.name, 0.0))  # type: ignore[arg-type,return-value]
    with TestClient(app) as client:
        assert app.state.settings is settings
        assert client.post("/v1/classify", json={"inputs": ["a", "b"]}).status_code == 200
        fast = client.post("/v1/classify", json={"inputs": ["a", "b", "c"]})  # the fast route (JSON body)
        assert fast.status_code == 422 and "inputs" in fast.text, fast.text
        for texts, status in ((["a", "b"], 200), (["a", "b", "c"], 422)):
            v2 = {"inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}]}
            assert client.post("/v2/models/alpha/infer", json=v2).status_code == status
