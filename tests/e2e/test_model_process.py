"""The model process behind the API process: what happens when it dies, hangs or is orphaned, and that the
single-process mode gives the same answers."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.e2e.conftest import run_server, spawn_serve

TEXTS = ["shares in the bank rose after profits", "the striker scored twice", "the minister called a vote"]


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _spawn(models_dir: Path, log: Path, **env: str) -> tuple[subprocess.Popen, str]:
    return spawn_serve(log, **{"MOE_MODELS_DIR": str(models_dir), "MOE_MODELS": "tiny", **env})


def _post_in_background(url: str, texts: list[str] = TEXTS) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def post() -> None:
        try:
            out["response"] = httpx.post(f"{url}/v1/classify", json={"inputs": texts}, timeout=30)
        except httpx.HTTPError as exc:
            out["error"] = exc

    thread = threading.Thread(target=post)
    thread.start()
    return thread, out


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_a_lost_model_process_gives_503_and_a_non_zero_exit(models_dir: Path, tmp_path: Path, fault: str) -> None:
    """With MOE_EXIT_ON_MODEL_CRASH (by default the process is restarted: tests/e2e/test_repository.py).
    killed: SIGKILL while a request waits. hung: SIGSTOP, so it cannot even answer pings; after
    MOE_WORKER_HANG_S (plus a slack for long batches) the API process kills it. Either way the waiting request gets
    a clean 503 and the server exits 3, for an orchestrator to restart it."""
    proc, url = _spawn(models_dir, tmp_path / "log", MOE_WORKER_HANG_S="1.5", MOE_EXIT_ON_MODEL_CRASH="true")
    try:
        (model_pid,) = _children(proc.pid)
        assert httpx.post(f"{url}/v1/classify", json={"inputs": TEXTS}).status_code == 200
        os.kill(model_pid, signal.SIGSTOP)  # the request below is then surely in flight when the fault happens
        thread, out = _post_in_background(url)
        time.sleep(0.5)
        if fault == "killed":
            os.kill(model_pid, signal.SIGKILL)
        thread.join(30)
        r = out.get("response")
        assert r is not None, out
        assert r.status_code == 503 and r.json()["type"] == "model_not_ready", r.text
        assert "model process" in r.json()["error"]
        assert proc.wait(30) == 3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = (tmp_path / "log").read_text()
    expected = "exited with code -9" if fault == "killed" else "did not answer for 6.5 s"  # hang + ping slack
    assert expected in log, log


def test_the_model_process_leaves_with_its_parent(models_dir: Path, tmp_path: Path) -> None:
    proc, _ = _spawn(models_dir, tmp_path / "log")
    (model_pid,) = _children(proc.pid)
    proc.kill()  # SIGKILL: the API process cannot stop its child itself
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{model_pid}").exists():
        with open(f"/proc/{model_pid}/stat") as f:
            if f.read().split(")")[-1].split()[0] == "Z":  # exited, waiting to be reaped by init
                break
        time.sleep(0.2)
    else:
        assert not Path(f"/proc/{model_pid}").exists(), "the model process outlived the API process"


def test_single_process_mode_gives_the_same_answers(models_dir: Path, tmp_path: Path) -> None:
    body = {"inputs": TEXTS, "raw_scores": True, "return_routing": True}
    answers = []
    for mode in ("true", "false"):
        with run_server(models_dir, tmp_path / f"{mode}.log", models="tiny", model_process=mode) as url:
            r = httpx.post(f"{url}/v1/classify", json=body)
            assert r.status_code == 200, r.text
            answers.append(r.json()["predictions"])
            metrics = httpx.get(f"{url}/metrics").text
            assert 'moe_texts_total{model="tiny"} 3.0' in metrics and "moe_requests_total" in metrics
    remote, local = answers
    for a, b in zip(remote, local, strict=True):
        sa = np.array([s["score"] for s in a["scores"]])
        sb = np.array([s["score"] for s in b["scores"]])
        assert a["label"] == b["label"] and np.abs(sa - sb).max() < 1e-5
        assert a["routing"]["tokens"] == b["routing"]["tokens"]
        assert a["routing"]["layers"][0]["experts"] == b["routing"]["layers"][0]["experts"]


def _sample(metrics: str, prefix: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith(prefix))


def test_a_client_that_leaves_has_its_texts_dropped(models_dir: Path, tmp_path: Path) -> None:
    """The API process tells the model process when a client disconnects; the texts never reach the model."""
    proc, url = _spawn(models_dir, tmp_path / "log")
    try:
        (model_pid,) = _children(proc.pid)
        assert httpx.post(f"{url}/v1/classify", json={"inputs": TEXTS}).status_code == 200
        before = httpx.get(f"{url}/metrics").text
        os.kill(model_pid, signal.SIGSTOP)  # the request below waits in the socket
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{url}/v1/classify", json={"inputs": ["the client leaves early"]}, timeout=1.0)
        time.sleep(0.5)  # the API sees the disconnect and sends the cancel after the request
        os.kill(model_pid, signal.SIGCONT)
        time.sleep(1.0)
        after = httpx.get(f"{url}/metrics").text
    finally:
        proc.kill()
        proc.wait()
    for name in ('moe_texts_total{model="tiny"}', 'moe_batch_size_texts_count{model="tiny"}'):
        assert _sample(after, name) == _sample(before, name), name
    assert _sample(after, 'moe_request_failures_total{model="tiny",reason="client_disconnected"}') == 1


def test_one_model_process_per_model_and_one_metrics_view(models_dir: Path, tmp_path: Path) -> None:
    proc, url = _spawn(models_dir, tmp_path / "log", MOE_MODELS="tiny,tiny-b")
    try:
        assert len(_children(proc.pid)) == 2
        for name in ("tiny", "tiny-b"):
            r = httpx.post(f"{url}/v1/classify", json={"inputs": TEXTS, "model": name})
            assert r.status_code == 200 and r.json()["model"] == name
        metrics = httpx.get(f"{url}/metrics").text
    finally:
        proc.kill()
        proc.wait()
    # Each family once, with both processes' samples.
    assert metrics.count("# TYPE moe_texts_total counter") == 1
    for name in ("tiny", "tiny-b"):
        assert _sample(metrics, f'moe_texts_total{{model="{name}"}}') == 3


def test_overload_is_refused_in_the_api_process(models_dir: Path, tmp_path: Path) -> None:
    """Texts already sent to the model process fill its queue and a batch (here 4 + 2): the next request gets its
    429 from the API process itself, with no round trip (the model process is stopped meanwhile)."""
    proc, url = _spawn(models_dir, tmp_path / "log", MOE_MAX_QUEUE_TEXTS="4", MOE_MAX_BATCH_SIZE="2")
    try:
        (model_pid,) = _children(proc.pid)
        os.kill(model_pid, signal.SIGSTOP)
        waiting = [_post_in_background(url, TEXTS[:2]) for _ in range(2)]  # 2 x 2 texts in flight: the queue
        time.sleep(0.5)
        refused = httpx.post(f"{url}/v1/classify", json={"inputs": TEXTS}, timeout=5)  # 4 + 3 > 4 + 2
        assert refused.status_code == 429, refused.text
        assert int(refused.headers["retry-after"]) >= 1 and int(refused.headers["retry-after-ms"]) >= 1
        os.kill(model_pid, signal.SIGCONT)
        for thread, out in waiting:
            thread.join(30)
            assert out["response"].status_code == 200
    finally:
        proc.kill()
        proc.wait()
