"""Served benchmarks: real HTTP servers in their own processes, a light asyncio (aiohttp) load generator here.

The baseline ("naive") is what a first FastAPI deployment of the same model looks like: one request at a time,
one forward per request, no batching. It is started by `python -m service.bench.served naive ...`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_process(
    cmd: list[str], env: dict[str, str], port: int, log_path: Path, timeout_s: float = 120
) -> Iterator[str]:
    """Start a server process, yield its base URL once /v2/health/ready answers 200, stop it afterwards (its
    output goes to log_path). Used by the benchmarks and by the end-to-end tests."""
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}: {log_path.read_text()[-3000:]}")
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready in {timeout_s:.0f} s: {log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_server(kind: str, model_dir: Path, threads: int, log_path: Path) -> contextlib.AbstractContextManager[str]:
    """kind: moe-serve | naive, on a free loopback port."""
    port = free_port()
    env = {**os.environ, "MOE_LOG_LEVEL": "warning"}
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


def _pct(lat: list[float], q: float) -> float:
    if not lat:
        return float("nan")
    s = sorted(lat)
    return round(1000 * s[min(len(s) - 1, int(q * len(s)))], 2)


def _result(
    server: str, texts: str, conc: int | None, rate: float | None, lat: list[float], errors: int, seconds: float
) -> LoadResult:
    n = len(lat) + errors
    return LoadResult(
        server,
        texts,
        conc,
        rate,
        n,
        errors,
        round(seconds, 2),
        round(len(lat) / seconds, 1),
        _pct(lat, 0.5),
        _pct(lat, 0.95),
        _pct(lat, 0.99),
    )


async def _post(session: Any, url: str, body: bytes) -> bool:
    async with session.post(url, data=body, headers={"content-type": "application/json"}) as r:
        await r.read()
        return r.status == 200


def closed_loop(
    url: str, bodies: list[bytes], concurrency: int, seconds: float, server: str, texts: str, warmup_s: float = 1.0
) -> LoadResult:
    """`concurrency` clients, each sending its next request as soon as the last one is answered."""
    import aiohttp

    async def run() -> LoadResult:
        lat: list[float] = []
        errors = 0
        conn = aiohttp.TCPConnector(limit=concurrency + 8)
        async with aiohttp.ClientSession(connector=conn) as session:
            t_start = time.perf_counter()
            measure_from, end = t_start + warmup_s, t_start + warmup_s + seconds

            async def client(i: int) -> None:
                nonlocal errors
                j = i
                while (now := time.perf_counter()) < end:
                    ok = await _post(session, url, bodies[j % len(bodies)])
                    j += concurrency
                    if now >= measure_from:
                        if ok:
                            lat.append(time.perf_counter() - now)
                        else:
                            errors += 1

            await asyncio.gather(*[client(i) for i in range(concurrency)])
        return _result(server, texts, concurrency, None, lat, errors, seconds)

    return asyncio.run(run())


def open_loop(
    url: str, bodies: list[bytes], rate: float, seconds: float, server: str, texts: str, max_in_flight: int = 512
) -> LoadResult:
    """Requests sent on a fixed schedule whatever the answers; latency counts from the scheduled send time, so a
    slow server is charged for the queueing it causes (no coordinated omission)."""
    import aiohttp

    async def run() -> LoadResult:
        lat: list[float] = []
        errors = 0
        sem = asyncio.Semaphore(max_in_flight)
        conn = aiohttp.TCPConnector(limit=max_in_flight)
        async with aiohttp.ClientSession(connector=conn) as session:
            t0 = time.perf_counter()
            n = int(rate * seconds)

            async def one(i: int) -> None:
                nonlocal errors
                scheduled = t0 + i / rate
                await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
                async with sem:
                    try:
                        ok = await _post(session, url, bodies[i % len(bodies)])
                    except aiohttp.ClientError:
                        ok = False
                if ok:
                    lat.append(time.perf_counter() - scheduled)
                else:
                    errors += 1

            await asyncio.gather(*[one(i) for i in range(n)])
            elapsed = time.perf_counter() - t0
        return _result(server, texts, None, rate, lat, errors, elapsed)

    return asyncio.run(run())


def naive_app(model_dir: str, threads: int) -> Any:
    """One request at a time: tokenize, forward a batch of one, answer. Same model, same threads."""
    import numpy as np
    import torch

    from service.modeling.artifacts import load_model
    from service.modeling.classifier import pad_batch

    torch.set_num_threads(threads)
    bundle = load_model(model_dir)
    lock = threading.Lock()
    app = FastAPI()

    @app.get("/v2/health/ready")
    def ready() -> dict:
        return {"ready": True}

    @app.post("/v1/classify")
    async def classify(request: Request) -> JSONResponse:
        body = await request.json()
        texts = body["inputs"] if isinstance(body["inputs"], list) else [body["inputs"]]

        def run() -> list:
            with lock, torch.inference_mode():
                out = []
                for t in texts:
                    ids = bundle.tokenizer.encode_batch([t], bundle.config.max_length)[0].ids
                    p = bundle.model(*pad_batch([ids])).logits.softmax(-1)[0].numpy()
                    out.append({"label": bundle.labels[int(np.argmax(p))], "score": float(p.max())})
                return out

        preds = await asyncio.to_thread(run)
        return JSONResponse({"predictions": preds})

    return app


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "naive":
    import uvicorn

    uvicorn.run(
        naive_app(sys.argv[2], int(sys.argv[4])),
        host="127.0.0.1",
        port=int(sys.argv[3]),
        log_level="warning",
        access_log=False,
    )
