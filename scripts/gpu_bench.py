"""The engine on a GPU: a model folder against its all-experts twin (top-k = E: for a MoEfied model, its dense
original in the same code), torch fp32 and bf16, headlines and whole articles, at several batch sizes.

The CPU comparison is `moe-serve bench` (service/bench/dense_vs_moe.py); this is its GPU counterpart, run where a
GPU exists (README, "On a GPU"). Each figure: texts/s, median of `--repeats` passes after a warm-up pass.

Usage: python scripts/gpu_bench.py --model models/bbc-news-minilm-moe --json gpu-bench.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

from service.backends import load_backend
from service.bench.dense_vs_moe import all_experts_copy, text_sets, texts_per_s
from service.modeling.artifacts import load_model


def rows(folder: Path, kind: str, sets: dict, args: argparse.Namespace) -> list[dict]:
    out = []
    for precision in ("fp32", "bf16"):
        backend = load_backend(folder, args.device, "torch", precision=precision)
        row: dict = {"model": kind, "precision": precision}
        for name, seqs in sets.items():
            for b in args.batches:
                row[f"{name}_b{b}"] = texts_per_s(backend.forward, seqs, b, args.repeats)
        print(row, flush=True)
        out.append(row)
    return out


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor() or "cpu"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("models/bbc-news-minilm-moe"))
    ap.add_argument("--texts", type=int, default=256)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda", help="cpu runs it here as a check of the script, not as a benchmark")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    sets = text_sets(load_model(args.model), args.texts)
    with tempfile.TemporaryDirectory() as tmp:
        dense = all_experts_copy(args.model, Path(tmp) / "all-experts")
        table = rows(args.model, "moe", sets, args)
        table += rows(dense, "all-experts", sets, args)
    ratios = {}
    for moe, dense_row in zip(table[:2], table[2:], strict=True):
        for k in [k for k in moe if k not in ("model", "precision")]:
            ratios[f"{moe['precision']}_{k}"] = round(moe[k] / dense_row[k], 2)
    result = {
        "command": " ".join(["python", *sys.argv]),
        "machine": f"{_device_name(args.device)}, torch {torch.__version__}, {platform.machine()}",
        "texts": {k: len(v) for k, v in sets.items()},
        "rows": table,
        "moe_over_all_experts": ratios,
    }
    print(json.dumps(result["moe_over_all_experts"], indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
