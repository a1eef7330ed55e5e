"""Benchmark plots: throughput vs concurrency, latency percentiles, MoE-layer time split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _concurrency_axis(ax: plt.Axes) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients (closed loop)")


def plot_all(r: dict[str, Any], out: Path) -> None:
    _moe_split(r["moe_layer"], out / "moe_layer_split.png")
    _engine(r["engine"], out / "engine_modes.png")
    if r.get("served"):
        closed = [s for s in r["served"] if s["concurrency"]]
        _throughput(closed, out / "throughput_vs_concurrency.png")
        _latency(closed, out / "latency_percentiles.png")


def _series(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for s in rows:
        out.setdefault((s["server"], s["texts"]), []).append(s)
    return out


def _throughput(rows: list[dict[str, Any]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for (server, texts), pts in _series(rows).items():
        ax.plot([p["concurrency"] for p in pts], [p["rps"] for p in pts], marker="o", label=f"{server} ({texts})")
    _concurrency_axis(ax)
    ax.set_ylabel("requests/s")
    ax.set_title("Throughput vs concurrency")
    ax.legend()
    _save(fig, path)


def _latency(rows: list[dict[str, Any]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for (server, texts), pts in _series(rows).items():
        xs = [p["concurrency"] for p in pts]
        line = ax.plot(xs, [p["p50_ms"] for p in pts], marker="o", label=f"{server} ({texts}) p50")[0]
        ax.plot(xs, [p["p99_ms"] for p in pts], marker="x", ls="--", color=line.get_color(), label="... p99")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("concurrent clients (closed loop)")
    ax.set_ylabel("latency ms")
    ax.set_title("Latency percentiles")
    ax.legend(fontsize=7)
    _save(fig, path)


def _moe_split(rows: list[dict[str, Any]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    phases = ("routing", "permute", "experts", "combine")
    bottom = [0.0] * len(rows)
    labels = [str(r["tokens"]) for r in rows]
    for ph in phases:
        vals = [r["split_seconds"][ph] / r["seconds"] * 100 for r in rows]
        ax.bar(labels, vals, bottom=bottom, label=ph)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_xlabel("tokens in the batch")
    ax.set_ylabel("% of MoE layer time")
    ax.set_title("MoE layer time split")
    ax.legend()
    _save(fig, path)


def _engine(rows: list[dict[str, Any]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    sets = sorted({r["texts"] for r in rows}, key=["short", "long", "mix"].index)
    modes = ["per_request", "padded", "grouped"]
    width = 0.25
    for i, mode in enumerate(modes):
        vals = [next(r["tokens_per_s"] for r in rows if r["texts"] == t and r["mode"] == mode) for t in sets]
        ax.bar([j + i * width for j in range(len(sets))], vals, width, label=mode)
    ax.set_xticks([j + width for j in range(len(sets))], sets)
    ax.set_ylabel("tokens/s")
    ax.set_title("Engine throughput by execution mode")
    ax.legend()
    _save(fig, path)
