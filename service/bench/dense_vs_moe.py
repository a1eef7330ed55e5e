"""Is the MoE cheaper than the dense model it was made from? The engine side by side on the same texts.

Every row is timed on the same two text sets from the bbc-news test split, cut at the model's maximum length:
`headline` (each article's first line) and `article` (the whole article), at batch 1 (one text after another) and
batch 64 (sorted by length, as the batcher cuts them). The rows:

- `moe`: the folder at each backend variant it can run (torch fp32 / bf16, ONNX Runtime fp32 / int8);
- `all-experts`: the same folder with top-k = number of experts, i.e. every expert on every token: for a
  MoEfied model this is exactly its dense original (the conversion tests prove it), in the same code and precision;
- `dense-ort`: the dense base (config `training.base`) as a user would deploy it without this project, HF
  transformers exported to ONNX and fused by ONNX Runtime's transformer optimizer, fp32 and int8
  (service/bench/dense_yardstick.py);
- `dense-ov`: the same export through OpenVINO with static int8 (NNCF, calibrated on validation texts; bf16
  elsewhere where the CPU has it: service/bench/dense_openvino.py).

The MoE is judged against the best dense row of any runtime, per regime.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from service.backends import load_backend
from service.bench.backends import available, length_sorted_batches
from service.bench.dense_yardstick import YARDSTICKS
from service.bench.timing import interleaved_medians, median_time
from service.modeling.artifacts import LoadedModel
from service.modeling.layout import CONFIG_FILE, TOKENIZER_FILE

log = logging.getLogger(__name__)
BATCHES = (1, 64)
Forward = Callable[[list[list[int]]], Any]


def text_sets(loaded: LoadedModel, n: int) -> dict[str, list[list[int]]]:
    """`headline` and `article` token ids: the first n test articles, whole and by their first line."""
    from service.training.data import load_dataset
    from service.training.evaluate import headline
    from service.training.predict import encode_texts

    test = load_dataset("bbc-news")["test"][:n]
    max_length = loaded.folder.config.max_length
    return {
        "headline": encode_texts(loaded.tokenizer, [headline(e.text) for e in test], max_length),
        "article": encode_texts(loaded.tokenizer, [e.text for e in test], max_length),
    }


def texts_per_s(forward: Forward, seqs: list[list[int]], batch: int, repeats: int) -> float:
    """Median over `repeats` passes over every text, after one warm-up pass."""
    calls = calls_for(seqs, batch)
    return round(len(seqs) / median_time(lambda: run_calls(forward, calls), repeats), 1)


def calls_for(seqs: list[list[int]], batch: int) -> list[list[list[int]]]:
    return [[s] for s in seqs] if batch == 1 else length_sorted_batches(seqs, batch)


def run_calls(forward: Forward, calls: list[list[list[int]]]) -> None:
    for c in calls:
        forward(c)


@dataclass(frozen=True)
class Contender:
    """One engine row to time: what it is, and how it runs a batch of token ids."""

    model: str  # moe | all-experts | a dense yardstick's model
    backend: str
    precision: str
    forward: Forward


def time_rows(contenders: list[Contender], sets: dict[str, list[list[int]]], repeats: int) -> list[dict[str, Any]]:
    """texts/s of every contender per text set and batch size (batch 1 over the first half of the texts), their
    passes interleaved (service/bench/timing.py) so that the ratios between rows are measured side by side."""
    rows = [{"model": c.model, "precision": c.precision, "backend": c.backend} for c in contenders]
    for name, seqs in sets.items():
        for b in BATCHES:
            key, texts = f"{name}_b{b}", seqs if b > 1 else seqs[: max(len(seqs) // 2, 1)]
            calls = calls_for(texts, b)
            runs = {i: functools.partial(run_calls, c.forward, calls) for i, c in enumerate(contenders)}
            for i, t in interleaved_medians(runs, repeats).items():
                rows[i][key] = round(len(texts) / t, 1)
            log.info("%s: %s", key, [(r["model"], r["backend"], r["precision"], r[key]) for r in rows])
    return rows


def all_experts_copy(model_dir: Path, into: Path) -> Path:
    """The folder with top-k = number of experts (weights linked, config rewritten): every expert on every token."""
    into.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.is_file() and f.name != CONFIG_FILE and not f.name.endswith(".onnx"):
            (into / f.name).symlink_to(f.resolve())
    cfg = json.loads((model_dir / CONFIG_FILE).read_text())
    arch = cfg["architecture"]
    arch["top_k"] = arch["num_experts"]
    cfg.pop("serving", None)
    (into / CONFIG_FILE).write_text(json.dumps(cfg))
    return into


def variant_contenders(kind: str, folder: Path, threads: int) -> list[Contender]:
    out = []
    for v in available(folder):
        backend = load_backend(folder, "cpu", v.backend, threads, v.precision)
        out.append(Contender(kind, v.backend, v.precision, backend.forward))
    return out


def dense_contenders(loaded: LoadedModel, threads: int, graphs: dict[str, Path]) -> list[Contender]:
    from service.bench.dense_yardstick import BY_NAME, load_graph

    out = []
    for name, graph in graphs.items():
        y, g = BY_NAME[name], load_graph(graph, loaded.tokenizer.pad_id, threads)
        out.append(Contender(y.model, y.backend, y.precision, g.forward))
    return out


def dense_graphs(loaded: LoadedModel, work: Path) -> dict[str, Path]:
    """The dense yardstick graphs of the folder's base (none for a model trained from scratch); OpenVINO's static
    int8 calibrated on validation articles and their headlines (as `--choose` times: served traffic brings both)."""
    from service.bench.backends import choice_texts
    from service.bench.dense_yardstick import build

    base = loaded.folder.training.get("base")
    if not base:
        return {}
    calibration = choice_texts(loaded, "validation", 64)
    return build(base, len(loaded.folder.labels), work / "dense", calibration, loaded.tokenizer.pad_id)


def compare(loaded: LoadedModel, n_texts: int, repeats: int, threads: int, work: Path) -> dict[str, Any]:
    """Every engine row on the same texts, and the ratios the MoE is judged by."""
    from service.modeling.onnx_export import export_model

    sets = text_sets(loaded, n_texts)
    moe_dir = work / "moe"  # a copy, so the bench never writes into the model folder
    shutil.copytree(loaded.folder.path, moe_dir)
    if not (moe_dir / "model.int8.onnx").is_file():
        export_model(moe_dir, int8=True)
    dense_dir = all_experts_copy(moe_dir, work / "all-experts")
    export_model(dense_dir, int8=True)
    contenders = variant_contenders("moe", moe_dir, threads) + variant_contenders("all-experts", dense_dir, threads)
    contenders += dense_contenders(loaded, threads, dense_graphs(loaded, work))
    rows = time_rows(contenders, sets, repeats)
    return {
        "texts": {k: len(v) for k, v in sets.items()},
        "mean_tokens": _mean_tokens(sets),
        "rows": rows,
        "ratios": ratios(rows),
    }


def served_rows(
    loaded: LoadedModel, cfg: dict[str, Any], threads: int, work: Path, out_dir: Path
) -> list[dict[str, Any]]:
    """moe-serve (the folder's own serving choice) and the dense yardstick servers, all started at once and taking
    turns run by run (a slow spell of the machine hits them alike), under the same wrk load on the same headline,
    article and mixed bodies; each point the run with the median throughput."""
    from service.bench import served

    texts = raw_texts(cfg["n_texts"])
    # Both servers read the first max_length tokens of an article (the same work; moe-serve's default reads every
    # window of a long text, about 2.4x the tokens of a bbc-news article: README, Long texts).
    bodies = {k: [orjson.dumps({"inputs": t, "long_text": "truncate"}) for t in v] for k, v in texts.items()}
    servers = {"moe-serve": lambda log: served.start_server("moe-serve", loaded.folder.path, threads, log)}
    for name, graph in dense_graphs_in(work).items():
        servers[name] = functools.partial(_dense_server, graph, loaded, threads)
    with contextlib.ExitStack() as stack:
        urls = {
            name: stack.enter_context(start(out_dir / f"{name.replace(' ', '-')}.log"))
            for name, start in servers.items()
        }
        for name, url in urls.items():
            served.closed_loop(f"{url}/v1/classify", bodies["headline"], 64, 1.0, name, "headline", out_dir)  # warm-up

        def load(name: str, texts: str, c: int) -> served.LoadResult:
            url = f"{urls[name]}/v1/classify"
            return served.closed_loop(url, bodies[texts], c, cfg["seconds"], name, texts, out_dir)

        loads = {name: functools.partial(load, name) for name in urls}
        return served.in_turns(loads, list(itertools.product(bodies, cfg["concurrency"])), cfg["served_runs"])


def dense_graphs_in(work: Path) -> dict[str, Path]:
    """The yardstick graphs `compare` built, by name (none for a model trained from scratch)."""
    from service.bench.dense_yardstick import built

    return built(work / "dense")


def _dense_server(graph: Path, loaded: LoadedModel, threads: int, log_path: Path) -> Any:
    from service.bench import served

    port = served.free_port()
    cmd = [
        sys.executable,
        "-m",
        "service.bench.dense_server",
        str(graph),
        str(loaded.folder.path / TOKENIZER_FILE),
        str(loaded.folder.config.max_length),
        str(port),
        str(threads),
    ]
    return served.server_process(cmd, dict(os.environ), port, log_path)


def raw_texts(n: int) -> dict[str, list[str]]:
    """Headlines, articles, and the two mixed (article, headline, article, ...), as traffic may bring them: a
    batcher that lets a headline join a batch of articles pads it to their length."""
    from service.training.data import load_dataset
    from service.training.evaluate import headline

    test = load_dataset("bbc-news")["test"][:n]
    heads, articles = [headline(e.text) for e in test], [e.text for e in test]
    mixed = [t for pair in zip(articles, heads, strict=True) for t in pair][:n]
    return {"headline": heads, "article": articles, "mixed": mixed}


def run(loaded: LoadedModel, cfg: dict[str, Any], threads: int, out_dir: Path, skip_served: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="moe-bench-") as tmp:
        work = Path(tmp)
        result = compare(loaded, cfg["n_texts"], cfg["repeats"], threads, work)
        if not skip_served:
            result["served"] = served_rows(loaded, cfg, threads, work, out_dir)
            result["served_ratios"] = served_ratios(result["served"])
    return result


def _mean_tokens(sets: dict[str, list[list[int]]]) -> dict[str, float]:
    return {k: round(sum(map(len, v)) / len(v), 1) for k, v in sets.items()}


REGIMES = tuple(f"{t}_b{b}" for t in ("headline", "article") for b in BATCHES)
DENSE_MODELS = frozenset(y.model for y in YARDSTICKS)


def ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per precision, MoE / all-experts; and the best MoE against the best dense yardstick of any runtime, per
    regime (naming the rows that won)."""

    def pick(kind: str, backend: str, precision: str) -> dict | None:
        return next((r for r in rows if (r["model"], r["backend"], r["precision"]) == (kind, backend, precision)), None)

    out: dict[str, Any] = {"moe_vs_all_experts": {}, "best_moe_vs_best_dense": {}}
    for r in rows:
        if r["model"] == "moe" and (d := pick("all-experts", r["backend"], r["precision"])):
            out["moe_vs_all_experts"][f"{r['backend']} {r['precision']}"] = {k: round(r[k] / d[k], 2) for k in REGIMES}
    dense = [r for r in rows if r["model"] in DENSE_MODELS]
    moe = [r for r in rows if r["model"] == "moe"]
    if dense and moe:
        for k in REGIMES:
            best_moe = max(moe, key=lambda r: r[k])
            best_dense = max(dense, key=lambda r: r[k])
            out["best_moe_vs_best_dense"][k] = {
                "ratio": round(best_moe[k] / best_dense[k], 2),
                "moe": f"{best_moe['backend']} {best_moe['precision']}",
                "dense": f"{best_dense['model']} {best_dense['precision']}",
            }
    return out


def markdown(r: dict[str, Any]) -> list[str]:
    mt = r["mean_tokens"]
    lines = [
        "",
        f"## The MoE against its dense original (engine, texts/s; headlines {mt['headline']} tokens, articles "
        f"{mt['article']} tokens on average)",
        "",
        "| model | backend | precision | headline, batch 1 | headline, batch 64 | article, batch 1 "
        "| article, batch 64 |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['model']} | {row['backend']} | {row['precision']} | "
            + " | ".join(str(row[k]) for k in REGIMES)
            + " |"
        )
    lines += ["", "| ratio | " + " | ".join(REGIMES) + " |", "|---|" + "---|" * len(REGIMES)]
    for name, v in r["ratios"]["moe_vs_all_experts"].items():
        lines.append(f"| MoE / all experts, {name} | " + " | ".join(f"{v[k]}x" for k in REGIMES) + " |")
    best = r["ratios"]["best_moe_vs_best_dense"]
    if best:
        lines.append(
            "| best MoE / best dense | "
            + " | ".join(f"{best[k]['ratio']}x ({best[k]['moe']} / {best[k]['dense']})" for k in REGIMES)
            + " |"
        )
    return lines


def served_markdown(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "",
        "### Served: moe-serve against the dense yardstick servers (wrk, the same headline, article and mixed bodies)",
        "",
        "| server | texts | connections | req/s | p50 ms | p99 ms | errors | req/s, each run | moe-serve / this |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    vs = {id(theirs): _ratio(mine, theirs) for theirs, mine in _against_moe_serve(rows)}
    for r in rows:
        each = ", ".join(str(x) for x in r["rps_all_runs"])
        ratio = f"{vs[id(r)][0]:.2f}x req/s, {vs[id(r)][1]:.2f}x p50" if id(r) in vs else ""
        lines.append(
            f"| {r['server']} | {r['texts']} | {r['concurrency']} | {r['rps']} | {r['p50_ms']} | {r['p99_ms']} "
            f"| {r['errors']} | {each} | {ratio} |"
        )
    return lines + served_ratio_markdown(served_ratios(rows))


def _against_moe_serve(rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(dense server row, moe-serve's row at the same texts and connections), for every dense row that has one."""
    ours = {(r["texts"], r["concurrency"]): r for r in rows if r["server"] == "moe-serve"}
    pairs = [(r, ours.get((r["texts"], r["concurrency"]))) for r in rows if r["server"] != "moe-serve"]
    return [(theirs, mine) for theirs, mine in pairs if mine is not None]


def _ratio(mine: dict[str, Any], theirs: dict[str, Any]) -> tuple[float, float]:
    """moe-serve's req/s over theirs, and their p50 over moe-serve's: above 1 means moe-serve is ahead."""
    return round(mine["rps"] / theirs["rps"], 2), round(theirs["p50_ms"] / mine["p50_ms"], 2)


def served_ratios(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """moe-serve / each dense server, per text set: req/s at the most connections and p50 alone (theirs / ours),
    so above 1 is moe-serve ahead in both; keyed e.g. `headline_c64_rps`, `headline_c1_p50`."""
    pairs = _against_moe_serve(rows)
    most = {t: max(r["concurrency"] for r, _ in pairs if r["texts"] == t) for t in {r["texts"] for r, _ in pairs}}
    out: dict[str, dict[str, float]] = {}
    for theirs, mine in pairs:
        rps, p50 = _ratio(mine, theirs)
        texts, c = theirs["texts"], theirs["concurrency"]
        if c == most[texts]:
            out.setdefault(theirs["server"], {})[f"{texts}_c{c}_rps"] = rps
        if c == 1:
            out.setdefault(theirs["server"], {})[f"{texts}_c1_p50"] = p50
    return out


def served_ratio_markdown(ratios: dict[str, dict[str, float]]) -> list[str]:
    if not ratios:
        return []
    keys = sorted({k for v in ratios.values() for k in v}, key=lambda k: (not k.startswith("headline"), k))
    lines = [
        "",
        "| moe-serve / dense server (req/s at the most connections; p50 at 1: theirs / ours) | "
        + " | ".join(keys)
        + " |",
        "|---|" + "---|" * len(keys),
    ]
    for server, v in ratios.items():
        lines.append(f"| {server} | " + " | ".join(f"{v[k]}x" if k in v else "" for k in keys) + " |")
    return lines
