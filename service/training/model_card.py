"""README.md model card written next to a trained model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.modeling.config import ModelConfig

if TYPE_CHECKING:
    from service.training.recipe import Recipe


def _encoder_lines(m: ModelConfig, meta: dict[str, Any]) -> str:
    experts = (
        f"MoE feed-forward every {m.moe_every} block(s): {m.num_experts} experts of width {m.expert_d_ff or m.d_ff}, "
        f"top-{m.top_k} token-choice routing ({m.activation}, outputs {m.combine})"
    )
    if meta.get("base"):
        return (
            f"- Encoder: pretrained `{meta['base']}` (licence: {meta.get('base_license') or 'see the base model'}; "
            f"BERT: {m.n_layers} blocks, d_model {m.d_model}, {m.n_heads} "
            f"heads, FFN {m.d_ff}), converted by {meta['conversion']}: {experts}; masked mean pooling; linear head.\n"
            f"- Tokenizer: the base model's own (WordPiece with [CLS]/[SEP]), vocabulary {m.vocab_size}."
        )
    return (
        f"- Encoder: {m.n_layers} blocks, d_model {m.d_model}, {m.n_heads} attention heads, attention per block:\n"
        f"  {m.attention}; {experts}; masked mean pooling; linear head.\n"
        f"- Tokenizer: WordPiece (HF `tokenizers`), lower-cased, trained on the training split, vocabulary "
        f"{m.vocab_size}."
    )


def _validated_on(recipe: Recipe) -> str:
    return " (articles and their first lines)" if recipe.training.validate_headlines else ""


def _storage(meta: dict[str, Any]) -> str:
    storage = meta.get("storage") or {}
    moved = storage.get("rounding_vs_unrounded")
    if not moved:
        return ""
    return (
        f"- Weights stored as {storage['weights_dtype']}, rounded before every validation: the file holds exactly "
        f"the model chosen, calibrated and evaluated here. Rounding moved probabilities by at most "
        f"{moved['max_abs_prob_diff']} and no prediction ({moved['texts']} validation and test texts) against the "
        "unrounded weights.\n"
    )


def _short_and_calibration(report: dict[str, Any]) -> str:
    lines = []
    h = report.get("headline")
    if h:
        lines.append(
            f"Headlines only (each text's first line, {h['mean_tokens']} tokens on average): accuracy "
            f"{h['accuracy']:.4f}, macro-F1 {h['macro_f1']:.4f}."
        )
    c = report.get("calibration")
    if c:
        lines.append(
            f"Calibration: temperature {c['temperature']} fitted on the validation split (`temperature` in "
            f"config.json; served scores are softmax(logits / T)); test ECE ({c['bins']} bins) {c['ece_before']} at "
            f"T = 1, {c['ece']} at T. See `reliability_diagram.png`."
        )
    return "\n\n".join(lines) + "\n" if lines else ""


def _class_rows(report: dict[str, Any]) -> str:
    return "\n".join(
        f"| {lab} | {v['precision']:.4f} | {v['recall']:.4f} | {v['f1']:.4f} | {v.get('roc_auc', float('nan')):.4f} "
        f"| {v['support']} |"
        for lab, v in report["per_class"].items()
    )


def _utilisation_rows(report: dict[str, Any]) -> str:
    return "\n".join(
        f"| {lay['layer']} | {' '.join(f'{s:.3f}' for s in lay['share'])} | {lay['imbalance_max_over_mean']} "
        f"| {lay['normalized_entropy']} |"
        for lay in report["expert_utilisation"]
    )


def write_model_card(
    out: Path,
    recipe: Recipe,
    m: ModelConfig,
    report: dict[str, Any],
    meta: dict[str, Any],
    history: list[dict[str, Any]],
) -> None:
    sizes = meta["split_sizes"]
    rows, util = _class_rows(report), _utilisation_rows(report)
    card = f"""# {out.name}

Mixture-of-Experts text classifier trained by moe-serve (`moe-serve train`, recipe `{meta["recipe"]}`).

## Model
{_encoder_lines(m, meta)}
- Maximum length: {m.max_length} tokens. Longer texts are truncated to their first {m.max_length} tokens
  ({report["truncated_share"]:.0%} of the test texts were).
- Labels: {", ".join(report["labels"])}.
{_storage(meta)}
## Data
- Dataset: `{meta["dataset"]}`; fixed stratified split (seed {meta["split_seed"]}, fractions
  {meta["split_fractions"]}): train {sizes["train"]}, validation {sizes["validation"]}, test {sizes["test"]}.
- Training: {meta["epochs_run"]} epochs run, best validation macro-F1{_validated_on(recipe)} at epoch
  {meta["best_epoch"]}
  ({history[meta["best_epoch"] - 1]["val_macro_f1"]}); {meta["train_seconds"]} s wall time.

## Test-split results
accuracy {report["accuracy"]:.4f}, macro-F1 {report["macro_f1"]:.4f}, macro precision {report["precision"]:.4f},
macro recall {report["recall"]:.4f}, macro one-vs-rest ROC-AUC {report["roc_auc"]}.

| class | precision | recall | F1 | ROC-AUC | support |
|---|---|---|---|---|---|
{rows}

{_short_and_calibration(report)}
Expert utilisation on the test split (share of token assignments per expert):

| MoE layer | share per expert | max/mean | normalised entropy |
|---|---|---|---|
{util}

Plots: `confusion_matrix.png`, `roc_curves.png`, `expert_by_class.png`. Full report: `eval.json`.
`routing_profile.json` holds the validation-split expert distribution that serving compares live traffic with.

## Limits
- Trained on {sizes["train"]} documents of one source and period; expect lower accuracy on other domains, and
  no meaningful answer for text outside the label set (every input gets one of the labels above).
- Only the first {m.max_length} tokens are read.
"""
    (out / "README.md").write_text(card)
