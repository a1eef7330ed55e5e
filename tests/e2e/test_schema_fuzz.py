"""schemathesis against the service's own OpenAPI schema, on a real server, bounded for CI: no 5xx, every response
as documented (status, content type, body schema), no schema-valid request rejected (408 excepted: a request whose
own timeout_ms was too short; see schemathesis.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import run_server

pytestmark = pytest.mark.e2e
CONFIG = Path(__file__).with_name("schemathesis.toml")


INFER = "/v2/models/{model}/infer"
# Every check on every operation, infer included: its documented body says that a tensor has `data` and a shape
# that agrees with it (service/api/v2.py), so a schema-valid body is one the code accepts.
RUNS = {"all but infer": ["--exclude-path", INFER], "infer": ["--include-path", INFER]}


@pytest.mark.parametrize("run", list(RUNS))
def test_openapi_schema_holds_under_fuzzing(run: str, models_dir: Path, tmp_path: Path) -> None:
    st = str(Path(sys.executable).with_name("schemathesis"))  # installed beside this interpreter (the venv)
    with run_server(models_dir, tmp_path / "log", default_model="tiny", max_body_bytes=200_000) as url:
        r = subprocess.run(
            [st, "--config-file", str(CONFIG), "run", f"{url}/openapi.json", "--checks", "all", *RUNS[run],
             "--max-examples", "30", "--seed", "7", "--workers", "1"],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        out = r.stdout + r.stderr
        assert r.returncode == 0, out[-6000:]
        assert "Unresolvable references" not in out, out[-3000:]
        assert httpx.post(f"{url}/v1/classify", json={"inputs": "still here"}).status_code == 200
