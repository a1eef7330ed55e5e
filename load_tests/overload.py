"""Overload and soak runs against a real `moe-serve serve` process it starts itself (loopback only).

    python load_tests/overload.py --factor 10 --seconds 60          # 10x the measured saturation for a minute
    python load_tests/overload.py --factor 0.5 --seconds 600        # soak: half the saturation for 10 minutes

First a closed loop (64 clients, a few seconds) measures the saturation rate in requests/s; then an open loop
offers `factor` times that rate for `seconds` (each request: `--texts` short texts). It checks what the service
guarantees and exits 1 when one fails:
- no transport error and no status other than 200 and 429 (every accepted request answered, every refusal a 429);
- every 429 carries Retry-After and retry-after-ms;
- p99 of the answered requests within the server's request timeout;
- resident memory of the server (API and model processes) after warm-up grows by less than `--max-rss-growth` (5%).
The JSON report (rates, status counts, latency percentiles, RSS samples) goes to stdout and to `--json`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.bench.served import free_port, server_process  # noqa: E402

TEXTS = [
    "Shares in the bank rose after profits beat forecasts",
    "The striker scored twice in the second half",
    "Ministers will vote on the new education bill",
    "A new smartphone chip promises longer battery life",
    "The film won three awards at the festival",
]


def rss_mb(pid: int) -> float:
    """Resident memory of the server: the process listening on the port and its children (the model process)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    total = 0.0
    for p in [str(pid), *children]:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) / 1024
    return total


async def closed_loop(url: str, body: bytes, clients: int, seconds: float) -> float:
    import aiohttp

    done = 0
    end = time.perf_counter() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:

        async def client() -> None:
            nonlocal done
            while time.perf_counter() < end:
                async with session.post(url, data=body, headers={"content-type": "application/json"}) as r:
                    await r.read()
                    done += r.status == 200

        await asyncio.gather(*[client() for _ in range(clients)])
    return done / seconds


async def open_loop(url: str, body: bytes, rate: float, seconds: float, pid: int) -> dict:
    import aiohttp

    statuses: Counter = Counter()
    errors: dict[str, str] = {}  # the first body of each unexpected status
    latencies: list[float] = []
    missing_retry_headers = 0
    rss: list[tuple[float, float]] = []
    t0 = time.perf_counter()

    async def one(session: aiohttp.ClientSession, scheduled: float) -> None:
        nonlocal missing_retry_headers
        try:
            async with session.post(url, data=body, headers={"content-type": "application/json"}) as r:
                text = await r.read()
                statuses[r.status] += 1
                if r.status not in (200, 429):
                    errors.setdefault(str(r.status), text.decode(errors="replace")[:300])
                if r.status == 200:
                    latencies.append(time.perf_counter() - scheduled)
                elif r.status == 429 and not ("Retry-After" in r.headers and "retry-after-ms" in r.headers):
                    missing_retry_headers += 1
        except aiohttp.ClientError as exc:
            statuses[f"transport: {type(exc).__name__}"] += 1

    async def sample_rss() -> None:
        while time.perf_counter() - t0 < seconds:
            rss.append((round(time.perf_counter() - t0, 1), round(rss_mb(pid), 1)))
            await asyncio.sleep(1.0)

    connector = aiohttp.TCPConnector(limit=0)  # open loop: no client-side cap on connections
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        sampler = asyncio.create_task(sample_rss())
        tasks, n = [], 0
        while (now := time.perf_counter() - t0) < seconds:
            due = int(now * rate) + 1
            while n < due:
                tasks.append(asyncio.create_task(one(session, t0 + n / rate)))
                n += 1
            await asyncio.sleep(0.002)
        await asyncio.gather(*tasks)
        await sampler
    lat = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    return {
        "offered": n,
        "offered_rate": round(n / seconds, 1),
        "statuses": {str(k): v for k, v in statuses.items()},
        "accepted_p50_ms": round(float(np.percentile(lat, 50)), 1),
        "accepted_p99_ms": round(float(np.percentile(lat, 99)), 1),
        "refusals_missing_retry_headers": missing_retry_headers,
        "error_examples": errors,
        "rss_mb": rss,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", default=str(ROOT / "models"))
    p.add_argument("--model", default="bbc-news-minilm-moe")
    p.add_argument("--factor", type=float, default=10.0, help="offered load as a multiple of saturation")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--texts", type=int, default=8, help="texts per request")
    p.add_argument("--timeout-s", type=float, default=30.0, help="the server's MOE_REQUEST_TIMEOUT_S")
    p.add_argument("--max-rss-growth", type=float, default=0.05)
    p.add_argument("--json", help="also write the report here")
    args = p.parse_args()

    body = json.dumps({"inputs": [TEXTS[i % len(TEXTS)] for i in range(args.texts)], "model": args.model}).encode()
    port = free_port()
    env = {
        **os.environ,
        "MOE_MODELS_DIR": args.models_dir,
        "MOE_MODELS": args.model,
        "MOE_PORT": str(port),
        "MOE_LOG_LEVEL": "warning",
        "MOE_REQUEST_TIMEOUT_S": str(args.timeout_s),
    }
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"moe-overload-{port}.log"
    cmd = [sys.executable, "-m", "service.cli", "serve"]
    with server_process(cmd, env, port, log, 120) as url:
        pid = _server_pid(port)
        classify = f"{url}/v1/classify"
        saturation = asyncio.run(closed_loop(classify, body, 64, 5.0))
        rate = max(1.0, args.factor * saturation)
        report = asyncio.run(open_loop(classify, body, rate, args.seconds, pid))
    report = {"model": args.model, "texts_per_request": args.texts, "saturation_rps": round(saturation, 1),
              "factor": args.factor, "seconds": args.seconds, **report}  # fmt: skip
    samples = [m for t, m in report["rss_mb"] if t >= min(10.0, args.seconds / 4)]  # after warm-up
    growth = (max(samples) - samples[0]) / samples[0] if len(samples) > 1 else 0.0
    report["rss_growth_after_warmup"] = round(growth, 4)
    allowed = {"200", "429"}
    failures = [
        *(f"status {s}: {n}" for s, n in report["statuses"].items() if s not in allowed),
        *([f"{report['refusals_missing_retry_headers']} refusals without Retry-After"]
          if report["refusals_missing_retry_headers"] else []),
        *([f"p99 {report['accepted_p99_ms']} ms over the {args.timeout_s} s timeout"]
          if report["accepted_p99_ms"] > args.timeout_s * 1000 else []),
        *([f"RSS grew {growth:.1%} after warm-up"] if growth > args.max_rss_growth else []),
    ]  # fmt: skip
    report["failures"] = failures
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 1 if failures else 0


def _server_pid(port: int) -> int:
    """The pid of the process listening on `port` (from /proc/net/tcp and the fds of our children)."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        if int(parts[1].split(":")[1], 16) == port and parts[3] == "0A":  # LISTEN
            inode = parts[9]
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) == f"socket:[{inode}]":
                    return int(proc.name)
        except OSError:
            continue
    raise RuntimeError(f"no process listens on port {port}")


if __name__ == "__main__":
    sys.exit(main())
