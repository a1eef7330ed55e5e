"""Served benchmarks: real HTTP servers in their own processes, driven by wrk (C, one thread) on the same machine.

The baseline ("naive") is what a first FastAPI deployment of the same model looks like: one request at a time,
one forward per request, no batching. It is started by `python -m service.bench.served naive ...`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from service.bench.timing import SETTLE_S

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ready(
    cmd: list[str], env: dict[str, str], port: int, log_path: Path, timeout_s: float = 120
) -> tuple[subprocess.Popen, str]:
    """Start a server process (its output to log_path) and return it with its base URL once /v2/health/ready
    answers 200. If it exits or is not ready in time, it is killed and RuntimeError carries the end of its log."""
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log_path.read_text()[-3000:]}")
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as r:
            if r.status == 200:
                return proc, url
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"server not ready in {timeout_s:.0f} s: {log_path.read_text()[-3000:]}")
        time.sleep(0.2)


@contextlib.contextmanager
def server_process(
    cmd: list[str], env: dict[str, str], port: int, log_path: Path, timeout_s: float = 120
) -> Iterator[str]:
    """spawn_ready, yielding the base URL, and the server stopped afterwards. Used by the benchmarks and by the
    end-to-end tests."""
    proc, url = spawn_ready(cmd, env, port, log_path, timeout_s)
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_server(
    kind: str, model_dir: Path, threads: int, log_path: Path, grpc_port: int | None = None
) -> contextlib.AbstractContextManager[str]:
    """kind: moe-serve | naive, on a free loopback port (moe-serve also on grpc_port, when given)."""
    port = free_port()
    env = {**os.environ, "MOE_LOG_LEVEL": "warning"}
    if grpc_port is not None:
        env["MOE_GRPC_PORT"] = str(grpc_port)
    if kind == "moe-serve":
        cmd = [
            sys.executable,
            "-m",
            "service.cli",
            "serve",
            "--models-dir",
            str(model_dir.parent),
            "--models",
            model_dir.name,
            "--port",
            str(port),
            "--threads",
            str(threads),
        ]
    else:
        cmd = [sys.executable, "-m", "service.bench.served", "naive", str(model_dir), str(port), str(threads)]
    return server_process(cmd, env, port, log_path)


@dataclass
class LoadResult:
    server: str
    texts: str
    concurrency: int | None  # closed loop
    rate: float | None  # open loop, requests/s offered
    requests: int
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    generator_core_share: float = 0.0  # the load generator's CPU time over (wall time x cores)


WRK_SCRIPT = Path(__file__).resolve().parents[2] / "load_tests" / "wrk_classify.lua"


def closed_loop(
    url: str, bodies: list[bytes], concurrency: int, seconds: float, server: str, texts: str, workdir: Path
) -> LoadResult:
    """wrk, one thread, `concurrency` connections each sending its next request as soon as the last is answered.
    wrk is C and light; its share of the cores (it runs on the server's machine) is measured and reported."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("wrk is not installed: run `make tools` (Debian package wrk)")
    body_file = workdir / f"bodies-{texts}.jsonl"
    body_file.write_bytes(b"\n".join(bodies) + b"\n")
    path = urllib.parse.urlsplit(url).path
    base = url[: len(url) - len(path)]
    cmd = [wrk, "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "--timeout", "30s", "-s", str(WRK_SCRIPT), base]
    env = {**os.environ, "WRK_BODIES": str(body_file), "WRK_PATH": path}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)  # reaped children only: the servers still run
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=seconds + 60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {err.decode()[-2000:]}")
    line = next(x for x in out.decode().splitlines() if x.startswith("{"))
    r = json.loads(line)
    wall = r["duration_us"] / 1e6
    errors = r["non_2xx"] + r["socket_errors"] + r["timeouts"]
    return LoadResult(
        server=server,
        texts=texts,
        concurrency=concurrency,
        rate=None,
        requests=r["requests"],
        errors=errors,
        seconds=round(wall, 2),
        rps=round((r["requests"] - errors) / wall, 1),
        p50_ms=round(r["p50_us"] / 1000, 3),
        p95_ms=round(r["p95_us"] / 1000, 3),
        p99_ms=round(r["p99_us"] / 1000, 3),
        generator_core_share=round(
            (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / (wall * (os.cpu_count() or 1)), 4
        ),
    )


Load = Callable[[str, int], LoadResult]  # (texts, concurrency) -> one timed run against one server


def in_turns(loads: dict[str, Load], points: list[tuple[str, int]], runs: int) -> list[dict[str, Any]]:
    """Per point (texts, concurrency), every server's load once in turn, `runs` times over: the servers are all up,
    and a slow spell of the machine (README: the spread paragraph) hits them alike instead of one server's runs.
    One row per server and point, in server order: the run with the median throughput, and every run's rate."""
    results: dict[tuple[str, str, int], list[LoadResult]] = {}
    for (texts, c), _, (name, load) in itertools.product(points, range(runs), loads.items()):
        time.sleep(SETTLE_S)
        results.setdefault((name, texts, c), []).append(load(texts, c))
    order = list(loads)
    return [median_run(results[key]) for key in sorted(results, key=lambda k: order.index(k[0]))]


def median_run(runs: list[LoadResult]) -> dict[str, Any]:
    r = sorted(runs, key=lambda x: x.rps)[len(runs) // 2]
    log.info(
        "%s %s c=%s: %.1f req/s p50 %.2f ms %s",
        r.server,
        r.texts,
        r.concurrency,
        r.rps,
        r.p50_ms,
        [x.rps for x in runs],
    )
    return {**asdict(r), "runs": len(runs), "rps_all_runs": [x.rps for x in runs]}


def closed_loop_grpc(
    address: str, model: str, texts: list[str], concurrency: int, seconds: float, server: str, label: str, workdir: Path
) -> LoadResult:
    """The same closed loop over gRPC (ModelInfer, one text per call): service/bench/grpc_load.py in a process of
    its own, its share of the cores measured as wrk's is."""
    texts_file = workdir / f"texts-{label}.jsonl"
    texts_file.write_text("\n".join(json.dumps(t) for t in texts) + "\n")
    cmd = [sys.executable, "-m", "service.bench.grpc_load", address, model, str(texts_file), str(concurrency)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([*cmd, f"{seconds:g}"], capture_output=True, timeout=seconds + 60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"grpc_load failed ({proc.returncode}): {proc.stderr.decode()[-2000:]}")
    r = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    wall = r["duration_us"] / 1e6
    return LoadResult(
        server=server,
        texts=label,
        concurrency=concurrency,
        rate=None,
        requests=r["requests"],
        errors=r["errors"],
        seconds=round(wall, 2),
        rps=round((r["requests"] - r["errors"]) / wall, 1),
        p50_ms=round(r["p50_us"] / 1000, 3),
        p95_ms=round(r["p95_us"] / 1000, 3),
        p99_ms=round(r["p99_us"] / 1000, 3),
        generator_core_share=round(
            (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / (wall * (os.cpu_count() or 1)), 4
        ),
    )


def backend_figures(model_dir: Path, threads: int, short: list[list[int]], batch: int = 64) -> dict[str, Any]:
    """The engine alone on the backend the server picks (same settings resolution), on the same short texts: one
    text at a time back to back, and full batches. The yardsticks for the served figures."""
    from service.backends import load_backend

    backend = load_backend(model_dir, "cpu", "auto", threads, "auto")
    backend.warmup()
    singles = []
    for ids in short[:200]:
        t0 = time.perf_counter()
        backend.forward([ids])
        singles.append(time.perf_counter() - t0)
    batches = [short[i : i + batch] for i in range(0, len(short) - batch + 1, batch)] or [short]
    t0 = time.perf_counter()
    texts = 0
    while time.perf_counter() - t0 < 3.0:
        for b in batches:
            backend.forward(b)
            texts += len(b)
    return {
        "backend": backend.kind,
        "precision": backend.info.precision,
        "single_text_ms": round(1000 * float(np.median(singles)), 3),
        "batch": batch,
        "batch_texts_per_s": round(texts / (time.perf_counter() - t0), 1),
    }


def lone_requests(url: str, bodies: list[bytes], n: int = 40, gap_s: float = 0.05) -> dict[str, Any]:
    """Requests one at a time with the server idle in between (as a lightly used service sees them): the server's
    own x-inference-time and x-total-time, medians."""
    inference, total = [], []
    for body in bodies[:n]:
        time.sleep(gap_s)
        req = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            inference.append(float(r.headers["x-inference-time"]))
            total.append(float(r.headers["x-total-time"]))
    return {
        "requests": len(inference),
        "gap_ms": gap_s * 1000,
        "inference_ms_p50": round(float(np.median(inference)), 3),
        "total_ms_p50": round(float(np.median(total)), 3),
    }


def yardstick_app(answer: Callable[[list[str]], Awaitable[list[dict]]]) -> FastAPI:
    """The whole HTTP surface of a yardstick server (naive, dense): readiness, and POST /v1/classify with
    {"inputs": text | [texts]} answered by `answer`."""
    app = FastAPI()

    @app.get("/v2/health/ready")
    def ready() -> dict:
        return {"ready": True}

    @app.post("/v1/classify")
    async def classify(request: Request) -> JSONResponse:
        body = await request.json()
        texts = body["inputs"] if isinstance(body["inputs"], list) else [body["inputs"]]
        return JSONResponse({"predictions": await answer(texts)})

    return app


def naive_app(model_dir: str, threads: int) -> Any:
    """One request at a time: tokenize, forward a batch of one, answer. Same model, same threads."""
    import numpy as np
    import torch

    from service.modeling.artifacts import load_model
    from service.modeling.classifier import pad_batch

    torch.set_num_threads(threads)
    bundle = load_model(model_dir)
    lock = threading.Lock()

    def run(texts: list[str]) -> list:
        with lock, torch.inference_mode():
            out = []
            for t in texts:
                ids = bundle.tokenizer.encode_batch([t], bundle.folder.config.max_length)[0].ids
                p = bundle.model(*pad_batch([ids])).logits.softmax(-1)[0].numpy()
                out.append({"label": bundle.folder.labels[int(np.argmax(p))], "score": float(p.max())})
            return out

    async def answer(texts: list[str]) -> list:
        return await asyncio.to_thread(run, texts)

    return yardstick_app(answer)


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "naive":
    import uvicorn

    uvicorn.run(
        naive_app(sys.argv[2], int(sys.argv[4])),
        host="127.0.0.1",
        port=int(sys.argv[3]),
        log_level="warning",
        access_log=False,
    )
