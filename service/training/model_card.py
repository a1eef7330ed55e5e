"""README.md model card written next to a trained model."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_model_card(
    out: Path, recipe: Any, report: dict[str, Any], meta: dict[str, Any], history: list[dict[str, Any]]
) -> None:
    m = recipe.model
    sizes = meta["split_sizes"]
    rows = "\n".join(
        f"| {lab} | {v['precision']:.4f} | {v['recall']:.4f} | {v['f1']:.4f} | {v.get('roc_auc', float('nan')):.4f} "
        f"| {v['support']} |"
        for lab, v in report["per_class"].items()
    )
    util = "\n".join(
        f"| {lay['layer']} | {' '.join(f'{s:.3f}' for s in lay['share'])} | {lay['imbalance_max_over_mean']} "
        f"| {lay['normalized_entropy']} |"
        for lay in report["expert_utilisation"]
    )
    card = f"""# {out.name}

Mixture-of-Experts text classifier trained by moe-serve (`moe-serve train`, recipe `{meta["recipe"]}`).

## Model
- Encoder: {m.n_layers} blocks, d_model {m.d_model}, {m.n_heads} attention heads, attention per block:
  {m.attention}; MoE feed-forward every {m.moe_every} block(s): {m.num_experts} experts of width {m.d_ff},
  top-{m.top_k} token-choice routing ({m.activation}); masked mean pooling; linear head.
- Tokenizer: WordPiece (HF `tokenizers`), lower-cased, trained on the training split, vocabulary {m.vocab_size}.
- Maximum length: {m.max_length} tokens. Longer texts are truncated to their first {m.max_length} tokens
  ({report["truncated_share"]:.0%} of the test texts were).
- Labels: {", ".join(report["labels"])}.

## Data
- Dataset: `{meta["dataset"]}`; fixed stratified split (seed {meta["split_seed"]}, fractions
  {meta["split_fractions"]}): train {sizes["train"]}, validation {sizes["validation"]}, test {sizes["test"]}.
- Training: {meta["epochs_run"]} epochs run, best validation macro-F1 at epoch {meta["best_epoch"]}
  ({history[meta["best_epoch"] - 1]["val_macro_f1"]}); {meta["train_seconds"]} s wall time.

## Test-split results
accuracy {report["accuracy"]:.4f}, macro-F1 {report["macro_f1"]:.4f}, macro precision {report["precision"]:.4f},
macro recall {report["recall"]:.4f}, macro one-vs-rest ROC-AUC {report["roc_auc"]}.

| class | precision | recall | F1 | ROC-AUC | support |
|---|---|---|---|---|---|
{rows}

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
