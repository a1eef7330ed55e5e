"""README's long-text table: macro-F1 and ECE on a model's test split (whole articles, headlines, headline + first
sentence) for truncation at several lengths and for chunking at several overlaps, window caps and poolings, with the
tokens each reads per text. Every window of a configuration is run once; poolings and caps reuse its logits.

    nice -n 19 .venv/bin/python scripts/long_text_table.py models/bbc-news-minilm-moe [--lengths 128 256]
    nice -n 19 .venv/bin/python scripts/long_text_table.py models/bbc-news-minilm-moe --timing 128
"""

from __future__ import annotations

import argparse
import json
import re
import time

import numpy as np

from service.modeling.artifacts import load_model
from service.modeling.probabilities import softmax
from service.modeling.windows import LongTextPolicy, encode_windows, pool_logits
from service.training.calibration import expected_calibration_error
from service.training.evaluate import headline, label_ids, model_examples
from service.training.metrics import classification_report
from service.training.predict import loaded_forward, predict


def first_sentence(text: str) -> str:
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    body = lines[1] if len(lines) > 1 else ""
    sentence = re.split(r"(?<=[.!?])\s", body, maxsplit=1)[0]
    return f"{headline(text)}\n{sentence}".strip()


def scores(logits: np.ndarray, y: np.ndarray, labels: list[str], temperature: float) -> dict[str, float]:
    probs = softmax(logits, temperature)
    rep = classification_report(probs, y, labels)
    return {"macro_f1": rep["macro_f1"], "ece": round(expected_calibration_error(probs, y), 4)}


POOLINGS = {
    "mean_logits": lambda lg, n: pool_logits(lg, n),
    "max_logits": lambda lg, n: lg.max(axis=0),
    "mean_probs": lambda lg, n: np.log(softmax(lg).mean(axis=0) + 1e-12),
}


def run(loaded, texts, y, length, policy, caps=(None,), poolings=("mean_logits",)) -> list[dict]:
    enc = encode_windows(loaded.tokenizer, texts, length, policy)
    windows = [w for e in enc for w in e.windows]
    t0 = time.perf_counter()
    per = predict(loaded_forward(loaded), windows).logits
    took = time.perf_counter() - t0
    bounds = np.cumsum([0] + [len(e.windows) for e in enc])
    rows = []
    for cap in caps:
        for pooling in poolings:
            pooled, tokens = [], []
            for e, a in zip(enc, bounds[:-1], strict=False):
                k = len(e.windows) if cap is None else min(cap, len(e.windows))
                pooled.append(POOLINGS[pooling](per[a : a + k], [len(w) for w in e.windows[:k]]))
                tokens.append(sum(len(w) for w in e.windows[:k]))
            row = {"length": length, "mode": policy.mode, "overlap": policy.overlap, "cap": cap, "pooling": pooling}
            row.update(scores(np.stack(pooled), y, loaded.folder.labels, loaded.folder.temperature))
            row["tokens_per_text"] = round(float(np.mean(tokens)), 1)
            row["forward_ms_per_text_all_windows"] = round(1000 * took / len(texts), 2)
            rows.append(row)
    return rows


def timing(loaded, texts: list[str], repeats: int) -> None:
    """Engine time per article, truncation at the model's maximum against the default chunking, the two runs
    alternated so a busy machine slows both alike; the median of `repeats`."""
    top = loaded.folder.config.max_length
    runs = {"truncate": LongTextPolicy("truncate"), "chunk": LongTextPolicy()}
    seqs = {k: [w for e in encode_windows(loaded.tokenizer, texts, top, p) for w in e.windows] for k, p in runs.items()}
    took: dict[str, list[float]] = {k: [] for k in runs}
    forward = loaded_forward(loaded)
    predict(forward, seqs["truncate"][:64])  # warm-up
    for _ in range(repeats):
        for k, s in seqs.items():
            t0 = time.perf_counter()
            predict(forward, s)
            took[k].append(time.perf_counter() - t0)
    for k, s in seqs.items():
        ms = 1000 * float(np.median(took[k])) / len(texts)
        tokens = sum(map(len, s)) / len(texts)
        row = {"timing": k, "texts": len(texts), "ms_per_article": round(ms, 2), "tokens": round(tokens, 1)}
        print(json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--overlaps", type=int, nargs="+", default=[0, 64, 128])
    ap.add_argument("--split", default="test")
    ap.add_argument("--timing", type=int, default=0, help="only time this many articles, 3 alternated runs")
    args = ap.parse_args()
    loaded = load_model(args.model)
    examples, _ = model_examples(loaded.folder, None, args.split)
    if args.timing:
        timing(loaded, [e.text for e in examples[: args.timing]], repeats=3)
        return
    y = label_ids(loaded.folder, examples)
    sets = {
        "article": [e.text for e in examples],
        "headline": [headline(e.text) for e in examples],
        "headline_first_sentence": [first_sentence(e.text) for e in examples],
    }
    top = loaded.folder.config.max_length
    for name, texts in sets.items():
        for length in args.lengths:
            for r in run(loaded, texts, y, length, LongTextPolicy("truncate")):
                print(json.dumps({"texts": name, **r}), flush=True)
        overlaps = args.overlaps if name == "article" else args.overlaps[1:2]
        for overlap in overlaps:
            caps = (None, 2, 4, 8) if name == "article" else (None,)
            poolings = tuple(POOLINGS) if name == "article" else ("mean_logits",)
            for r in run(loaded, texts, y, top, LongTextPolicy("chunk", overlap, 10_000), caps, poolings):
                print(json.dumps({"texts": name, **r}), flush=True)


if __name__ == "__main__":
    main()
