"""The model repository against real processes (`moe-serve serve`, one model process per folder, the small
committed model models/bbc-news-moe copied into a temporary repository): reload, unload and load under a steady
load with no failed request, a killed model process restarted while the other model answers, a restart loop that
ends in FAILED, and poll mode loading a copied folder once it has settled, never a half-written one."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from service.modeling.folder import write_temperature
from tests.conftest import ROOT
from tests.e2e.conftest import spawn_serve

pytestmark = pytest.mark.e2e
SMALL = ROOT / "models" / "bbc-news-moe"


def _repo(tmp_path: Path, *names: str) -> Path:
    repo = tmp_path / "repo"
    for name in names:
        shutil.copytree(SMALL, repo / name)
    return repo


@contextlib.contextmanager
def _serve(tmp_path: Path, repo: Path, **env: str) -> Iterator[tuple[subprocess.Popen, str]]:
    env = {"MOE_MODELS_DIR": str(repo), "MOE_BACKEND": "torch", "MOE_PRECISION": "fp32", "MOE_THREADS": "1", **env}
    proc, url = spawn_serve(tmp_path / "log", **env)
    try:
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _model_pid(server_pid: int, model: str) -> int:
    """The model process serving `model`: the child whose settings name that folder."""
    for pid in Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split():
        with contextlib.suppress(OSError):
            if f'"models":["{model}"]' in Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace"):
                return int(pid)
    raise LookupError(model)


def _index(url: str) -> dict[str, dict]:
    return {e["name"]: e for e in httpx.get(f"{url}/v2/repository/index", timeout=10).json()}


def _until(check: Callable[[], bool], timeout_s: float = 60.0) -> None:
    end = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.1)


class SteadyLoad:
    """One client sending one text at a time to a model, as long as it runs; every status is counted, and every
    non-200 answer kept."""

    def __init__(self, url: str, model: str) -> None:
        self.url, self.model = url, model
        self.statuses: Counter[int] = Counter()
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> SteadyLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                try:
                    r = client.post(f"{self.url}/v1/classify", json={"inputs": "shares rose", "model": self.model})
                    self.statuses[r.status_code] += 1
                    if r.status_code != 200:
                        self.failures.append(f"{r.status_code} {r.headers.get('retry-after')} {r.text[:200]}")
                except httpx.HTTPError as exc:
                    self.statuses[0] += 1
                    self.failures.append(repr(exc))
                time.sleep(0.005)


def test_reload_unload_and_load_under_load_fail_no_request(tmp_path: Path) -> None:
    repo = _repo(tmp_path, "a", "b")
    with _serve(tmp_path, repo, MOE_MODEL_CONTROL="explicit") as (proc, url):
        first = _index(url)["a"]["version"]
        old_pid = _model_pid(proc.pid, "a")
        with SteadyLoad(url, "a") as on_a, SteadyLoad(url, "b") as on_b:
            time.sleep(1)
            write_temperature(repo / "a", 1.5)  # a new version of a
            r = httpx.post(f"{url}/v2/repository/models/a/load", timeout=120)
            assert r.status_code == 200, r.text
            time.sleep(1)
        assert on_a.failures == [] and on_b.failures == [], (on_a.failures[:5], on_b.failures[:5])
        assert on_a.statuses[200] > 20 and on_b.statuses[200] > 20, (on_a.statuses, on_b.statuses)
        index = _index(url)
        assert index["a"]["state"] == "READY" and index["a"]["version"] != first
        _until(lambda: not Path(f"/proc/{old_pid}").exists() or _zombie(old_pid), 30)  # the old process stopped
        with SteadyLoad(url, "a") as on_a:
            assert httpx.post(f"{url}/v2/repository/models/b/unload", timeout=60).json()["state"] == "UNAVAILABLE"
            assert httpx.post(f"{url}/v1/classify", json={"inputs": "x", "model": "b"}).status_code == 404
            assert httpx.post(f"{url}/v2/repository/models/b/load", timeout=120).json()["state"] == "READY"
            assert httpx.post(f"{url}/v1/classify", json={"inputs": "x", "model": "b"}).status_code == 200
        assert on_a.failures == [] and on_a.statuses[200] > 10, on_a.failures[:5]
        metrics = httpx.get(f"{url}/metrics").text
        assert 'moe_model_reloads_total{model="a",outcome="ok"} 1.0' in metrics
        assert 'moe_model_unloads_total{model="b",outcome="ok"} 1.0' in metrics


def _zombie(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    return True


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_a_lost_model_process_is_restarted_while_the_other_model_answers(tmp_path: Path, fault: str) -> None:
    """killed: SIGKILL. hung: SIGSTOP, so it cannot answer pings; the API process kills it after MOE_WORKER_HANG_S
    plus the ping slack (5 s). Either way it is restarted in place."""
    repo = _repo(tmp_path, "a", "b")
    with _serve(tmp_path, repo, MOE_RESTART_BACKOFF_S="1", MOE_WORKER_HANG_S="1") as (proc, url):
        pid = _model_pid(proc.pid, "a")
        with SteadyLoad(url, "b") as on_b, SteadyLoad(url, "a") as on_a:
            time.sleep(0.5)
            os.kill(pid, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
            _until(lambda: _index(url)["a"]["state"] == "RESTARTING", 20)
            assert httpx.get(f"{url}/v2/models/a/ready").status_code == 503
            _until(lambda: _index(url)["a"]["state"] == "READY", 60)
            time.sleep(0.5)
        assert on_b.failures == [] and on_b.statuses[200] > 20, (on_b.failures[:5], on_b.statuses)
        # a's requests while it was down: 503 with Retry-After, nothing else.
        assert on_a.statuses[503] >= 1 and set(on_a.statuses) <= {200, 503}, on_a.statuses
        assert all(f.startswith("503 ") and f.split()[1].isdigit() for f in on_a.failures), on_a.failures[:5]
        assert _model_pid(proc.pid, "a") != pid
        assert "restarted after" in _index(url)["a"]["reason"]
        assert 'moe_model_restarts_total{model="a",outcome="ok"} 1.0' in httpx.get(f"{url}/metrics").text
        assert proc.poll() is None


def test_a_restart_loop_ends_in_failed_and_the_server_keeps_the_other_model(tmp_path: Path) -> None:
    repo = _repo(tmp_path, "a", "b")
    env = {"MOE_RESTART_BACKOFF_S": "0.2", "MOE_MAX_RESTARTS": "3"}
    with _serve(tmp_path, repo, **env) as (proc, url):
        (repo / "a" / "model.safetensors").write_bytes(b"truncated")  # every restart now fails to load
        os.kill(_model_pid(proc.pid, "a"), signal.SIGKILL)
        _until(lambda: _index(url)["a"]["state"] == "FAILED", 90)
        assert "3 crashes within 300 s" in _index(url)["a"]["reason"]
        r = httpx.post(f"{url}/v1/classify", json={"inputs": "x", "model": "a"})
        assert r.status_code == 503 and r.json()["type"] == "model_failed", r.text
        assert httpx.post(f"{url}/v1/classify", json={"inputs": "x", "model": "b"}).status_code == 200
        metrics = httpx.get(f"{url}/metrics").text
        assert 'moe_model_restarts_total{model="a",outcome="error"} 2.0' in metrics
        assert 'moe_model_restarts_total{model="a",outcome="gave_up"} 1.0' in metrics
        assert proc.poll() is None


def test_every_model_failed_stops_the_server_with_status_3(tmp_path: Path) -> None:
    repo = _repo(tmp_path, "a")
    with _serve(tmp_path, repo, MOE_RESTART_BACKOFF_S="0.2", MOE_MAX_RESTARTS="2") as (proc, _url):
        (repo / "a" / "model.safetensors").write_bytes(b"truncated")
        os.kill(_model_pid(proc.pid, "a"), signal.SIGKILL)
        assert proc.wait(60) == 3
    assert "every model has failed" in (tmp_path / "log").read_text()


def test_poll_mode_loads_a_copied_folder_once_settled_and_unloads_a_removed_one(tmp_path: Path) -> None:
    repo = _repo(tmp_path, "a")
    env = {"MOE_MODEL_CONTROL": "poll", "MOE_POLL_INTERVAL_S": "0.3", "MOE_POLL_SETTLE_S": "1.5"}
    with _serve(tmp_path, repo, **env) as (_proc, url):
        target = repo / "b"
        target.mkdir()
        for f in sorted(SMALL.iterdir(), key=lambda p: p.name != "config.json"):  # config.json first: discoverable
            if f.name != "model.safetensors":
                shutil.copy(f, target / f.name)
        weights = (SMALL / "model.safetensors").read_bytes()
        with (target / "model.safetensors").open("wb") as out:  # a slow copy: 8 chunks, 0.5 s apart
            for i in range(8):
                out.write(weights[i * len(weights) // 8 : (i + 1) * len(weights) // 8])
                out.flush()
                time.sleep(0.5)
                assert _index(url)["b"]["state"] == "UNAVAILABLE" and _index(url)["b"]["reason"] == ""
        _until(lambda: _index(url)["b"]["state"] == "READY", 60)
        assert httpx.post(f"{url}/v1/classify", json={"inputs": "x", "model": "b"}).status_code == 200
        assert 'moe_model_loads_total{model="b",outcome="error"}' not in httpx.get(f"{url}/metrics").text
        shutil.rmtree(target)
        _until(lambda: _index(url)["b"]["state"] == "UNAVAILABLE", 30)
        assert httpx.post(f"{url}/v1/classify", json={"inputs": "x", "model": "b"}).status_code == 404
        assert httpx.post(f"{url}/v1/classify", json={"inputs": "x", "model": "a"}).status_code == 200
