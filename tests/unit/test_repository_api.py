"""The model repository routes in process: the real app and RemoteEngine, each "model process" a ModelServer on a
thread over inproc:// with the numpy fake backend. Load, reload (a new version swapped in), unload, a failed
reload leaving the old version serving, and a crashed model server restarted, then failed after max_restarts."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from tests.fakes import FakeBackend


def _loader(path: Path) -> FakeBackend:
    if (path / "BROKEN").exists():
        raise ValueError(f"{path}/model.safetensors: truncated")
    return FakeBackend(path.name)


@pytest.fixture
def client_for(tmp_path: Path) -> Iterator:
    clients: list[TestClient] = []

    def make(**settings: object) -> TestClient:
        for name in ("alpha", "beta"):
            (tmp_path / name).mkdir(exist_ok=True)
            (tmp_path / name / "config.json").write_text('{"v": 1}')
        s = Settings(models_dir=tmp_path, default_model="alpha", restart_backoff_s=0.05, **settings)  # type: ignore[arg-type]
        client = TestClient(create_app(s, _loader)).__enter__()
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


def _index(client: TestClient) -> dict[str, dict]:
    r = client.get("/v2/repository/index")
    assert r.status_code == 200, r.text
    return {e["name"]: e for e in r.json()}


def _classify(client: TestClient, model: str) -> int:
    return client.post("/v1/classify", json={"inputs": "shares rose", "model": model}).status_code


def _until(check, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_index_lists_every_folder_and_control_needs_explicit_mode(client_for) -> None:
    client = client_for()
    index = _index(client)
    assert [e["state"] for e in index.values()] == ["READY", "READY"]
    assert index["alpha"]["version"] == index["beta"]["version"] and len(index["alpha"]["version"]) == 12
    r = client.post("/v2/repository/models/alpha/load")
    assert r.status_code == 409 and r.json()["type"] == "model_control_off", r.text
    assert client.post("/v2/repository/index").json() == client.get("/v2/repository/index").json()
    assert set(client.delete("/v2/repository/index").headers["allow"].split(", ")) == {"GET", "POST"}


def test_reload_swaps_in_the_new_version_and_unload_removes_the_model(client_for, tmp_path: Path) -> None:
    client = client_for(model_control="explicit")
    old = _index(client)["alpha"]["version"]
    (tmp_path / "alpha" / "config.json").write_text('{"v": 2}')
    r = client.post("/v2/repository/models/alpha/load")
    assert r.status_code == 200 and r.json()["state"] == "READY", r.text
    assert r.json()["version"] not in (None, old)
    assert _classify(client, "alpha") == 200
    assert client.get("/v2/models/alpha").json()["versions"] == [r.json()["version"]]
    metrics = client.get("/metrics").text
    assert 'moe_model_reloads_total{model="alpha",outcome="ok"} 1.0' in metrics
    assert f'moe_model_version_info{{model="alpha",version="{r.json()["version"]}"}} 1.0' in metrics
    assert f'version="{old}"' in metrics  # beta's, still serving the first version
    assert client.post("/v2/repository/models/beta/unload").json()["state"] == "UNAVAILABLE"
    assert _classify(client, "beta") == 404 and _index(client)["beta"]["reason"] == "unloaded"
    assert client.post("/v2/repository/models/beta/load").status_code == 200 and _classify(client, "beta") == 200
    assert client.post("/v2/repository/models/nope/load").status_code == 404
    assert client.post("/v2/repository/models/../load").status_code == 404


def test_a_failed_reload_leaves_the_old_version_serving(client_for, tmp_path: Path) -> None:
    client = client_for(model_control="explicit")
    before = _index(client)["alpha"]
    (tmp_path / "alpha" / "BROKEN").write_text("")
    r = client.post("/v2/repository/models/alpha/load")
    assert r.status_code == 503 and "truncated" in r.json()["error"], r.text
    after = _index(client)["alpha"]
    assert after["state"] == "READY" and after["version"] == before["version"]
    assert "reload failed" in after["reason"] and "truncated" in after["reason"]
    assert _classify(client, "alpha") == 200


def test_a_crashed_model_server_is_restarted_then_failed_after_max_restarts(client_for) -> None:
    client = client_for(max_restarts=2)
    engine = client.app.state.engine
    engine.models["alpha"].process.proc.kill()
    _until(lambda: _index(client)["alpha"]["reason"].startswith("restarted after"))
    assert _index(client)["alpha"]["state"] == "READY" and _classify(client, "alpha") == 200
    engine.models["alpha"].process.proc.kill()  # the second crash within the window: given up
    _until(lambda: _index(client)["alpha"]["state"] == "FAILED")
    r = client.post("/v1/classify", json={"inputs": "x", "model": "alpha"})
    assert r.status_code == 503 and r.json()["type"] == "model_failed", r.text
    assert _classify(client, "beta") == 200  # the other model never stopped
    metrics = client.get("/metrics").text
    assert 'moe_model_restarts_total{model="alpha",outcome="ok"} 1.0' in metrics
    assert 'moe_model_restarts_total{model="alpha",outcome="gave_up"} 1.0' in metrics


def test_single_process_mode_answers_501(tmp_path: Path) -> None:
    (tmp_path / "alpha").mkdir()
    (tmp_path / "alpha" / "config.json").write_text("{}")
    with TestClient(create_app(Settings(models_dir=tmp_path, model_process=False), _loader)) as client:
        r = client.get("/v2/repository/index")
        assert r.status_code == 501 and r.json()["type"] == "not_supported", r.text


def test_poll_mode_loads_reloads_and_unloads_settled_folders(client_for, tmp_path: Path) -> None:
    client = client_for(model_control="poll", poll_interval_s=0.02, poll_settle_s=0.3)
    (tmp_path / "gamma").mkdir()
    (tmp_path / "gamma" / "config.json").write_text('{"v": 1}')
    _until(lambda: _index(client)["gamma"]["state"] == "READY")
    first = _index(client)["gamma"]["version"]
    (tmp_path / "gamma" / "config.json").write_text('{"v": 2}')
    _until(lambda: _index(client)["gamma"]["version"] != first)
    assert _classify(client, "gamma") == 200
    for f in (tmp_path / "gamma").iterdir():
        f.unlink()
    (tmp_path / "gamma").rmdir()
    _until(lambda: _index(client)["gamma"]["state"] == "UNAVAILABLE")
    assert _classify(client, "gamma") == 404 and _classify(client, "alpha") == 200
    r = client.post("/v2/repository/models/alpha/unload")
    assert r.status_code == 409, r.text  # poll mode owns the repository
