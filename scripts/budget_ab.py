"""Served throughput of one model at several batch token budgets (MOE_MAX_BATCH_TOKENS), fresh servers, alternating
rounds: what `moe-serve export --choose`'s budget rule (service/bench/backends.py, `best_budget`) is checked against.

Per server, at 64 connections (wrk, one thread, on the same cores): headlines, articles, and the two mixed
(article, headline, ...), the same bodies as `moe-serve bench`'s served rows; req/s and p50. The server's own
/v1/models card confirms the budget in effect.

    .venv/bin/python scripts/budget_ab.py --model models/bbc-news-minilm-moe --json docs/bench/budgets.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import orjson

from service.bench import served
from service.bench.dense_vs_moe import raw_texts

SECONDS, CONNECTIONS = 8.0, 64


def one_server(model: Path, budget: int, bodies: dict[str, list[bytes]], work: Path) -> dict[str, Any]:
    os.environ["MOE_MAX_BATCH_TOKENS"] = str(budget)
    with served.start_server("moe-serve", model, 2, work / f"{budget}.log") as url:
        card = json.loads(urllib.request.urlopen(f"{url}/v1/models/{model.name}").read())
        assert card["max_batch_tokens"] == budget, card["max_batch_tokens"]
        classify = f"{url}/v1/classify"
        served.closed_loop(classify, bodies["headline"], CONNECTIONS, 1.0, str(budget), "headline", work)  # warm-up
        row: dict[str, Any] = {"max_batch_tokens": budget}
        for kind, texts in bodies.items():
            r = served.closed_loop(classify, texts, CONNECTIONS, SECONDS, str(budget), kind, work)
            row |= {f"{kind}_rps": r.rps, f"{kind}_p50_ms": r.p50_ms}
        return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/bbc-news-minilm-moe")
    p.add_argument("--budgets", default="1024,2048,8192,16384", help="comma-separated token budgets")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args()
    texts = raw_texts(128)
    bodies = {k: [orjson.dumps({"inputs": t, "long_text": "truncate"}) for t in v] for k, v in texts.items()}
    budgets = [int(b) for b in args.budgets.split(",")]
    with tempfile.TemporaryDirectory(prefix="budget-ab-") as tmp:
        rows = [one_server(Path(args.model), b, bodies, Path(tmp)) for _ in range(args.rounds) for b in budgets]
    from service.bench.run import machine

    keys = [k for k in rows[0] if k != "max_batch_tokens"]
    print("| max_batch_tokens | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for r in rows:
        print(f"| {r['max_batch_tokens']} | " + " | ".join(str(r[k]) for k in keys) + " |")
    if args.json:
        meta = {"machine": machine(), "connections": CONNECTIONS, "seconds": SECONDS}
        Path(args.json).write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
