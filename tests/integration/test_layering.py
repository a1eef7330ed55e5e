"""The API layer knows nothing of torch: importing the app (routes, engine, metrics) must not import it. A fresh
interpreter, since the test process has torch loaded already."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_app_imports_without_torch() -> None:
    code = (
        "import sys, service.app, service.api.v1, service.api.v2, service.api.grpc_v2.server; "
        "print('torch' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_settings_and_table_import_no_torch_or_onnxruntime() -> None:
    code = (
        "import sys, service.config, service.backends.variants, service.cli; "
        "print(sorted({'torch', 'onnxruntime'} & set(sys.modules)))"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
