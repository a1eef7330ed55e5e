"""What ONNX Runtime's spinning threads cost and buy in moe-serve: the ONNX backend's `session.force_spinning_stop`
against ORT's default (threads spin on after a run), same model, fresh servers, alternating rounds.

Per server: a lone headline after 50 ms of silence (the server's x-inference-time and x-total-time, medians of 60),
headlines back to back at 1 connection (wrk p50) and at 64 (req/s), and the model process's CPU in the 1.5 s after a
lone request (the keep-warm window), in cores. The "spin" servers run ORT's default through a sitecustomize that
swaps the backend's config key for an inert one: the service itself has no switch for it (README, "Served: threads
that spin").

    .venv/bin/python scripts/spinning_ab.py --model models/bbc-news-minilm-moe --json docs/bench/spinning.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson

from service.bench import served

MODES = ("stop", "spin")  # stop: the backend as shipped; spin: ORT's default
SITECUSTOMIZE = """import os
if os.environ.get("MOE_SPINNING_AB") == "spin":
    import service.backends.onnx_backend as backend
    backend.FORCE_SPINNING_STOP = "moe_serve.spinning_ab.inert"  # ORT stores unknown keys and ignores them
"""


def _cpu_s(pid: str) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int | str) -> list[str]:
    return subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()


def idle_cores(url: str, body: bytes, model_pid: str, window_s: float = 1.5, n: int = 3) -> float:
    """The model process's CPU (cores) in the window after a lone request, the median of n."""
    shares = []
    for _ in range(n):
        req = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
        urllib.request.urlopen(req, timeout=10).read()
        c0 = _cpu_s(model_pid)
        time.sleep(window_s)
        shares.append((_cpu_s(model_pid) - c0) / window_s)
    return round(sorted(shares)[n // 2], 2)


def one_server(model: Path, mode: str, bodies: list[bytes], work: Path) -> dict[str, Any]:
    os.environ["MOE_SPINNING_AB"] = mode
    with served.start_server("moe-serve", model, 2, work / f"{mode}.log") as url:
        classify = f"{url}/v1/classify"
        server = _children(os.getpid())[0]
        model_pid = _children(server)[0]
        served.closed_loop(classify, bodies, 4, 1.0, mode, "headline", work)  # warm-up
        lone = served.lone_requests(classify, bodies, n=60, gap_s=0.05)
        c1 = served.closed_loop(classify, bodies, 1, 4.0, mode, "headline", work)
        c64 = served.closed_loop(classify, bodies, 64, 5.0, mode, "headline", work)
        return {
            "mode": mode,
            "lone_inference_ms_p50": lone["inference_ms_p50"],
            "lone_total_ms_p50": lone["total_ms_p50"],
            "c1_p50_ms": c1.p50_ms,
            "c64_rps": c64.rps,
            "idle_cores": idle_cores(classify, bodies[0], model_pid),
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/bbc-news-minilm-moe")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args()
    from service.training.data import load_dataset
    from service.training.evaluate import headline

    bodies = [orjson.dumps({"inputs": headline(e.text)}) for e in load_dataset("bbc-news")["test"][:64]]
    with tempfile.TemporaryDirectory(prefix="spinning-ab-") as tmp:
        work = Path(tmp)
        (work / "sitecustomize.py").write_text(SITECUSTOMIZE)
        root = Path(__file__).resolve().parents[1]
        os.environ["PYTHONPATH"] = os.pathsep.join([str(work), str(root), os.environ.get("PYTHONPATH", "")])
        rows = [one_server(Path(args.model), mode, bodies, work) for _ in range(args.rounds) for mode in MODES]
    from service.bench.run import machine

    keys = [k for k in rows[0] if k != "mode"]
    print("| server | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for r in rows:
        print(f"| {r['mode']} | " + " | ".join(str(r[k]) for k in keys) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
