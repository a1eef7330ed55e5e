"""The routing explorer's server side, in process over the numpy fake backend: the page and its assets (open without
the API key, a fixed list of files), GET /v1/models/{model}/experts on both paths (model server on a thread, one
process), and the pure expert_profile() it serves. The page itself runs in a real browser in tests/e2e."""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api.explorer import ASSETS, WEB
from service.app import create_app
from service.config import Settings
from service.modeling.expert_profile import expert_profile
from tests.fakes import LABELS, FakeBackend

ROOT = Path(__file__).resolve().parents[2]
# The fake model: 1 MoE layer of 4 experts, labels business, sport, tech.
PROFILE = {"split": "validation", "layers": [{"layer": 0, "share": [0.1, 0.2, 0.3, 0.4]}]}
REPORT = {
    "split": "test",
    "expert_by_class": [
        {
            "layer": 0,
            "share": {"business": [0.7, 0.1, 0.2, 0.0], "sport": [0.0, 0.5, 0.1, 0.4], "tech": [0.2, 0.2, 0.6, 0.0]},
        }
    ],
}


@pytest.fixture(params=[True, False], ids=["model-server", "one-process"])
def client(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[TestClient]:
    """`alpha` has eval.json and routing_profile.json; `beta` has neither. The API key is "k"."""
    for name in ("alpha", "beta"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    (tmp_path / "alpha" / "routing_profile.json").write_text(json.dumps(PROFILE))
    (tmp_path / "alpha" / "eval.json").write_text(json.dumps(REPORT))
    settings = Settings(models_dir=tmp_path, default_model="alpha", model_process=request.param, api_key="k")
    app = create_app(settings, lambda path: FakeBackend(path.name))
    with TestClient(app) as c:
        yield c


KEY = {"Authorization": "Bearer k"}


def test_page_and_assets_load_without_the_key(client: TestClient) -> None:
    page = client.get("/explorer")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for name, media_type in ASSETS.items():
        assert f'"/explorer/{name}"' in page.text  # the page links each asset it is served with
        r = client.get(f"/explorer/{name}")
        assert r.status_code == 200 and r.headers["content-type"] == media_type
        assert r.headers["cache-control"] == "no-cache"
    assert client.get("/v1/models/alpha/experts").status_code == 401  # the data still needs the key


def test_only_the_listed_files_are_served(client: TestClient) -> None:
    for name in ("explorer.html", "..%2Fapp.py", "nope.js"):
        r = client.get(f"/explorer/{name}", headers=KEY)
        assert r.status_code == 404 and r.json()["type"] == "not_found", name


def test_experts_of_an_evaluated_model(client: TestClient) -> None:
    r = client.get("/v1/models/alpha/experts", headers=KEY)
    assert r.status_code == 200
    body = r.json()
    assert (body["model"], body["num_experts"], body["top_k"], body["labels"]) == ("alpha", 4, 2, LABELS)
    assert (body["training_split"], body["evaluation_split"]) == ("validation", "test")
    (layer,) = body["layers"]
    assert layer["training_share"] == PROFILE["layers"][0]["share"]
    assert layer["class_share"] == REPORT["expert_by_class"][0]["share"]
    assert [e["training_share"] for e in layer["experts"]] == [0.1, 0.2, 0.3, 0.4]
    assert layer["experts"][0]["top_classes"] == [{"label": "business", "share": 0.7}, {"label": "tech", "share": 0.2}]
    assert [c["label"] for c in layer["experts"][3]["top_classes"]] == ["sport"]  # classes that never use it: left out


def test_experts_of_a_model_never_evaluated_and_of_no_model(client: TestClient) -> None:
    body = client.get("/v1/models/beta/experts", headers=KEY).json()
    assert body["layers"] == [] and body["training_split"] is None and body["evaluation_split"] is None
    r = client.get("/v1/models/gamma/experts", headers=KEY)
    assert r.status_code == 404 and r.json()["type"] == "model_not_found"


def test_experts_route_is_documented(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    op = spec["paths"]["/v1/models/{model}/experts"]["get"]
    assert op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/ExpertsResponse")
    assert "/explorer" not in spec["paths"]  # a page, not an API


def test_profile_files_for_another_layout_are_ignored() -> None:
    assert expert_profile(REPORT, PROFILE, moe_layers=1, num_experts=4) is not None
    assert expert_profile(REPORT, PROFILE, moe_layers=2, num_experts=4) is None  # another number of layers
    assert expert_profile(REPORT, PROFILE, moe_layers=1, num_experts=3) is None  # another number of experts
    assert expert_profile(None, None, 1, 4) is None
    half = expert_profile(None, PROFILE, 1, 4)
    assert half is not None and half["evaluation_split"] is None
    assert half["layers"][0]["class_share"] is None and half["layers"][0]["experts"][2]["top_classes"] == []


def test_every_web_file_is_packaged() -> None:
    """pyproject's package data covers the page and its assets, so an installed service (wheel, image) serves them."""
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[tool.setuptools.package-data]", 1)[1]
    patterns = json.loads(re.search(r"^service = (\[.*\])$", section, re.M).group(1))  # type: ignore[union-attr]
    files = sorted(p.relative_to(WEB.parent).as_posix() for p in WEB.iterdir())
    assert files == sorted(["web/explorer.html", *(f"web/{n}" for n in ASSETS)])
    assert all(any(fnmatch.fnmatch(f, p) for p in patterns) for f in files)
