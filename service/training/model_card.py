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


def _task_rows(summary: dict[str, Any], reports: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    rows = []
    for task, r in reports.items():
        h = summary["tasks"][task].get("headline")
        head = f"{h['macro_f1']:.4f}" if h else "—"
        c = r.get("calibration") or {}
        rows.append(
            f"| {task} | {meta['tasks'][task]['dataset']} | {r['examples']} | {r['accuracy']:.4f} | "
            f"{r['macro_f1']:.4f} | {head} | {c.get('temperature', '—')} | "
            f"{c.get('ece_before', '—')} → {c.get('ece', '—')} |"
        )
    return "\n".join(rows)


def _share_rows(summary: dict[str, Any]) -> str:
    rows = []
    layers = zip(summary["expert_share_by_task"], summary["specialization"], strict=True)
    for layer, (shares, spec) in enumerate(layers):
        mi = spec["mutual_information_bits"]
        rows += [
            f"| {layer} | {task} | {' '.join(f'{s:.3f}' for s in share)} | {mi} |" for task, share in shares.items()
        ]
    return "\n".join(rows)


def _task_storage(meta: dict[str, Any]) -> str:
    storage = meta.get("storage") or {}
    moved = storage.get("rounding_vs_unrounded")
    if not moved:
        return ""
    per_task = "; ".join(
        f"{t}: probabilities moved by at most {v['max_abs_prob_diff']}, labels kept on {v['argmax_agreement']:.2%} of "
        f"{v['texts']} texts"
        for t, v in moved.items()
    )
    return (
        f"- Weights stored as {storage['weights_dtype']}, rounded before every validation: the file holds exactly "
        f"the model chosen, calibrated and evaluated here. Against the unrounded weights, on the validation and test "
        f"texts: {per_task}.\n"
    )


def _task_sections(reports: dict[str, dict[str, Any]]) -> str:
    return "\n\n".join(
        f"### {task}\nLabels: {', '.join(r['labels'])}.\n\n| class | precision | recall | F1 | ROC-AUC | support |\n"
        f"|---|---|---|---|---|---|\n{_class_rows(r)}\n\nPlots and the full report: `eval/{task}/`."
        for task, r in reports.items()
    )


def write_task_model_card(out: Path, m: ModelConfig, meta: dict[str, Any], history: list[dict[str, Any]]) -> None:
    """README.md of a multi-task folder, from what the folder holds: config.json's training metadata, eval.json
    (every task, expert shares by task, specialization) and each task's full report under eval/<task>/."""
    import json

    summary = json.loads((out / "eval.json").read_text())
    reports = {t: json.loads((out / "eval" / t / "eval.json").read_text()) for t in summary["tasks"]}
    moe_layers = len(summary["specialization"])
    routed = moe_layers if m.task_routed_layers is None else m.task_routed_layers
    best = history[meta["best_epoch"] - 1]
    best_by_task = ", ".join(f"{t} {best[f'val_macro_f1_{t}']}" for t in reports if f"val_macro_f1_{t}" in best)
    sizes = "; ".join(
        f"{t}: `{v['dataset']}`, train {v['split_sizes']['train']}, validation {v['split_sizes']['validation']}, "
        f"test {v['split_sizes']['test']}"
        for t, v in meta["tasks"].items()
    )
    card = f"""# {out.name}

Multi-task Mixture-of-Experts text classifier trained by moe-serve (`moe-serve train`, recipe `{meta["recipe"]}`):
one encoder and one pool of experts for {len(reports)} tasks ({", ".join(reports)}), a head per task.

## Model
{_encoder_lines(m, meta)}
- Tasks: {"; ".join(f"{t} ({', '.join(r['labels'])})" for t, r in reports.items())}. The top {routed} of the
  {moe_layers} MoE layers route each task's tokens by that task's own router; the {moe_layers - routed} below share
  one router, so a text asked for several tasks runs them once. Every expert is shared by every task.
- Maximum length: {m.max_length} tokens; longer texts are read window by window (served default) or truncated.
{_task_storage(meta)}
## Data
- Fixed split per task (seed {meta["split_seed"]}, fractions {meta["split_fractions"]}): {sizes}.
- Training: {meta["epochs_run"]} epochs run, mixed-task batches; best mean validation macro-F1 at epoch
  {meta["best_epoch"]} ({best["val_macro_f1"]}: {best_by_task}); {meta["train_seconds"]} s wall time.

## Test-split results
Macro-F1 averaged over the tasks: {summary["mean_macro_f1"]}. Headlines: each text's first line (topic's titles;
a review has one line, so its figure is the review's own). Calibration: a temperature per task fitted on its
validation split; test ECE at T = 1 → at T.

| task | dataset | test texts | accuracy | macro-F1 | headlines macro-F1 | temperature | ECE |
|---|---|---|---|---|---|---|---|
{_task_rows(summary, reports, meta)}

{_task_sections(reports)}

## What the experts do per task
Share of each task's test-split token assignments per expert, and the mutual information between task and expert in
that layer (bits; 0: the experts serve every task alike). Plot: `task_experts.png`.

| MoE layer | task | share per expert | task–expert MI (bits) |
|---|---|---|---|
{_share_rows(summary)}

`routing_profile.json` holds each task's validation-split expert distribution, which serving compares live traffic
with (drift per task). `moe-serve extract --model models/{out.name} --task T` writes one task as its own folder.

## Limits
- Each task is trained on one source and period; expect lower accuracy on other domains, and no meaningful answer
  for text outside a task's label set (every input gets one of that task's labels).
"""
    (out / "README.md").write_text(card)
