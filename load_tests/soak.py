"""The long soak (not CI): a real `moe-serve serve` at a fraction of its measured saturation for an hour, to show
whether resident memory levels off after warm-up.

    nice -n 19 python load_tests/soak.py                        # an hour at half saturation (the default)
    python load_tests/soak.py --seconds 180 --json soak.json    # a short run that proves the script works
    python load_tests/soak.py --env ONEDNN_PRIMITIVE_CACHE_CAPACITY=256 --env MALLOC_ARENA_MAX=2

First a closed loop (64 clients, 5 s) measures the saturation rate; then an open loop offers `--factor` times it for
`--seconds`, sampling the resident memory of the API process and of each model process every `--sample-s`. It
exits 1 when a request fails (any status but 200, or a transport error) or when the server's memory in the
second half of the run grows by `--max-late-growth` (1%) or more: the median of the last minute against the median
of the minute at the half-way point (medians, so one sample taken mid-allocation does not decide). Each process's
own growth is in the report, to say which one grows. `--env` passes variables to the server (and so to its model
processes): a cache that grows (oneDNN's primitive cache, glibc malloc arenas) can be bounded that way and the run
repeated.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overload import ROOT, TEXTS, _server_pid, closed_loop

from service.bench.served import free_port, server_process


def rss_by_process(pid: int) -> dict[str, float]:
    """MB resident of the API process ("api") and of each child, by its pid (a restarted model process is a new
    series)."""
    out = {}
    for name, p in [("api", str(pid))] + [(c, c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out[name] = round(int(line.split()[1]) / 1024, 1)
        except OSError:
            continue
    return out


async def steady_load(url: str, body: bytes, rate: float, seconds: float, pid: int, sample_s: float) -> dict:
    """Open loop at `rate`; finished requests are counted and dropped (an hour of tasks would fill the client)."""
    import aiohttp

    statuses: Counter = Counter()
    errors: dict[str, str] = {}
    samples: list[tuple[float, dict[str, float]]] = []
    in_flight: set[asyncio.Task] = set()
    t0 = time.perf_counter()

    async def one(session: aiohttp.ClientSession) -> None:
        try:
            async with session.post(url, data=body, headers={"content-type": "application/json"}) as r:
                text = await r.read()
                statuses[str(r.status)] += 1
                if r.status != 200:
                    errors.setdefault(str(r.status), text.decode(errors="replace")[:300])
        except aiohttp.ClientError as exc:
            statuses[f"transport: {type(exc).__name__}"] += 1

    async def sample() -> None:
        while time.perf_counter() - t0 < seconds:
            samples.append((round(time.perf_counter() - t0, 1), rss_by_process(pid)))
            await asyncio.sleep(sample_s)

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        sampler = asyncio.create_task(sample())
        n = 0
        while (now := time.perf_counter() - t0) < seconds:
            while n < int(now * rate) + 1:
                task = asyncio.create_task(one(session))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                n += 1
            await asyncio.sleep(0.002)
        await asyncio.gather(*in_flight)
        await sampler
    return {"offered": n, "offered_rate": round(n / seconds, 1), "statuses": dict(statuses), "errors": errors,
            "rss_samples": samples}  # fmt: skip


def late_growth(samples: list[tuple[float, dict[str, float]]], seconds: float, window_s: float) -> dict[str, float]:
    """Growth of each series (and of the total) from the window at half time to the last window."""

    def median_in(lo: float, hi: float, key: str | None) -> float | None:
        window = [m for t, m in samples if lo <= t < hi]
        vals = [sum(m.values()) if key is None else m[key] for m in window if key is None or key in m]
        return statistics.median(vals) if vals else None

    half, end = seconds / 2, seconds
    out = {}
    for key in [None, *sorted({k for _, m in samples for k in m})]:
        a, b = median_in(half, half + window_s, key), median_in(end - window_s, end + 1, key)
        if a and b:
            out[key or "total"] = round((b - a) / a, 4)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", default=str(ROOT / "models"))
    p.add_argument("--model", default="bbc-news-minilm-moe")
    p.add_argument("--factor", type=float, default=0.5, help="offered load as a multiple of saturation")
    p.add_argument("--seconds", type=float, default=3600.0)
    p.add_argument("--texts", type=int, default=8, help="texts per request")
    p.add_argument("--sample-s", type=float, default=5.0, help="how often memory is sampled")
    p.add_argument("--window-s", type=float, default=60.0, help="the windows whose medians are compared")
    p.add_argument("--max-late-growth", type=float, default=0.01)
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="for the server (repeatable)")
    p.add_argument("--json", help="also write the report here")
    args = p.parse_args()

    body = json.dumps({"inputs": [TEXTS[i % len(TEXTS)] for i in range(args.texts)], "model": args.model}).encode()
    port = free_port()
    extra = dict(kv.split("=", 1) for kv in args.env)
    env = {**os.environ, "MOE_MODELS_DIR": args.models_dir, "MOE_MODELS": args.model, "MOE_PORT": str(port),
           "MOE_LOG_LEVEL": "warning", **extra}  # fmt: skip
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"moe-soak-{port}.log"
    with server_process([sys.executable, "-m", "service.cli", "serve"], env, port, log, 180) as url:
        pid = _server_pid(port)
        classify = f"{url}/v1/classify"
        saturation = asyncio.run(closed_loop(classify, body, 64, 5.0))
        run = asyncio.run(steady_load(classify, body, max(1.0, args.factor * saturation), args.seconds, pid,
                                      args.sample_s))  # fmt: skip
    growth = late_growth(run["rss_samples"], args.seconds, min(args.window_s, args.seconds / 4))
    first, last = run["rss_samples"][0][1], run["rss_samples"][-1][1]
    report = {"model": args.model, "env": extra, "saturation_rps": round(saturation, 1), "factor": args.factor,
              "seconds": args.seconds, **{k: v for k, v in run.items() if k != "rss_samples"},
              "rss_mb_first": first, "rss_mb_last": last, "late_growth": growth,
              "rss_samples": run["rss_samples"]}  # fmt: skip
    failures = [f"status {s}: {n}" for s, n in run["statuses"].items() if s != "200"]
    if growth.get("total", 0.0) >= args.max_late_growth:
        failures.append(f"memory grew {growth['total']:.2%} in the second half (bound {args.max_late_growth:.0%})")
    report["failures"] = failures
    text = json.dumps(report, indent=2)
    print(json.dumps({k: v for k, v in report.items() if k != "rss_samples"}, indent=2))
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
