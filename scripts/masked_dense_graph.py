"""Does the small-batch masked dense route pay? Torch and ONNX, grouped / sparse against masked, on small batches.

Exports the model a second time with every MoE layer as one masked dense GEMM pair (MoEFeedForward.masked_forward:
every expert on every token, the unchosen hidden units zeroed), fp32 and int8 as `moe-serve export` builds them,
and times both graphs, interleaved, on the same bbc-news test headlines cut into batches of 1, 2, 4 and 8 texts
and on lone articles: ms per call, the median of 5 rounds. This is the upper bound of what an ONNX `If` or a
second graph chosen per batch could gain. Beside them, the torch backend at fp32 and bf16 with the masked route off
(grouped only) and on up to its measured token count (torch_backend.MASKED_DENSE_TOKENS; for fp32, where that is
0, up to 64 tokens, to show why). README (The MoE against its dense original) has the figures.

    .venv/bin/python scripts/masked_dense_graph.py --model models/bbc-news-minilm-moe
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from service.bench.dense_vs_moe import text_sets
from service.bench.dense_yardstick import DenseGraph
from service.modeling import onnx_export
from service.modeling.artifacts import load_model
from service.modeling.classifier import MoEClassifier

ROUNDS = 5


class _MaskedGraphModel(onnx_export._GraphModel):
    """The export graph with each MoE layer's masked route, whatever the token count."""

    def __init__(self, model: MoEClassifier) -> None:
        super().__init__(model)
        for layer in self.model.moe_layers:
            layer.dispatch, layer.masked_dense_tokens = "grouped", sys.maxsize


def export_both(folder: Path, work: Path) -> dict[str, Path]:
    """name -> graph: the sparse graphs as `moe-serve export` writes them and their masked twins."""
    model = load_model(folder).model
    graphs = {}
    for name, graph_model in (("sparse", onnx_export._GraphModel), ("masked", _MaskedGraphModel)):
        (work / name).mkdir()
        built = onnx_export.build_graphs(model, work / name, True, graph_model)
        graphs |= {f"{name} {precision}": path for precision, path in built.items()}
    return graphs


def torch_forwards(folder: Path) -> dict:
    """name -> forward: the torch backend per precision, grouped only and with the masked route."""
    from service.backends import load_backend
    from service.backends.torch_backend import MASKED_DENSE_TOKENS

    forwards = {}
    for precision, tokens in MASKED_DENSE_TOKENS.items():
        for name, limit in (("grouped", 0), ("masked", tokens or 64)):
            backend = load_backend(folder, "cpu", "torch", precision=precision)
            backend.model.use_masked_dense(limit)
            forwards[f"torch {precision} {name} <= {limit}" if limit else f"torch {precision} grouped"] = (
                backend.forward
            )
    return forwards


def time_calls(forwards: dict, calls: list[list[list[int]]]) -> dict[str, float]:
    """ms per call of each forward over the same calls, the forwards interleaved round by round."""
    times: dict[str, list[float]] = {n: [] for n in forwards}
    for f in forwards.values():
        for c in calls[:4]:
            f(c)  # warm-up
    for _ in range(ROUNDS):
        for name, f in forwards.items():
            t0 = time.perf_counter()
            for c in calls:
                f(c)
            times[name].append((time.perf_counter() - t0) / len(calls) * 1e3)
    return {n: statistics.median(v) for n, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=Path("models/bbc-news-minilm-moe"))
    ap.add_argument("--texts", type=int, default=128, help="bbc-news test articles to take headlines from")
    args = ap.parse_args()
    sets = text_sets(load_model(args.model), args.texts)
    heads, articles = sets["headline"], sets["article"][:16]
    cases = {f"{b} headline(s)": [heads[i : i + b] for i in range(0, len(heads), b)] for b in (1, 2, 4, 8)}
    cases["1 article"] = [[a] for a in articles]
    with tempfile.TemporaryDirectory(prefix="masked-graph-") as tmp:
        graphs = export_both(args.model, Path(tmp))
        forwards = {name: DenseGraph(path).forward for name, path in graphs.items()}
        forwards |= torch_forwards(args.model)
        print("| batch | tokens per call | " + " | ".join(f"{n}, ms" for n in forwards) + " |")
        print("|---|---|" + "---|" * len(forwards))
        for case, calls in cases.items():
            tokens = sum(len(s) for c in calls for s in c) / len(calls)
            ms = time_calls(forwards, calls)
            print(f"| {case} | {tokens:.1f} | " + " | ".join(f"{ms[n]:.2f}" for n in forwards) + " |", flush=True)


if __name__ == "__main__":
    main()
