"""Orchestrates a benchmark run and writes JSON, a markdown table and PNG plots."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import orjson
import torch

from service.bench import dense_vs_moe, served
from service.bench import engine as eng
from service.bench.backends import REGIMES, SATURATED, measure_variants
from service.modeling.artifacts import load_model

log = logging.getLogger(__name__)

MODES = {
    "quick": {
        "short": 128,
        "long": 16,
        "mix": 32,
        "repeats": 3,
        "concurrency": [1, 64],
        "texts": ["short"],
        "seconds": 4.0,
        "served_runs": 1,
        "n_texts": 48,
    },
    "full": {
        "short": 512,
        "long": 64,
        "mix": 128,
        "repeats": 5,
        "concurrency": [1, 4, 16, 64],
        "texts": ["short", "mix"],
        "seconds": 5.0,
        "served_runs": 3,
        "n_texts": 128,
    },
}


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        **runtime_versions(),
    }


def runtime_versions() -> dict[str, str]:
    """The installed versions of the runtimes the bench times (the OpenVINO pair only with the `openvino` extra)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("onnxruntime", "openvino", "nncf"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            continue
    return out


def run_bench(model_dir: Path, mode: str, out_dir: Path, skip_served: bool = False) -> dict[str, Any]:
    cfg = MODES[mode]
    out_dir.mkdir(parents=True, exist_ok=True)
    bundle = load_model(model_dir)
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    results: dict[str, Any] = {
        "mode": mode,
        "model": bundle.folder.name,
        "machine": machine(),
        "load_generator": "wrk (one thread) on the same cores as the servers; its share of the cores is in each row",
    }
    log.info("matmul peak")
    results["peak_gflops"] = eng.matmul_peak()
    log.info("engine modes")
    sets = eng.texts_for_bench(bundle, cfg["short"], cfg["long"], cfg["mix"])
    rows = eng.engine_modes(bundle.model, sets, batch_size=64, repeats=cfg["repeats"])
    peak = results["peak_gflops"]["fp32"]
    results["engine"] = [{**asdict(r), "peak_share": round(r.gflops / peak, 4)} for r in rows]
    by = {(r.mode, r.texts): r for r in rows}
    results["engine_ratios"] = {
        t: {
            "grouped_vs_per_request": round(by["grouped", t].seq_per_s / by["per_request", t].seq_per_s, 2),
            "grouped_vs_padded": round(by["grouped", t].seq_per_s / by["padded", t].seq_per_s, 2),
        }
        for t in sets
    }
    layer = bundle.model.moe_layers[0]
    results["moe_layer"] = [eng.moe_layer_split(layer, n, cfg["repeats"] + 2) for n in (64, 512, 2048, 8192)]
    for row in results["moe_layer"]:
        row["peak_share"] = round(row["gflops"] / peak, 4)
    single = next(r for r in rows if r.mode == "per_request" and r.texts == "short")
    results["engine_single_short_ms"] = round(1000 / single.seq_per_s, 3)
    log.info("backends")  # the variant table's CPU rows whose files are there (ONNX: after `moe-serve export`)
    results["backends"] = measure_variants(Path(model_dir), sets["mix"], None, cfg["repeats"])

    log.info("the MoE against its dense original")
    results["dense_vs_moe"] = dense_vs_moe.run(bundle, cfg, threads, out_dir, skip_served)
    if not skip_served:
        results["served_backend"] = served.backend_figures(Path(model_dir), threads, sets["short"])
        results["served"], results["lone_request"] = served_runs(Path(model_dir), bundle, sets, cfg, threads, out_dir)
        results["served_ratios"] = _served_ratios(results)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    (out_dir / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "bench.md").write_text(markdown(results))
    from service.bench.plots import plot_all

    plot_all(results, out_dir)
    return results


def served_runs(
    model_dir: Path, bundle: Any, sets: dict[str, list[list[int]]], cfg: dict[str, Any], threads: int, out_dir: Path
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """moe-serve (over HTTP and gRPC) and the naive server, each in its own process, all up at once and driven by
    wrk (the gRPC client for gRPC) in turns, several runs per point, the run with the median throughput reported.
    Then lone requests to moe-serve (one at a time, idle between)."""
    texts_of = {t: [bundle.tokenizer.tokenizer.decode(ids) for ids in sets[t]] for t in sets}
    bodies = {t: [orjson.dumps({"inputs": text}) for text in texts_of[t]] for t in sets}
    grpc_port, seconds = served.free_port(), cfg["seconds"]
    with contextlib.ExitStack() as stack:

        def start(server: str, port: int | None = None) -> str:
            log_file = out_dir / f"{server}.log"
            url = stack.enter_context(served.start_server(server, model_dir.resolve(), threads, log_file, port))
            served.closed_loop(f"{url}/v1/classify", bodies["short"], 64, 1.0, server, "short", out_dir)  # warm-up
            return f"{url}/v1/classify"

        classify = {"moe-serve": start("moe-serve", grpc_port), "naive": start("naive")}

        def http(server: str) -> served.Load:
            return lambda t, c: served.closed_loop(classify[server], bodies[t], c, seconds, server, t, out_dir)

        def grpc(t: str, c: int) -> served.LoadResult:
            address = f"127.0.0.1:{grpc_port}"
            return served.closed_loop_grpc(
                address, model_dir.name, texts_of[t], c, seconds, "moe-serve gRPC", t, out_dir
            )

        loads = {"moe-serve": http("moe-serve"), "moe-serve gRPC": grpc, "naive": http("naive")}
        rows = served.in_turns(loads, list(itertools.product(cfg["texts"], cfg["concurrency"])), cfg["served_runs"])
        lone = served.lone_requests(classify["moe-serve"], bodies["short"])
    return rows, lone


def _served_ratios(r: dict[str, Any]) -> dict[str, Any]:
    rows = r["served"]

    def get(server: str, texts: str, c: int) -> dict[str, Any] | None:
        return next((x for x in rows if x["server"] == server and x["texts"] == texts and x["concurrency"] == c), None)

    out: dict[str, Any] = {}
    a, b = get("moe-serve", "short", 64), get("naive", "short", 64)
    if a and b and b["rps"]:
        out["short_c64_throughput_vs_naive"] = round(a["rps"] / b["rps"], 2)
    a, b = get("moe-serve", "short", 1), get("naive", "short", 1)
    if a and b and b["p50_ms"]:
        out["short_c1_p50_vs_naive"] = round(a["p50_ms"] / b["p50_ms"], 2)
    engine = r["served_backend"]
    a = get("moe-serve", "short", 64)
    if a:
        out["short_c64_vs_engine_batched"] = round(a["rps"] / engine["batch_texts_per_s"], 2)
    lone = r.get("lone_request") or {}
    if lone.get("inference_ms_p50"):
        out["lone_inference_vs_engine_single"] = round(lone["inference_ms_p50"] / engine["single_text_ms"], 2)
    return out


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        f"# moe-serve bench ({r['mode']} mode), model `{r['model']}`",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} with {m['threads']} threads, "
        f"Python {m['python']}. Load generator: {r['load_generator']}.",
        "",
        f"Matmul peak (2048^3): fp32 {r['peak_gflops']['fp32']} GFLOP/s, bf16 {r['peak_gflops']['bf16']} GFLOP/s.",
        "",
        "## Engine (offline, same texts, batches of 64)",
        "",
        "| texts | mode | texts/s | tokens/s | useful GFLOP/s | share of fp32 peak |",
        "|---|---|---|---|---|---|",
    ]
    for e in r["engine"]:
        lines.append(
            f"| {e['texts']} | {e['mode']} | {e['seq_per_s']} | {e['tokens_per_s']} | {e['gflops']} "
            f"| {e['peak_share']:.1%} |"
        )
    lines += ["", "| texts | grouped / per_request | grouped / padded |", "|---|---|---|"]
    for t, v in r["engine_ratios"].items():
        lines.append(f"| {t} | {v['grouped_vs_per_request']}x | {v['grouped_vs_padded']}x |")
    lines += [
        "",
        "## One MoE layer (grouped dispatch)",
        "",
        "| tokens | time ms | routing | permute | experts | combine | GFLOP/s | expert GEMM GFLOP/s "
        "| share of fp32 peak |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["moe_layer"]:
        s = row["split_seconds"]
        tot = row["seconds"]
        lines.append(
            f"| {row['tokens']} | {tot * 1000:.3f} | "
            + " | ".join(f"{s[k] / tot:.0%}" for k in ("routing", "permute", "experts", "combine"))
            + f" | {row['gflops']} | {row['expert_gflops']} | {row['peak_share']:.1%} |"
        )
    lines += backends_markdown(r["backends"])
    if "dense_vs_moe" in r:
        lines += dense_vs_moe.markdown(r["dense_vs_moe"])
        lines += dense_vs_moe.served_markdown(r["dense_vs_moe"].get("served", []))
    if "served" in r:
        lines += served_markdown(r)
    lines += ["", f"Total bench time: {r['seconds']} s.", ""]
    return "\n".join(lines)


def served_markdown(r: dict[str, Any]) -> list[str]:
    e, lone = r["served_backend"], r.get("lone_request") or {}
    lines = [
        "",
        "## Served over HTTP (wrk, closed loop) and gRPC (service/bench/grpc_load.py, closed loop, one text per call); "
        "the run with the median throughput of each point",
        "",
        "| server | texts | connections | req/s | p50 ms | p95 ms | p99 ms | errors | generator share of cores "
        "| req/s, each run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in r["served"]:
        each = ", ".join(str(x) for x in s["rps_all_runs"])
        lines.append(
            f"| {s['server']} | {s['texts']} | {s['concurrency']} | {s['rps']} | {s['p50_ms']} | {s['p95_ms']} "
            f"| {s['p99_ms']} | {s['errors']} | {s['generator_core_share']:.1%} | {each} |"
        )
    lines += [
        "",
        f"Engine on the served backend ({e['backend']} {e['precision']}), the same short texts: one text at a time "
        f"back to back {e['single_text_ms']} ms; batches of {e['batch']} {e['batch_texts_per_s']} texts/s.",
        f"Lone requests to moe-serve (one at a time, {lone.get('gap_ms')} ms idle between): x-inference-time p50 "
        f"{lone.get('inference_ms_p50')} ms, x-total-time p50 {lone.get('total_ms_p50')} ms.",
        "",
        f"Ratios: {json.dumps(r['served_ratios'])}.",
    ]
    return lines


def backends_markdown(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "",
        f"## Backends (engine, the `mix` texts; batch 1, batch {SATURATED} and served-like batches of random sizes; "
        "p50/p99 per call)",
        "",
        "| backend | precision | size MB | " + " | ".join(f"{k} texts/s | p50 ms | p99 ms" for k in REGIMES) + " |",
        "|---|---|---|" + "---|---|---|" * len(REGIMES),
    ]
    for b in rows:
        cells = " | ".join(f"{b[k]['texts_per_s']} | {b[k]['p50_ms']} | {b[k]['p99_ms']}" for k in REGIMES)
        lines.append(f"| {b['backend']} | {b['precision']} | {b['size_mb']} | {cells} |")
    return lines
