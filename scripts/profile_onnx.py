"""Where a forward's time goes, op type by op type: the MoE's ONNX graph against the dense yardstick graph.

ONNX Runtime's own profiler (one thread, so ops do not overlap), on the same token ids: a lone headline and a batch
of 64 articles from the bbc-news test split. Prints a markdown table per case; `--json` keeps the numbers.

    .venv/bin/python scripts/profile_onnx.py --model models/bbc-news-minilm-moe --precision int8
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from service.modeling.artifacts import load_model
from service.modeling.tokenizer import pad_ids
from service.training.data import load_dataset
from service.training.evaluate import headline
from service.training.predict import encode_texts

RUNS = 5


def profile(graph: Path, seqs: list[list[int]], pad_id: int) -> dict[str, Any]:
    """Per op type: ms per run and calls per run (RUNS runs after one warm-up), and the nodes of the graph."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.enable_profiling = True
    opts.profile_file_prefix = str(Path(tempfile.gettempdir()) / "moe-profile")
    session = ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
    ids, mask = pad_ids(seqs, pad_id)
    for _ in range(RUNS + 1):
        session.run(None, {"input_ids": ids, "attention_mask": mask})
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    runs = [e["dur"] for e in events if e.get("name") == "model_run"][1:]
    time_us: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    first_run_end = next(e["ts"] + e["dur"] for e in events if e.get("name") == "model_run")
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] > first_run_end:
            time_us[e["args"]["op_name"]] += e["dur"]
            calls[e["args"]["op_name"]] += 1
    return {
        "run_ms_median": round(float(np.median(runs)) / 1e3, 3),
        "ops": {op: {"ms": round(t / RUNS / 1e3, 3), "calls": calls[op] // RUNS} for op, t in time_us.most_common()},
        "nodes_run": sum(calls.values()) // RUNS,
    }


def markdown(case: str, results: dict[str, dict[str, Any]], top: int = 8) -> list[str]:
    lines = [f"### {case}", "", "| graph | run ms (median) | node runs | top ops: ms (calls) |", "|---|---|---|---|"]
    for name, r in results.items():
        ops = ", ".join(f"{op} {v['ms']} ({v['calls']})" for op, v in list(r["ops"].items())[:top])
        lines.append(f"| {name} | {r['run_ms_median']} | {r['nodes_run']} | {ops} |")
    return [*lines, ""]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/bbc-news-minilm-moe")
    p.add_argument("--precision", default="int8", choices=("fp32", "int8"))
    p.add_argument("--json")
    args = p.parse_args()
    from service.bench.dense_yardstick import build
    from service.modeling.onnx_export import export_model

    loaded = load_model(args.model)
    test = load_dataset("bbc-news")["test"]
    max_length = loaded.folder.config.max_length
    cases = {
        "a lone headline": encode_texts(loaded.tokenizer, [headline(test[0].text)], max_length),
        "64 articles": encode_texts(loaded.tokenizer, [e.text for e in test[:64]], max_length),
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        graph_name = "model.onnx" if args.precision == "fp32" else "model.int8.onnx"
        moe_graph = Path(args.model) / graph_name
        if not moe_graph.is_file():
            export_model(args.model, int8=True)
        graphs = {f"MoE {args.precision}": moe_graph}
        if base := loaded.folder.training.get("base"):
            name = f"dense-ort {args.precision}"
            graphs[name] = build(base, len(loaded.folder.labels), work)[name]
        out = {
            case: {name: profile(g, seqs, loaded.tokenizer.pad_id) for name, g in graphs.items()}
            for case, seqs in cases.items()
        }
    for case, results in out.items():
        print("\n".join(markdown(case, results)))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
