"""Temperature from config.json to the served scores, and the evaluation report's calibration and headline sections.

A small untrained model saved with the project's own save_model: no training, so each test takes about a second.
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from service.api.v1 import model_card, prediction
from service.backends import load_backend
from service.config import Settings
from service.engine.local_model import LocalModel
from service.engine.loop import InferenceThread
from service.metrics import Metrics
from service.modeling.artifacts import ModelFolderError, load_model, save_model, write_temperature
from service.modeling.classifier import ModelConfig, MoEClassifier
from service.modeling.probabilities import softmax
from service.modeling.tokenizer import TextTokenizer
from service.training.data import Example
from service.training.evaluate import calibrate, evaluate_examples, headline, write_report
from service.training.predict import predict_texts

LABELS = ["business", "politics", "sports"]
WORDS = ["shares", "profits", "bank", "minister", "vote", "election", "match", "striker", "goal", "season"]


def _folder(path: Path, temperature: float = 1.0) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=200, num_labels=3, max_length=64, d_model=32, n_heads=4, d_ff=48, dropout=0.0)
    model = MoEClassifier(cfg).eval()
    tok = TextTokenizer.train([" ".join(WORDS)] * 20, vocab_size=200)
    return save_model(path, model, tok, LABELS, {"dataset": "synthetic"}, temperature=temperature)


def _examples(n: int = 30, multi_line: bool = True) -> list[Example]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        title = " ".join(rng.choice(WORDS, 3))
        body = " ".join(rng.choice(WORDS, 20))
        out.append(Example(f"{title}\n\n{body}" if multi_line else f"{title} {body}", LABELS[i % 3], str(i)))
    return out


def test_temperature_round_trips_and_old_folders_load_with_one(tmp_path: Path) -> None:
    d = _folder(tmp_path / "m", temperature=0.5)
    assert json.loads((d / "config.json").read_text())["temperature"] == 0.5
    assert load_model(d).folder.temperature == 0.5
    cfg = json.loads((d / "config.json").read_text())
    del cfg["temperature"]  # a folder saved before calibration existed
    (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    assert load_model(d).folder.temperature == 1.0


def test_write_temperature_changes_only_that_key(tmp_path: Path) -> None:
    d = _folder(tmp_path / "m")
    before = json.loads((d / "config.json").read_text())
    weights = (d / "model.safetensors").read_bytes()
    write_temperature(d, 1.7)
    text = (d / "config.json").read_text()
    assert text == json.dumps({**before, "temperature": 1.7}, indent=2) + "\n"
    assert list(json.loads(text)) == list(before)  # same keys, same order
    assert (d / "model.safetensors").read_bytes() == weights
    with pytest.raises(ValueError, match="finite number > 0"):
        write_temperature(d, 0.0)


@pytest.mark.parametrize("bad", ["0", "-1.5", '"1.5"', "null", "true", "NaN", "Infinity", "[1.0]"])
def test_bad_temperature_is_a_model_folder_error(tmp_path: Path, bad: str) -> None:
    d = _folder(tmp_path / "m")
    text = (d / "config.json").read_text()
    (d / "config.json").write_text(text.replace('"temperature": 1.0', f'"temperature": {bad}'))
    with pytest.raises(ModelFolderError, match=r"config\.json: temperature must be a finite number > 0"):
        load_model(d)


def test_engine_applies_the_temperature_once_for_every_backend(tmp_path: Path) -> None:
    t = 0.25
    d = _folder(tmp_path / "m", temperature=t)
    texts = ["shares profits bank", "the striker scored a goal this season", "vote"]
    bundle = load_model(d)
    preds, _ = predict_texts(bundle, texts)
    worker = LocalModel(load_backend(d, device="cpu"), Settings(max_wait_ms=0), Metrics(), ThreadPoolExecutor(1))
    assert worker.info.temperature == t and asyncio.run(model_card(worker))["temperature"] == t
    thread = InferenceThread(worker)
    thread.start()
    try:
        result = asyncio.run(worker.classify(texts))
    finally:
        worker.close()
        thread.join(5)
    for i, r in enumerate(result.results):
        np.testing.assert_allclose(r.logits, preds.logits[i] / t, atol=1e-5, rtol=1e-6)  # raw_scores: scaled
        served = prediction(worker, r, None, raw=False)
        got = [next(s["score"] for s in served["scores"] if s["label"] == lab) for lab in LABELS]
        np.testing.assert_allclose(got, softmax(preds.logits[i], t), atol=1e-6, rtol=0)
        np.testing.assert_allclose(preds.probs[i], softmax(preds.logits[i], t), atol=1e-6, rtol=0)


def test_report_has_calibration_and_headline_sections(tmp_path: Path) -> None:
    d = _folder(tmp_path / "m", temperature=0.8)
    bundle = load_model(d)
    examples = _examples()
    t, _ = calibrate(bundle, examples)
    from tests.calibration_reference import ece, minimises_nll

    logits = predict_texts(bundle, [e.text for e in examples])[0].logits
    assert minimises_nll(t, logits, np.array([LABELS.index(e.label) for e in examples])), t
    report, preds, y = evaluate_examples(bundle, examples, "test", "synthetic")
    cal = report["calibration"]
    assert cal["temperature"] == 0.8 and cal["bins"] == 15
    assert cal["ece_before"] == pytest.approx(ece(preds.logits, y, 1.0), abs=1e-4)
    assert cal["ece"] == pytest.approx(ece(preds.logits, y, 0.8), abs=1e-4)
    head = report["headline"]
    assert head["examples"] == 30 and set(head) >= {"accuracy", "macro_f1", "per_class", "confusion_matrix", "roc_auc"}
    assert 0 <= head["macro_f1"] <= 1 and np.sum(head["confusion_matrix"]) == 30
    assert head["calibration"]["temperature"] == 0.8 and 0 <= head["calibration"]["ece"] <= 1
    assert 2 <= head["mean_tokens"] < preds.num_tokens.mean()  # 3 title words, vs 23 words in the whole text
    write_report(report, preds, y, bundle.folder.labels, tmp_path / "rep")
    assert (tmp_path / "rep" / "reliability_diagram.png").stat().st_size > 1000
    # Single-line texts: a headline would be the text itself, so there is no such section.
    single, _, _ = evaluate_examples(bundle, _examples(multi_line=False), "test", "synthetic")
    assert "headline" not in single and "calibration" in single


def test_headline_is_the_first_non_empty_line() -> None:
    assert headline("Title here \nBody text.\nMore.") == "Title here"
    assert headline("\n\n  Late title\nbody") == "Late title"
    assert headline("one line only") == "one line only"
